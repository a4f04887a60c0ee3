"""The worker's pipeline for each provider, run in-process: genuine callbacks move payments,
forged and malformed ones are kept and change nothing, unknown statuses open anomalies, and
duplicates, stale snapshots and late funds never move a payment backwards."""

from __future__ import annotations

import json
import logging
import threading
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import pytest
import redis
import responses
from flask import Flask
from flask.testing import FlaskClient

from ipn import create_app
from ipn.config import Settings
from ipn.processing import process_notification, run
from ipn.providers.coinbarpay import encrypt_legacy_token
from ipn.services import Services
from ipn.sweeper import sweep_inbox
from models import AnomalyKind, EventSource, NotificationStatus, PaymentStatus
from workers.tasks import process_notifications

from conftest import Backend, RecordingDispatcher
from faults_support import forget_queue, free_port
from helpers import (
    CUBEPAY_IPN,
    FORM,
    JSON,
    PROVIDER_URL,
    anomalies,
    bpg_signature,
    bpg_snapshot,
    coinbarpay_signature,
    coinbarpay_status,
    cryptoprocessing_callback,
    cryptoprocessing_headers,
    cubepay_query_answer,
    events,
    later,
    load_payment,
    make_payment,
    notification,
)

BPG_ID = "95bf1d853cf2e040f0ce219221f9b17206525941"
BPG_STATUS_URL = f"{PROVIDER_URL}/bitcoinpaygate/v2/payments/{BPG_ID}"
CUBEPAY_QUERY_URL = f"{PROVIDER_URL}/cubepay/payment/query"
COINBAR_STATUS_URL = (
    f"{PROVIDER_URL}/coinbarpay/coinbar/api/v2/pay/gateway/payment/order-1001/status"
)


def deliver(
    client: FlaskClient,
    app: Flask,
    services: Services,
    path: str,
    body: bytes,
    headers: dict[str, str],
) -> Any:
    response = client.post(path, data=body, headers=headers)
    assert (response.status_code, response.get_data()) == (200, b"success")
    notification_id = app.extensions["ipn.dispatcher"].submitted[-1]
    process_notification(services, notification_id)
    return notification(services.db, notification_id)


def assert_rejected_without_effect(
    services: Services, row: Any, payment: Any, provider_api: responses.RequestsMock | None
) -> None:
    """Kept and rejected with its reason; the payment untouched; the provider never asked."""
    assert row.status is NotificationStatus.REJECTED
    assert row.last_error
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    assert events(services.db, payment.id) == []
    if provider_api is not None:
        assert len(provider_api.calls) == 0


# --- CubePay ------------------------------------------------------------------------------


def cubepay_payment(services: Services, **fields: Any) -> Any:
    values = {
        "provider_payment_id": "C1536678153791231775",
        "callback_token": "tok_5f2b9c",
        "pay_amount": Decimal("0.01"),
        "pay_currency": "BTC",
        **fields,
    }
    return make_payment(services.db, **values)


def test_cubepay_genuine_ipn_confirmed_by_query_makes_payment_paid(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = cubepay_payment(services)
    provider_api.post(CUBEPAY_QUERY_URL, body=cubepay_query_answer(2))
    row = deliver(client, app, services, "/ipn/cubepay", CUBEPAY_IPN, FORM)
    assert row.status is NotificationStatus.PROCESSED
    assert row.payment_id == payment.id
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    assert load_payment(services.db, payment.id).paid_amount == Decimal("0.01")
    [event] = events(services.db, payment.id)
    assert (event.from_status, event.to_status) == (PaymentStatus.PENDING, PaymentStatus.PAID)
    assert event.source is EventSource.CALLBACK
    assert event.notification_id == row.id
    assert f"ipn #{row.id}" in event.detail and "status query" in event.detail
    # The query asked by the provider's id, signed: nothing from the IPN body was trusted.
    [call] = provider_api.calls
    assert "id=C1536678153791231775" in str(call.request.body)


def test_cubepay_partial_payment_is_underpaid(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = cubepay_payment(services)
    provider_api.post(CUBEPAY_QUERY_URL, body=cubepay_query_answer(2, paid="0.004"))
    deliver(client, app, services, "/ipn/cubepay", CUBEPAY_IPN, FORM)
    assert load_payment(services.db, payment.id).status is PaymentStatus.UNDERPAID


@pytest.mark.parametrize(
    "body",
    [
        CUBEPAY_IPN.replace(b"source_amount=500", b"source_amount=501"),  # one byte changed
        CUBEPAY_IPN.replace(b"sign=5E25AF", b"sign=5E25AE"),  # signature one byte off
        CUBEPAY_IPN.replace(b"client_id=exampleclientid", b"client_id=someoneelse"),
        CUBEPAY_IPN.replace(b"other=tok_5f2b9c", b"other=tok_guess1"),  # changes sign too
    ],
    ids=["body-byte", "sign-byte", "foreign-client", "token"],
)
def test_cubepay_forged_ipn_is_kept_rejected_and_changes_nothing(
    client: FlaskClient,
    app: Flask,
    services: Services,
    provider_api: responses.RequestsMock,
    body: bytes,
) -> None:
    payment = cubepay_payment(services)
    row = deliver(client, app, services, "/ipn/cubepay", body, FORM)
    assert_rejected_without_effect(services, row, payment, provider_api)
    assert row.body == body
    assert "forged" in (row.last_error or "")


def test_cubepay_wrong_per_payment_token_with_valid_sign_is_rejected(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    """The IPN is signed correctly, but echoes a token that is not this payment's."""
    payment = cubepay_payment(services, callback_token="tok_other")
    row = deliver(client, app, services, "/ipn/cubepay", CUBEPAY_IPN, FORM)
    assert_rejected_without_effect(services, row, payment, provider_api)
    assert "token" in (row.last_error or "")


def test_cubepay_unknown_status_changes_nothing_and_opens_one_anomaly(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = cubepay_payment(services)
    provider_api.post(CUBEPAY_QUERY_URL, body=cubepay_query_answer(42))
    for _ in range(3):
        row = deliver(client, app, services, "/ipn/cubepay", CUBEPAY_IPN, FORM)
        assert row.status is NotificationStatus.PROCESSED
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    [anomaly] = anomalies(services.db)
    assert anomaly.kind is AnomalyKind.UNKNOWN_STATUS
    assert anomaly.payment_id == payment.id
    assert anomaly.evidence["provider_status"] == "42"
    [event] = events(services.db, payment.id)
    assert event.from_status == event.to_status == PaymentStatus.PENDING


def test_cubepay_unknown_payment_is_adopted_from_the_providers_answer(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    provider_api.post(CUBEPAY_QUERY_URL, body=cubepay_query_answer(2))
    row = deliver(client, app, services, "/ipn/cubepay", CUBEPAY_IPN, FORM)
    assert row.status is NotificationStatus.PROCESSED
    adopted = load_payment(services.db, row.payment_id)
    assert adopted.adopted and adopted.order_id == "M12345678"
    assert (adopted.amount, adopted.currency) == (Decimal("500"), "TWD")
    assert adopted.status is PaymentStatus.PAID
    first, second = events(services.db, adopted.id)
    assert first.from_status is None and "adopted" in first.detail
    assert (second.from_status, second.to_status) == (PaymentStatus.PENDING, PaymentStatus.PAID)


def test_paid_with_a_different_amount_is_an_anomaly_not_paid(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = cubepay_payment(services, amount=Decimal("400"))
    provider_api.post(CUBEPAY_QUERY_URL, body=cubepay_query_answer(2))
    deliver(client, app, services, "/ipn/cubepay", CUBEPAY_IPN, FORM)
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    [anomaly] = anomalies(services.db)
    assert anomaly.kind is AnomalyKind.AMOUNT_MISMATCH


def test_provider_outage_leaves_the_row_received_for_a_retry(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = cubepay_payment(services)
    provider_api.post(CUBEPAY_QUERY_URL, status=503, body=b"down")
    client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM)
    [notification_id] = app.extensions["ipn.dispatcher"].submitted
    from ipn.processing import run

    _message, countdown = run(services, notification_id, retries_so_far=0)
    assert countdown is not None and countdown > 0
    row = notification(services.db, notification_id)
    assert row.status is NotificationStatus.RECEIVED
    assert "503" in (row.last_error or "")
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    # The last permitted retry gives up: the row is failed with its error, nothing applied.
    _message, countdown = run(
        services, notification_id, retries_so_far=services.settings.task_max_retries
    )
    assert countdown is None
    row = notification(services.db, notification_id)
    assert row.status is NotificationStatus.FAILED
    assert "503" in (row.last_error or "")
    assert events(services.db, payment.id) == []


# --- BitcoinPaygate -------------------------------------------------------------------------


def bpg_payment(services: Services) -> Any:
    return make_payment(
        services.db,
        provider="bitcoinpaygate",
        order_id="2015-03-10/123/1",
        provider_payment_id=BPG_ID,
        amount=Decimal("10.00"),
        currency="USD",
    )


def bpg_headers(body: bytes, key: str = "examplehmackey") -> dict[str, str]:
    return {**JSON, "X-BPG-Signature": bpg_signature(body, key)}


def test_bitcoinpaygate_signature_vector_verifies_through_the_endpoint(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    body = (
        b'{"paymentId":"95bf1d853cf2e040f0ce219221f9b17206525941","status":"CONFIRMED",'
        b'"merchantTransactionId":"2015-03-10/123/1","currentTime":"2018-01-12T15:16:32Z"}'
    )
    headers = {**JSON, "X-BPG-Signature": "2f63d990dd9703a3c92e8c9d6664c6bd78da8c9e"}
    payment = bpg_payment(services)
    provider_api.get(BPG_STATUS_URL, body=bpg_snapshot("CONFIRMED"))
    row = deliver(client, app, services, "/ipn/bitcoinpaygate/notification", body, headers)
    assert row.status is NotificationStatus.PROCESSED
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID


@pytest.mark.parametrize("forge", ["byte", "key", "missing"])
def test_bitcoinpaygate_forged_notification_is_rejected(
    client: FlaskClient,
    app: Flask,
    services: Services,
    provider_api: responses.RequestsMock,
    forge: str,
) -> None:
    payment = bpg_payment(services)
    body = bpg_snapshot("CONFIRMED")
    headers = bpg_headers(body, "wrongkey" if forge == "key" else "examplehmackey")
    if forge == "byte":
        body = body.replace(b'"amount":10.00', b'"amount":10.01')
    if forge == "missing":
        del headers["X-BPG-Signature"]
    row = deliver(client, app, services, "/ipn/bitcoinpaygate/notification", body, headers)
    assert_rejected_without_effect(services, row, payment, provider_api)


def test_bitcoinpaygate_stale_snapshot_never_moves_backwards(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = bpg_payment(services)
    provider_api.get(
        BPG_STATUS_URL, body=bpg_snapshot("CONFIRMED", current_time="2018-01-12T15:20:00Z")
    )
    new = bpg_snapshot("CONFIRMED", current_time="2018-01-12T15:20:00Z")
    deliver(client, app, services, "/ipn/bitcoinpaygate/notification", new, bpg_headers(new))
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    # An older UNCONFIRMED snapshot arrives late: recorded, ignored, no query needed.
    old = bpg_snapshot("UNCONFIRMED", current_time="2018-01-12T15:10:00Z")
    calls_before = len(provider_api.calls)
    row = deliver(client, app, services, "/ipn/bitcoinpaygate/notification", old, bpg_headers(old))
    assert row.status is NotificationStatus.PROCESSED
    assert len(provider_api.calls) == calls_before
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    _changed, stale = events(services.db, payment.id)
    assert stale.from_status == stale.to_status == PaymentStatus.PAID
    assert "stale" in stale.detail


def test_bitcoinpaygate_out_of_order_answer_is_recorded_not_applied(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    """The status API itself answers an earlier state (no clock to compare): forward only."""
    payment = bpg_payment(services)
    body = bpg_snapshot("CONFIRMED")
    provider_api.get(BPG_STATUS_URL, body=bpg_snapshot("CONFIRMED"))
    deliver(client, app, services, "/ipn/bitcoinpaygate/notification", body, bpg_headers(body))
    provider_api.replace(
        responses.GET,
        BPG_STATUS_URL,
        body=bpg_snapshot("UNCONFIRMED", current_time="2018-01-12T15:30:00Z"),
    )
    deliver(client, app, services, "/ipn/bitcoinpaygate/notification", body, bpg_headers(body))
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    assert "backwards" in events(services.db, payment.id)[-1].detail


def test_bitcoinpaygate_paid_after_expired_is_an_anomaly(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = bpg_payment(services)
    body = bpg_snapshot("EXPIRED")
    provider_api.get(BPG_STATUS_URL, body=bpg_snapshot("EXPIRED"))
    deliver(client, app, services, "/ipn/bitcoinpaygate/notification", body, bpg_headers(body))
    assert load_payment(services.db, payment.id).status is PaymentStatus.EXPIRED
    provider_api.replace(
        responses.GET,
        BPG_STATUS_URL,
        body=bpg_snapshot("CONFIRMED", current_time="2018-01-12T16:00:00Z"),
    )
    deliver(client, app, services, "/ipn/bitcoinpaygate/notification", body, bpg_headers(body))
    assert load_payment(services.db, payment.id).status is PaymentStatus.EXPIRED
    [anomaly] = anomalies(services.db)
    assert anomaly.kind is AnomalyKind.LATE_PAYMENT


def test_bitcoinpaygate_anomaly_notification_is_recorded_once_and_changes_nothing(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = bpg_payment(services)
    body = (
        b'{"paymentId":"%s","merchantTransactionId":"2015-03-10/123/1","paidBtc":0.5,'
        b'"btcTransactions":[{"btcTxId":"bb5af4","btcAmount":0.5,'
        b'"time":"2018-05-01T08:52:18.233Z"}],"notificationType":"ANOMALY"}' % BPG_ID.encode()
    )
    for _ in range(2):
        row = deliver(client, app, services, "/ipn/bitcoinpaygate/anomaly", body, bpg_headers(body))
        assert row.status is NotificationStatus.PROCESSED
    [anomaly] = anomalies(services.db)
    assert anomaly.kind is AnomalyKind.UNEXPECTED_FUNDS
    assert anomaly.payment_id == payment.id
    assert anomaly.evidence["verified"] is True
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    assert len(provider_api.calls) == 0


# --- CoinbarPay -----------------------------------------------------------------------------


def coinbar_payment(services: Services) -> Any:
    return make_payment(
        services.db,
        provider="coinbarpay",
        order_id="order-1001",
        amount=Decimal("8.99"),
        currency="EUR",
    )


def coinbar_headers(body: bytes, secret: str = "your_secret_key") -> dict[str, str]:
    return {
        **JSON,
        "SIGNATURE": coinbarpay_signature(body, secret),
        "CBPAY-API-KEY": "2cb63353-2541-4c4e-90d4-7bf1d4b42c5c",
    }


def test_coinbarpay_callback_is_settled_by_the_status_api(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = coinbar_payment(services)
    body = coinbarpay_status("SUCCESS")
    provider_api.get(COINBAR_STATUS_URL, body=coinbarpay_status("SUCCESS"))
    row = deliver(client, app, services, "/ipn/coinbarpay", body, coinbar_headers(body))
    assert row.status is NotificationStatus.PROCESSED
    paid = load_payment(services.db, payment.id)
    assert paid.status is PaymentStatus.PAID
    assert paid.pay_amount == Decimal("0.00045145423250897323")
    # SUCCESS then FAILED: the money went back.
    provider_api.replace(responses.GET, COINBAR_STATUS_URL, body=coinbarpay_status("FAILED"))
    deliver(client, app, services, "/ipn/coinbarpay", body, coinbar_headers(body))
    assert load_payment(services.db, payment.id).status is PaymentStatus.REFUNDED


def test_coinbarpay_legacy_token_callback_verifies_and_is_confirmed(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = coinbar_payment(services)
    token = encrypt_legacy_token(
        b'{"payment_request_id_client":"order-1001","status":"SUCCESS",'
        b'"payment_id_coinbar":"499f5adb-5911-4d1f-8642-2c53c24075d9",'
        b'"payment_detail":{"total_price":8.99}}',
        "0123456789abcdef0123456789abcdef",
        "fedcba9876543210",
    )
    body = (
        '{"responseToken":"%s","serviceClientId":"2cb63353-2541-4c4e-90d4-7bf1d4b42c5c",'
        '"timestamp":1700000000000}' % token
    ).encode()
    provider_api.get(COINBAR_STATUS_URL, body=coinbarpay_status("SUCCESS"))
    row = deliver(client, app, services, "/ipn/coinbarpay", body, JSON)
    assert row.status is NotificationStatus.PROCESSED
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID


@pytest.mark.parametrize("forge", ["byte", "key", "client", "token"])
def test_coinbarpay_forged_callback_is_rejected(
    client: FlaskClient,
    app: Flask,
    services: Services,
    provider_api: responses.RequestsMock,
    forge: str,
) -> None:
    payment = coinbar_payment(services)
    body = coinbarpay_status("SUCCESS")
    headers = coinbar_headers(body, "not_the_secret" if forge == "key" else "your_secret_key")
    if forge == "byte":
        body = body.replace(b'"total_price":8.99', b'"total_price":9.99')
    if forge == "client":
        headers["CBPAY-API-KEY"] = "someone-else"
    if forge == "token":
        body = (
            b'{"responseToken":"bm90IGEgdG9rZW4=","serviceClientId":'
            b'"2cb63353-2541-4c4e-90d4-7bf1d4b42c5c","timestamp":1}'
        )
        headers = JSON
    row = deliver(client, app, services, "/ipn/coinbarpay", body, headers)
    assert_rejected_without_effect(services, row, payment, provider_api)


def test_coinbarpay_unknown_status_opens_an_anomaly(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = coinbar_payment(services)
    body = coinbarpay_status("SUCCESS")
    provider_api.get(COINBAR_STATUS_URL, body=coinbarpay_status("ON_HOLD"))
    deliver(client, app, services, "/ipn/coinbarpay", body, coinbar_headers(body))
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    assert [a.kind for a in anomalies(services.db)] == [AnomalyKind.UNKNOWN_STATUS]


# --- CryptoProcessing -----------------------------------------------------------------------


def cp_payment(services: Services, **fields: Any) -> Any:
    values = {
        "provider": "cryptoprocessing",
        "order_id": "order_12345",
        "amount": Decimal("0.3"),
        "currency": "ETH",
        **fields,
    }
    return make_payment(services.db, **values)


def test_cryptoprocessing_signature_vector_and_callbacks_move_the_payment(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    from ipn.providers.cryptoprocessing import signature

    assert signature(b'{"currency":"BTC","foreign_id":"123456"}', "AbCdEfG123456") == (
        "03c25fcf7cd35e7d995e402cd5d51edd72d48e1471e865907967809a0c189ba55b90815f20e2bb10"
        "f82c7a9e9d865546fda58989c2ae9e8e2ff7bc29195fa1ec"
    )
    payment = cp_payment(services)
    steps = [
        ("processing", "0.004", PaymentStatus.UNDERPAID),
        ("processing", "0.0094", PaymentStatus.CONFIRMING),
        ("paid", "0.0094", PaymentStatus.PAID),
    ]
    for status, received, expected in steps:
        body = cryptoprocessing_callback(status, received=received)
        deliver(
            client, app, services, "/ipn/cryptoprocessing", body, cryptoprocessing_headers(body)
        )
        assert load_payment(services.db, payment.id).status is expected
    assert [e.to_status for e in events(services.db, payment.id)] == [
        PaymentStatus.UNDERPAID,
        PaymentStatus.CONFIRMING,
        PaymentStatus.PAID,
    ]


@pytest.mark.parametrize(("end", "shows"), [("failed", "0"), ("failed", "0.005"), ("expired", "0")])
def test_cryptoprocessing_an_end_sent_before_the_full_money_changes_nothing(
    client: FlaskClient, app: Flask, services: Services, end: str, shows: str
) -> None:
    """CryptoProcessing's callbacks carry no time. A `paid` showing the full amount, refused
    because it is for another amount, leaves the payment pending with the money seen; a
    `failed` or `expired` showing less, arriving after it, was sent before it: no change."""
    payment = cp_payment(services, pay_amount=Decimal("0.0094"))
    paid = cryptoprocessing_callback("paid", received="0.0094", amount="0.4")
    row = deliver(
        client, app, services, "/ipn/cryptoprocessing", paid, cryptoprocessing_headers(paid)
    )
    assert "not marked paid" in (row.outcome or "")
    [mismatch] = anomalies(services.db)
    assert mismatch.kind is AnomalyKind.AMOUNT_MISMATCH

    late = cryptoprocessing_callback(end, received=shows)
    row = deliver(
        client, app, services, "/ipn/cryptoprocessing", late, cryptoprocessing_headers(late)
    )
    assert row.status is NotificationStatus.PROCESSED
    assert (row.outcome or "").startswith(
        f"older callback: it shows {shows} received, the full 0.0094 was already seen"
    ), row.outcome
    held = load_payment(services.db, payment.id)
    assert (held.status, held.paid_amount) == (PaymentStatus.PENDING, Decimal("0.0094"))
    assert [e.to_status for e in events(services.db, payment.id)] == [PaymentStatus.PENDING] * 2

    # The same end showing the full amount is the provider's word after it: it ends the payment.
    final = cryptoprocessing_callback(end, received="0.0094")
    deliver(client, app, services, "/ipn/cryptoprocessing", final, cryptoprocessing_headers(final))
    assert load_payment(services.db, payment.id).status is PaymentStatus(end)


@pytest.mark.parametrize("forge", ["byte", "key", "missing", "foreign-key"])
def test_cryptoprocessing_forged_callback_is_rejected(
    client: FlaskClient, app: Flask, services: Services, forge: str
) -> None:
    payment = cp_payment(services)
    body = cryptoprocessing_callback("paid", received="0.0094")
    headers = cryptoprocessing_headers(
        body,
        secret="wrong" if forge == "key" else "AbCdEfG123456",
        key="not-ours" if forge == "foreign-key" else "cp-api-key",
    )
    if forge == "byte":
        body = body.replace(b'"amount":"0.3"', b'"amount":"0.4"')
    if forge == "missing":
        del headers["X-Processing-Signature"]
    row = deliver(client, app, services, "/ipn/cryptoprocessing", body, headers)
    assert_rejected_without_effect(services, row, payment, None)


def test_cryptoprocessing_unknown_status_and_other_types(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    payment = cp_payment(services)
    body = cryptoprocessing_callback("restricted")
    deliver(client, app, services, "/ipn/cryptoprocessing", body, cryptoprocessing_headers(body))
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    assert [a.kind for a in anomalies(services.db)] == [AnomalyKind.UNKNOWN_STATUS]
    deposit = cryptoprocessing_callback("confirmed", kind="deposit")
    row = deliver(
        client, app, services, "/ipn/cryptoprocessing", deposit, cryptoprocessing_headers(deposit)
    )
    assert row.status is NotificationStatus.IGNORED
    assert "deposit" in (row.outcome or "")


def test_duplicate_callbacks_have_one_effect(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    payment = cp_payment(services)
    body = cryptoprocessing_callback("paid", received="0.0094")
    rows = [
        deliver(
            client, app, services, "/ipn/cryptoprocessing", body, cryptoprocessing_headers(body)
        )
        for _ in range(5)
    ]
    assert all(row.status is NotificationStatus.PROCESSED for row in rows)
    [event] = events(services.db, payment.id)
    assert event.to_status is PaymentStatus.PAID
    assert [row.outcome for row in rows[1:]] == ["duplicate: already paid"] * 4


# --- every provider -------------------------------------------------------------------------

MALFORMED = [
    b"{not json",
    b"\xff\xfe invalid utf-8",
    b"[1, 2, 3]",
    b'"just a string"',
    b"[" * 30_000 + b"]" * 30_000,
    b"",
]


@pytest.mark.parametrize(
    "path",
    [
        "/ipn/cubepay",
        "/ipn/bitcoinpaygate/notification",
        "/ipn/coinbarpay",
        "/ipn/cryptoprocessing",
    ],
)
@pytest.mark.parametrize(
    "body", MALFORMED, ids=["json", "utf8", "array", "string", "deep", "empty"]
)
def test_malformed_bodies_are_rejected_without_effect(
    client: FlaskClient,
    app: Flask,
    services: Services,
    provider_api: responses.RequestsMock,
    path: str,
    body: bytes,
) -> None:
    headers = {
        **JSON,
        "X-BPG-Signature": bpg_signature(body),
        "SIGNATURE": coinbarpay_signature(body),
        **cryptoprocessing_headers(body),
    }
    row = deliver(client, app, services, path, body, headers)
    assert row.status is NotificationStatus.REJECTED
    assert row.last_error
    assert len(provider_api.calls) == 0
    assert anomalies(services.db) == []


def test_unconfigured_provider_stores_and_ignores_then_replays(
    settings: Any, provider_api: responses.RequestsMock
) -> None:
    from ipn import create_app
    from ipn.replay import replay
    from models import ReplayMode

    from conftest import RecordingDispatcher

    app = create_app(settings.with_changes(cryptoprocessing=settings.cryptoprocessing.__class__()))
    app.extensions["ipn.dispatcher"] = RecordingDispatcher()
    services = app.extensions["ipn"]
    payment = cp_payment(services)
    body = cryptoprocessing_callback("paid", received="0.0094")
    row = deliver(
        app.test_client(),
        app,
        services,
        "/ipn/cryptoprocessing",
        body,
        cryptoprocessing_headers(body),
    )
    assert row.status is NotificationStatus.IGNORED
    assert "not configured" in (row.outcome or "")
    # Configured later, the stored row replays into its effect.
    configured = Services.from_settings(settings)
    replay(configured, [row.id], ReplayMode.STORED, lambda _id: None, requested_by="cli")
    process_notification(configured, row.id)
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    replayed = events(services.db, payment.id)[-1]
    assert replayed.source is EventSource.REPLAY
    # The timeline says who asked for the replay.
    assert f"replay of callback #{row.id} by cli" in replayed.detail
    app.extensions["ipn"].db.engine.dispose()
    configured.db.engine.dispose()


def test_allowlist_rejects_other_senders(settings: Any) -> None:
    import ipaddress

    from ipn import create_app

    from conftest import RecordingDispatcher

    allow = (ipaddress.ip_network("198.51.100.0/24"),)
    app = create_app(
        settings.with_changes(
            cryptoprocessing=settings.cryptoprocessing.__class__(
                api_key="cp-api-key", secret="AbCdEfG123456", allowed_ips=allow
            )
        )
    )
    app.extensions["ipn.dispatcher"] = RecordingDispatcher()
    services = app.extensions["ipn"]
    payment = cp_payment(services)
    body = cryptoprocessing_callback("paid", received="0.0094")
    client = app.test_client()
    client.post(
        "/ipn/cryptoprocessing",
        data=body,
        headers=cryptoprocessing_headers(body),
        environ_base={"REMOTE_ADDR": "203.0.113.7"},
    )
    [outsider] = app.extensions["ipn.dispatcher"].submitted
    process_notification(services, outsider)
    assert notification(services.db, outsider).status is NotificationStatus.REJECTED
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    client.post(
        "/ipn/cryptoprocessing",
        data=body,
        headers=cryptoprocessing_headers(body),
        environ_base={"REMOTE_ADDR": "198.51.100.20"},
    )
    process_notification(services, app.extensions["ipn.dispatcher"].submitted[-1])
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    services.db.engine.dispose()


def test_two_workers_on_one_row_settle_it_once(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    """Both claim the row before either settles it (a redelivered message racing the first):
    one applies and settles, the other finds the row settled and rolls its own work back."""
    payment = cubepay_payment(services)
    both_asked = threading.Barrier(2, timeout=10)

    def answer(_request: Any) -> tuple[int, dict[str, str], bytes]:
        both_asked.wait()
        return 200, {}, cubepay_query_answer(2)

    provider_api.add_callback(responses.POST, CUBEPAY_QUERY_URL, callback=answer)
    client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM)
    [notification_id] = app.extensions["ipn.dispatcher"].submitted
    outcomes: list[Any] = []
    workers = [
        threading.Thread(
            target=lambda: outcomes.append(process_notification(services, notification_id))
        )
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(o.message for o in outcomes) == [
        "pending -> paid",
        "settled meanwhile by another worker",
    ]
    row = notification(services.db, notification_id)
    assert (row.status, row.outcome, row.attempts) == (
        NotificationStatus.PROCESSED,
        "pending -> paid",
        2,
    )
    assert len(events(services.db, payment.id)) == 1


# --- Failed attempts: the row keeps why; a permanent error settles it at once -----------------


def stored_cubepay_ipn(client: FlaskClient, app: Flask, body: bytes = CUBEPAY_IPN) -> int:
    response = client.post("/ipn/cubepay", data=body, headers=FORM)
    assert (response.status_code, response.get_data()) == (200, b"success")
    notification_id: int = app.extensions["ipn.dispatcher"].submitted[-1]
    return notification_id


def test_a_transient_failure_keeps_its_type_message_and_traceback(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    cubepay_payment(services)
    provider_api.post(CUBEPAY_QUERY_URL, status=503, body=b"down")
    notification_id = stored_cubepay_ipn(client, app)

    _message, countdown = run(services, notification_id, retries_so_far=0)
    assert countdown is not None
    row = notification(services.db, notification_id)
    assert row.status is NotificationStatus.RECEIVED
    assert (row.last_error or "").startswith("ProviderUnavailable: ") and "503" in row.last_error
    assert "Traceback" in (row.last_traceback or "")
    assert "ProviderUnavailable" in (row.last_traceback or "")


def test_a_bug_settles_the_row_failed_at_once_with_its_traceback(
    client: FlaskClient,
    app: Flask,
    services: Services,
    provider_api: responses.RequestsMock,
    monkeypatch: pytest.MonkeyPatch,
    api_headers: dict[str, str],
) -> None:
    payment = cubepay_payment(services)
    provider_api.post(CUBEPAY_QUERY_URL, body=cubepay_query_answer(2))

    def broken(*_args: Any) -> Any:
        raise ZeroDivisionError("a bug in the mapping")

    monkeypatch.setattr(services.providers["cubepay"], "decide", broken)
    notification_id = stored_cubepay_ipn(client, app)

    message, countdown = run(services, notification_id, retries_so_far=0)
    assert countdown is None, "a bug is not retried"
    assert "ZeroDivisionError" in message
    row = notification(services.db, notification_id)
    assert row.status is NotificationStatus.FAILED
    assert row.attempts == 1
    assert row.last_error == "ZeroDivisionError: a bug in the mapping"
    assert "Traceback" in (row.last_traceback or "") and "broken" in (row.last_traceback or "")
    assert row.processed_at is not None and row.next_attempt_at is None
    # An operator reads why, over the API and in the terminal.
    shown = client.get(f"/api/notifications/{notification_id}", headers=api_headers).get_json()
    assert shown["traceback"] == row.last_traceback
    assert shown["last_error"] == "ZeroDivisionError: a bug in the mapping"
    printed = app.test_cli_runner().invoke(args=["notifications", "show", str(notification_id)])
    assert printed.exit_code == 0
    assert "    traceback:" in printed.output and 'raise ZeroDivisionError("a bug' in printed.output
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    assert events(services.db, payment.id) == []
    # Settled: the sweeper never picks it up again, let alone marks it dead without an attempt.
    report = sweep_inbox(services, lambda _id: None, now=later(hours=2))
    assert (report.requeued, report.dead) == ([], [])


@pytest.mark.parametrize("lost", ["interface-error", "invalidated-connection"])
def test_a_lost_database_connection_is_retried_not_failed(
    client: FlaskClient,
    app: Flask,
    services: Services,
    monkeypatch: pytest.MonkeyPatch,
    lost: str,
) -> None:
    from sqlalchemy.exc import DBAPIError, InterfaceError

    def answer(_ref: Any) -> Any:
        if lost == "interface-error":
            raise InterfaceError("SELECT 1", {}, Exception("connection already closed"))
        raise DBAPIError("SELECT 1", {}, Exception("server closed"), connection_invalidated=True)

    cubepay_payment(services)
    monkeypatch.setattr(services.providers["cubepay"], "fetch_status", answer)
    notification_id = stored_cubepay_ipn(client, app)

    _message, countdown = run(services, notification_id, retries_so_far=0)
    assert countdown is not None
    row = notification(services.db, notification_id)
    assert row.status is NotificationStatus.RECEIVED
    assert row.last_traceback


def test_an_answer_the_money_column_cannot_hold_fails_at_once(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    """The status answer has 28 decimals (the column keeps 24): asking again gives the same."""
    payment = cubepay_payment(services)
    provider_api.post(CUBEPAY_QUERY_URL, body=cubepay_query_answer(2, paid="0." + "1" * 28))
    notification_id = stored_cubepay_ipn(client, app)

    _message, countdown = run(services, notification_id, retries_so_far=0)
    assert countdown is None
    row = notification(services.db, notification_id)
    assert row.status is NotificationStatus.FAILED
    assert row.attempts == 1
    assert "more than 24 decimals" in (row.last_error or "")
    assert "pay_info.paid_amount" in (row.last_error or "")
    assert row.last_traceback
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    assert events(services.db, payment.id) == []


def test_a_database_refusal_while_applying_settles_the_row_failed(
    client: FlaskClient,
    app: Flask,
    services: Services,
    provider_api: responses.RequestsMock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever slips past the adapters' checks (here a snapshot the money type refuses) is a
    permanent error on both backends: failed with the database's words, nothing applied."""
    from ipn import processing
    from ipn.providers.base import Snapshot

    payment = cubepay_payment(services)
    too_fine = Decimal("0." + "1" * 30)

    def answer(_ref: Any) -> Snapshot:
        return Snapshot("2", order_id="M12345678", paid_amount=too_fine, pay_amount=too_fine)

    monkeypatch.setattr(services.providers["cubepay"], "fetch_status", answer)
    notification_id = stored_cubepay_ipn(client, app)

    outcome = processing.process_notification(services, notification_id)
    assert outcome.status is NotificationStatus.FAILED
    row = notification(services.db, notification_id)
    assert row.status is NotificationStatus.FAILED
    assert (row.last_error or "").startswith("StatementError: ValueError: money has more than")
    assert "[SQL:" not in (row.last_error or "")
    assert row.last_traceback
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING


# --- Poison input: ids and amounts no column can keep are refused where they are read ---------

POISON_IDS = {
    "nul": ("M1234\x005678", "NUL byte"),
    "lone-surrogate": ("M1234\udc805678", "lone surrogate"),
    "control": ("M1234\n5678", "control character"),
    "oversized": ("M" * 256, "more than 255"),
}


def deliver_by_run(
    client: FlaskClient, app: Flask, services: Services, path: str, body: bytes, headers: Any
) -> Any:
    """Store through the endpoint, then one attempt as the task makes it."""
    response = client.post(path, data=body, headers=headers)
    assert (response.status_code, response.get_data()) == (200, b"success")
    notification_id = app.extensions["ipn.dispatcher"].submitted[-1]
    _message, countdown = run(services, notification_id, retries_so_far=0)
    assert countdown is None, "poison is never retried"
    return notification(services.db, notification_id)


def assert_refused_poison(services: Services, row: Any, expected: str) -> None:
    assert row.status is NotificationStatus.REJECTED, (row.status, row.last_error)
    assert (row.last_error or "").startswith("malformed: ")
    assert expected in (row.last_error or "")
    assert "\x00" not in row.last_error
    assert row.attempts == 1
    # Settled for good: no sweep retries it or buries it as dead.
    report = sweep_inbox(services, lambda _id: None, now=later(hours=2))
    assert (report.requeued, report.dead) == ([], [])


@pytest.mark.parametrize(
    ("shape", "poison"),
    # A form body is UTF-8 bytes: only JSON's escapes can carry a lone surrogate.
    [("form", p) for p in POISON_IDS if p != "lone-surrogate"] + [("json", p) for p in POISON_IDS],
)
def test_cubepay_unsigned_ipn_with_a_poison_order_id_is_rejected(
    client: FlaskClient,
    app: Flask,
    services: Services,
    provider_api: responses.RequestsMock,
    poison: str,
    shape: str,
) -> None:
    """Only the public client id is needed to send one; it must not jam the worker."""
    order_id, expected = POISON_IDS[poison]
    fields = {"client_id": "exampleclientid", "merchant_transaction_id": order_id}
    if shape == "form":
        body, headers = urlencode(fields).encode(), FORM
    else:
        body, headers = json.dumps(fields).encode(), JSON
    row = deliver_by_run(client, app, services, "/ipn/cubepay", body, headers)
    assert_refused_poison(services, row, expected)
    assert len(provider_api.calls) == 0


@pytest.mark.parametrize("poison", POISON_IDS)
def test_coinbarpay_unsigned_callback_with_a_poison_order_id_is_rejected(
    client: FlaskClient,
    app: Flask,
    services: Services,
    provider_api: responses.RequestsMock,
    poison: str,
) -> None:
    order_id, expected = POISON_IDS[poison]
    body = json.dumps(
        {
            "payment_id_coinbar": "499f5adb-5911-4d1f-8642-2c53c24075d9",
            "payment_request_id_client": order_id,
            "service_client_id": "2cb63353-2541-4c4e-90d4-7bf1d4b42c5c",
            "status": "SUCCESS",
        }
    ).encode()
    row = deliver_by_run(client, app, services, "/ipn/coinbarpay", body, JSON)
    assert_refused_poison(services, row, expected)
    assert len(provider_api.calls) == 0


@pytest.mark.parametrize(
    ("received", "expected"),
    [
        ("1e999", "beyond the 24 integer digits"),
        ("1" + "0" * 40, "beyond the 24 integer digits"),
        ("0." + "1" * 25, "more than 24 decimals"),
    ],
    ids=["1e999", "10^40", "25-decimals"],
)
@pytest.mark.parametrize("written", ["string", "number"])
def test_cryptoprocessing_signed_callback_with_an_amount_beyond_the_column_is_rejected(
    client: FlaskClient,
    app: Flask,
    services: Services,
    received: str,
    expected: str,
    written: str,
) -> None:
    payment = cp_payment(services)
    body = cryptoprocessing_callback("paid", received=received)
    if written == "number":
        body = body.replace(f'"{received}"'.encode(), received.encode())
    row = deliver_by_run(
        client, app, services, "/ipn/cryptoprocessing", body, cryptoprocessing_headers(body)
    )
    assert_refused_poison(services, row, expected)
    assert "currency_sent.received_amount" in (row.last_error or "")
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    assert events(services.db, payment.id) == []


def test_amounts_at_the_columns_limits_are_kept_exactly(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    """24 integer digits and 24 decimals fit; zeros beyond the 24th decimal change nothing."""
    payment = cp_payment(services)
    received = "9" * 24 + "." + "9" * 24
    body = cryptoprocessing_callback("paid", received=received, expected="0.0094" + "0" * 30)
    row = deliver_by_run(
        client, app, services, "/ipn/cryptoprocessing", body, cryptoprocessing_headers(body)
    )
    assert row.status is NotificationStatus.PROCESSED, row.last_error
    stored = load_payment(services.db, payment.id)
    assert stored.paid_amount == Decimal(received)
    assert stored.pay_amount == Decimal("0.0094")


# --- Several ids in one message (workers.tasks.process_notifications) --------------------------


def queued(app: Flask) -> list[dict[str, Any]]:
    """The messages waiting in the app's own queue, first published first."""
    settings = app.extensions["ipn"].settings
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return [json.loads(raw) for raw in reversed(client.lrange(settings.queue, 0, -1))]
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_ids_sent_together_are_each_processed_and_a_retry_goes_out_alone(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    """One message: the first id applied, the second's status query refused (postponed and
    published on its own as its first retry, in a countdown), the third rejected as forged."""
    payment = cubepay_payment(services)
    provider_api.post(CUBEPAY_QUERY_URL, body=cubepay_query_answer(2))
    provider_api.post(CUBEPAY_QUERY_URL, status=503, body=b"down")
    first = stored_cubepay_ipn(client, app)
    second = stored_cubepay_ipn(client, app)
    forged = stored_cubepay_ipn(client, app, CUBEPAY_IPN.replace(b"sign=5E25AF", b"sign=5E25AE"))
    forget_queue(services.settings.redis_url, services.settings.queue)
    try:
        with app.app_context():
            summary = process_notifications.run([first, second, forged])
        [retry] = queued(app)
    finally:
        forget_queue(services.settings.redis_url, services.settings.queue)

    rows = [notification(services.db, i) for i in (first, second, forged)]
    assert [row.status for row in rows] == [
        NotificationStatus.PROCESSED,
        NotificationStatus.RECEIVED,
        NotificationStatus.REJECTED,
    ]
    assert "503" in (rows[1].last_error or "") and rows[1].next_attempt_at is not None
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    headers = retry["headers"]
    assert (headers["task"], headers["argsrepr"], headers["retries"]) == (
        "ipn.process_notification",
        f"[{second}]",
        1,
    )
    assert headers["eta"] is not None
    assert [f"{i}: " in summary for i in (first, second, forged)] == [True, True, True]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_retry_the_broker_refuses_is_left_for_the_sweeper(
    backend: Backend,
    settings: Settings,
    provider_api: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis gone when a retry is published: the message's other ids still run, and the row
    keeps its next attempt for the sweeper."""
    app = create_app(backend.settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    app.extensions["ipn.dispatcher"] = RecordingDispatcher()
    services = app.extensions["ipn"]
    payment = cubepay_payment(services)
    provider_api.post(CUBEPAY_QUERY_URL, status=503, body=b"down")
    provider_api.post(CUBEPAY_QUERY_URL, status=503, body=b"down")
    provider_api.post(CUBEPAY_QUERY_URL, body=cubepay_query_answer(2))
    client = app.test_client()
    refused = stored_cubepay_ipn(client, app)
    applied = stored_cubepay_ipn(client, app)
    try:
        with app.app_context(), caplog.at_level(logging.WARNING, "workers.tasks"):
            process_notifications.run([refused, applied])
    finally:
        services.db.engine.dispose()

    assert notification(services.db, refused).status is NotificationStatus.RECEIVED
    assert notification(services.db, refused).next_attempt_at is not None
    assert notification(services.db, applied).status is NotificationStatus.PROCESSED
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    assert [r.getMessage() for r in caplog.records if r.name == "workers.tasks"] == [
        f"notification {refused}: retry not enqueued (OperationalError); "
        "the sweeper will pick it up"
    ]
