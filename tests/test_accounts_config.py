"""IPN_ACCOUNTS_FILE: what it configures, and every way it can be wrong stopping start-up with
one line that names the table or key."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ipn.config import (
    BitcoinPaygateSettings,
    CoinbarPaySettings,
    CryptoProcessingSettings,
    CubePaySettings,
    PreviousSecret,
    Settings,
    settings_or_exit,
)
from ipn.errors import ConfigurationError, ForgedCallback
from ipn.providers import PROVIDER_CLASSES, Provider
from ipn.providers.base import Authenticity

from conftest import PROVIDER_ENV, ROOT
from helpers import (
    CUBEPAY_IPN,
    FORM,
    bpg_signature,
    coinbarpay_signature,
    coinbarpay_status,
    cryptoprocessing_callback,
    cryptoprocessing_headers,
)

BASE_ENV = {"IPN_CONSOLE": "0"}
GOOD = """
[cubepay.eur-shop]
client_id = "eur-id"
client_secret = "eur-secret"
api_url = "https://eur.cubepay.test/"
currency_ids = {EUR = 446, GBP = 445}
allowed_ips = ["203.0.113.7/24", "2001:db8::1"]
poll_limit = "60/minute"
previous_secrets = [{secret = "eur-old", valid_until = 2027-01-31T01:00:00+01:00}]

[cubepay.usd-shop]
client_id = "usd-id"
client_secret = "usd-secret"
poll_limit = "800/day"

[coinbarpay.default]
service_client_id = "coinbar-id"
secret_key = "coinbar-secret"
payment_timeout_minutes = 45
sign_empty_get = "empty"
"""


def load(tmp_path: Path, text: str, **env: str) -> Settings:
    path = tmp_path / "accounts.toml"
    path.write_text(text)
    return Settings.from_env({**BASE_ENV, **env, "IPN_ACCOUNTS_FILE": str(path)})


def test_the_file_configures_named_accounts_beside_the_environments(tmp_path: Path) -> None:
    settings = load(tmp_path, GOOD, CUBEPAY_CLIENT_ID="env-id", CUBEPAY_CLIENT_SECRET="env-secret")
    assert settings.account_names("cubepay") == ("default", "eur-shop", "usd-shop")
    assert settings.account_names("bitcoinpaygate") == ("default",)
    default = settings.account("cubepay")
    assert isinstance(default, CubePaySettings)
    assert (default.client_id, default.account) == ("env-id", "default")
    eur = settings.account("cubepay", "eur-shop")
    assert isinstance(eur, CubePaySettings)
    assert (eur.client_id, eur.client_secret, eur.account) == ("eur-id", "eur-secret", "eur-shop")
    assert eur.api_url == "https://eur.cubepay.test"
    assert (eur.currency_ids["EUR"], eur.currency_ids["GBP"], eur.currency_ids["BTC"]) == (
        446,
        445,
        2,
    )
    assert [str(n) for n in eur.allowed_ips] == ["203.0.113.0/24", "2001:db8::1/128"]
    assert eur.poll_limit == (60, "minute")
    assert eur.previous_secrets == (PreviousSecret("eur-old", datetime(2027, 1, 31, tzinfo=UTC)),)
    usd = settings.account("cubepay", "usd-shop")
    assert usd.poll_limit == (800, "day") and usd.previous_secrets == ()
    assert usd.api_url == "https://api.cubepay.io"
    # A file's `default` is the account behind today's path when the environment has none.
    coinbar = settings.coinbarpay
    assert isinstance(coinbar, CoinbarPaySettings)
    assert (coinbar.service_client_id, coinbar.account) == ("coinbar-id", "default")
    assert coinbar.payment_timeout == timedelta(minutes=45) and coinbar.empty_body_signs == ""
    with pytest.raises(KeyError):
        settings.account("cubepay", "gbp-shop")
    assert len(list(settings.all_accounts())) == 6


def test_without_a_file_there_is_one_account_per_provider_as_before() -> None:
    settings = Settings.from_env({**BASE_ENV, **PROVIDER_ENV})
    assert settings.accounts == {}
    for provider in PROVIDER_CLASSES:
        assert settings.account_names(provider) == ("default",)
        assert settings.account(provider) is settings.provider(provider)
        assert settings.account(provider).previous_secrets == ()


def test_the_environments_account_may_keep_one_replaced_secret() -> None:
    settings = Settings.from_env(
        {
            **BASE_ENV,
            **PROVIDER_ENV,
            "BITCOINPAYGATE_PREVIOUS_SECRET": "old-hmac",
            "BITCOINPAYGATE_PREVIOUS_SECRET_VALID_UNTIL": "2027-01-31T00:00:00Z",
        }
    )
    assert settings.bitcoinpaygate.previous_secrets == (
        PreviousSecret("old-hmac", datetime(2027, 1, 31, tzinfo=UTC)),
    )


ACCOUNT = '[cubepay.shop]\nclient_id = "id"\nclient_secret = "secret"\n'

# Each wrong file, and what the one line must say (besides the file's name).
WRONG = {
    "not TOML": ("[cubepay.shop\n", "not TOML"),
    "unknown provider": ('[paypal.shop]\nclient_id = "x"\n', "[paypal] is not a provider"),
    "provider not a table of tables": ('[cubepay]\nclient_id = "x"\n', "one table per account"),
    "upper-case name": (ACCOUNT.replace("shop", "Shop"), "[cubepay.Shop]: an account's name"),
    "name with a slash": (
        ACCOUNT.replace("cubepay.shop", 'cubepay."a/b"'),
        "[cubepay.a/b]: an account's name",
    ),
    "name too long": (ACCOUNT.replace("shop", "s" * 41), "at most 40"),
    "unknown key": (ACCOUNT + 'client_secrte = "x"\n', "unknown key 'client_secrte'"),
    "missing secret": (
        '[cubepay.shop]\nclient_id = "id"\n',
        "[cubepay.shop]: client_secret is missing",
    ),
    "empty secret": (ACCOUNT.replace('"secret"', '" "'), "client_secret is empty"),
    "missing coinbarpay key": (
        '[coinbarpay.shop]\nservice_client_id = "x"\n',
        "[coinbarpay.shop]: secret_key is missing",
    ),
    "missing cryptoprocessing key": (
        '[cryptoprocessing.shop]\nsecret = "x"\n',
        "[cryptoprocessing.shop]: api_key is missing",
    ),
    "secret not text": (ACCOUNT.replace('"secret"', "12.5"), "client_secret must be text"),
    "allowlist not a list": (
        ACCOUNT + 'allowed_ips = "10.0.0.0/8"\n',
        "allowed_ips must be a list",
    ),
    "allowlist not networks": (ACCOUNT + 'allowed_ips = ["nowhere"]\n', "allowed_ips"),
    "bad api url": (ACCOUNT + 'api_url = "ftp://x"\n', "api_url must be an http(s) URL"),
    "bad currency ids": (ACCOUNT + 'currency_ids = {EUR = "x"}\n', "currency_ids must be a table"),
    "bad poll limit": (ACCOUNT + 'poll_limit = "lots"\n', "poll_limit must look like 800/day"),
    "poll limit a week": (ACCOUNT + 'poll_limit = "5/week"\n', "poll_limit must look like"),
    "currency ids not a table": (
        ACCOUNT + 'currency_ids = "EUR=446"\n',
        "currency_ids must be a table",
    ),
    "previous not a list": (
        ACCOUNT + 'previous_secrets = "old"\n',
        "previous_secrets must look like",
    ),
    "previous without secret": (
        ACCOUNT + "previous_secrets = [{valid_until = 2027-01-31T00:00:00Z}]\n",
        "previous_secrets entry 1: secret is missing",
    ),
    "previous without expiry": (
        ACCOUNT + 'previous_secrets = [{secret = "old"}]\n',
        "entry 1: valid_until must be a time with its offset",
    ),
    "previous expiry without offset": (
        ACCOUNT + 'previous_secrets = [{secret = "old", valid_until = 2027-01-31T00:00:00}]\n',
        "valid_until must be a time with its offset",
    ),
    "previous expiry a date": (
        ACCOUNT + 'previous_secrets = [{secret = "old", valid_until = 2027-01-31}]\n',
        "valid_until must be a time with its offset",
    ),
    "previous with unknown key": (
        ACCOUNT
        + 'previous_secrets = [{secret = "a", valid_until = 2027-01-31T00:00:00Z}, '
        + '{secret = "b", valid_until = 2027-01-31T00:00:00Z, until = 1}]\n',
        "entry 2: unknown key 'until'",
    ),
    "previous without a signing key": (
        '[bitcoinpaygate.shop]\napi_key_name = "n"\napi_key_secret = "s"\n'
        'previous_secrets = [{secret = "old", valid_until = 2027-01-31T00:00:00Z}]\n',
        "previous_secrets replace hmac_key, which is not set",
    ),
    "two accounts, one client": (
        ACCOUNT + ACCOUNT.replace("shop", "other"),
        "[cubepay.shop] and [cubepay.other] have the same client_id",
    ),
    "two tables, one path": (ACCOUNT + ACCOUNT, "not TOML"),
}


@pytest.mark.parametrize(("text", "said"), WRONG.values(), ids=WRONG.keys())
def test_a_wrong_file_is_refused_naming_what_is_wrong(tmp_path: Path, text: str, said: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        load(tmp_path, text)
    message = str(refused.value)
    assert said in message
    assert message.startswith(f"IPN_ACCOUNTS_FILE {tmp_path / 'accounts.toml'}")
    assert "\n" not in message
    # No secret is ever repeated back.
    assert 'secret"' not in message and "eur-old" not in message


def test_the_environment_and_the_file_cannot_both_be_the_default_account(tmp_path: Path) -> None:
    text = '[cubepay.default]\nclient_id = "file-id"\nclient_secret = "file-secret"\n'
    with pytest.raises(ConfigurationError, match="both define the account at /ipn/cubepay"):
        load(tmp_path, text, CUBEPAY_CLIENT_ID="env-id")
    assert load(tmp_path, text).cubepay.client_id == "file-id"


def test_an_account_of_the_file_cannot_share_the_environments_client(tmp_path: Path) -> None:
    text = '[cubepay.eur]\nclient_id = "env-id"\nclient_secret = "other"\n'
    with pytest.raises(
        ConfigurationError, match=r"the CUBEPAY_\* variables and \[cubepay.eur\] have the same"
    ):
        load(tmp_path, text, CUBEPAY_CLIENT_ID="env-id", CUBEPAY_CLIENT_SECRET="s")


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot be read"):
        Settings.from_env({**BASE_ENV, "IPN_ACCOUNTS_FILE": str(tmp_path / "nowhere.toml")})


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"CUBEPAY_PREVIOUS_SECRET": "old"}, "must be set together"),
        ({"CUBEPAY_PREVIOUS_SECRET_VALID_UNTIL": "2027-01-31T00:00:00Z"}, "must be set together"),
        (
            {"CUBEPAY_PREVIOUS_SECRET": "old", "CUBEPAY_PREVIOUS_SECRET_VALID_UNTIL": "soon"},
            "CUBEPAY_PREVIOUS_SECRET_VALID_UNTIL must be a time with its offset",
        ),
        (
            {
                "CUBEPAY_PREVIOUS_SECRET": "old",
                "CUBEPAY_PREVIOUS_SECRET_VALID_UNTIL": "2027-01-31T00:00:00",
            },
            "with its offset",
        ),
    ],
)
def test_a_wrong_previous_secret_in_the_environment_is_refused(
    env: dict[str, str], said: str
) -> None:
    with pytest.raises(ConfigurationError, match=said):
        Settings.from_env({**BASE_ENV, **env})


def test_settings_or_exit_says_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "accounts.toml"
    path.write_text("[paypal.shop]\n")
    with pytest.raises(SystemExit) as stopped:
        settings_or_exit({**BASE_ENV, "IPN_ACCOUNTS_FILE": str(path)})
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("ipn: configuration error: IPN_ACCOUNTS_FILE")


# --- rotation, provider by provider, with the test vectors ------------------------------------

NOW = datetime(2026, 12, 1, tzinfo=UTC)
UNTIL = NOW + timedelta(days=30)


def rotated(provider: str, old: str) -> Provider:
    """The provider's adapter whose documented secret `old` has just been replaced."""
    classes = {
        "cubepay": CubePaySettings(client_id="exampleclientid", client_secret="new-secret"),
        "bitcoinpaygate": BitcoinPaygateSettings(
            api_key_name="n", api_key_secret="s", hmac_key="new-secret"
        ),
        "coinbarpay": CoinbarPaySettings(
            service_client_id="2cb63353-2541-4c4e-90d4-7bf1d4b42c5c", secret_key="new-secret"
        ),
        "cryptoprocessing": CryptoProcessingSettings(api_key="cp-api-key", secret="new-secret"),
    }
    settings = replace(classes[provider], previous_secrets=(PreviousSecret(old, UNTIL),))
    return PROVIDER_CLASSES[provider](settings)


BPG_BODY = (
    b'{"paymentId":"95bf1d853cf2e040f0ce219221f9b17206525941","status":"CONFIRMED",'
    b'"merchantTransactionId":"2015-03-10/123/1","currentTime":"2018-01-12T15:16:32Z"}'
)
COINBAR_BODY = coinbarpay_status("SUCCESS")
CP_BODY = cryptoprocessing_callback("paid", received="0.0094")


def signed_with(provider: str, secret: str) -> tuple[str, bytes, dict[str, str]]:
    """(kind, body, headers) of a callback signed with `secret`; the documented vector where
    the secret is the documented one."""
    if provider == "cubepay":
        assert secret == "exampleclientsecret"
        return "ipn", CUBEPAY_IPN, FORM
    if provider == "bitcoinpaygate":
        signature = bpg_signature(BPG_BODY, secret)
        if secret == "examplehmackey":
            assert signature == "2f63d990dd9703a3c92e8c9d6664c6bd78da8c9e"
        return "notification", BPG_BODY, {"X-BPG-Signature": signature}
    if provider == "coinbarpay":
        return "callback", COINBAR_BODY, {"SIGNATURE": coinbarpay_signature(COINBAR_BODY, secret)}
    return "callback", CP_BODY, cryptoprocessing_headers(CP_BODY, secret=secret)


DOCUMENTED = {
    "cubepay": "exampleclientsecret",
    "bitcoinpaygate": "examplehmackey",
    "coinbarpay": "your_secret_key",
    "cryptoprocessing": "AbCdEfG123456",
}


@pytest.mark.parametrize("provider", DOCUMENTED)
def test_each_provider_verifies_with_a_replaced_secret_until_it_expires(provider: str) -> None:
    adapter = rotated(provider, DOCUMENTED[provider])
    kind, body, headers = signed_with(provider, DOCUMENTED[provider])
    callback = adapter.read_callback(kind, body, headers, received_at=UNTIL - timedelta(seconds=1))
    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.verified_by == "previous until 2026-12-31T00:00:00Z"
    with pytest.raises(ForgedCallback):
        adapter.read_callback(kind, body, headers, received_at=UNTIL)
    # Without rotation, the documented secret is the current one.
    documented: dict[str, str] = {adapter.settings.signed_with: DOCUMENTED[provider]}
    current = PROVIDER_CLASSES[provider](
        replace(adapter.settings, previous_secrets=(), **documented)
    )
    assert current.read_callback(kind, body, headers).verified_by == "current"


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(
            [sys.executable, "-m", "gunicorn", "wsgi:app", "--bind", "127.0.0.1:0"], id="web"
        ),
        pytest.param([sys.executable, "-m", "celery", "-A", "workers.main", "worker"], id="worker"),
        pytest.param([sys.executable, "-m", "celery", "-A", "workers.main", "beat"], id="beat"),
        pytest.param([sys.executable, "-m", "ipn.cli", "db", "upgrade"], id="release"),
    ],
)
def test_no_process_starts_on_a_wrong_file(argv: list[str], tmp_path: Path) -> None:
    path = tmp_path / "accounts.toml"
    path.write_text('[cubepay.shop]\nclient_id = "id"\nclient_secret = "s"\n[stripe.x]\n')
    done = subprocess.run(
        argv,
        env={
            "PATH": "/usr/bin:/bin",
            **BASE_ENV,
            "IPN_ACCOUNTS_FILE": str(path),
            "IPN_DATA_DIR": str(tmp_path),
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        f"ipn: configuration error: IPN_ACCOUNTS_FILE {path}: [stripe] is not a provider "
        "(known: cubepay, bitcoinpaygate, coinbarpay, cryptoprocessing)"
    ]
    # Nothing was started, not even the database.
    assert not (tmp_path / "ipn.sqlite").exists()


def test_every_replaced_secret_still_valid_is_tried_in_turn() -> None:
    settings = CubePaySettings(
        client_id="exampleclientid",
        client_secret="new-secret",
        previous_secrets=(
            PreviousSecret("another-old-one", UNTIL),
            PreviousSecret("exampleclientsecret", UNTIL + timedelta(days=1)),
        ),
    )
    callback = PROVIDER_CLASSES["cubepay"](settings).read_callback(
        "ipn", CUBEPAY_IPN, FORM, received_at=NOW
    )
    assert callback.verified_by == "previous until 2027-01-01T00:00:00Z"


def test_without_a_time_of_receipt_a_replaced_secret_is_judged_now() -> None:
    def adapter(valid_until: datetime) -> Provider:
        previous = (PreviousSecret("exampleclientsecret", valid_until),)
        return PROVIDER_CLASSES["cubepay"](
            CubePaySettings(
                client_id="exampleclientid", client_secret="new", previous_secrets=previous
            )
        )

    now = datetime.now(UTC)
    assert adapter(now + timedelta(hours=1)).read_callback("ipn", CUBEPAY_IPN, FORM).verified_by
    with pytest.raises(ForgedCallback):
        adapter(now - timedelta(seconds=1)).read_callback("ipn", CUBEPAY_IPN, FORM)
