"""The merchant-event settings: read from the environment, refused in one line when they would
only fail at the first event, and a lax one said out loud as a server starts."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from ipn.config import Settings, warn_if_lax
from ipn.errors import ConfigurationError
from ipn.events import signing

BASE = {"DATABASE_URL": "sqlite:///:memory:"}


def test_defaults_and_overrides() -> None:
    events = Settings.from_env(BASE).events
    assert (events.webhook_url, events.webhook_secret, events.allow_private) == (None, None, False)
    assert events.retry_schedule == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert (events.connect_timeout, events.total_timeout) == (3.05, 10.0)
    assert events.disable_after == timedelta(days=5)
    assert events.secret_overlap == timedelta(hours=24)

    secret = signing.new_secret()
    events = Settings.from_env(
        {
            **BASE,
            "IPN_MERCHANT_WEBHOOK_URL": "https://shop.example/hooks",
            "IPN_MERCHANT_WEBHOOK_SECRET": secret,
            "IPN_MERCHANT_ALLOW_PRIVATE": "1",
            "IPN_EVENT_RETRY_SCHEDULE": "1, 2,3",
            "IPN_EVENT_TIMEOUT": "4",
            "IPN_MERCHANT_DISABLE_AFTER_HOURS": "1",
        }
    ).events
    assert (events.webhook_url, events.webhook_secret, events.allow_private) == (
        "https://shop.example/hooks",
        secret,
        True,
    )
    assert events.retry_schedule == (1, 2, 3)
    assert events.lease == timedelta(seconds=13)  # beyond any attempt of 4 s
    assert events.disable_after == timedelta(hours=1)
    assert secret not in repr(events)


@pytest.mark.parametrize(
    ("env", "words"),
    [
        (
            {"IPN_MERCHANT_WEBHOOK_URL": "https://shop.example/"},
            "needs IPN_MERCHANT_WEBHOOK_SECRET",
        ),
        ({"IPN_MERCHANT_WEBHOOK_SECRET": "hunter2"}, "whsec_ followed by base64"),
        ({"IPN_MERCHANT_WEBHOOK_SECRET": "whsec_not*base64"}, "whsec_ followed by base64"),
        ({"IPN_MERCHANT_WEBHOOK_SECRET": "whsec_c2hvcnQ="}, "24 to 64 bytes"),
        (
            {
                "IPN_MERCHANT_WEBHOOK_URL": "ftp://shop.example/",
                "IPN_MERCHANT_WEBHOOK_SECRET": signing.new_secret(),
            },
            "https:// URL",
        ),
        ({"IPN_MERCHANT_ALLOW_PRIVATE": "maybe"}, "IPN_MERCHANT_ALLOW_PRIVATE must be 1 or 0"),
        ({"IPN_EVENT_RETRY_SCHEDULE": "5,five"}, "IPN_EVENT_RETRY_SCHEDULE must look like"),
        ({"IPN_EVENT_TIMEOUT": "0"}, "IPN_EVENT_TIMEOUT must be positive"),
    ],
)
def test_bad_event_settings_stop_start_up_naming_the_variable(
    env: dict[str, str], words: str
) -> None:
    with pytest.raises(ConfigurationError, match=words) as caught:
        Settings.from_env({**BASE, **env})
    secret = env.get("IPN_MERCHANT_WEBHOOK_SECRET")
    if secret and secret.startswith("whsec_") and len(secret) > 20:
        assert secret not in str(caught.value)


def test_private_endpoints_are_said_out_loud(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        warn_if_lax(Settings.from_env(BASE))
    assert caplog.records == []
    with caplog.at_level(logging.WARNING):
        warn_if_lax(Settings.from_env({**BASE, "IPN_MERCHANT_ALLOW_PRIVATE": "1"}))
    [record] = caplog.records
    assert "IPN_MERCHANT_ALLOW_PRIVATE is on" in record.getMessage()
