"""Several merchant accounts per provider: each with its own callback path, credentials and
payments, and secrets replaced without losing what was signed with the old one."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from ipn import replay
from ipn.app import create_app
from ipn.config import Settings
from ipn.inbox import store_callback
from ipn.logs import secret_values
from ipn.processing import process_notification
from ipn.providers.cubepay import sign
from ipn.reconcile import check_payment, reconcile_due
from ipn.services import Services
from models import (
    MerchantEvent,
    Notification,
    NotificationStatus,
    Payment,
    PaymentStatus,
    ReplayMode,
)

from conftest import PROVIDER_URL, Backend, clean
from helpers import (
    CUBEPAY_IPN,
    FORM,
    count,
    cryptoprocessing_callback,
    cryptoprocessing_headers,
    cubepay_query_answer,
    load_payment,
    make_payment,
    notification,
)

EUR_URL = f"{PROVIDER_URL}/cubepay-eur"
ACCOUNTS = f"""
[cubepay.eur-shop]
client_id = "eurclientid"
client_secret = "eurclientsecret"
api_url = "{EUR_URL}"

[cryptoprocessing.usd-shop]
api_key = "usd-api-key"
secret = "usd-secret"
api_url = "{PROVIDER_URL}/cryptoprocessing-usd"
"""


def cubepay_ipn(
    client_id: str, secret: str, *, order_id: str = "M12345678", token: str = "tok_5f2b9c"
) -> bytes:
    """A CubePay IPN as cubepay.md lays it out, signed with `secret`."""
    fields = {
        "client_id": client_id,
        "source_coin_id": "443",
        "source_amount": "500",
        "item_name": "Test item name",
        "merchant_transaction_id": order_id,
        "other": token,
        "send_coin_id": "",
        "send_amount": "",
        "receive_address": "",
    }
    return urllib.parse.urlencode({**fields, "sign": sign(fields, secret)}).encode()


def accounts_settings(backend: Backend, tmp_path: Path, text: str = ACCOUNTS) -> Settings:
    path = tmp_path / "accounts.toml"
    path.write_text(text)
    return Settings.from_env({**backend.env, "IPN_ACCOUNTS_FILE": str(path)})


@pytest.fixture
def settings(backend: Backend, tmp_path: Path) -> Settings:
    clean(backend.db)
    return accounts_settings(backend, tmp_path)


def created_answer(payment_id: str, order_id: str) -> dict[str, Any]:
    return {
        "status": 200,
        "data": {
            "id": payment_id,
            "status": 0,
            "pay_url": f"https://pay.example/{payment_id}",
            "pay_info": {
                "coin": {"id": 2, "symbol": "BTC"},
                "address": "bc1qexampleaddress",
                "amount": "0.01",
                "paid_amount": "0",
                "merchant_transaction_id": order_id,
                "source_coin": {"id": 443, "symbol": "TWD"},
                "source_amount": "500",
            },
        },
    }


def create(client: FlaskClient, headers: dict[str, str], **fields: str) -> Any:
    """POST /api/payments of a CubePay payment, `fields` on top of a valid one."""
    body = {
        "provider": "cubepay",
        "order_id": "1001",
        "amount": "500",
        "currency": "TWD",
        "pay_currency": "BTC",
        **fields,
    }
    return client.post("/api/payments", json=body, headers=headers)


def form(request: Any) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(request.body, keep_blank_values=True))


def signed_by(fields: dict[str, str], secret: str) -> bool:
    return fields["sign"] == sign({k: v for k, v in fields.items() if k != "sign"}, secret)


def verified_by_previous(client: FlaskClient, account: str) -> float:
    """What /metrics says of callbacks verified by a replaced secret of the account."""
    labels = {"provider": "cubepay", "account": account, "secret": "previous"}
    for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True)):
        for sample in family.samples:
            if sample.name == "ipn_callbacks_verified_total" and sample.labels == labels:
                return float(sample.value)
    return 0.0


# --- two CubePay accounts ---------------------------------------------------------------------


def test_each_account_has_its_callback_path_and_the_payment_knows_its_account(
    client: FlaskClient, services: Services, api_headers: dict[str, str], provider_api: Any
) -> None:
    for url, payment_id in ((EUR_URL, "C-eur-1"), (f"{PROVIDER_URL}/cubepay", "C-default-1")):
        # Asked first whether an earlier attempt created it; then created.
        provider_api.post(f"{url}/payment/query", json={"status": 404, "data": "not found"})
        provider_api.post(f"{url}/payment/coin", json=created_answer(payment_id, "1001"))
    # The same order id in two shops is two payments, each created with its account's keys.
    made = {}
    for account in ("eur-shop", "default"):
        answer = create(client, api_headers, account=account)
        assert answer.status_code == 201, answer.get_json()
        made[account] = answer.get_json()
    assert made["eur-shop"]["account"] == "eur-shop"
    assert made["default"]["account"] == "default"
    sent = {call.request.url: form(call.request) for call in provider_api.calls}
    eur_create = sent[f"{EUR_URL}/payment/coin"]
    default_create = sent[f"{PROVIDER_URL}/cubepay/payment/coin"]
    assert eur_create["client_id"] == "eurclientid"
    assert signed_by(eur_create, "eurclientsecret")
    assert eur_create["ipn_url"] == "http://localhost:8000/ipn/cubepay/eur-shop"
    assert default_create["client_id"] == "exampleclientid"
    assert signed_by(default_create, "exampleclientsecret")
    assert default_create["ipn_url"] == "http://localhost:8000/ipn/cubepay"
    assert signed_by(sent[f"{EUR_URL}/payment/query"], "eurclientsecret")

    # Once per account: a second create of the same order in the same shop is a conflict.
    again = create(client, api_headers, account="eur-shop")
    assert again.status_code == 409
    assert "account eur-shop" in again.get_json()["error"]

    listed = client.get("/api/payments?account=eur-shop", headers=api_headers).get_json()
    assert [p["id"] for p in listed["items"]] == [made["eur-shop"]["id"]]
    # The shop is told whose payment it is.
    with services.db.sessions() as session:
        created = session.scalars(
            select(MerchantEvent).where(MerchantEvent.payment_id == made["eur-shop"]["id"])
        ).one()
    assert json.loads(created.body)["data"]["account"] == "eur-shop"


def test_unknown_account_is_refused_naming_the_field(
    client: FlaskClient, api_headers: dict[str, str], provider_api: Any
) -> None:
    answer = create(client, api_headers, account="gbp-shop")
    assert answer.status_code == 422
    assert answer.get_json()["field"] == "account"
    assert "default, eur-shop" in answer.get_json()["error"]
    assert len(provider_api.calls) == 0
    # An account of another provider is no account of this one.
    answer = create(client, api_headers, account="usd-shop")
    assert answer.status_code == 422
    for query in (
        "/api/payments?account=gbp-shop",
        "/api/notifications?account=gbp-shop",
        "/api/payments?provider=cubepay&account=usd-shop",
    ):
        assert client.get(query, headers=api_headers).status_code == 400, query


def test_a_callback_to_an_account_that_does_not_exist_is_not_stored(
    client: FlaskClient, services: Services
) -> None:
    answer = client.post("/ipn/cubepay/gbp-shop", data=CUBEPAY_IPN, headers=FORM)
    assert answer.status_code == 404
    assert "gbp-shop" in answer.get_data(as_text=True)
    assert client.get("/ipn/cubepay/eur-shop").status_code == 405
    assert count(services.db, Notification) == 0


def post(client: FlaskClient, app: Flask, path: str, body: bytes) -> int:
    answer = client.post(path, data=body, headers=FORM)
    assert answer.status_code == 200 and answer.get_data() == b"success"
    submitted: list[int] = app.extensions["ipn.dispatcher"].submitted
    return submitted[-1]


@pytest.mark.parametrize(
    ("path", "body", "expected", "why"),
    [
        # The documented vector, signed for the default account, on its path.
        ("/ipn/cubepay", CUBEPAY_IPN, NotificationStatus.PROCESSED, None),
        # The same bytes on the other account's path: not that account's client or secret.
        ("/ipn/cubepay/eur-shop", CUBEPAY_IPN, NotificationStatus.REJECTED, "client_id is not"),
        # The other account's callback, signed with its own secret, on its own path.
        (
            "/ipn/cubepay/eur-shop",
            cubepay_ipn("eurclientid", "eurclientsecret"),
            NotificationStatus.PROCESSED,
            None,
        ),
        # Its client id, signed with the default account's secret: the sign does not verify.
        (
            "/ipn/cubepay/eur-shop",
            cubepay_ipn("eurclientid", "exampleclientsecret"),
            NotificationStatus.REJECTED,
            "sign does not verify",
        ),
        (
            "/ipn/cubepay",
            cubepay_ipn("eurclientid", "eurclientsecret"),
            NotificationStatus.REJECTED,
            "client_id is not",
        ),
        # The default's client id with the other account's secret, on the default's path.
        (
            "/ipn/cubepay",
            cubepay_ipn("exampleclientid", "eurclientsecret"),
            NotificationStatus.REJECTED,
            "sign does not verify",
        ),
    ],
)
def test_a_callback_verifies_only_with_its_accounts_secret(
    client: FlaskClient,
    app: Flask,
    services: Services,
    provider_api: Any,
    path: str,
    body: bytes,
    expected: NotificationStatus,
    why: str | None,
) -> None:
    default = make_payment(services.db, callback_token="tok_5f2b9c")
    eur = make_payment(services.db, account="eur-shop", callback_token="tok_5f2b9c")
    for url in (f"{PROVIDER_URL}/cubepay/payment/query", f"{EUR_URL}/payment/query"):
        provider_api.post(url, body=cubepay_query_answer(2))
    notification_id = post(client, app, path, body)
    outcome = process_notification(services, notification_id)
    row = notification(services.db, notification_id)
    assert row.status is expected, row.outcome
    assert row.account == ("default" if path == "/ipn/cubepay" else "eur-shop")
    if why is not None:
        assert why in (row.last_error or "")
        assert row.verified_by is None
        assert len(provider_api.calls) == 0
        return
    # Asked with the account's own credentials, about the account's own payment.
    (call,) = provider_api.calls
    asked = form(call.request)
    if path == "/ipn/cubepay":
        assert call.request.url.startswith(f"{PROVIDER_URL}/cubepay/")
        assert asked["client_id"] == "exampleclientid"
        assert outcome.payment_id == default.id
    else:
        assert call.request.url.startswith(f"{EUR_URL}/")
        assert asked["client_id"] == "eurclientid"
        assert signed_by(asked, "eurclientsecret")
        assert outcome.payment_id == eur.id
    assert row.verified_by == "current"


def test_reconciliation_asks_with_each_payments_account(
    services: Services, provider_api: Any
) -> None:
    default = make_payment(services.db, order_id="A-1", next_check_at=datetime.now(UTC))
    eur = make_payment(
        services.db, account="eur-shop", order_id="A-1", next_check_at=datetime.now(UTC)
    )
    provider_api.post(
        f"{PROVIDER_URL}/cubepay/payment/query", body=cubepay_query_answer(2, order_id="A-1")
    )
    provider_api.post(f"{EUR_URL}/payment/query", body=cubepay_query_answer(0, order_id="A-1"))
    for payment in (default, eur):
        check_payment(services, payment.id, force=True)
    asked = {call.request.url: form(call.request)["client_id"] for call in provider_api.calls}
    assert asked == {
        f"{PROVIDER_URL}/cubepay/payment/query": "exampleclientid",
        f"{EUR_URL}/payment/query": "eurclientid",
    }
    assert load_payment(services.db, default.id).status is PaymentStatus.PAID
    assert load_payment(services.db, eur.id).status is PaymentStatus.PENDING


def test_each_account_spends_its_own_call_budget(
    backend: Backend, tmp_path: Path, provider_api: Any
) -> None:
    clean(backend.db)
    budgeted = ACCOUNTS.replace(
        'api_url = "' + EUR_URL, 'poll_limit = "1/minute"\napi_url = "' + EUR_URL
    )
    settings = accounts_settings(backend, tmp_path, budgeted)
    settings = settings.with_changes(poll_limits={"cubepay": (2, "minute")})
    services = Services.from_settings(settings)
    due = datetime.now(UTC) - timedelta(minutes=1)
    for n in range(3):
        make_payment(services.db, order_id=f"D-{n}", next_check_at=due)
        make_payment(services.db, order_id=f"E-{n}", account="eur-shop", next_check_at=due)
    provider_api.post(f"{PROVIDER_URL}/cubepay/payment/query", body=cubepay_query_answer(0))
    provider_api.post(f"{EUR_URL}/payment/query", body=cubepay_query_answer(0))
    report = reconcile_due(services)
    calls = [call.request.url for call in provider_api.calls]
    assert calls.count(f"{PROVIDER_URL}/cubepay/payment/query") == 2
    assert calls.count(f"{EUR_URL}/payment/query") == 1
    assert report.skipped_budget == 3
    services.db.engine.dispose()


def test_an_account_removed_from_the_file_leaves_its_rows_to_replay(
    backend: Backend, services: Services, app: Flask, client: FlaskClient
) -> None:
    notification_id = post(
        client, app, "/ipn/cubepay/eur-shop", cubepay_ipn("eurclientid", "eurclientsecret")
    )
    without = Services.from_settings(backend.settings())
    outcome = process_notification(without, notification_id)
    assert outcome.status is NotificationStatus.IGNORED
    assert "cubepay has no account named 'eur-shop'" in outcome.message
    without.db.engine.dispose()


# --- rotation ---------------------------------------------------------------------------------

VALID_UNTIL = datetime(2027, 1, 31, tzinfo=UTC)
ROTATED = f"""
[cubepay.eur-shop]
client_id = "eurclientid"
client_secret = "eurclientsecret-2"
api_url = "{EUR_URL}"
previous_secrets = [
    {{secret = "eurclientsecret-0", valid_until = 2026-12-01T00:00:00Z}},
    {{secret = "eurclientsecret", valid_until = 2027-01-31T00:00:00Z}},
]

[cryptoprocessing.usd-shop]
api_key = "usd-api-key"
secret = "usd-secret-2"
previous_secrets = [{{secret = "usd-secret", valid_until = 2027-01-31T00:00:00+00:00}}]
"""


@pytest.fixture
def rotated_app(backend: Backend, tmp_path: Path) -> Iterator[Flask]:
    clean(backend.db)
    app = create_app(accounts_settings(backend, tmp_path, ROTATED))
    yield app
    app.extensions["ipn"].db.engine.dispose()


@pytest.fixture
def rotated(rotated_app: Flask) -> Services:
    services: Services = rotated_app.extensions["ipn"]
    return services


@pytest.mark.parametrize(
    ("secret", "received_at", "verified_by"),
    [
        ("eurclientsecret-2", VALID_UNTIL + timedelta(days=400), "current"),
        (
            "eurclientsecret",
            VALID_UNTIL - timedelta(seconds=1),
            "previous until 2027-01-31T00:00:00Z",
        ),
        # Past its expiry the old secret verifies nothing, however the callback is signed.
        ("eurclientsecret", VALID_UNTIL, None),
        (
            "eurclientsecret-0",
            datetime(2026, 11, 30, tzinfo=UTC),
            "previous until 2026-12-01T00:00:00Z",
        ),
        ("eurclientsecret-0", datetime(2026, 12, 1, tzinfo=UTC), None),
        ("never-configured", VALID_UNTIL - timedelta(days=30), None),
    ],
)
def test_a_callback_signed_with_a_replaced_secret_verifies_until_that_secret_expires(
    rotated_app: Flask,
    rotated: Services,
    provider_api: Any,
    secret: str,
    received_at: datetime,
    verified_by: str | None,
) -> None:
    make_payment(rotated.db, account="eur-shop", callback_token="tok_5f2b9c")
    provider_api.post(f"{EUR_URL}/payment/query", body=cubepay_query_answer(2))
    scraper = rotated_app.test_client()
    before = verified_by_previous(scraper, "eur-shop")
    notification_id = store_callback(
        rotated.db,
        "cubepay",
        "ipn",
        cubepay_ipn("eurclientid", secret),
        FORM,
        "127.0.0.1",
        received_at=received_at,
        account="eur-shop",
    )
    outcome = process_notification(rotated, notification_id)
    row = notification(rotated.db, notification_id)
    assert row.verified_by == verified_by
    after = verified_by_previous(scraper, "eur-shop")
    if verified_by is None:
        assert outcome.status is NotificationStatus.REJECTED
        assert "sign does not verify" in (row.last_error or "")
        assert after == before
    else:
        assert outcome.status is NotificationStatus.PROCESSED, outcome.message
        assert after == before + (verified_by != "current")
    # The status query is always signed with the current secret.
    for call in provider_api.calls:
        asked = form(call.request)
        assert signed_by(asked, "eurclientsecret-2")


def test_rotation_without_a_status_api_applies_what_the_old_secret_signed(
    rotated: Services,
) -> None:
    """CryptoProcessing has no status API: the verified callback is the evidence, so the
    secret that verified it is all there is between a forgery and a payment."""
    body = cryptoprocessing_callback("paid", received="0.0094", foreign_id="order-9")
    old = cryptoprocessing_headers(body, secret="usd-secret", key="usd-api-key")
    stored, late = (
        store_callback(
            rotated.db,
            "cryptoprocessing",
            "callback",
            body,
            old,
            None,
            received_at=VALID_UNTIL + hours,
            account="usd-shop",
        )
        for hours in (timedelta(hours=-1), timedelta(hours=1))
    )
    assert process_notification(rotated, stored).status is NotificationStatus.PROCESSED
    assert notification(rotated.db, stored).verified_by == "previous until 2027-01-31T00:00:00Z"
    assert process_notification(rotated, late).status is NotificationStatus.REJECTED
    assert count(rotated.db, Payment) == 1


def test_a_row_rejected_under_a_wrong_secret_is_processed_by_replay_once_fixed(
    backend: Backend, tmp_path: Path, provider_api: Any
) -> None:
    clean(backend.db)
    wrong = Services.from_settings(
        accounts_settings(backend, tmp_path, ACCOUNTS.replace('"eurclientsecret"', '"mistyped"'))
    )
    make_payment(wrong.db, account="eur-shop", callback_token="tok_5f2b9c")
    notification_id = store_callback(
        wrong.db,
        "cubepay",
        "ipn",
        cubepay_ipn("eurclientid", "eurclientsecret"),
        FORM,
        None,
        account="eur-shop",
    )
    assert process_notification(wrong, notification_id).status is NotificationStatus.REJECTED
    fixed = Services.from_settings(accounts_settings(backend, tmp_path))
    replay.replay(fixed, [notification_id], ReplayMode.STORED, lambda _: None)
    provider_api.post(f"{EUR_URL}/payment/query", body=cubepay_query_answer(2))
    assert process_notification(fixed, notification_id).status is NotificationStatus.PROCESSED
    assert notification(fixed.db, notification_id).verified_by == "current"
    wrong.db.engine.dispose()
    fixed.db.engine.dispose()


def test_a_secret_in_the_accounts_file_never_reaches_the_logs(
    backend: Backend, tmp_path: Path
) -> None:
    values = secret_values(accounts_settings(backend, tmp_path, ROTATED))
    for secret in (
        "eurclientsecret-2",
        "eurclientsecret",
        "eurclientsecret-0",
        "usd-secret-2",
        "usd-secret",
        "usd-api-key",
        "exampleclientsecret",
    ):
        assert secret in values
    assert "eurclientid" not in values


# --- the command line -------------------------------------------------------------------------


def test_the_command_line_filters_and_creates_by_account(
    app: Flask, client: FlaskClient, services: Services
) -> None:
    default_row = post(client, app, "/ipn/cubepay", CUBEPAY_IPN)
    eur_row = post(
        client, app, "/ipn/cubepay/eur-shop", cubepay_ipn("eurclientid", "eurclientsecret")
    )
    cli = app.test_cli_runner()
    listed = cli.invoke(args=["notifications", "list", "--account", "eur-shop", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [(row["id"], row["account"]) for row in rows] == [(eur_row, "eur-shop")]
    replayed = cli.invoke(args=["replay", "--account", "default", "--dry-run", "--json"])
    assert json.loads(replayed.output)["ids"] == [default_row]
    shown = cli.invoke(args=["notifications", "show", str(eur_row)])
    assert "account: eur-shop" in shown.output
    table = cli.invoke(args=["notifications", "list", "--account", "eur-shop"]).output
    assert table.split()[:4] == ["id", "provider", "account", "kind"]
    assert table.splitlines()[1].split()[:3] == [str(eur_row), "cubepay", "eur-shop"]

    for args in (
        ["notifications", "list", "--account", "gbp-shop"],
        ["replay", "--provider", "cryptoprocessing", "--account", "eur-shop"],
    ):
        refused = cli.invoke(args=args)
        assert refused.exit_code == 2, args
        assert "--account" in refused.output and "configured:" in refused.output
    refused = cli.invoke(
        args=[
            "payments",
            "create",
            "--provider",
            "cubepay",
            "--account",
            "gbp-shop",
            "--order-id",
            "1",
            "--amount",
            "5",
            "--currency",
            "TWD",
            "--pay-currency",
            "BTC",
        ]
    )
    assert refused.exit_code == 2
    assert "--account" in refused.output and "default, eur-shop" in refused.output

    make_payment(services.db, order_id="1001")
    make_payment(services.db, order_id="1001", account="eur-shop")
    ambiguous = cli.invoke(args=["payments", "show", "1001"])
    assert ambiguous.exit_code == 1
    assert "cubepay account eur-shop" in ambiguous.output


# --- an existing deployment -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_rows_from_before_accounts_belong_to_the_default_account(kind: str, tmp_path: Path) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    from ipn import migrate
    from ipn.db import Database

    from conftest import _postgres_database

    drop = None
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    else:
        url, drop = _postgres_database(tmp_path)
    db = Database(url)
    try:
        migrate.upgrade(db, "0008_alerts")
        with db.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO payments (id, provider, order_id, status, version, created_at,"
                    " updated_at, expiry_inferred, adopted, checks, poll_failures, event_sequence)"
                    " VALUES ('pay_old', 'cubepay', '1001', 'paid', 1, :now, :now, false, false,"
                    " 0, 0, 0)"
                ),
                {"now": datetime.now(UTC)},
            )
            connection.execute(
                text(
                    "INSERT INTO provider_calls (provider, period, calls)"
                    " VALUES ('cubepay', 'day:x', 7)"
                )
            )
        migrate.upgrade(db)
        with db.engine.begin() as connection:
            assert (
                connection.execute(text("SELECT account FROM payments")).scalar_one() == "default"
            )
            assert (
                connection.execute(text("SELECT account FROM provider_calls")).scalar_one()
                == "default"
            )
        # The same order id in another account is a payment of its own; in the same, refused.
        make_payment(db, id="pay_eur", order_id="1001", account="eur-shop")
        with pytest.raises(IntegrityError):
            make_payment(db, id="pay_again", order_id="1001")
    finally:
        db.engine.dispose()
        if drop:
            drop()
