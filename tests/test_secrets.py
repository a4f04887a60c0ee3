"""No secret, token or raw body reaches the logs, whatever the path: genuine and forged
callbacks, status queries, creates and the API, with every logger at DEBUG."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from ipn.logs import CONTEXT_FIELDS, bound, configure_logging
from ipn.processing import run
from ipn.services import Services

from conftest import FAST_ENV, PROVIDER_ENV
from helpers import (
    CUBEPAY_IPN,
    FORM,
    PROVIDER_URL,
    bpg_snapshot,
    cubepay_query_answer,
    make_payment,
)

SECRETS = [
    value
    for name, value in PROVIDER_ENV.items()
    if name.endswith(("SECRET", "SECRET_KEY", "HMAC_KEY", "TOKEN_API_KEY", "API_KEY"))
]
SECRETS += [FAST_ENV["IPN_API_TOKEN"], FAST_ENV["IPN_SECRET_KEY"], "tok_5f2b9c"]
CUSTOMER_EMAIL = "jane.doe@example.com"
# What the settings hold, which the handler knows to redact (a payment's token is not there).
SETTINGS_SECRETS = [secret for secret in SECRETS if secret != "tok_5f2b9c"]


@pytest.fixture
def json_lines(app: Flask) -> Iterator[io.StringIO]:
    """The process's own handler, in JSON, at DEBUG: what a log collector would receive."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging(
        app.extensions["ipn"].settings.with_changes(log_format="json"),
        level=logging.DEBUG,
        stream=stream,
    )
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def test_no_secret_is_logged(
    client: FlaskClient,
    app: Flask,
    services: Services,
    provider_api: responses.RequestsMock,
    api_headers: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    json_lines: io.StringIO,
) -> None:
    assert len(SECRETS) >= 7
    # caplog sees the records as the code logged them, before any redaction: the code itself
    # must not log a secret; the redaction of our own handler is only the last line of defence.
    caplog.set_level(logging.DEBUG)
    make_payment(
        services.db, provider_payment_id="C1536678153791231775", callback_token="tok_5f2b9c"
    )
    provider_api.post(f"{PROVIDER_URL}/cubepay/payment/query", body=cubepay_query_answer(2))
    client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM)
    forged = bpg_snapshot("CONFIRMED")
    client.post(
        "/ipn/bitcoinpaygate/notification",
        data=forged,
        headers={"Content-Type": "application/json", "X-BPG-Signature": "00" * 20},
    )
    for notification_id in app.extensions["ipn.dispatcher"].submitted:
        run(services, notification_id, 0)
    provider_api.post(
        f"{PROVIDER_URL}/cryptoprocessing/api/payments/v1/requests",
        status=500,
        body="internal error",
    )
    client.post(
        "/api/payments",
        headers=api_headers,
        json={
            "provider": "cryptoprocessing",
            "order_id": "s-1",
            "amount": "1.00",
            "currency": "EUR",
        },
    )
    client.get("/api/notifications/1", headers=api_headers)
    client.get("/api/payments", headers={"Authorization": "Bearer wrong-token"})
    client.post(
        "/api/payments",
        headers=api_headers,
        json={
            "provider": "cryptoprocessing",
            "order_id": "s-2",
            "amount": "1.00",
            "currency": "EUR",
            "customer_email": CUSTOMER_EMAIL,
        },
    )
    records = [
        {name: getattr(record, name, None) for name in CONTEXT_FIELDS} for record in caplog.records
    ]
    logged = caplog.text + repr(records)
    written = json_lines.getvalue()
    parsed = [json.loads(line) for line in written.splitlines()]
    assert any(line.get("request_id") for line in parsed)
    assert any(line.get("notification_id") for line in parsed)
    assert logging.getLogger("ipn.processing").isEnabledFor(logging.DEBUG)
    assert "cubepay" in logged  # the logs did record these paths
    for text in (logged, written):
        for secret in SECRETS:
            assert secret not in text, f"a secret reached the logs: {secret[:3]}..."
        assert CUBEPAY_IPN.decode() not in text
        assert CUSTOMER_EMAIL not in text


def test_the_handler_redacts_what_the_code_should_never_have_logged(
    app: Flask, json_lines: io.StringIO
) -> None:
    log = logging.getLogger("ipn.test")
    with bound(order_id=f"for {CUSTOMER_EMAIL}"):
        for secret in SETTINGS_SECRETS:
            log.debug("leaked %s in a message", secret)
            log.debug("leaked in a message: " + secret)
        try:
            raise ValueError(f"secret {SETTINGS_SECRETS[0]} in an exception")
        except ValueError:
            log.exception("with a traceback")
        log.debug("an email: %s", CUSTOMER_EMAIL)
    written = json_lines.getvalue()
    lines = [json.loads(line) for line in written.splitlines()]
    assert len(lines) == 2 * len(SETTINGS_SECRETS) + 2
    assert "[redacted]" in lines[0]["message"]
    assert "[redacted]" in lines[-2]["exc_info"]
    assert "[email]" in lines[-1]["message"] and "[email]" in lines[-1]["order_id"]
    for secret in SETTINGS_SECRETS:
        assert secret not in written
    assert CUSTOMER_EMAIL not in written
