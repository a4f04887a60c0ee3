"""BitcoinPaygate adapter: HMAC signatures, notifications and anomalies, status, create, resend."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import requests
import responses

from ipn.config import BitcoinPaygateSettings, HTTPSettings
from ipn.errors import (
    ForgedCallback,
    InvalidPaymentRequest,
    MalformedCallback,
    PaymentNotFound,
    ProviderRejected,
    ProviderUnavailable,
)
from ipn.providers.base import Authenticity, PaymentRef, PaymentRequest, Snapshot
from ipn.providers.bitcoinpaygate import BitcoinPaygate, anomaly_key, signature
from models import PaymentStatus

from helpers import provider_mock

API = "https://bpg.test/api"
KEY = "examplehmackey"
KEY_NAME = "key-name"
KEY_SECRET = "key-secret"
PAYMENT_ID = "95bf1d853cf2e040f0ce219221f9b17206525941"
TX_ID = "bb5af483bca29992fe1fb0ec75026f3b346ef1181ab8d77a92b5b564b713acba"

# The test vector of bitcoinpaygate.md.
VECTOR_BODY = (
    b'{"paymentId":"95bf1d853cf2e040f0ce219221f9b17206525941","status":"CONFIRMED",'
    b'"merchantTransactionId":"2015-03-10/123/1","currentTime":"2018-01-12T15:16:32Z"}'
)
VECTOR_SIGNATURE = "2f63d990dd9703a3c92e8c9d6664c6bd78da8c9e"

# The documented status (partially paid), one amount made 18 decimals long.
STATUS = (
    b'{"paymentId":"95bf1d853cf2e040f0ce219221f9b17206525941","amount":10.00,"amountBtc":1.00,'
    b'"currency":"USD","status":"NEW","remainingToPayBtc":0.5,"remainingToPay":5.00,'
    b'"paid":5.00,"paidBtc":0.500000000000000001,"paymentTime":"2018-01-12T12:06:20Z",'
    b'"expirationTime":"2018-01-12T12:21:20Z","currentTime":"2018-01-12T15:16:32Z",'
    b'"merchantTransactionId":"2015-03-10/123/1","notificationUrl":"https://example.com/notify",'
    b'"message":"payment for cookies","btcTransactions":[{"btcTxId":"'
    + TX_ID.encode()
    + b'","btcAmount":0.02194594,"time":"2018-05-01T08:52:18.233Z"}],"notificationType":"REGULAR"}'
)

ANOMALY = (
    b'{"paymentId":"95bf1d853cf2e040f0ce219221f9b17206525941",'
    b'"merchantTransactionId":"2015-03-10/123/1","currency":"USD","paidBtc":0.02194594,'
    b'"paidAmount":180.12,"btcTransactions":[{"btcTxId":"'
    + TX_ID.encode()
    + b'","btcAmount":0.02194594,"time":"2018-05-01T08:52:18.233Z"}],'
    b'"currentTime":"2018-05-01T09:12:00Z","notificationType":"ANOMALY"}'
)

CREATED = (
    b'{"paymentId":"95bf1d853cf2e040f0ce219221f9b17206525941","amount":0.002510980000000001,'
    b'"address":"2N8iLSfdFv7GRXoNxtSgMmA1e9BQHyU1PzB","label":"shop",'
    b'"message":"Order 2015-03-10/123/1",'
    b'"paymentAddress":"bitcoin:2N8iLSfdFv7GRXoNxtSgMmA1e9BQHyU1PzB?amount=0.002510980000000001",'
    b'"expirationTime":"2018-01-12T12:21:20Z","exchangeRate":3982.4,'
    b'"merchantTransactionId":"2015-03-10/123/1",'
    b'"paymentPageUrl":"https://bitcoinpaygate.com/payment/95bf1d853cf2e040f0ce219221f9b17206525941"}'
)

# When a status mapping is asked; only CubePay reads it.
DECIDED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def reference_signature(body: bytes, key: str = KEY) -> str:
    """The documented scheme written out again, so the tests do not trust the module."""
    return hmac.new(key.encode(), body, hashlib.sha1).hexdigest()


def signed(body: bytes, key: str = KEY) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-BPG-Signature": reference_signature(body, key)}


def basic_auth(call: Any) -> str:
    scheme, _, token = call.request.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(token).decode()


@pytest.fixture
def paygate() -> BitcoinPaygate:
    return BitcoinPaygate(
        BitcoinPaygateSettings(
            api_key_name=KEY_NAME, api_key_secret=KEY_SECRET, hmac_key=KEY, api_url=API
        ),
        HTTPSettings(attempts=2, backoff_max=0.01, connect_timeout=0.5, read_timeout=0.5),
    )


@pytest.fixture
def unkeyed() -> BitcoinPaygate:
    return BitcoinPaygate(BitcoinPaygateSettings(api_key_name=KEY_NAME, api_key_secret=KEY_SECRET))


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with provider_mock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


# Signatures ----------------------------------------------------------------------------------


def test_signature_matches_the_documented_vector() -> None:
    assert signature(VECTOR_BODY, KEY) == VECTOR_SIGNATURE


def test_documented_notification_verifies(paygate: BitcoinPaygate) -> None:
    callback = paygate.read_callback(
        "notification", VECTOR_BODY, {"X-BPG-Signature": VECTOR_SIGNATURE}
    )
    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.ref == PaymentRef("2015-03-10/123/1", PAYMENT_ID)
    assert callback.snapshot is not None
    assert callback.snapshot.provider_status == "CONFIRMED"
    assert callback.snapshot.as_of == datetime(2018, 1, 12, 15, 16, 32, tzinfo=UTC)
    assert callback.token is None


@pytest.mark.parametrize(
    "headers",
    [
        {"x-bpg-signature": VECTOR_SIGNATURE},
        {"X-BPG-SIGNATURE": VECTOR_SIGNATURE.upper()},
    ],
)
def test_signature_header_and_hex_case_do_not_matter(
    paygate: BitcoinPaygate, headers: dict[str, str]
) -> None:
    callback = paygate.read_callback("notification", VECTOR_BODY, headers)
    assert callback.authenticity is Authenticity.VERIFIED


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (VECTOR_BODY.replace(b"CONFIRMED", b"CONFIRMEE"), {"X-BPG-Signature": VECTOR_SIGNATURE}),
        (VECTOR_BODY + b" ", {"X-BPG-Signature": VECTOR_SIGNATURE}),
        (VECTOR_BODY, signed(VECTOR_BODY, key="anotherkey")),
        (VECTOR_BODY, {"Content-Type": "application/json"}),
        (VECTOR_BODY, {"X-BPG-Signature": ""}),
        (VECTOR_BODY, {"X-BPG-Signature": VECTOR_SIGNATURE[:-1]}),
        (VECTOR_BODY, {"X-BPG-Signature": hashlib.sha1(VECTOR_BODY).hexdigest()}),
    ],
    ids=["byte-changed", "byte-added", "wrong-key", "missing", "empty", "short", "plain-sha1"],
)
def test_forged_notification_is_refused(
    paygate: BitcoinPaygate, body: bytes, headers: dict[str, str]
) -> None:
    with pytest.raises(ForgedCallback):
        paygate.read_callback("notification", body, headers)


def test_forged_anomaly_is_refused(paygate: BitcoinPaygate) -> None:
    headers = signed(ANOMALY)
    with pytest.raises(ForgedCallback):
        paygate.read_callback("anomaly", ANOMALY.replace(b"180.12", b"180.13"), headers)
    with pytest.raises(ForgedCallback):
        paygate.read_callback("anomaly", ANOMALY, {})


def test_without_a_key_a_notification_is_only_a_hint(unkeyed: BitcoinPaygate) -> None:
    assert (
        unkeyed.read_callback("notification", VECTOR_BODY, {}).authenticity is Authenticity.UNSIGNED
    )
    # A signature cannot make it more than a hint when there is no key to check it with.
    callback = unkeyed.read_callback("notification", VECTOR_BODY, {"X-BPG-Signature": "00"})
    assert callback.authenticity is Authenticity.UNSIGNED


# Notifications -------------------------------------------------------------------------------


def test_notification_is_a_full_snapshot(paygate: BitcoinPaygate) -> None:
    callback = paygate.read_callback("notification", STATUS, signed(STATUS))
    assert callback.snapshot == Snapshot(
        provider_status="NEW",
        order_id="2015-03-10/123/1",
        provider_payment_id=PAYMENT_ID,
        amount=Decimal("10.00"),
        currency="USD",
        pay_amount=Decimal("1.00"),
        pay_currency="BTC",
        paid_amount=Decimal("0.500000000000000001"),
        expires_at=datetime(2018, 1, 12, 12, 21, 20, tzinfo=UTC),
        as_of=datetime(2018, 1, 12, 15, 16, 32, tzinfo=UTC),
    )
    assert callback.snapshot is not None
    assert str(callback.snapshot.amount) == "10.00"
    assert callback.ref == PaymentRef("2015-03-10/123/1", PAYMENT_ID)
    assert callback.fields["message"] == "payment for cookies"


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"paymentId": "abc", "status": "NEW"',
        b'["paymentId", "abc"]',
        b'"CONFIRMED"',
        b'{"paymentId": "ab\xffc", "status": "NEW"}',
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"status": "CONFIRMED", "merchantTransactionId": "2015-03-10/123/1"}',
        b'{"paymentId": "", "status": "CONFIRMED"}',
        b'{"paymentId": "abc"}',
        b'{"paymentId": "abc", "status": 7}',
        b'{"paymentId": "abc", "status": "NEW", "amountBtc": "lots"}',
        b'{"paymentId": "abc", "status": "NEW", "currentTime": "yesterday"}',
        b"",
    ],
    ids=[
        "broken-json",
        "truncated-json",
        "array",
        "string",
        "not-utf8",
        "deeply-nested",
        "deeply-nested-array",
        "no-payment-id",
        "empty-payment-id",
        "no-status",
        "status-not-text",
        "amount-not-a-number",
        "time-not-a-time",
        "empty",
    ],
)
def test_malformed_notification_is_refused(paygate: BitcoinPaygate, body: bytes) -> None:
    # Correctly signed, so that only the shape is wrong.
    with pytest.raises(MalformedCallback):
        paygate.read_callback("notification", body, signed(body))


def test_unknown_callback_kind_is_refused(paygate: BitcoinPaygate) -> None:
    with pytest.raises(MalformedCallback):
        paygate.read_callback("ipn", VECTOR_BODY, {"X-BPG-Signature": VECTOR_SIGNATURE})


# Anomalies -----------------------------------------------------------------------------------


def test_anomaly_is_kept_as_it_is(paygate: BitcoinPaygate) -> None:
    callback = paygate.read_callback("anomaly", ANOMALY, signed(ANOMALY))
    assert callback.kind == "anomaly"
    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.ref == PaymentRef("2015-03-10/123/1", PAYMENT_ID)
    assert callback.snapshot is None
    assert callback.fields["paidAmount"] == Decimal("180.12")
    assert callback.fields["notificationType"] == "ANOMALY"
    assert anomaly_key(callback.fields, ANOMALY) == f"bitcoinpaygate:{PAYMENT_ID}:{TX_ID}"


@pytest.mark.parametrize(
    ("body", "ref"),
    [
        (b'{"paymentId": "p1", "paidBtc": 0.1}', PaymentRef(None, "p1")),
        (b'{"merchantTransactionId": "m1", "paidBtc": 0.1}', PaymentRef("m1", None)),
    ],
)
def test_anomaly_needs_one_reference(paygate: BitcoinPaygate, body: bytes, ref: PaymentRef) -> None:
    assert paygate.read_callback("anomaly", body, signed(body)).ref == ref


@pytest.mark.parametrize(
    "body",
    [
        b'{"paidBtc": 0.1, "btcTransactions": []}',
        b'{"paymentId": "", "merchantTransactionId": null}',
        b"[]",
        b"{",
        b"\xff\xfe{}",
    ],
)
def test_malformed_anomaly_is_refused(paygate: BitcoinPaygate, body: bytes) -> None:
    with pytest.raises(MalformedCallback):
        paygate.read_callback("anomaly", body, signed(body))


@pytest.mark.parametrize(
    "body",
    [
        b'{"paymentId": "p1", "paidBtc": 0.1}',
        b'{"paymentId": "p1", "btcTransactions": []}',
        b'{"paymentId": "p1", "btcTransactions": [{"btcAmount": 0.1}]}',
        b'{"merchantTransactionId": "m1", "btcTransactions": [{"btcTxId": "t1"}]}',
        b'{"paymentId": "p1", "btcTransactions": {"btcTxId": "t1"}}',
    ],
)
def test_anomaly_key_falls_back_to_the_body_hash(body: bytes) -> None:
    fields = json.loads(body)
    assert anomaly_key(fields, body) == f"bitcoinpaygate:sha256:{hashlib.sha256(body).hexdigest()}"


def test_anomaly_key_uses_the_first_transaction() -> None:
    body = b'{"paymentId": "p1", "btcTransactions": [{"btcTxId": "t1"}, {"btcTxId": "t2"}]}'
    assert anomaly_key(json.loads(body), body) == "bitcoinpaygate:p1:t1"
    # The same fact re-sent with other bytes keeps its key.
    again = b'{"btcTransactions": [{"btcTxId": "t1"}], "paymentId": "p1", "currentTime": "x"}'
    assert anomaly_key(json.loads(again), again) == "bitcoinpaygate:p1:t1"


# GET /v2/payments/{paymentId} ----------------------------------------------------------------


STATUS_URL = f"{API}/v2/payments/{PAYMENT_ID}"


def test_fetch_status_asks_with_basic_auth(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.GET, STATUS_URL, body=STATUS)
    snapshot = paygate.fetch_status(PaymentRef("2015-03-10/123/1", PAYMENT_ID))
    (call,) = mocked.calls
    assert call.request.method == "GET"
    assert call.request.url == STATUS_URL
    assert basic_auth(call) == "key-name:key-secret"
    assert snapshot.provider_status == "NEW"
    assert snapshot.paid_amount == Decimal("0.500000000000000001")
    assert str(snapshot.paid_amount) == "0.500000000000000001"
    assert snapshot.as_of == datetime(2018, 1, 12, 15, 16, 32, tzinfo=UTC)


def test_fetch_status_puts_the_id_in_one_path_segment(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.GET, f"{API}/v2/payments/a%2F..%2Fb", body=STATUS)
    paygate.fetch_status(PaymentRef(provider_payment_id="a/../b"))
    assert mocked.calls[0].request.url == f"{API}/v2/payments/a%2F..%2Fb"


def test_fetch_status_needs_the_payment_id(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock
) -> None:
    with pytest.raises(PaymentNotFound, match="paymentId"):
        paygate.fetch_status(PaymentRef(order_id="2015-03-10/123/1"))
    assert len(mocked.calls) == 0


def test_fetch_status_needs_credentials(mocked: responses.RequestsMock) -> None:
    paygate = BitcoinPaygate(BitcoinPaygateSettings(api_url=API))
    with pytest.raises(ProviderRejected):
        paygate.fetch_status(PaymentRef(provider_payment_id=PAYMENT_ID))
    assert len(mocked.calls) == 0


@pytest.mark.parametrize(
    ("status", "body", "error", "calls"),
    [
        (404, b'[{"message": "Payment not found"}]', PaymentNotFound, 1),
        (401, b'[{"message": "Bad credentials"}]', ProviderRejected, 1),
        (400, b'[{"message": "a"}, {"message": "b"}]', ProviderRejected, 1),
        (500, b'[{"message": "Internal error"}]', ProviderUnavailable, 2),
        (429, b"", ProviderUnavailable, 2),
        (200, b"<html>maintenance</html>", ProviderUnavailable, 2),
        (200, STATUS[:-30], ProviderUnavailable, 2),
        (200, b'[{"paymentId": "x"}]', ProviderUnavailable, 1),
        (200, b'{"paymentId": "x"}', ProviderUnavailable, 1),
        (200, b'{"paymentId": "x", "status": "NEW", "amount": "ten"}', ProviderUnavailable, 1),
    ],
    ids=[
        "404",
        "401",
        "400",
        "500",
        "429",
        "garbage",
        "truncated",
        "array",
        "no-status",
        "bad-amount",
    ],
)
def test_fetch_status_errors(
    paygate: BitcoinPaygate,
    mocked: responses.RequestsMock,
    status: int,
    body: bytes,
    error: type[Exception],
    calls: int,
) -> None:
    mocked.add(responses.GET, STATUS_URL, body=body, status=status)
    with pytest.raises(error) as raised:
        paygate.fetch_status(PaymentRef(provider_payment_id=PAYMENT_ID))
    assert type(raised.value) is error
    assert len(mocked.calls) == calls
    assert KEY_SECRET not in str(raised.value)


def test_fetch_status_error_carries_the_provider_words(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock
) -> None:
    mocked.add(
        responses.GET,
        STATUS_URL,
        status=400,
        body=b'[{"message": "Invalid id"}, {"message": "Try again"}]',
    )
    with pytest.raises(ProviderRejected, match="Invalid id; Try again"):
        paygate.fetch_status(PaymentRef(provider_payment_id=PAYMENT_ID))


def test_fetch_status_timeout(paygate: BitcoinPaygate, mocked: responses.RequestsMock) -> None:
    mocked.add(responses.GET, STATUS_URL, body=requests.Timeout())
    with pytest.raises(ProviderUnavailable, match="timed out"):
        paygate.fetch_status(PaymentRef(provider_payment_id=PAYMENT_ID))
    assert len(mocked.calls) == 2


def test_fetch_status_retries_then_answers(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.GET, STATUS_URL, body=requests.ConnectionError())
    mocked.add(responses.GET, STATUS_URL, body=STATUS)
    assert paygate.fetch_status(PaymentRef(provider_payment_id=PAYMENT_ID)).provider_status == (
        "NEW"
    )
    assert len(mocked.calls) == 2


# Resend --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(200, True), (402, False)])
def test_request_resend(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock, value: int, expected: bool
) -> None:
    url = f"{API}/v2/payments/notify/{PAYMENT_ID}"
    mocked.add(responses.GET, url, json={"value": value})
    assert paygate.request_resend(PAYMENT_ID) is expected
    (call,) = mocked.calls
    assert call.request.url == url
    assert basic_auth(call) == "key-name:key-secret"


@pytest.mark.parametrize("body", [b'{"value": 500}', b"{}", b"[]", b'"ok"'])
def test_request_resend_refuses_an_unexpected_answer(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock, body: bytes
) -> None:
    mocked.add(responses.GET, f"{API}/v2/payments/notify/{PAYMENT_ID}", body=body)
    with pytest.raises(ProviderUnavailable):
        paygate.request_resend(PAYMENT_ID)


# The status table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("NEW", PaymentStatus.PENDING),
        ("UNDERPAID", PaymentStatus.UNDERPAID),
        ("UNCONFIRMED", PaymentStatus.CONFIRMING),
        ("CONFIRMED", PaymentStatus.PAID),
        ("COMPLETED", PaymentStatus.PAID),
        ("PAID", PaymentStatus.CONFIRMING),
        ("EXPIRED", PaymentStatus.EXPIRED),
        ("REFUNDED", None),
        ("REGULAR", None),
        ("", None),
    ],
)
def test_status_table(paygate: BitcoinPaygate, status: str, state: PaymentStatus | None) -> None:
    decision = paygate.decide(
        Snapshot(provider_status=status, provider_payment_id="p1"), None, DECIDED_AT
    )
    assert decision.state is state
    assert decision.anomalies == ()
    assert (decision.note == "") is (state is not None)


def test_invalid_fails_and_flags_for_review(paygate: BitcoinPaygate) -> None:
    snapshot = Snapshot(
        provider_status="INVALID",
        provider_payment_id=PAYMENT_ID,
        order_id="2015-03-10/123/1",
        pay_amount=Decimal("1.00"),
        paid_amount=Decimal("1.50000000"),
    )
    decision = paygate.decide(snapshot, None, DECIDED_AT)
    assert decision.state is PaymentStatus.FAILED
    ((kind, evidence),) = decision.anomalies
    assert kind == "provider_failure"
    assert evidence["status"] == "INVALID"
    assert evidence["paymentId"] == PAYMENT_ID
    assert evidence["merchantTransactionId"] == "2015-03-10/123/1"
    assert evidence["paidBtc"] == "1.50000000"
    # The evidence goes into a JSON column: no Decimal, no float.
    assert json.loads(json.dumps(evidence)) == evidence


# POST /v2/payments/new -----------------------------------------------------------------------


NEW_URL = f"{API}/v2/payments/new"


def payment_request(**changes: Any) -> PaymentRequest:
    values: dict[str, Any] = {
        "order_id": "2015-03-10/123/1",
        "amount": Decimal("10.00"),
        "currency": "USD",
        "notification_url": "https://shop.example/ipn/bitcoinpaygate/notification",
        "description": "payment for cookies",
        "anomaly_url": "https://shop.example/ipn/bitcoinpaygate/anomaly",
    }
    values.update(changes)
    return PaymentRequest(**values)


def test_create_sends_the_exact_request(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.POST, NEW_URL, body=CREATED)
    paygate.create_payment(payment_request())
    (call,) = mocked.calls
    assert call.request.headers["Content-Type"] == "application/json"
    assert basic_auth(call) == "key-name:key-secret"
    assert json.loads(call.request.body or b"") == {
        "amount": "10.00",
        "currency": "USD",
        "notificationUrl": "https://shop.example/ipn/bitcoinpaygate/notification",
        "message": "payment for cookies",
        "merchantTransactionId": "2015-03-10/123/1",
        "anomalyNotificationUrl": "https://shop.example/ipn/bitcoinpaygate/anomaly",
    }


def test_create_leaves_out_what_was_not_given(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.POST, NEW_URL, body=CREATED)
    paygate.create_payment(
        payment_request(description=None, anomaly_url=None, amount=Decimal("0.000000000000000001"))
    )
    sent = json.loads(mocked.calls[0].request.body or b"")
    assert "anomalyNotificationUrl" not in sent
    assert sent["message"] == "Order 2015-03-10/123/1"
    assert sent["amount"] == "0.000000000000000001"


def test_create_returns_what_the_customer_needs(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.POST, NEW_URL, body=CREATED)
    snapshot = paygate.create_payment(payment_request())
    assert snapshot.provider_payment_id == PAYMENT_ID
    assert snapshot.provider_status == "NEW"
    assert (snapshot.amount, snapshot.currency) == (Decimal("10.00"), "USD")
    assert str(snapshot.pay_amount) == "0.002510980000000001"
    assert snapshot.pay_currency == "BTC"
    assert snapshot.pay_address == "2N8iLSfdFv7GRXoNxtSgMmA1e9BQHyU1PzB"
    assert snapshot.payment_uri == (
        "bitcoin:2N8iLSfdFv7GRXoNxtSgMmA1e9BQHyU1PzB?amount=0.002510980000000001"
    )
    assert snapshot.pay_url == f"https://bitcoinpaygate.com/payment/{PAYMENT_ID}"
    assert snapshot.expires_at == datetime(2018, 1, 12, 12, 21, 20, tzinfo=UTC)
    assert snapshot.order_id == "2015-03-10/123/1"
    assert paygate.decide(snapshot, None, DECIDED_AT).state is PaymentStatus.PENDING


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount": Decimal("0")}, "amount"),
        ({"amount": Decimal("-5")}, "amount"),
        ({"amount": Decimal("Infinity")}, "amount"),
        ({"currency": ""}, "currency"),
        ({"pay_currency": "ETH"}, "pay_currency"),
        ({"order_id": ""}, "order_id"),
    ],
)
def test_create_refuses_what_it_cannot_take_before_any_call(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidPaymentRequest) as raised:
        paygate.create_payment(payment_request(**changes))
    assert raised.value.field == field
    assert len(mocked.calls) == 0


def test_create_accepts_btc_as_the_coin(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.POST, NEW_URL, body=CREATED)
    assert paygate.create_payment(payment_request(pay_currency="btc")).pay_currency == "BTC"


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (400, b'[{"message": "Invalid currency"}]', ProviderRejected, "Invalid currency"),
        (401, b'[{"message": "Bad credentials"}]', ProviderRejected, "Bad credentials"),
        (500, b'[{"message": "Internal error"}]', ProviderUnavailable, "Internal error"),
        (503, b"", ProviderUnavailable, "503"),
        (429, b"", ProviderUnavailable, "429"),
        (200, b"<html>", ProviderUnavailable, "not JSON"),
        (200, CREATED[:50], ProviderUnavailable, "not JSON"),
        (200, b'{"address": "x"}', ProviderUnavailable, "paymentId"),
        (200, b'[{"paymentId": "x"}]', ProviderUnavailable, "paymentId"),
        (200, b'{"paymentId": "x", "amount": "a lot"}', ProviderUnavailable, "amount"),
    ],
)
def test_create_errors_are_not_retried(
    paygate: BitcoinPaygate,
    mocked: responses.RequestsMock,
    status: int,
    body: bytes,
    error: type[Exception],
    message: str,
) -> None:
    mocked.add(responses.POST, NEW_URL, body=body, status=status)
    with pytest.raises(error, match=message) as raised:
        paygate.create_payment(payment_request())
    assert type(raised.value) is error
    assert len(mocked.calls) == 1


def test_create_timeout_is_not_retried(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.POST, NEW_URL, body=requests.Timeout())
    with pytest.raises(ProviderUnavailable, match="timed out"):
        paygate.create_payment(payment_request())
    assert len(mocked.calls) == 1


# What the adapter reads and sends, field by field ---------------------------------------------


def with_changes(body: bytes, **changes: Any) -> bytes:
    data = json.loads(body)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data).encode()


def test_fetch_status_keeps_our_id_when_the_answer_has_none(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.GET, STATUS_URL, body=with_changes(STATUS, paymentId=None))
    snapshot = paygate.fetch_status(PaymentRef(provider_payment_id=PAYMENT_ID))
    assert snapshot.provider_payment_id == PAYMENT_ID


@pytest.mark.parametrize(
    "field", ["amount", "amountBtc", "paidBtc", "expirationTime", "currentTime"]
)
def test_fetch_status_names_a_field_it_cannot_read(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock, field: str
) -> None:
    mocked.add(responses.GET, STATUS_URL, body=with_changes(STATUS, **{field: "soon"}))
    with pytest.raises(ProviderUnavailable, match=f"cannot be read: {field} is not"):
        paygate.fetch_status(PaymentRef(provider_payment_id=PAYMENT_ID))


@pytest.mark.parametrize(
    "settings",
    [
        BitcoinPaygateSettings(api_key_name=KEY_NAME, api_url=API),
        BitcoinPaygateSettings(api_key_secret=KEY_SECRET, api_url=API),
    ],
)
def test_half_an_api_key_is_no_key(
    mocked: responses.RequestsMock, settings: BitcoinPaygateSettings
) -> None:
    with pytest.raises(ProviderRejected, match="not configured"):
        BitcoinPaygate(settings).fetch_status(PaymentRef(provider_payment_id=PAYMENT_ID))
    assert len(mocked.calls) == 0


def test_an_api_url_with_a_trailing_slash_is_joined_once(mocked: responses.RequestsMock) -> None:
    paygate = BitcoinPaygate(
        BitcoinPaygateSettings(api_key_name=KEY_NAME, api_key_secret=KEY_SECRET, api_url=API + "/")
    )
    mocked.add(responses.GET, STATUS_URL, body=STATUS)
    paygate.fetch_status(PaymentRef(provider_payment_id=PAYMENT_ID))
    assert mocked.calls[0].request.url == STATUS_URL


def test_create_takes_the_order_id_the_answer_gives_else_ours(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.POST, NEW_URL, body=with_changes(CREATED, merchantTransactionId="x-1"))
    assert paygate.create_payment(payment_request()).order_id == "x-1"
    mocked.replace(responses.POST, NEW_URL, body=with_changes(CREATED, merchantTransactionId=None))
    assert paygate.create_payment(payment_request()).order_id == "2015-03-10/123/1"


@pytest.mark.parametrize("field", ["amount", "expirationTime"])
def test_create_names_a_field_it_cannot_read(
    paygate: BitcoinPaygate, mocked: responses.RequestsMock, field: str
) -> None:
    mocked.add(responses.POST, NEW_URL, body=with_changes(CREATED, **{field: "soon"}))
    with pytest.raises(ProviderUnavailable, match=f"cannot be read: {field} is not"):
        paygate.create_payment(payment_request())
