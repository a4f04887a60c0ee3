"""CryptoProcessing adapter: the signature, callbacks, the mapping table and payment creation."""

from __future__ import annotations

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

from ipn.config import CryptoProcessingSettings, HTTPSettings
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
from ipn.providers.cryptoprocessing import CryptoProcessing, signature
from models import PaymentStatus

from helpers import provider_mock

# -- the documented vector and callback (cryptoprocessing.md) --------------------------------------

VECTOR_SECRET = "AbCdEfG123456"
VECTOR_BODY = b'{"currency":"BTC","foreign_id":"123456"}'
VECTOR_SIGNATURE = (
    "03c25fcf7cd35e7d995e402cd5d51edd72d48e1471e865907967809a0c189ba5"
    "5b90815f20e2bb10f82c7a9e9d865546fda58989c2ae9e8e2ff7bc29195fa1ec"
)

API_KEY = "cp-api-key-0001"
SECRET = "cp-secret-do-not-log"
API_URL = "https://cryptoprocessing.test"
CREATE_URL = API_URL + "/api/payments/v1/requests"

CALLBACK = (
    b'{"payment_request_id":"019c0ebf-81e5-751d-aa57-fb9e2cba23c2","foreign_id":"order_12345",'
    b'"type":"payment_request","status":"processing","end_user_email":"test@test.com",'
    b'"payment_request_address":{"id":"019c0ebf-84a1-7bdc-a09c-8b62294cc75d",'
    b'"currency":{"iso":"BTC","network_name":"bitcoin"},'
    b'"convert_to":{"iso":"ETH","network_name":"ethereum"},'
    b'"address":"tb1qj0d4rsczat6dx3yy065g98rrz5hewkrdcrz7je"},'
    b'"payment_request_amount":{"currency":{"iso":"ETH","network_name":"ethereum"},"amount":"0.3"},'
    b'"currency_sent":{"currency":{"iso":"BTC","network_name":"bitcoin"},"expected_amount":"0.0094",'
    b'"received_amount":"0","remaining_amount":"0.0094"},'
    b'"fixed_at":1769773958,"expires_at":1769774157,"valid_until":1769774157}'
)

# When a status mapping is asked; only CubePay reads it.
DECIDED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def hmac_sha512(body: bytes, secret: str = SECRET) -> str:
    """Computed here independently of the module under test."""
    return hmac.new(secret.encode(), body, hashlib.sha512).hexdigest()


def signed(body: bytes, **overrides: str) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "X-Processing-Key": API_KEY,
        "X-Processing-Signature": hmac_sha512(body),
    }
    headers.update(overrides)
    return headers


def callback_body(**changes: Any) -> bytes:
    data = json.loads(CALLBACK)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data).encode()


@dataclass(frozen=True)
class HeldPayment:
    status: PaymentStatus
    created_at: datetime = datetime(2026, 1, 30, 11, 50, tzinfo=UTC)
    amount: Decimal | None = Decimal("0.3")
    currency: str | None = "ETH"
    pay_amount: Decimal | None = Decimal("0.0094")
    paid_amount: Decimal | None = None


@pytest.fixture
def settings() -> CryptoProcessingSettings:
    return CryptoProcessingSettings(api_key=API_KEY, secret=SECRET, api_url=API_URL)


@pytest.fixture
def provider(settings: CryptoProcessingSettings) -> CryptoProcessing:
    return CryptoProcessing(settings, HTTPSettings(attempts=2, backoff_max=0.01))


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with provider_mock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


# -- signing ----------------------------------------------------------------------------------


def test_documented_signature_vector() -> None:
    assert signature(VECTOR_BODY, VECTOR_SECRET) == VECTOR_SIGNATURE
    assert hmac_sha512(VECTOR_BODY, VECTOR_SECRET) == VECTOR_SIGNATURE


def test_the_documented_vector_is_accepted_as_a_callback_signature() -> None:
    provider = CryptoProcessing(CryptoProcessingSettings(api_key=API_KEY, secret=VECTOR_SECRET))
    # Signed and keyed correctly, but not a payment request: stored, not handled.
    callback = provider.read_callback(
        "callback",
        VECTOR_BODY,
        {"X-Processing-Key": API_KEY, "X-Processing-Signature": VECTOR_SIGNATURE},
    )
    assert callback.authenticity is Authenticity.VERIFIED
    assert not callback.handled


# -- callbacks --------------------------------------------------------------------------------


def test_genuine_callback_is_verified_with_ref_and_snapshot(provider: CryptoProcessing) -> None:
    callback = provider.read_callback("callback", CALLBACK, signed(CALLBACK))

    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.handled
    assert callback.ref == PaymentRef("order_12345", "019c0ebf-81e5-751d-aa57-fb9e2cba23c2")
    assert callback.snapshot == Snapshot(
        provider_status="processing",
        order_id="order_12345",
        provider_payment_id="019c0ebf-81e5-751d-aa57-fb9e2cba23c2",
        amount=Decimal("0.3"),
        currency="ETH",
        pay_amount=Decimal("0.0094"),
        pay_currency="BTC",
        paid_amount=Decimal("0"),
        pay_address="tb1qj0d4rsczat6dx3yy065g98rrz5hewkrdcrz7je",
        expires_at=datetime(2026, 1, 30, 11, 55, 57, tzinfo=UTC),
    )
    assert callback.fields["end_user_email"] == "test@test.com"
    assert provider.decide(callback.snapshot, None, DECIDED_AT).state is PaymentStatus.CONFIRMING


def test_amounts_keep_every_digit(provider: CryptoProcessing) -> None:
    body = CALLBACK.replace(
        b'"expected_amount":"0.0094"', b'"expected_amount":0.123456789012345678901'
    ).replace(b'"received_amount":"0"', b'"received_amount":"0.000000000000000001"')
    callback = provider.read_callback("callback", body, signed(body))
    assert callback.snapshot is not None
    assert str(callback.snapshot.pay_amount) == "0.123456789012345678901"
    assert str(callback.snapshot.paid_amount) == "1E-18"
    assert callback.snapshot.paid_amount == Decimal("0.000000000000000001")


def test_signature_is_compared_case_insensitively(provider: CryptoProcessing) -> None:
    headers = signed(CALLBACK)
    headers = {
        k.lower(): v.upper() if k == "X-Processing-Signature" else v for k, v in headers.items()
    }
    callback = provider.read_callback("callback", CALLBACK, headers)
    assert callback.authenticity is Authenticity.VERIFIED


@pytest.mark.parametrize(
    "headers",
    [
        signed(CALLBACK, **{"X-Processing-Signature": hmac_sha512(CALLBACK, "another-secret")}),
        signed(CALLBACK, **{"X-Processing-Key": "someone-else"}),
        signed(CALLBACK, **{"X-Processing-Key": ""}),
        signed(CALLBACK, **{"X-Processing-Signature": ""}),
        signed(CALLBACK, **{"X-Processing-Signature": hmac_sha512(CALLBACK)[:-2]}),
        {"X-Processing-Signature": hmac_sha512(CALLBACK)},
        {"X-Processing-Key": API_KEY},
        {},
    ],
    ids=[
        "wrong-secret",
        "foreign-key",
        "empty-key",
        "empty-signature",
        "short-signature",
        "missing-key",
        "missing-signature",
        "no-headers",
    ],
)
def test_forged_callbacks(provider: CryptoProcessing, headers: dict[str, str]) -> None:
    with pytest.raises(ForgedCallback) as caught:
        provider.read_callback("callback", CALLBACK, headers)
    assert SECRET not in str(caught.value)
    assert hmac_sha512(CALLBACK) not in str(caught.value)


def test_one_byte_changed_is_forged(provider: CryptoProcessing) -> None:
    tampered = CALLBACK.replace(b'"amount":"0.3"', b'"amount":"0.1"')
    assert len(tampered) == len(CALLBACK) and tampered != CALLBACK
    with pytest.raises(ForgedCallback):
        provider.read_callback("callback", tampered, signed(CALLBACK))


def test_forged_unhandled_type_is_still_forged(provider: CryptoProcessing) -> None:
    body = callback_body(type="deposit")
    with pytest.raises(ForgedCallback):
        provider.read_callback("callback", body, signed(body, **{"X-Processing-Key": "x"}))


@pytest.mark.parametrize("kind_of", ["deposit", "withdrawal", "exchange", "invoice", None, 7])
def test_other_callback_types_are_stored_not_handled(
    provider: CryptoProcessing, kind_of: Any
) -> None:
    body = callback_body(type=kind_of, status="confirmed")
    callback = provider.read_callback("callback", body, signed(body))
    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.handled is False
    assert callback.reason == f"callbacks of type {kind_of!r} are not handled"
    assert not callback.ref
    assert callback.snapshot is None


DEEP_ARRAY = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000


@pytest.mark.parametrize(
    "body",
    [
        CALLBACK[:-1],
        b"",
        b'[{"type": "payment_request"}]',
        b"null",
        b'{"type": "payment_request", "foreign_id": "order-\xff", "status": "paid"}',
        DEEP_ARRAY,
        DEEP_OBJECT,
        callback_body(foreign_id=None, payment_request_id=None),
        callback_body(foreign_id="", payment_request_id=""),
        callback_body(status=None),
        callback_body(status=3),
        callback_body(foreign_id=["order"]),
        callback_body(currency_sent="0.0094"),
        callback_body(payment_request_amount={"amount": "a lot"}),
        callback_body(expires_at="tomorrow"),
    ],
    ids=[
        "truncated",
        "empty",
        "array",
        "null",
        "invalid-utf8",
        "deep-array",
        "deep-object",
        "no-reference",
        "empty-reference",
        "no-status",
        "status-not-text",
        "reference-not-text",
        "currency-sent-not-object",
        "amount-not-number",
        "expiry-not-time",
    ],
)
def test_malformed_callbacks(provider: CryptoProcessing, body: bytes) -> None:
    with pytest.raises(MalformedCallback):
        provider.read_callback("callback", body, signed(body))


def test_unknown_kind_is_malformed(provider: CryptoProcessing) -> None:
    with pytest.raises(MalformedCallback):
        provider.read_callback("ipn", CALLBACK, signed(CALLBACK))


def test_unconfigured_provider_names_the_settings() -> None:
    provider = CryptoProcessing(CryptoProcessingSettings())
    with pytest.raises(MalformedCallback, match="CRYPTOPROCESSING_SECRET"):
        provider.read_callback("callback", CALLBACK, signed(CALLBACK))


def test_there_is_no_status_api(provider: CryptoProcessing) -> None:
    assert provider.has_status_api is False
    with pytest.raises(NotImplementedError):
        provider.fetch_status(PaymentRef("order_12345"))


# -- the mapping table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected", "received", "state"),
    [
        ("created", None, None, PaymentStatus.PENDING),
        ("processing", None, None, PaymentStatus.CONFIRMING),
        ("processing", "0.0094", "0", PaymentStatus.CONFIRMING),
        ("processing", "0.0094", "0.0050", PaymentStatus.UNDERPAID),
        ("processing", "0.0094", "0.009399999999999999", PaymentStatus.UNDERPAID),
        ("processing", "0.0094", "0.0094", PaymentStatus.CONFIRMING),
        ("processing", "0.0094", "0.02", PaymentStatus.CONFIRMING),
        ("processing", None, "0.005", PaymentStatus.CONFIRMING),
        ("paid", "0.0094", "0.0094", PaymentStatus.PAID),
        ("paid", "0.0094", "0.005", PaymentStatus.PAID),
        ("failed", "0.0094", "0.005", PaymentStatus.FAILED),
        ("expired", "0.0094", "0", PaymentStatus.EXPIRED),
        ("restricted", None, None, None),
        ("cancelled", None, None, None),
        ("confirmed", None, None, None),
    ],
)
def test_decide(
    provider: CryptoProcessing,
    status: str,
    expected: str | None,
    received: str | None,
    state: PaymentStatus | None,
) -> None:
    snapshot = Snapshot(
        provider_status=status,
        order_id="order_12345",
        pay_amount=Decimal(expected) if expected else None,
        paid_amount=Decimal(received) if received else None,
    )
    assert provider.decide(snapshot, HeldPayment(PaymentStatus.PENDING), DECIDED_AT).state == state
    assert provider.decide(snapshot, None, DECIDED_AT).state == state


@pytest.mark.parametrize(
    ("status", "pay", "held", "shows", "older"),
    [
        ("failed", "0.0094", "0.0094", "0", True),
        ("failed", "0.0094", "0.0094", "0.005", True),
        ("failed", "0.0094", "0.0094", None, True),
        ("failed", "0.0094", "0.02", "0.0094", True),
        ("failed", "0.0094", "0.0094", "0.0094", False),
        ("failed", "0.0094", "0.009399", "0", False),
        ("failed", "0.0094", None, "0", False),
        ("failed", None, "0.0094", "0", False),
        ("expired", "0.0094", "0.0094", "0", True),
        ("expired", "0.0094", "0.0094", "0.0094", False),
        ("processing", "0.0094", "0.0094", "0", False),
        ("paid", "0.0094", "0.0094", "0.005", False),
        ("created", "0.0094", "0.0094", None, False),
    ],
)
def test_an_end_showing_less_than_the_full_amount_seen_is_an_older_callback(
    provider: CryptoProcessing,
    status: str,
    pay: str | None,
    held: str | None,
    shows: str | None,
    older: bool,
) -> None:
    """No time on the callbacks: `failed` and `expired` mean too little arrived, so one showing
    less than the full amount the payment already holds was sent before that money."""
    snapshot = Snapshot(
        provider_status=status,
        order_id="order_12345",
        pay_amount=Decimal("0.0094"),
        paid_amount=Decimal(shows) if shows else None,
    )
    payment = HeldPayment(
        PaymentStatus.PENDING,
        pay_amount=Decimal(pay) if pay else None,
        paid_amount=Decimal(held) if held else None,
    )
    decision = provider.decide(snapshot, payment, DECIDED_AT)
    # The state is the one the status maps to; `older` only says the snapshot is not news.
    assert decision.state is provider.decide(snapshot, None, DECIDED_AT).state
    assert bool(decision.older) is older
    if older:
        assert decision.older == (
            f"older callback: it shows {shows or 0} received, the full {held} was already seen"
        )


def test_underpaid_callback_end_to_end(provider: CryptoProcessing) -> None:
    sent = {"currency": {"iso": "BTC"}, "expected_amount": "0.0094", "received_amount": "0.0040"}
    body = callback_body(currency_sent=sent)
    callback = provider.read_callback("callback", body, signed(body))
    assert callback.snapshot is not None
    decision = provider.decide(callback.snapshot, None, DECIDED_AT)
    assert decision.state is PaymentStatus.UNDERPAID
    assert "0.0040" in decision.note


# -- creating a payment request -------------------------------------------------------------------

CREATE_ANSWER = (
    b'{"data":{"id":"0196f6a1-cab2-76fb-84c7-7e9ee9ddf6b4","amount":"100.50",'
    b'"currency":{"iso":"EUR"},"status":"created","life_time":1731427200,'
    b'"end_user_email":"mario.rossi@example.com","description":"Order 0512",'
    b'"payment_link":"https://pay.cryptoprocessing.com/request/0196f6a1-cab2-76fb-84c7-7e9ee9ddf6b4",'
    b'"foreign_id":"order-1001"}}'
)


def payment_request(**changes: Any) -> PaymentRequest:
    request = PaymentRequest(
        order_id="order-1001",
        amount=Decimal("100.50"),
        currency="EUR",
        notification_url="https://ipn.example.com/ipn/cryptoprocessing/callback",
        pay_currency="BTC",
        description="Order 0512",
        customer_email="mario.rossi@example.com",
    )
    return replace(request, **changes)


def test_create_payment_sends_the_exact_signed_body(
    provider: CryptoProcessing, mocked: responses.RequestsMock
) -> None:
    mocked.post(CREATE_URL, body=CREATE_ANSWER, content_type="application/json")

    snapshot = provider.create_payment(payment_request())

    assert len(mocked.calls) == 1
    sent = mocked.calls[0].request
    assert sent.body == (
        b'{"amount":"100.50","currency":{"iso":"EUR"},"life_time_duration":3600,'
        b'"payment_currency":{"iso":"BTC"},"end_user_email":"mario.rossi@example.com",'
        b'"description":"Order 0512","foreign_id":"order-1001"}'
    )
    assert sent.headers["X-Processing-Signature"] == hmac_sha512(sent.body)
    assert sent.headers["X-Processing-Key"] == API_KEY
    assert sent.headers["Content-Type"] == "application/json"
    assert snapshot.provider_status == "created"
    assert snapshot.ref == PaymentRef("order-1001", "0196f6a1-cab2-76fb-84c7-7e9ee9ddf6b4")
    assert (snapshot.amount, snapshot.currency) == (Decimal("100.50"), "EUR")
    assert snapshot.pay_currency == "BTC"
    assert snapshot.pay_url == (
        "https://pay.cryptoprocessing.com/request/0196f6a1-cab2-76fb-84c7-7e9ee9ddf6b4"
    )
    assert snapshot.expires_at == datetime(2024, 11, 12, 16, 0, tzinfo=UTC)
    assert provider.decide(snapshot, None, DECIDED_AT).state is PaymentStatus.PENDING


def test_create_payment_leaves_out_what_is_not_given(
    settings: CryptoProcessingSettings, mocked: responses.RequestsMock
) -> None:
    provider = CryptoProcessing(replace(settings, life_time=timedelta(minutes=15)))
    mocked.post(CREATE_URL, body=CREATE_ANSWER)

    provider.create_payment(
        payment_request(
            amount=Decimal("0.000000000000000001"),
            currency="USDT",
            pay_currency=None,
            description=None,
            customer_email=None,
        )
    )

    body = mocked.calls[0].request.body
    assert body == (
        b'{"amount":"0.000000000000000001","currency":{"iso":"USDT"},'
        b'"life_time_duration":900,"foreign_id":"order-1001"}'
    )
    assert mocked.calls[0].request.headers["X-Processing-Signature"] == hmac_sha512(body)


def test_create_payment_writes_amounts_without_exponents(
    provider: CryptoProcessing, mocked: responses.RequestsMock
) -> None:
    mocked.post(CREATE_URL, body=CREATE_ANSWER)
    provider.create_payment(payment_request(amount=Decimal("1E+2")))
    body = mocked.calls[0].request.body
    assert isinstance(body, bytes)
    assert body.startswith(b'{"amount":"100",')


def test_create_answer_with_address_and_amounts_fills_them_in(
    provider: CryptoProcessing, mocked: responses.RequestsMock
) -> None:
    answer = json.loads(CREATE_ANSWER)
    answer["data"]["payment_request_address"] = {"address": "bc1qexample"}
    answer["data"]["currency_sent"] = {
        "currency": {"iso": "BTC"},
        "expected_amount": "0.001234567890123456",
    }
    mocked.post(CREATE_URL, body=json.dumps(answer))
    snapshot = provider.create_payment(payment_request())
    assert snapshot.pay_address == "bc1qexample"
    assert str(snapshot.pay_amount) == "0.001234567890123456"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount": Decimal("0")}, "amount"),
        ({"amount": Decimal("-5")}, "amount"),
        ({"amount": Decimal("Infinity")}, "amount"),
        ({"currency": ""}, "currency"),
        ({"order_id": ""}, "order_id"),
    ],
)
def test_create_payment_refuses_bad_input_before_sending(
    provider: CryptoProcessing,
    mocked: responses.RequestsMock,
    changes: dict[str, Any],
    field: str,
) -> None:
    with pytest.raises(InvalidPaymentRequest) as caught:
        provider.create_payment(payment_request(**changes))
    assert caught.value.field == field
    assert len(mocked.calls) == 0


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (401, b'{"errors": {"key": "invalid"}}', ProviderRejected),
        (403, b'{"error": "Forbidden"}', ProviderRejected),
        (422, b'{"errors": {"amount": "too small"}}', ProviderRejected),
        (404, b"not found", PaymentNotFound),
        (500, b"oops", ProviderUnavailable),
        (429, b"slow down", ProviderUnavailable),
        (200, b"<html>", ProviderUnavailable),
        (200, CREATE_ANSWER[:-5], ProviderUnavailable),
        (200, b"[]", ProviderUnavailable),
        (200, b'{"id": "x"}', ProviderUnavailable),
        (200, b'{"data": {"amount": "100.50"}}', ProviderUnavailable),
        (200, b'{"data": {"id": "x", "amount": "NaN"}}', ProviderUnavailable),
        (200, b'{"data": {"id": "x", "life_time": "next week"}}', ProviderUnavailable),
    ],
    ids=[
        "401",
        "403",
        "422",
        "404",
        "500",
        "429",
        "garbage",
        "truncated",
        "array",
        "no-data",
        "no-id",
        "nan-amount",
        "bad-life-time",
    ],
)
def test_create_payment_errors_are_never_retried(
    provider: CryptoProcessing,
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
    assert SECRET not in str(caught.value)


def test_create_payment_timeout_is_unavailable_and_not_retried(
    provider: CryptoProcessing, mocked: responses.RequestsMock
) -> None:
    mocked.post(CREATE_URL, body=requests.Timeout())
    with pytest.raises(ProviderUnavailable, match="timed out"):
        provider.create_payment(payment_request())
    assert len(mocked.calls) == 1


# -- what the adapter reads and sends, field by field ------------------------------------------


@pytest.mark.parametrize(
    "settings", [CryptoProcessingSettings(api_key=API_KEY), CryptoProcessingSettings(secret=SECRET)]
)
def test_half_configured_is_not_configured(settings: CryptoProcessingSettings) -> None:
    provider = CryptoProcessing(settings)
    with pytest.raises(MalformedCallback, match="not configured"):
        provider.read_callback("callback", CALLBACK, signed(CALLBACK))
    with pytest.raises(ConfigurationError, match="not configured"):
        provider.create_payment(payment_request())


def test_a_life_time_of_zero_is_a_configuration_error(mocked: responses.RequestsMock) -> None:
    settings = CryptoProcessingSettings(
        api_key=API_KEY, secret=SECRET, api_url=API_URL, life_time=timedelta(0)
    )
    with pytest.raises(ConfigurationError, match="LIFE_TIME"):
        CryptoProcessing(settings).create_payment(payment_request())
    assert len(mocked.calls) == 0


def test_create_payment_sends_text_as_utf_8(
    provider: CryptoProcessing, mocked: responses.RequestsMock
) -> None:
    mocked.post(CREATE_URL, body=CREATE_ANSWER)
    provider.create_payment(payment_request(description="Café crème"))
    assert "Café crème".encode() in mocked.calls[0].request.body


def read(provider: CryptoProcessing, **changes: Any) -> Snapshot:
    body = callback_body(**changes)
    callback = provider.read_callback("callback", body, signed(body))
    assert callback.snapshot is not None
    return callback.snapshot


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"foreign_id": True}, "foreign_id is not text"),
        ({"payment_request_id": [1]}, "payment_request_id is not text"),
        ({"payment_request_amount": {"amount": "x"}}, "payment_request_amount.amount is not"),
        ({"payment_request_amount": {"currency": True}}, "payment_request_amount.currency is"),
        (
            {"payment_request_amount": {"currency": {"iso": True}}},
            "payment_request_amount.currency.iso is not text",
        ),
        ({"currency_sent": {"expected_amount": "x"}}, "currency_sent.expected_amount is not"),
        ({"currency_sent": {"currency": False}}, "currency_sent.currency is not text"),
        ({"currency_sent": {"received_amount": "x"}}, "currency_sent.received_amount is not"),
        ({"payment_request_address": {"address": 1.5}}, "payment_request_address.address is"),
        ({"expires_at": "soon"}, "expires_at"),
    ],
)
def test_a_bad_callback_field_is_named(
    provider: CryptoProcessing, changes: dict[str, Any], named: str
) -> None:
    with pytest.raises(MalformedCallback) as raised:
        read(provider, **changes)
    assert named in str(raised.value)


def test_callback_ids_as_numbers_bare_codes_and_empty_text(provider: CryptoProcessing) -> None:
    snapshot = read(
        provider,
        foreign_id="",
        payment_request_id=12345,
        payment_request_amount={"currency": "ETH", "amount": "0.3"},
    )
    assert snapshot.order_id is None
    assert snapshot.provider_payment_id == "12345"
    assert snapshot.currency == "ETH"


def create_answer(**changes: Any) -> str:
    answer = json.loads(CREATE_ANSWER)
    for key, value in changes.items():
        if value is None:
            answer["data"].pop(key, None)
        else:
            answer["data"][key] = value
    return json.dumps(answer)


def test_create_answer_says_what_it_says(
    provider: CryptoProcessing, mocked: responses.RequestsMock
) -> None:
    mocked.post(
        CREATE_URL,
        body=create_answer(
            status="pending",
            foreign_id="theirs",
            amount="99",
            currency={"iso": "USD"},
            currency_sent={"currency": {"iso": "LTC"}},
        ),
    )
    snapshot = provider.create_payment(payment_request())
    assert snapshot.provider_status == "pending"
    assert (snapshot.order_id, snapshot.amount, snapshot.currency) == ("theirs", 99, "USD")
    assert snapshot.pay_currency == "LTC"
    assert snapshot.pay_url == (
        "https://pay.cryptoprocessing.com/request/0196f6a1-cab2-76fb-84c7-7e9ee9ddf6b4"
    )
    assert snapshot.expires_at == datetime.fromtimestamp(1731427200, UTC)


def test_create_answer_gaps_are_filled_from_the_request(
    provider: CryptoProcessing, mocked: responses.RequestsMock
) -> None:
    mocked.post(
        CREATE_URL, body=create_answer(status=None, foreign_id=None, amount=None, currency=None)
    )
    snapshot = provider.create_payment(payment_request(order_id="mine", amount=Decimal("7")))
    assert snapshot.provider_status == "created"
    assert (snapshot.order_id, snapshot.amount, snapshot.currency) == ("mine", 7, "EUR")
    assert snapshot.pay_currency == "BTC"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"id": True}, "id is not text"),
        ({"foreign_id": 1.5}, "foreign_id is not text"),
        ({"currency": False}, "currency is not text"),
        ({"currency_sent": {"expected_amount": "x"}}, "currency_sent.expected_amount is not"),
        ({"currency_sent": {"currency": False}}, "currency_sent.currency is not text"),
        ({"payment_request_address": {"address": 1.5}}, "payment_request_address.address is"),
        ({"payment_link": 1.5}, "payment_link is not text"),
        ({"life_time": "next week"}, "life_time"),
    ],
)
def test_a_bad_create_answer_field_is_named(
    provider: CryptoProcessing, mocked: responses.RequestsMock, changes: dict[str, Any], named: str
) -> None:
    mocked.post(CREATE_URL, body=create_answer(**changes))
    with pytest.raises(ProviderUnavailable) as raised:
        provider.create_payment(payment_request())
    assert named in str(raised.value)
