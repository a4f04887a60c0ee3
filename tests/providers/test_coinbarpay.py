"""CoinbarPay adapter: signatures and legacy tokens, callbacks, the status API, creates, mapping."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import requests
import responses
import time_machine

from ipn.config import CoinbarPaySettings, HTTPSettings
from ipn.errors import (
    ConfigurationError,
    ForgedCallback,
    InvalidPaymentRequest,
    MalformedCallback,
    PaymentNotFound,
    ProviderRejected,
    ProviderUnavailable,
)
from ipn.providers.base import Authenticity, PaymentRef, PaymentRequest, Snapshot
from ipn.providers.coinbarpay import (
    CoinbarPay,
    compact_json,
    decrypt_legacy_token,
    encrypt_legacy_token,
    js_number_survives,
    signature,
)
from models import PaymentStatus

from helpers import provider_mock

# -- the documented vectors (coinbarpay.md) ---------------------------------------------------

CLIENT_ID = "2cb63353-2541-4c4e-90d4-7bf1d4b42c5c"
SECRET = "your_secret_key"
CREATE_VECTOR = (
    b'{"service_client_id":"2cb63353-2541-4c4e-90d4-7bf1d4b42c5c","payment_request_id":"order-1001",'
    b'"input_coin":"EUR","products":[{"product_name":"Order #1001","product_price":8.99,'
    b'"product_amount":1,"product_id":"1001","product_type":"ecommerce"}],'
    b'"email":"mario.rossi@example.com","surname":"Rossi","name":"Mario","user_id":"42",'
    b'"timestamp":1700000000000,"destination_coin":"BTC"}'
)
CREATE_VECTOR_SIGNATURE = "164e169b6277bc1b24762cc70866114f2415db74c855055995f76f06ec1ffe2b"
EMPTY_OBJECT_SIGNATURE = "b043c2e564f32f8ef68649bba92f78cc717066ed4a6e6acc2c8d369675799c34"

LEGACY_KEY = "0123456789abcdef0123456789abcdef"
LEGACY_IV = "fedcba9876543210"
LEGACY_PLAINTEXT = (
    b'{"payment_request_id_client":"1001","status":"SUCCESS",'
    b'"payment_id_coinbar":"499f5adb-5911-4d1f-8642-2c53c24075d9",'
    b'"payment_detail":{"total_price":0.05}}'
)
LEGACY_TOKEN = (
    "MXJ4UTdTWVQreTFXVG1aWWNkUnd2YWRJdVRTZXpDbGhrWnlDSDZicFUzbmdwSm00c3J6QnBGRDRRSnk3T3FEL2ZZ"
    "NVZTNmczUDVpbEluOVJaVVZCZnZqSkJvclRZbkJpSjFPUkVYM2R6U0o5U1BiMERQOWsrZ3JFUlRtYUYwcnUwR2VR"
    "TFc0azljRkx2OGpqbFpZbDFiMlVCeU4rVlpvaTgzMDhWZ09IdElXYlJTM00rSTdPdEpVNmpOSWkxdnFIR3lkR0p3"
    "ak9ISVdHRWllMnpNZXdrQT09"
)

# The status answer from the docs, with its over-long destination_amount kept as digits.
STATUS_ANSWER = (
    b'{"payment_id_coinbar":"499f5adb-5911-4d1f-8642-2c53c24075d9",'
    b'"payment_request_id_client":"order-1001",'
    b'"service_client_id":"2cb63353-2541-4c4e-90d4-7bf1d4b42c5c","status":"FAILED",'
    b'"payment_detail":{"destination_coin":"BTC","trade_pair":"BTC/EUR",'
    b'"destination_amount":0.00045145423250897323,"coin_change":19913.425,"total_price":8.99},'
    b'"input_coin":"EUR","creation_time":"2022-05-11T12:16:01.064Z",'
    b'"update_time":"2022-05-11T12:30:35.059Z","status_descr":"Timeout"}'
)

API_URL = "https://coinbar.test"
STATUS_URL = API_URL + "/coinbar/api/v2/pay/gateway/payment/order-1001/status"
CREATE_URL = API_URL + "/coinbar/api/v2/pay/gateway/initiate"

# When a status mapping is asked; only CubePay reads it.
DECIDED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def hmac_sha256(body: bytes, secret: str = SECRET) -> str:
    """Computed here independently of the module under test."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class HeldPayment:
    status: PaymentStatus
    created_at: datetime = datetime(2022, 5, 11, 12, 16, tzinfo=UTC)
    amount: Decimal | None = Decimal("8.99")
    currency: str | None = "EUR"
    pay_amount: Decimal | None = None
    paid_amount: Decimal | None = None


@pytest.fixture
def settings() -> CoinbarPaySettings:
    return CoinbarPaySettings(
        service_client_id=CLIENT_ID,
        secret_key=SECRET,
        api_url=API_URL,
        token_api_key=LEGACY_KEY,
        token_secret=LEGACY_IV,
    )


@pytest.fixture
def provider(settings: CoinbarPaySettings) -> CoinbarPay:
    return CoinbarPay(settings, HTTPSettings(attempts=2, backoff_max=0.01))


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with provider_mock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


# -- signing ----------------------------------------------------------------------------------


def test_create_vector_built_from_python_values_is_byte_exact_and_signed_as_documented() -> None:
    body = {
        "service_client_id": CLIENT_ID,
        "payment_request_id": "order-1001",
        "input_coin": "EUR",
        "products": [
            {
                "product_name": "Order #1001",
                "product_price": Decimal("8.99"),
                "product_amount": 1,
                "product_id": "1001",
                "product_type": "ecommerce",
            }
        ],
        "email": "mario.rossi@example.com",
        "surname": "Rossi",
        "name": "Mario",
        "user_id": "42",
        "timestamp": 1700000000000,
        "destination_coin": "BTC",
    }
    assert compact_json(body) == CREATE_VECTOR
    assert signature(compact_json(body), SECRET) == CREATE_VECTOR_SIGNATURE


def test_empty_object_vector() -> None:
    assert compact_json({}) == b"{}"
    assert signature(b"{}", SECRET) == EMPTY_OBJECT_SIGNATURE


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (Decimal("8.99"), b"8.99"),
        (Decimal("1"), b"1"),
        (Decimal("1.0"), b"1"),
        (Decimal("8.90"), b"8.9"),
        (Decimal("1E+2"), b"100"),
        (Decimal("-0.00"), b"0"),
        (Decimal("0.00045145423250897323"), b"0.00045145423250897323"),
        (Decimal("123456789.123456789123456789"), b"123456789.123456789123456789"),
    ],
)
def test_compact_json_writes_decimals_as_their_digits(value: Decimal, written: bytes) -> None:
    assert compact_json({"p": value}) == b'{"p":' + written + b"}"


def test_compact_json_leaves_non_ascii_unescaped_and_refuses_floats() -> None:
    assert compact_json({"name": "Caffè €"}) == '{"name":"Caffè €"}'.encode()
    assert compact_json([True, None, 3, 'a"b']) == b'[true,null,3,"a\\"b"]'
    with pytest.raises(TypeError):
        compact_json({"price": 1.0})


def test_legacy_token_vector_round_trips_both_ways() -> None:
    assert decrypt_legacy_token(LEGACY_TOKEN, LEGACY_KEY, LEGACY_IV) == LEGACY_PLAINTEXT
    assert encrypt_legacy_token(LEGACY_PLAINTEXT, LEGACY_KEY, LEGACY_IV) == LEGACY_TOKEN


# -- callbacks: the current form ---------------------------------------------------------------


def test_signed_callback_is_verified_with_ref_and_snapshot(provider: CoinbarPay) -> None:
    headers = {"SIGNATURE": hmac_sha256(STATUS_ANSWER), "CBPAY-API-KEY": CLIENT_ID}

    callback = provider.read_callback("callback", STATUS_ANSWER, headers)

    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.handled
    assert callback.ref == PaymentRef("order-1001", "499f5adb-5911-4d1f-8642-2c53c24075d9")
    assert callback.snapshot == Snapshot(
        provider_status="FAILED",
        order_id="order-1001",
        provider_payment_id="499f5adb-5911-4d1f-8642-2c53c24075d9",
        amount=Decimal("8.99"),
        currency="EUR",
        pay_amount=Decimal("0.00045145423250897323"),
        pay_currency="BTC",
        as_of=datetime(2022, 5, 11, 12, 30, 35, 59000, tzinfo=UTC),
        detail="Timeout",
    )
    assert callback.fields["status_descr"] == "Timeout"


def test_signature_is_compared_case_insensitively(provider: CoinbarPay) -> None:
    headers = {"signature": hmac_sha256(STATUS_ANSWER).upper()}
    callback = provider.read_callback("callback", STATUS_ANSWER, headers)
    assert callback.authenticity is Authenticity.VERIFIED


def test_unsigned_callback_is_only_a_hint(provider: CoinbarPay) -> None:
    callback = provider.read_callback("callback", STATUS_ANSWER, {"Service-Client-Id": CLIENT_ID})
    assert callback.authenticity is Authenticity.UNSIGNED
    assert callback.ref == PaymentRef("order-1001", "499f5adb-5911-4d1f-8642-2c53c24075d9")


def test_payment_request_id_stands_in_for_the_client_reference(provider: CoinbarPay) -> None:
    body = json.dumps({"payment_request_id": "order-7", "status": "CREATED"}).encode()
    callback = provider.read_callback("callback", body, {})
    assert callback.ref == PaymentRef("order-7", None)
    assert callback.snapshot is not None and callback.snapshot.provider_status == "CREATED"


def test_one_byte_changed_is_forged(provider: CoinbarPay) -> None:
    tampered = STATUS_ANSWER.replace(b'"total_price":8.99', b'"total_price":0.99')
    assert tampered != STATUS_ANSWER
    with pytest.raises(ForgedCallback):
        provider.read_callback("callback", tampered, {"SIGNATURE": hmac_sha256(STATUS_ANSWER)})


def test_signature_with_another_key_is_forged_and_the_message_keeps_secrets(
    provider: CoinbarPay,
) -> None:
    headers = {"SIGNATURE": hmac_sha256(STATUS_ANSWER, "not_our_secret")}
    with pytest.raises(ForgedCallback) as caught:
        provider.read_callback("callback", STATUS_ANSWER, headers)
    assert SECRET not in str(caught.value)
    assert hmac_sha256(STATUS_ANSWER) not in str(caught.value)


@pytest.mark.parametrize(
    ("headers", "body_client_id"),
    [
        ({"CBPAY-API-KEY": "someone-else"}, CLIENT_ID),
        ({"Service-Client-Id": "someone-else"}, CLIENT_ID),
        ({"CBPAY-API-KEY": CLIENT_ID, "Service-Client-Id": "someone-else"}, CLIENT_ID),
        ({"CBPAY-API-KEY": CLIENT_ID}, "someone-else"),
        ({}, 12345),
    ],
)
def test_foreign_client_id_is_forged_even_with_a_good_signature(
    provider: CoinbarPay, headers: dict[str, str], body_client_id: Any
) -> None:
    body = json.dumps(
        {"payment_request_id_client": "order-1001", "service_client_id": body_client_id}
    ).encode()
    with pytest.raises(ForgedCallback):
        provider.read_callback("callback", body, {**headers, "SIGNATURE": hmac_sha256(body)})


DEEP_ARRAY = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000


@pytest.mark.parametrize(
    "body",
    [
        b'{"payment_request_id_client": "order-1001",',
        b"",
        b'[{"payment_request_id_client": "order-1001"}]',
        b'"order-1001"',
        b'{"payment_request_id_client": "order-\xff"}',
        DEEP_ARRAY,
        DEEP_OBJECT,
        b'{"status": "SUCCESS", "service_client_id": "2cb63353-2541-4c4e-90d4-7bf1d4b42c5c"}',
        b'{"payment_request_id_client": "", "status": "SUCCESS"}',
        b'{"payment_request_id_client": {"id": 1}}',
        b'{"payment_request_id_client": "1", "status": "SUCCESS", "payment_detail": [1]}',
        b'{"payment_request_id_client": "1", "status": "SUCCESS", '
        b'"payment_detail": {"total_price": "lots"}}',
    ],
    ids=[
        "truncated",
        "empty",
        "array",
        "string",
        "invalid-utf8",
        "deep-array",
        "deep-object",
        "no-reference",
        "empty-reference",
        "reference-not-text",
        "detail-not-object",
        "amount-not-number",
    ],
)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_malformed_bodies(provider: CoinbarPay, body: bytes, signed: bool) -> None:
    headers = {"SIGNATURE": hmac_sha256(body)} if signed else {}
    with pytest.raises(MalformedCallback):
        provider.read_callback("callback", body, headers)


def test_unknown_kind_is_malformed(provider: CoinbarPay) -> None:
    with pytest.raises(MalformedCallback):
        provider.read_callback("anomaly", STATUS_ANSWER, {})


def test_unconfigured_provider_cannot_read_callbacks() -> None:
    provider = CoinbarPay(CoinbarPaySettings(api_url=API_URL))
    with pytest.raises(MalformedCallback, match="COINBARPAY_SECRET_KEY"):
        provider.read_callback("callback", STATUS_ANSWER, {})


# -- callbacks: the legacy AES token --------------------------------------------------------------


def legacy_body(token: Any = LEGACY_TOKEN, client_id: Any = CLIENT_ID) -> bytes:
    body: dict[str, Any] = {"responseToken": token, "timestamp": 1685986891864}
    if client_id is not None:
        body["serviceClientId"] = client_id
    return json.dumps(body).encode()


def test_legacy_token_callback_is_verified(provider: CoinbarPay) -> None:
    callback = provider.read_callback("callback", legacy_body(), {"Service-Client-Id": CLIENT_ID})
    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.ref == PaymentRef("1001", "499f5adb-5911-4d1f-8642-2c53c24075d9")
    assert callback.snapshot is not None
    assert callback.snapshot.provider_status == "SUCCESS"
    assert callback.snapshot.amount == Decimal("0.05")
    assert callback.fields["status"] == "SUCCESS"


def test_legacy_client_id_in_the_header_alone_is_enough(provider: CoinbarPay) -> None:
    callback = provider.read_callback(
        "callback", legacy_body(client_id=None), {"Service-Client-Id": CLIENT_ID}
    )
    assert callback.authenticity is Authenticity.VERIFIED


def test_legacy_decrypted_sandbox_payload_reads_as_a_status(provider: CoinbarPay) -> None:
    # The real SUCCESS payload from the docs, re-encrypted under the test keys.
    payload = (
        b'{"result":"success","payment_id_coinbar":"499f5adb-5911-4d1f-8642-2c53c24075d9",'
        b'"payment_request_id_client":"1","service_client_id":"2cb63353-2541-4c4e-90d4-7bf1d4b42c5c",'
        b'"customer":{"email":"mario.rossi@example.com"},"products":[{"product_name":"Order #1",'
        b'"product_price":0.05,"product_amount":1,"product_id":"1","product_type":"ecommerce"}],'
        b'"input_coin":"EUR","status":"SUCCESS","payment_detail":{"transaction_id":'
        b'"DFE92F4E-736B-420A-BCBE-B53485DD1546","timestamp":"2023-06-05T17:41:31.864Z",'
        b'"total_price":0.05},"creation_time":"2023-06-05T17:40:36.184Z",'
        b'"update_time":"2023-06-05T17:41:24.123Z"}'
    )
    token = encrypt_legacy_token(payload, LEGACY_KEY, LEGACY_IV)

    callback = provider.read_callback("callback", legacy_body(token), {})

    assert callback.ref == PaymentRef("1", "499f5adb-5911-4d1f-8642-2c53c24075d9")
    assert callback.snapshot is not None
    assert (callback.snapshot.amount, callback.snapshot.currency) == (Decimal("0.05"), "EUR")
    assert provider.decide(callback.snapshot, None, DECIDED_AT).state is PaymentStatus.PAID


def _flip_inner(token: str, index: int) -> str:
    """The token with one ciphertext byte changed, still valid double base64."""
    import base64

    raw = bytearray(base64.b64decode(base64.b64decode(token)))
    raw[index] ^= 0x01
    return base64.b64encode(base64.b64encode(bytes(raw))).decode()


@pytest.mark.parametrize(
    "token",
    [
        LEGACY_TOKEN[:-8],
        LEGACY_TOKEN[:40] + ("A" if LEGACY_TOKEN[40] != "A" else "B") + LEGACY_TOKEN[41:],
        _flip_inner(LEGACY_TOKEN, 0),
        _flip_inner(LEGACY_TOKEN, -1),
        "not base64 at all!",
        "aGVsbG8=",  # one layer of base64 only
        "",
        encrypt_legacy_token(LEGACY_PLAINTEXT, "fedcba9876543210fedcba9876543210", LEGACY_IV),
        encrypt_legacy_token(b"not json", LEGACY_KEY, LEGACY_IV),
        encrypt_legacy_token(b'["a list"]', LEGACY_KEY, LEGACY_IV),
        encrypt_legacy_token(b"\xff\xfe", LEGACY_KEY, LEGACY_IV),
        encrypt_legacy_token(b"[" * 100_000, LEGACY_KEY, LEGACY_IV),
        encrypt_legacy_token(
            b'{"payment_request_id_client":"1","service_client_id":"someone-else"}',
            LEGACY_KEY,
            LEGACY_IV,
        ),
        12345,
        None,
    ],
    ids=[
        "truncated",
        "one-char-changed",
        "first-block-flipped",
        "padding-flipped",
        "not-base64",
        "single-base64",
        "empty",
        "other-key",
        "not-json",
        "json-array",
        "not-utf8",
        "deep",
        "foreign-client-inside",
        "number",
        "null",
    ],
)
def test_corrupted_legacy_token_is_forged(provider: CoinbarPay, token: Any) -> None:
    with pytest.raises(ForgedCallback):
        provider.read_callback("callback", legacy_body(token), {"Service-Client-Id": CLIENT_ID})


@pytest.mark.parametrize(
    ("body_client_id", "headers"),
    [
        ("someone-else", {}),
        (CLIENT_ID, {"Service-Client-Id": "someone-else"}),
        (None, {}),
    ],
    ids=["foreign-in-body", "foreign-in-header", "none-at-all"],
)
def test_legacy_callback_must_name_our_client(
    provider: CoinbarPay, body_client_id: str | None, headers: dict[str, str]
) -> None:
    with pytest.raises(ForgedCallback):
        provider.read_callback("callback", legacy_body(client_id=body_client_id), headers)


def test_legacy_keys_of_the_wrong_length_are_our_fault_not_a_forgery(
    settings: CoinbarPaySettings,
) -> None:
    provider = CoinbarPay(replace(settings, token_api_key="short"))
    with pytest.raises(MalformedCallback, match="32 bytes"):
        provider.read_callback("callback", legacy_body(), {"Service-Client-Id": CLIENT_ID})


def test_legacy_callback_without_legacy_keys_names_the_missing_settings(
    settings: CoinbarPaySettings,
) -> None:
    provider = CoinbarPay(replace(settings, token_api_key=None, token_secret=None))
    with pytest.raises(MalformedCallback) as caught:
        provider.read_callback("callback", legacy_body(), {"Service-Client-Id": CLIENT_ID})
    assert "COINBARPAY_TOKEN_API_KEY" in str(caught.value)
    assert "COINBARPAY_TOKEN_SECRET" in str(caught.value)


# -- the mapping table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "descr", "held", "expected"),
    [
        ("CREATED", "", None, PaymentStatus.PENDING),
        ("PENDING", "", PaymentStatus.PENDING, PaymentStatus.CONFIRMING),
        ("SUCCESS", "", PaymentStatus.CONFIRMING, PaymentStatus.PAID),
        ("FAILED", "Timeout", PaymentStatus.PENDING, PaymentStatus.EXPIRED),
        ("FAILED", "TIMEOUT", None, PaymentStatus.EXPIRED),
        ("FAILED", "Timeout", PaymentStatus.PAID, PaymentStatus.REFUNDED),
        ("FAILED", "", PaymentStatus.PAID, PaymentStatus.REFUNDED),
        ("FAILED", "", PaymentStatus.REFUNDED, PaymentStatus.REFUNDED),
        ("FAILED", "Rejected", PaymentStatus.CONFIRMING, PaymentStatus.FAILED),
        ("FAILED", "", None, PaymentStatus.FAILED),
        ("CANCELED", "", PaymentStatus.PENDING, PaymentStatus.CANCELLED),
        ("CANCELLED", "", None, PaymentStatus.CANCELLED),
        ("REFUNDED", "", PaymentStatus.PAID, None),
        ("EXPIRED", "", None, None),
    ],
)
def test_decide(
    provider: CoinbarPay,
    status: str,
    descr: str,
    held: PaymentStatus | None,
    expected: PaymentStatus | None,
) -> None:
    snapshot = Snapshot(provider_status=status, order_id="order-1001", detail=descr)
    payment = HeldPayment(held) if held is not None else None
    assert provider.decide(snapshot, payment, DECIDED_AT).state == expected


def test_unknown_status_says_which(provider: CoinbarPay) -> None:
    decision = provider.decide(Snapshot(provider_status="ON_HOLD"), None, DECIDED_AT)
    assert decision.state is None
    assert "ON_HOLD" in decision.note


# -- the status API -------------------------------------------------------------------------------


def test_fetch_status_sends_a_signed_get_and_reads_every_digit(
    provider: CoinbarPay, mocked: responses.RequestsMock
) -> None:
    long_amount = b"0.123456789012345678901234"
    answer = STATUS_ANSWER.replace(b"0.00045145423250897323", long_amount)
    mocked.get(STATUS_URL, body=answer, content_type="application/json")

    snapshot = provider.fetch_status(PaymentRef("order-1001", None))

    assert len(mocked.calls) == 1
    sent = mocked.calls[0].request
    assert sent.method == "GET"
    assert sent.url == STATUS_URL
    assert sent.body is None
    assert sent.headers["CBPAY-API-KEY"] == CLIENT_ID
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["SIGNATURE"] == hmac_sha256(b"{}") == EMPTY_OBJECT_SIGNATURE
    assert str(snapshot.pay_amount) == long_amount.decode()
    assert snapshot.amount == Decimal("8.99")
    assert snapshot.provider_status == "FAILED"
    assert snapshot.detail == "Timeout"
    assert snapshot.ref == PaymentRef("order-1001", "499f5adb-5911-4d1f-8642-2c53c24075d9")
    assert provider.decide(snapshot, HeldPayment(PaymentStatus.PENDING), DECIDED_AT).state == (
        PaymentStatus.EXPIRED
    )


def test_fetch_status_can_sign_the_empty_string(
    settings: CoinbarPaySettings, mocked: responses.RequestsMock
) -> None:
    provider = CoinbarPay(replace(settings, empty_body_signs=""))
    mocked.get(STATUS_URL, body=STATUS_ANSWER)
    provider.fetch_status(PaymentRef("order-1001"))
    assert mocked.calls[0].request.headers["SIGNATURE"] == hmac_sha256(b"")


def test_fetch_status_quotes_the_order_id_into_one_path_segment(
    provider: CoinbarPay, mocked: responses.RequestsMock
) -> None:
    url = API_URL + "/coinbar/api/v2/pay/gateway/payment/a%2Fb%3Fc/status"
    mocked.get(url, body=STATUS_ANSWER.replace(b'"order-1001"', b'"a/b?c"'))
    assert provider.fetch_status(PaymentRef("a/b?c")).order_id == "a/b?c"
    assert mocked.calls[0].request.url == url


def test_fetch_status_without_our_order_id_is_not_found_without_asking(
    provider: CoinbarPay, mocked: responses.RequestsMock
) -> None:
    with pytest.raises(PaymentNotFound, match="payment_request_id"):
        provider.fetch_status(PaymentRef(None, "499f5adb-5911-4d1f-8642-2c53c24075d9"))
    assert len(mocked.calls) == 0


@pytest.mark.parametrize(
    ("status", "body", "error", "calls"),
    [
        (404, b'{"result": false, "error": "Payment not found"}', PaymentNotFound, 1),
        (401, b'{"result": false, "error": "Invalid signature"}', ProviderRejected, 1),
        (400, b"bad request", ProviderRejected, 1),
        (500, b"oops", ProviderUnavailable, 2),
        (503, b"", ProviderUnavailable, 2),
        (429, b"slow down", ProviderUnavailable, 2),
        (429, b'{"result": false, "error": "Api RATE exceeded"}', ProviderUnavailable, 2),
        (403, b'{"result": false, "error": "Api RATE exceeded"}', ProviderUnavailable, 1),
        (200, b'{"result": false, "error": "Api RATE exceeded"}', ProviderUnavailable, 1),
        (200, b'{"result": false, "error": "Invalid signature"}', ProviderRejected, 1),
        (200, b'{"result": false, "error": "Payment not found"}', PaymentNotFound, 1),
        (200, b"<html>gateway</html>", ProviderUnavailable, 2),
        (200, STATUS_ANSWER[:-20], ProviderUnavailable, 2),
        (200, b"[]", ProviderUnavailable, 1),
        (200, b'{"payment_request_id_client": "order-1001"}', ProviderUnavailable, 1),
        (200, b'{"status": "SUCCESS", "payment_detail": "x"}', ProviderUnavailable, 1),
        (
            200,
            b'{"status": "SUCCESS", "payment_request_id_client": "order-9"}',
            ProviderRejected,
            1,
        ),
    ],
    ids=[
        "404",
        "401",
        "400",
        "500-retried",
        "503-retried",
        "429-retried",
        "429-rate-limit",
        "403-rate-limit",
        "200-rate-limit",
        "result-false",
        "result-false-not-found",
        "garbage",
        "truncated",
        "array",
        "no-status",
        "bad-detail",
        "another-payment",
    ],
)
def test_fetch_status_errors(
    provider: CoinbarPay,
    mocked: responses.RequestsMock,
    status: int,
    body: bytes,
    error: type[Exception],
    calls: int,
) -> None:
    mocked.get(STATUS_URL, status=status, body=body)
    with pytest.raises(error) as caught:
        provider.fetch_status(PaymentRef("order-1001"))
    assert type(caught.value) is error
    assert len(mocked.calls) == calls
    assert SECRET not in str(caught.value)


def test_fetch_status_timeout_is_retried_then_unavailable(
    provider: CoinbarPay, mocked: responses.RequestsMock
) -> None:
    mocked.get(STATUS_URL, body=requests.Timeout())
    with pytest.raises(ProviderUnavailable, match="timed out"):
        provider.fetch_status(PaymentRef("order-1001"))
    assert len(mocked.calls) == 2


def test_fetch_status_recovers_from_one_transient_failure(provider: CoinbarPay) -> None:
    with provider_mock(registry=responses.registries.OrderedRegistry) as mocked:
        mocked.get(STATUS_URL, status=502, body=b"bad gateway")
        mocked.get(STATUS_URL, body=STATUS_ANSWER)
        assert provider.fetch_status(PaymentRef("order-1001")).provider_status == "FAILED"
        assert len(mocked.calls) == 2


# -- creating a payment ---------------------------------------------------------------------------

NOW = datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)  # 1700000000000 ms

CREATE_ANSWER = (
    b'{"result":"success","request_token":"tok","payment_id_coinbar":'
    b'"499f5adb-5911-4d1f-8642-2c53c24075d9","payment_total_price":8.99,"trade_pair":"BTC/EUR",'
    b'"payment_string":"bitcoin:bc1qexample?amount=0.000451454232508973231",'
    b'"destination_coin_change":19913.425,"destination_amount":0.000451454232508973231,'
    b'"destination_address":"bc1qexample","destination_memo":null}'
)


def payment_request(**changes: Any) -> PaymentRequest:
    request = PaymentRequest(
        order_id="order-1001",
        amount=Decimal("8.99"),
        currency="EUR",
        notification_url="https://ipn.example.com/ipn/coinbarpay/callback",
        pay_currency="BTC",
        customer_email="mario.rossi@example.com",
    )
    return replace(request, **changes)


def test_create_payment_sends_the_exact_signed_body(
    provider: CoinbarPay, mocked: responses.RequestsMock
) -> None:
    mocked.post(CREATE_URL, body=CREATE_ANSWER, content_type="application/json")

    with time_machine.travel(NOW, tick=False):
        snapshot = provider.create_payment(payment_request())

    assert len(mocked.calls) == 1
    sent = mocked.calls[0].request
    assert sent.body == (
        b'{"service_client_id":"2cb63353-2541-4c4e-90d4-7bf1d4b42c5c",'
        b'"payment_request_id":"order-1001","input_coin":"EUR","products":[{"product_name":'
        b'"Order #order-1001","product_price":8.99,"product_amount":1,"product_id":"order-1001",'
        b'"product_type":"ecommerce"}],"email":"mario.rossi@example.com",'
        b'"timestamp":1700000000000,"destination_coin":"BTC"}'
    )
    assert sent.headers["SIGNATURE"] == hmac_sha256(sent.body)
    assert sent.headers["CBPAY-API-KEY"] == CLIENT_ID
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["source"] == "web"
    assert snapshot.provider_status == "CREATED"
    assert snapshot.ref == PaymentRef("order-1001", "499f5adb-5911-4d1f-8642-2c53c24075d9")
    assert (snapshot.amount, snapshot.currency) == (Decimal("8.99"), "EUR")
    assert str(snapshot.pay_amount) == "0.000451454232508973231"
    assert snapshot.pay_currency == "BTC"
    assert snapshot.pay_address == "bc1qexample"
    assert snapshot.payment_uri == "bitcoin:bc1qexample?amount=0.000451454232508973231"
    assert snapshot.expires_at == NOW + timedelta(minutes=30)


def test_create_payment_uses_the_description_unescaped_and_a_whole_price(
    settings: CoinbarPaySettings, mocked: responses.RequestsMock
) -> None:
    provider = CoinbarPay(replace(settings, payment_timeout=timedelta(minutes=5)))
    mocked.post(CREATE_URL, body=CREATE_ANSWER)

    with time_machine.travel(NOW, tick=False):
        snapshot = provider.create_payment(
            payment_request(amount=Decimal("12.00"), description="Caffè ☕", pay_currency="XDB")
        )

    body = mocked.calls[0].request.body
    assert isinstance(body, bytes)
    sent = json.loads(body, parse_float=Decimal)
    assert sent["products"][0]["product_name"] == "Caffè ☕"
    assert '"product_name":"Caffè ☕","product_price":12,'.encode() in body
    assert sent["destination_coin"] == "XDB"
    assert mocked.calls[0].request.headers["SIGNATURE"] == hmac_sha256(body)
    assert snapshot.expires_at == NOW + timedelta(minutes=5)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"customer_email": None}, "customer_email"),
        ({"customer_email": ""}, "customer_email"),
        ({"pay_currency": None}, "pay_currency"),
        ({"amount": Decimal("0")}, "amount"),
        ({"amount": Decimal("-1")}, "amount"),
        ({"amount": Decimal("NaN")}, "amount"),
        ({"amount": Decimal("0.1234567890123456789")}, "amount"),
        ({"currency": ""}, "currency"),
        ({"order_id": ""}, "order_id"),
    ],
)
def test_create_payment_refuses_what_coinbarpay_cannot_take_before_sending(
    provider: CoinbarPay, mocked: responses.RequestsMock, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidPaymentRequest) as caught:
        provider.create_payment(payment_request(**changes))
    assert caught.value.field == field
    assert len(mocked.calls) == 0


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (200, b'{"result": "error", "error": "destination_coin not supported"}', ProviderRejected),
        (200, b'{"result": false, "error": "Invalid signature"}', ProviderRejected),
        (200, b'{"payment_id_coinbar": "x"}', ProviderRejected),
        (200, b'{"result": false, "error": "Api RATE exceeded"}', ProviderUnavailable),
        (401, b'{"result": false, "error": "Unauthorized"}', ProviderRejected),
        (404, b"not here", PaymentNotFound),
        (500, b"oops", ProviderUnavailable),
        (429, b"slow down", ProviderUnavailable),
        (200, b"<html>", ProviderUnavailable),
        (200, CREATE_ANSWER[:-10], ProviderUnavailable),
        (200, b'{"result": "success"}', ProviderUnavailable),
        (
            200,
            b'{"result": "success", "payment_id_coinbar": "x", "destination_amount": "?"}',
            ProviderUnavailable,
        ),
    ],
    ids=[
        "result-error",
        "result-false",
        "result-missing",
        "rate-limit",
        "401",
        "404",
        "500",
        "429",
        "garbage",
        "truncated",
        "no-payment-id",
        "bad-amount",
    ],
)
def test_create_payment_errors_are_never_retried(
    provider: CoinbarPay,
    mocked: responses.RequestsMock,
    status: int,
    body: bytes,
    error: type[Exception],
) -> None:
    mocked.post(CREATE_URL, status=status, body=body)
    with pytest.raises(error) as caught:
        provider.create_payment(payment_request())
    assert type(caught.value) is error
    assert len(mocked.calls) == 1


def test_create_payment_timeout_is_unavailable_and_not_retried(
    provider: CoinbarPay, mocked: responses.RequestsMock
) -> None:
    mocked.post(CREATE_URL, body=requests.Timeout())
    with pytest.raises(ProviderUnavailable):
        provider.create_payment(payment_request())
    assert len(mocked.calls) == 1


# -- what the adapter reads and sends, field by field ------------------------------------------


def test_compact_json_keeps_non_ascii_keys_as_they_are() -> None:
    assert compact_json({"clé": ["é", Decimal("1.50")]}) == '{"clé":["é",1.5]}'.encode()


@pytest.mark.parametrize(
    ("value", "survives"),
    [
        (Decimal("1e-6"), True),
        (Decimal("1e20"), True),
        (Decimal("1e21"), False),
        (Decimal("1e22"), False),
        (Decimal("1e-7"), False),
        (Decimal("NaN"), False),
        (Decimal("Infinity"), False),
    ],
)
def test_js_number_survives_at_the_edges(value: Decimal, survives: bool) -> None:
    assert js_number_survives(value) is survives


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("@@@@", "not base64"),
        (base64.b64encode(b"@@@@").decode(), "not base64"),
        ("é", "not base64"),
        ("", "not whole AES blocks"),
    ],
)
def test_a_legacy_token_that_does_not_decode_says_why(token: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decrypt_legacy_token(token, LEGACY_KEY, LEGACY_IV)


@pytest.mark.parametrize(("key", "iv"), [(LEGACY_KEY, "short"), ("short", LEGACY_IV)])
def test_legacy_keys_of_the_wrong_size_are_named(key: str, iv: str) -> None:
    with pytest.raises(ValueError, match="must be 32 bytes"):
        decrypt_legacy_token(LEGACY_TOKEN, key, iv)


@pytest.mark.parametrize(
    "settings",
    [
        CoinbarPaySettings(service_client_id=CLIENT_ID, api_url=API_URL),
        CoinbarPaySettings(secret_key=SECRET, api_url=API_URL),
    ],
)
def test_half_configured_is_not_configured(
    mocked: responses.RequestsMock, settings: CoinbarPaySettings
) -> None:
    provider = CoinbarPay(settings)
    with pytest.raises(MalformedCallback, match="not configured"):
        provider.read_callback("callback", STATUS_ANSWER, {})
    with pytest.raises(ConfigurationError, match="not configured"):
        provider.fetch_status(PaymentRef("order-1001"))
    assert len(mocked.calls) == 0


@pytest.mark.parametrize(
    "settings",
    [
        CoinbarPaySettings(
            service_client_id=CLIENT_ID, secret_key=SECRET, token_api_key=LEGACY_KEY
        ),
        CoinbarPaySettings(service_client_id=CLIENT_ID, secret_key=SECRET, token_secret=LEGACY_IV),
    ],
)
def test_a_legacy_callback_needs_both_token_settings(settings: CoinbarPaySettings) -> None:
    body = json.dumps({"serviceClientId": CLIENT_ID, "responseToken": LEGACY_TOKEN}).encode()
    with pytest.raises(MalformedCallback, match="not configured"):
        CoinbarPay(settings).read_callback("callback", body, {})


def callback(provider: CoinbarPay, **changes: Any) -> Snapshot:
    data = json.loads(STATUS_ANSWER)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    body = json.dumps(data).encode()
    read = provider.read_callback("callback", body, {"SIGNATURE": hmac_sha256(body)})
    assert read.snapshot is not None
    return read.snapshot


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"payment_request_id_client": True}, "payment_request_id_client is not text"),
        (
            {"payment_request_id_client": None, "payment_request_id": True},
            "payment_request_id is not text",
        ),
        ({"payment_id_coinbar": 1.5}, "payment_id_coinbar is not text"),
        ({"input_coin": False}, "input_coin is not text"),
        ({"payment_detail": {"total_price": "x"}}, "payment_detail.total_price is not"),
        ({"payment_detail": {"destination_amount": "x"}}, "payment_detail.destination_amount"),
        ({"payment_detail": {"destination_coin": 1.5}}, "payment_detail.destination_coin is"),
        ({"update_time": "soon"}, "update_time is not"),
        ({"status": 5}, "status is missing or not text"),
        ({"status": ""}, "status is missing or not text"),
    ],
)
def test_a_bad_callback_field_is_named(
    provider: CoinbarPay, changes: dict[str, Any], named: str
) -> None:
    with pytest.raises(MalformedCallback) as raised:
        callback(provider, **changes)
    assert named in str(raised.value)


def test_callback_ids_as_numbers_empty_text_and_no_description(provider: CoinbarPay) -> None:
    snapshot = callback(
        provider,
        payment_request_id_client="",
        payment_request_id=1001,
        status_descr=None,
    )
    assert snapshot.order_id == "1001"
    assert snapshot.detail == ""


def create_answer(**changes: Any) -> str:
    data = json.loads(CREATE_ANSWER)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data)


def test_create_takes_the_coin_the_answer_names(
    provider: CoinbarPay, mocked: responses.RequestsMock
) -> None:
    mocked.post(CREATE_URL, body=create_answer(destination_coin="USDT"))
    assert provider.create_payment(payment_request(amount=Decimal("0.5"))).pay_currency == "USDT"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"payment_id_coinbar": True}, "payment_id_coinbar is not text"),
        ({"destination_amount": "x"}, "destination_amount is not"),
        ({"destination_coin": 1.5}, "destination_coin is not text"),
        ({"destination_address": 1.5}, "destination_address is not text"),
        ({"payment_string": 1.5}, "payment_string is not text"),
    ],
)
def test_a_bad_create_answer_field_is_named(
    provider: CoinbarPay, mocked: responses.RequestsMock, changes: dict[str, Any], named: str
) -> None:
    mocked.post(CREATE_URL, body=create_answer(**changes))
    with pytest.raises(ProviderUnavailable) as raised:
        provider.create_payment(payment_request())
    assert named in str(raised.value)


def test_a_create_answer_without_a_result_says_so(
    provider: CoinbarPay, mocked: responses.RequestsMock
) -> None:
    mocked.post(CREATE_URL, body=create_answer(result=None))
    with pytest.raises(ProviderRejected, match="result missing"):
        provider.create_payment(payment_request())
