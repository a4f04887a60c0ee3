"""CubePay adapter: signatures, IPN parsing, payment/query and payment/coin, the status table."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
import requests
import responses
import time_machine
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from ipn.config import CubePaySettings, HTTPSettings
from ipn.errors import (
    ForgedCallback,
    InvalidPaymentRequest,
    MalformedCallback,
    PaymentNotFound,
    ProviderRejected,
    ProviderUnavailable,
)
from ipn.providers.base import Authenticity, PaymentRef, PaymentRequest, Snapshot
from ipn.providers.cubepay import CubePay, sign
from models import PaymentStatus

from helpers import provider_mock

API = "https://api.cubepay.test"
CLIENT_ID = "exampleclientid"
SECRET = "exampleclientsecret"
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

# The example IPN of cubepay.md, signed with `client_secret=exampleclientsecret`.
EXAMPLE_IPN = (
    b"client_id=exampleclientid&source_coin_id=443&source_amount=500&item_name=Test+item+name"
    b"&merchant_transaction_id=M12345678&other=tok_5f2b9c&send_coin_id=&send_amount="
    b"&receive_address=&sign=5E25AFAFB5C31B384697A601A853D55032692BE33BA541FEDE567DF53E69ACC0"
)
EXAMPLE_SIGN = "5E25AFAFB5C31B384697A601A853D55032692BE33BA541FEDE567DF53E69ACC0"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON = {"Content-Type": "application/json"}

# payment/coin's documented answer (the later shape: `fee`, `send_info`), one amount longer.
CREATED: dict[str, Any] = {
    "id": "C1536678153791231775",
    "status": 0,
    "status_message": "unpaid",
    "pay_url": "http://cubepay.io/payment/pay?id=C1536678153791231775",
    "pay_info": {
        "coin": {"id": 2, "symbol": "BTC", "name": "BitCoin", "description": "BitCoin"},
        "address": "2N8iLSfdFv7GRXoNxtSgMmA1e9BQHyU1PzB",
        "qrcode": "http://common.cubepay.io/tool/qrcode/2N8iLSfdFv7GRXoNxtSgMmA1e9BQHyU1PzB.png",
        "amount": "@AMOUNT@",
        "paid_amount": 0,
        "merchant_transaction_id": "M12345678",
        "item_name": "Test item name",
        "source_coin": {"id": 443, "symbol": "TWD", "name": "New Taiwan Dollar"},
        "source_amount": 500,
        "rate": "@RATE@",
        "fee": {"amount": "@FEE@", "coin": {"id": 1, "symbol": "ETH", "name": "Ether"}},
    },
    "send_info": None,
}

# payment/query's documented answer (the first shape: `send_coin`, `refund_info`).
REFUNDED: dict[str, Any] = {
    "id": "C1536292666260718848",
    "status": 6,
    "status_message": "Refunded",
    "pay_url": "http://cubepay.io/payment/pay?id=C1536292666260718848",
    "pay_info": {
        "coin": {"id": 3, "symbol": "USDT", "name": "USDT"},
        "address": "0x08ab6fed4cc9780a383f36ce3f166db6fd0aa910",
        "amount": 100,
        "paid_amount": 100,
        "merchant_transaction_id": "1536292098",
        "item_name": "Test item name",
        "source_coin": {"id": 3, "symbol": "USDT", "name": "USDT"},
        "source_amount": 100,
        "rate": 1,
        "send_coin": {"id": 502, "symbol": "TOKEN1", "name": "Token1 Test"},
        "send_amount": 5000,
        "receive_address": "0x5A0DA1fD7f6b084A81F07fb9d641D295b2E7e669",
    },
    "refund_info": {
        "amount": "89.700000",
        "to_address": "0x5A0DA1fD7f6b084A81F07fb9d641D295b2E7e669",
    },
}


def answer_text(data: Any, status: int = 200) -> str:
    """A CubePay answer whose numbers are written exactly as given by `@...@` placeholders."""
    text = json.dumps({"status": status, "data": data})
    for name, literal in {
        "AMOUNT": "0.123456789012345678",
        "RATE": "199124.20804479",
        "FEE": "0.003",
    }.items():
        text = text.replace(f'"@{name}@"', literal)
    return text


def reference_sign(fields: dict[str, str], secret: str = SECRET) -> str:
    """cubepay.md's recipe, written out again so the tests do not trust the module's `sign`."""
    pairs = sorted((k, v) for k, v in fields.items() if k != "sign")
    text = "&".join(f"{k}={v}" for k, v in pairs) + f"&client_secret={secret}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest().upper()


def signed_form(fields: dict[str, str], secret: str = SECRET) -> bytes:
    return urlencode({**fields, "sign": reference_sign(fields, secret)}).encode()


def sent_form(call: Any) -> dict[str, str]:
    body = call.request.body
    text = body.decode() if isinstance(body, bytes) else body
    pairs = parse_qsl(text, keep_blank_values=True)
    assert len(pairs) == len(dict(pairs)), "a field was sent twice"
    return dict(pairs)


@dataclass(frozen=True)
class HeldPayment:
    status: PaymentStatus = PaymentStatus.PENDING
    created_at: datetime = NOW
    amount: Decimal | None = Decimal("500")
    currency: str | None = "TWD"
    pay_amount: Decimal | None = Decimal("1")
    paid_amount: Decimal | None = None


@pytest.fixture
def cubepay() -> CubePay:
    return CubePay(
        CubePaySettings(client_id=CLIENT_ID, client_secret=SECRET, api_url=API),
        HTTPSettings(attempts=2, backoff_max=0.01, connect_timeout=0.5, read_timeout=0.5),
    )


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with provider_mock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


# The sign ------------------------------------------------------------------------------------


def test_sign_matches_the_documented_vector() -> None:
    fields = {
        "wkey3": "250",
        "ekey2": "200",
        "akey": "100",
        "client_id": "exampleclientid",
        "ekey1": "100",
    }
    result = sign(fields, "exampleclientkey")
    assert result == "5235D1A5A1E376D9D6E2A278E2265F6C41AAC8D2913AA6569518B06D2451E591"
    # The provider's own doc prints the hash of the old `client_key=` label: not ours.
    assert not result.startswith("CA3F40AE")


def test_sign_matches_the_documented_query_vector() -> None:
    fields = {"id": "C1536678153791231775", "client_id": "exampleclientid"}
    assert sign(fields, SECRET) == (
        "BB5C2F63181246064BB3B7F0EB6C77F2CDCF7CB264DC9F9160D7057EFE7CCEE0"
    )


def test_sign_leaves_out_a_sign_field_and_uses_raw_values() -> None:
    fields = {"item_name": "a b&c/d", "client_id": "x"}
    assert sign({**fields, "sign": "ANYTHING"}, SECRET) == sign(fields, SECRET)
    raw = "client_id=x&item_name=a b&c/d&client_secret=exampleclientsecret"
    assert sign(fields, SECRET) == hashlib.sha256(raw.encode()).hexdigest().upper()


# Reading the IPN -----------------------------------------------------------------------------


def test_example_ipn_verifies(cubepay: CubePay) -> None:
    callback = cubepay.read_callback("ipn", EXAMPLE_IPN, FORM)
    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.ref == PaymentRef(order_id="M12345678", provider_payment_id=None)
    assert callback.token == "tok_5f2b9c"
    assert callback.snapshot is None
    assert callback.kind == "ipn"
    assert callback.fields["item_name"] == "Test item name"
    assert callback.fields["send_coin_id"] == ""
    assert callback.fields["sign"] == EXAMPLE_SIGN


def test_example_ipn_verifies_without_a_content_type(cubepay: CubePay) -> None:
    callback = cubepay.read_callback("ipn", EXAMPLE_IPN, {})
    assert callback.authenticity is Authenticity.VERIFIED


def test_lower_case_sign_verifies(cubepay: CubePay) -> None:
    body = EXAMPLE_IPN.replace(EXAMPLE_SIGN.encode(), EXAMPLE_SIGN.lower().encode())
    assert cubepay.read_callback("ipn", body, FORM).authenticity is Authenticity.VERIFIED


def test_ipn_without_sign_is_only_a_hint(cubepay: CubePay) -> None:
    body = EXAMPLE_IPN.split(b"&sign=")[0]
    callback = cubepay.read_callback("ipn", body, FORM)
    assert callback.authenticity is Authenticity.UNSIGNED
    assert callback.ref.order_id == "M12345678"
    assert callback.token == "tok_5f2b9c"


def example_as_json(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(parse_qsl(EXAMPLE_IPN.decode(), keep_blank_values=True))
    fields.update(source_coin_id=443, source_amount=500)
    fields.update(changes)
    return fields


def test_json_ipn_signs_its_integers_as_digits(cubepay: CubePay) -> None:
    body = json.dumps(example_as_json()).encode()
    callback = cubepay.read_callback("ipn", body, JSON)
    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.fields["source_amount"] == "500"
    assert callback.ref.order_id == "M12345678"


def test_json_ipn_is_recognised_by_its_body_alone(cubepay: CubePay) -> None:
    body = b"  " + json.dumps(example_as_json()).encode()
    assert cubepay.read_callback("ipn", body, FORM).authenticity is Authenticity.VERIFIED


def test_json_ipn_signs_null_as_an_empty_field(cubepay: CubePay) -> None:
    fields = example_as_json(send_coin_id=None, send_amount=None, receive_address=None)
    callback = cubepay.read_callback("ipn", json.dumps(fields).encode(), JSON)
    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.fields["send_amount"] == ""


def test_json_ipn_signs_decimals_as_written(cubepay: CubePay) -> None:
    # 0.00000001 must sign as written, not as Decimal's "1E-8".
    base = {"client_id": CLIENT_ID, "merchant_transaction_id": "M1", "send_amount": "0.00000001"}
    good = reference_sign(base)
    body = (
        '{"client_id":"exampleclientid","merchant_transaction_id":"M1",'
        f'"send_amount":0.00000001,"sign":"{good}"}}'
    ).encode()
    callback = cubepay.read_callback("ipn", body, JSON)
    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.fields["send_amount"] == "0.00000001"


def test_json_ipn_signs_booleans_as_their_json_words(cubepay: CubePay) -> None:
    base = {"client_id": CLIENT_ID, "merchant_transaction_id": "M1", "a": "true", "b": "false"}
    body = json.dumps(
        {**base, "a": True, "b": False, "sign": reference_sign(base)}, separators=(",", ":")
    ).encode()
    callback = cubepay.read_callback("ipn", body, JSON)
    assert callback.authenticity is Authenticity.VERIFIED
    assert (callback.fields["a"], callback.fields["b"]) == ("true", "false")


def test_query_shaped_form_ipn_names_both_ids(cubepay: CubePay) -> None:
    fields = {
        "client_id": CLIENT_ID,
        "id": "C1536678153791231775",
        "status": "2",
        "pay_info[merchant_transaction_id]": "M12345678",
        "pay_info[amount]": "0.00251098",
    }
    callback = cubepay.read_callback("ipn", signed_form(fields), FORM)
    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.ref == PaymentRef("M12345678", "C1536678153791231775")
    assert callback.snapshot is None


def test_query_shaped_json_ipn_signs_nested_objects_as_compact_json(cubepay: CubePay) -> None:
    nested = '{"merchant_transaction_id":"M12345678","amount":0.00251098}'
    base = {"client_id": CLIENT_ID, "id": "C1536678153791231775", "status": "2"}
    good = reference_sign({**base, "pay_info": nested})
    body = (
        '{"client_id": "exampleclientid", "id": "C1536678153791231775", "status": 2,'
        f' "pay_info": {{"merchant_transaction_id": "M12345678", "amount": 0.00251098}},'
        f' "sign": "{good}"}}'
    ).encode()
    callback = cubepay.read_callback("ipn", body, JSON)
    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.ref == PaymentRef("M12345678", "C1536678153791231775")


@hypothesis_settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=8).filter(
            lambda name: name not in ("sign", "client_id", "merchant_transaction_id")
        ),
        st.text(st.characters(codec="utf-8"), max_size=12),
        max_size=5,
    )
)
def test_any_form_ipn_signed_over_its_raw_values_verifies(extra: dict[str, str]) -> None:
    cubepay = CubePay(CubePaySettings(client_id=CLIENT_ID, client_secret=SECRET))
    fields = {"client_id": CLIENT_ID, "merchant_transaction_id": "M1", **extra}
    callback = cubepay.read_callback("ipn", signed_form(fields), FORM)
    assert callback.authenticity is Authenticity.VERIFIED
    assert dict(callback.fields) == {**fields, "sign": reference_sign(fields)}


@pytest.mark.parametrize(
    "body",
    [
        # One byte of the body changed.
        EXAMPLE_IPN.replace(b"Test+item+name", b"Test+item+namf"),
        EXAMPLE_IPN.replace(b"source_amount=500", b"source_amount=900"),
        # An empty field dropped: empty fields are signed too.
        EXAMPLE_IPN.replace(b"&send_amount=", b""),
        # Signed with another secret.
        signed_form(
            {"client_id": CLIENT_ID, "merchant_transaction_id": "M1"}, secret="not-the-secret"
        ),
        # A sign that is present but empty.
        EXAMPLE_IPN.replace(EXAMPLE_SIGN.encode(), b""),
        # Another merchant's IPN, correctly signed with its own secret.
        signed_form({"client_id": "someoneelse", "merchant_transaction_id": "M1"}),
        # No client id at all.
        signed_form({"merchant_transaction_id": "M1"}),
        urlencode({"merchant_transaction_id": "M1"}).encode(),
    ],
    ids=[
        "byte-changed",
        "amount-changed",
        "empty-field-dropped",
        "wrong-secret",
        "empty-sign",
        "foreign-client-id",
        "signed-without-client-id",
        "unsigned-without-client-id",
    ],
)
def test_forged_ipn_is_refused(cubepay: CubePay, body: bytes) -> None:
    with pytest.raises(ForgedCallback):
        cubepay.read_callback("ipn", body, FORM)


def test_wrong_configured_secret_refuses_the_example() -> None:
    cubepay = CubePay(CubePaySettings(client_id=CLIENT_ID, client_secret="exampleclientkey"))
    with pytest.raises(ForgedCallback):
        cubepay.read_callback("ipn", EXAMPLE_IPN, FORM)


def test_wrong_configured_client_id_refuses_the_example() -> None:
    cubepay = CubePay(CubePaySettings(client_id="otherclientid", client_secret=SECRET))
    with pytest.raises(ForgedCallback):
        cubepay.read_callback("ipn", EXAMPLE_IPN, FORM)


def test_forged_json_ipn_is_refused(cubepay: CubePay) -> None:
    body = json.dumps(example_as_json(source_amount=501)).encode()
    with pytest.raises(ForgedCallback):
        cubepay.read_callback("ipn", body, JSON)


def test_a_wrong_token_does_not_match(cubepay: CubePay) -> None:
    callback = cubepay.read_callback("ipn", EXAMPLE_IPN, FORM)
    assert cubepay.token_matches(callback, "tok_5f2b9c")
    assert not cubepay.token_matches(callback, "tok_other")
    # An echo that was emptied on the way is a mismatch, not "no token".
    unsigned = EXAMPLE_IPN.split(b"&sign=")[0].replace(b"other=tok_5f2b9c", b"other=")
    empty = cubepay.read_callback("ipn", unsigned, FORM)
    assert empty.token == ""
    assert not cubepay.token_matches(empty, "tok_5f2b9c")


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"client_id=exampleclientid&merchant_transaction_id=M\xff1", FORM),
        (b"client_id=exampleclientid&merchant_transaction_id=M%FF1", FORM),
        (b'{"client_id": "exampleclientid", "merchant_transaction_id": "M\xff"}', JSON),
        (b'["client_id", "exampleclientid"]', JSON),
        (b'["client_id", "exampleclientid"]', FORM),
        (b'"client_id=exampleclientid"', JSON),
        (b'{"client_id": "exampleclientid", "merchant_transaction_id": "M1"', JSON),
        (b"{not json", FORM),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, JSON),
        (b"[" * 100_000 + b"]" * 100_000, FORM),
        (b'{"client_id":"exampleclientid","merchant_transaction_id":"M1","x":NaN}', JSON),
        (b"client_id=exampleclientid&merchant_transaction_id=M1&merchant_transaction_id=M2", FORM),
        (b'{"client_id":"exampleclientid","merchant_transaction_id":"M1","client_id":"x"}', JSON),
        (b"client_id=exampleclientid&source_amount=500", FORM),
        (b'{"client_id":"exampleclientid","merchant_transaction_id":""}', JSON),
        (b"", FORM),
    ],
    ids=[
        "form-not-utf8",
        "form-percent-not-utf8",
        "json-not-utf8",
        "json-array",
        "json-array-as-form",
        "json-string",
        "json-truncated",
        "json-broken",
        "json-deeply-nested",
        "json-deeply-nested-array",
        "json-nan",
        "form-duplicate-field",
        "json-duplicate-field",
        "form-no-reference",
        "json-empty-reference",
        "empty",
    ],
)
def test_malformed_ipn_is_refused(cubepay: CubePay, body: bytes, headers: dict[str, str]) -> None:
    with pytest.raises(MalformedCallback):
        cubepay.read_callback("ipn", body, headers)


def test_unknown_callback_kind_is_refused(cubepay: CubePay) -> None:
    with pytest.raises(MalformedCallback):
        cubepay.read_callback("notification", EXAMPLE_IPN, FORM)


# payment/query -------------------------------------------------------------------------------


def add_query(mocked: responses.RequestsMock, text: str, status: int = 200) -> None:
    mocked.add(responses.POST, f"{API}/payment/query", body=text, status=status)


def test_fetch_status_sends_the_documented_signed_query(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    add_query(mocked, answer_text([CREATED]))
    cubepay.fetch_status(PaymentRef("M12345678", "C1536678153791231775"))
    (call,) = mocked.calls
    assert call.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert sent_form(call) == {
        "client_id": "exampleclientid",
        "id": "C1536678153791231775",
        "sign": "BB5C2F63181246064BB3B7F0EB6C77F2CDCF7CB264DC9F9160D7057EFE7CCEE0",
    }
    assert SECRET not in str(call.request.body)


def test_fetch_status_by_merchant_id_when_the_cubepay_id_is_unknown(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    add_query(mocked, answer_text([CREATED]))
    cubepay.fetch_status(PaymentRef(order_id="M12345678"))
    form = sent_form(mocked.calls[0])
    assert set(form) == {"client_id", "merchant_transaction_id", "sign"}
    assert form["merchant_transaction_id"] == "M12345678"
    assert form["sign"] == reference_sign(form)


def test_fetch_status_reads_every_digit(cubepay: CubePay, mocked: responses.RequestsMock) -> None:
    add_query(mocked, answer_text([CREATED]))
    snapshot = cubepay.fetch_status(PaymentRef(provider_payment_id="C1536678153791231775"))
    assert snapshot == Snapshot(
        provider_status="0",
        order_id="M12345678",
        provider_payment_id="C1536678153791231775",
        amount=Decimal("500"),
        currency="TWD",
        pay_amount=Decimal("0.123456789012345678"),
        pay_currency="BTC",
        paid_amount=Decimal("0"),
        pay_address="2N8iLSfdFv7GRXoNxtSgMmA1e9BQHyU1PzB",
        pay_url="http://cubepay.io/payment/pay?id=C1536678153791231775",
        detail="unpaid",
    )
    assert isinstance(snapshot.pay_amount, Decimal)
    assert str(snapshot.pay_amount) == "0.123456789012345678"


def test_fetch_status_reads_the_first_answer_shape(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    add_query(mocked, answer_text([REFUNDED]))
    snapshot = cubepay.fetch_status(PaymentRef(provider_payment_id="C1536292666260718848"))
    assert snapshot.provider_status == "6"
    assert snapshot.order_id == "1536292098"
    assert (snapshot.amount, snapshot.currency) == (Decimal("100"), "USDT")
    assert (snapshot.pay_amount, snapshot.paid_amount) == (Decimal("100"), Decimal("100"))
    assert cubepay.decide(snapshot, None, NOW).state is PaymentStatus.REFUNDED


def test_fetch_status_picks_the_record_with_our_id(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    other = {**CREATED, "id": "C0000000000000000001", "status": 4}
    add_query(mocked, answer_text([CREATED, other]))
    snapshot = cubepay.fetch_status(PaymentRef("M12345678", "C1536678153791231775"))
    assert (snapshot.provider_payment_id, snapshot.provider_status) == (CREATED["id"], "0")


def test_fetch_status_by_merchant_id_takes_the_last_record(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    later = {**CREATED, "id": "C0000000000000000001", "status": 4}
    add_query(mocked, answer_text([CREATED, later]))
    snapshot = cubepay.fetch_status(PaymentRef(order_id="M12345678"))
    assert (snapshot.provider_payment_id, snapshot.provider_status) == (later["id"], "4")


def test_fetch_status_accepts_an_object(cubepay: CubePay, mocked: responses.RequestsMock) -> None:
    add_query(mocked, answer_text(CREATED))
    snapshot = cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert snapshot.provider_payment_id == CREATED["id"]


def test_fetch_status_names_a_currency_by_its_configured_id(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    pay_info = {**CREATED["pay_info"], "source_coin": {"id": 447}, "coin": {"id": 4}}
    add_query(mocked, answer_text([{**CREATED, "pay_info": pay_info}]))
    snapshot = cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert (snapshot.currency, snapshot.pay_currency) == ("USD", "LTC")


def test_fetch_status_keeps_an_unknown_status_for_review(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    add_query(mocked, answer_text([{**CREATED, "status": 9}]))
    snapshot = cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert snapshot.provider_status == "9"
    assert cubepay.decide(snapshot, None, NOW).state is None


def test_fetch_status_retries_a_transient_failure(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    add_query(mocked, "", status=503)
    add_query(mocked, answer_text([CREATED]))
    snapshot = cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert snapshot.provider_status == "0"
    assert len(mocked.calls) == 2


@pytest.mark.parametrize(
    ("status", "text", "error"),
    [
        (200, answer_text("payment not found", 404), PaymentNotFound),
        (404, answer_text("payment not found", 404), PaymentNotFound),
        (200, answer_text([]), PaymentNotFound),
        (200, answer_text(None), PaymentNotFound),
        (200, answer_text("sign error", 401), ProviderRejected),
        (401, answer_text("missing client_id", 401), ProviderRejected),
        (200, answer_text("process error", 400), ProviderRejected),
        (200, answer_text("fatal error", 500), ProviderUnavailable),
        (200, answer_text("who knows", 418), ProviderUnavailable),
        (500, answer_text("fatal error", 500), ProviderUnavailable),
        (429, "slow down", ProviderUnavailable),
        (200, "<html>gateway</html>", ProviderUnavailable),
        (200, answer_text([CREATED])[:-20], ProviderUnavailable),
        (200, '{"data": []}', ProviderUnavailable),
        (200, '["status", 200]', ProviderUnavailable),
        (200, answer_text(["C1536678153791231775"]), ProviderUnavailable),
        (200, answer_text([{**CREATED, "status": None}]), ProviderUnavailable),
        (200, answer_text([{**CREATED, "pay_info": "none"}]), ProviderUnavailable),
        (
            200,
            answer_text([{**CREATED, "pay_info": {**CREATED["pay_info"], "amount": "lots"}}]),
            ProviderUnavailable,
        ),
    ],
    ids=[
        "body-404",
        "http-404",
        "empty-list",
        "null-data",
        "body-401",
        "http-401",
        "body-400",
        "body-500",
        "body-unknown-code",
        "http-500",
        "http-429",
        "garbage",
        "truncated-json",
        "no-status",
        "not-an-object",
        "records-not-objects",
        "record-without-status",
        "pay-info-not-an-object",
        "amount-not-a-number",
    ],
)
def test_fetch_status_errors(
    cubepay: CubePay,
    mocked: responses.RequestsMock,
    status: int,
    text: str,
    error: type[Exception],
) -> None:
    add_query(mocked, text, status=status)
    with pytest.raises(error) as raised:
        cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert type(raised.value) is error
    assert SECRET not in str(raised.value)


def test_fetch_status_not_found_is_not_retried(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    add_query(mocked, answer_text("payment not found", 404), status=404)
    with pytest.raises(PaymentNotFound):
        cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert len(mocked.calls) == 1


def test_fetch_status_server_error_is_retried_then_given_up(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    add_query(mocked, answer_text("fatal error", 500), status=500)
    with pytest.raises(ProviderUnavailable):
        cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert len(mocked.calls) == 2


def test_fetch_status_timeout(cubepay: CubePay, mocked: responses.RequestsMock) -> None:
    mocked.add(responses.POST, f"{API}/payment/query", body=requests.Timeout())
    with pytest.raises(ProviderUnavailable, match="timed out"):
        cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert len(mocked.calls) == 2


def test_fetch_status_needs_a_reference(cubepay: CubePay, mocked: responses.RequestsMock) -> None:
    with pytest.raises(PaymentNotFound):
        cubepay.fetch_status(PaymentRef())
    assert len(mocked.calls) == 0


def test_fetch_status_needs_credentials(mocked: responses.RequestsMock) -> None:
    cubepay = CubePay(CubePaySettings(api_url=API))
    with pytest.raises(ProviderRejected):
        cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert len(mocked.calls) == 0


# The status table ----------------------------------------------------------------------------


def snapshot_of(status: str, paid: str | None = None, pay: str | None = "1") -> Snapshot:
    return Snapshot(
        provider_status=status,
        pay_amount=Decimal(pay) if pay is not None else None,
        paid_amount=Decimal(paid) if paid is not None else None,
    )


@pytest.mark.parametrize(
    ("status", "paid", "pay", "state", "note"),
    [
        ("0", "0", "1", PaymentStatus.PENDING, ""),
        ("1", "0", "1", PaymentStatus.CONFIRMING, ""),
        ("1", None, "1", PaymentStatus.CONFIRMING, ""),
        ("1", "0.4", "1", PaymentStatus.UNDERPAID, "paid 0.4 of 1"),
        ("1", "1", "1", PaymentStatus.CONFIRMING, ""),
        ("2", "1", "1", PaymentStatus.PAID, ""),
        ("2", "1.5", "1", PaymentStatus.PAID, ""),
        (
            "2",
            "0.999999999999999999",
            "1",
            PaymentStatus.UNDERPAID,
            "paid 0.999999999999999999 of 1",
        ),
        ("2", None, "1", PaymentStatus.PAID, ""),
        ("3", "1", "1", PaymentStatus.PAID, ""),
        ("3", "0.5", "1", PaymentStatus.UNDERPAID, "paid 0.5 of 1"),
        ("4", "1", "1", PaymentStatus.PAID, ""),
        ("4", "0", "1", PaymentStatus.UNDERPAID, "paid 0 of 1"),
        ("5", "1", "1", PaymentStatus.PAID, "refund in progress"),
        ("6", "1", "1", PaymentStatus.REFUNDED, ""),
        ("7", "1", "1", None, "unknown CubePay status '7'"),
        ("-2", None, "1", None, "unknown CubePay status '-2'"),
        ("paid", "1", "1", None, "unknown CubePay status 'paid'"),
        ("", None, "1", None, "unknown CubePay status ''"),
    ],
)
def test_status_table(
    cubepay: CubePay,
    status: str,
    paid: str | None,
    pay: str | None,
    state: PaymentStatus | None,
    note: str,
) -> None:
    decision = cubepay.decide(snapshot_of(status, paid, pay), HeldPayment(), NOW)
    assert decision.state is state
    assert decision.note == note
    assert decision.anomalies == ()


def test_status_table_falls_back_to_the_held_crypto_amount(cubepay: CubePay) -> None:
    snapshot = snapshot_of("2", paid="0.5", pay=None)
    assert cubepay.decide(snapshot, HeldPayment(pay_amount=Decimal("1")), NOW).state is (
        PaymentStatus.UNDERPAID
    )
    assert cubepay.decide(snapshot, None, NOW).state is PaymentStatus.PAID


def test_status_keys_on_the_number_not_the_message(cubepay: CubePay) -> None:
    snapshot = Snapshot(provider_status="0", detail="Paid", paid_amount=Decimal("1"))
    assert cubepay.decide(snapshot, HeldPayment(), NOW).state is PaymentStatus.PENDING


@pytest.mark.parametrize(
    ("age", "state"),
    [
        (timedelta(hours=5, minutes=59, seconds=59), PaymentStatus.CANCELLED),
        (timedelta(hours=6), PaymentStatus.EXPIRED),
        (timedelta(hours=6, seconds=1), PaymentStatus.EXPIRED),
        (timedelta(days=3), PaymentStatus.EXPIRED),
        (timedelta(0), PaymentStatus.CANCELLED),
    ],
)
def test_canceled_is_expired_after_six_hours(
    cubepay: CubePay, age: timedelta, state: PaymentStatus
) -> None:
    held = HeldPayment(created_at=NOW)
    assert cubepay.decide(snapshot_of("-1"), held, NOW + age).state is state


def test_canceled_reads_a_naive_creation_time_as_utc(cubepay: CubePay) -> None:
    held = HeldPayment(created_at=NOW.replace(tzinfo=None))
    later = NOW + timedelta(hours=7)
    assert cubepay.decide(snapshot_of("-1"), held, later).state is PaymentStatus.EXPIRED


def test_canceled_without_a_held_payment_is_cancelled(cubepay: CubePay) -> None:
    later = NOW + timedelta(days=30)
    assert cubepay.decide(snapshot_of("-1"), None, later).state is PaymentStatus.CANCELLED


# payment/coin --------------------------------------------------------------------------------


def payment_request(**changes: Any) -> PaymentRequest:
    values: dict[str, Any] = {
        "order_id": "M12345678",
        "amount": Decimal("500"),
        "currency": "TWD",
        "notification_url": "https://shop.example/ipn/cubepay",
        "pay_currency": "BTC",
        "description": "Test item name",
        "callback_token": "tok_5f2b9c",
    }
    values.update(changes)
    return PaymentRequest(**values)


def add_create(mocked: responses.RequestsMock, text: str, status: int = 200) -> None:
    mocked.add(responses.POST, f"{API}/payment/coin", body=text, status=status)


def test_create_sends_the_signed_form(cubepay: CubePay, mocked: responses.RequestsMock) -> None:
    add_create(mocked, answer_text(CREATED))
    cubepay.create_payment(payment_request())
    (call,) = mocked.calls
    form = sent_form(call)
    assert form == {
        "coin_id": "2",
        "client_id": "exampleclientid",
        "source_coin_id": "443",
        "source_amount": "500",
        "item_name": "Test item name",
        "merchant_transaction_id": "M12345678",
        "other": "tok_5f2b9c",
        "ipn_url": "https://shop.example/ipn/cubepay",
        "sign": form["sign"],
    }
    assert form["sign"] == reference_sign(form)
    assert SECRET not in str(call.request.body)


def test_create_returns_what_the_customer_needs(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    add_create(mocked, answer_text(CREATED))
    with time_machine.travel(NOW, tick=False):
        snapshot = cubepay.create_payment(payment_request())
    assert snapshot.provider_payment_id == "C1536678153791231775"
    assert snapshot.provider_status == "0"
    assert (snapshot.amount, snapshot.currency) == (Decimal("500"), "TWD")
    assert str(snapshot.pay_amount) == "0.123456789012345678"
    assert snapshot.pay_currency == "BTC"
    assert snapshot.pay_address == "2N8iLSfdFv7GRXoNxtSgMmA1e9BQHyU1PzB"
    assert snapshot.pay_url == "http://cubepay.io/payment/pay?id=C1536678153791231775"
    assert snapshot.expires_at == NOW + timedelta(hours=6)
    assert snapshot.order_id == "M12345678"


@pytest.mark.parametrize(
    ("amount", "wire"),
    [
        (Decimal("500.50"), "500.50"),
        (Decimal("1E+2"), "100"),
        (Decimal("0.000000000000000001"), "0.000000000000000001"),
        (Decimal("12.345000"), "12.345000"),
    ],
)
def test_create_sends_and_signs_the_amount_formatted_once(
    cubepay: CubePay, mocked: responses.RequestsMock, amount: Decimal, wire: str
) -> None:
    add_create(mocked, answer_text(CREATED))
    cubepay.create_payment(payment_request(amount=amount))
    form = sent_form(mocked.calls[0])
    assert form["source_amount"] == wire
    assert form["sign"] == reference_sign(form)


def test_create_leaves_out_empty_optional_fields(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    add_create(mocked, answer_text(CREATED))
    cubepay.create_payment(
        payment_request(description=None, callback_token=None, notification_url="")
    )
    form = sent_form(mocked.calls[0])
    assert "other" not in form
    assert "ipn_url" not in form
    assert form["item_name"] == "Order M12345678"
    assert form["sign"] == reference_sign(form)


def test_create_accepts_lower_case_codes(cubepay: CubePay, mocked: responses.RequestsMock) -> None:
    add_create(mocked, answer_text(CREATED))
    cubepay.create_payment(payment_request(currency="usd", pay_currency="eth"))
    form = sent_form(mocked.calls[0])
    assert (form["source_coin_id"], form["coin_id"]) == ("447", "1")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"pay_currency": "DOGE"}, "pay_currency"),
        ({"pay_currency": None}, "pay_currency"),
        ({"currency": "EUR"}, "currency"),
        ({"amount": Decimal("0")}, "amount"),
        ({"amount": Decimal("-1")}, "amount"),
        ({"amount": Decimal("NaN")}, "amount"),
        ({"order_id": ""}, "order_id"),
    ],
)
def test_create_refuses_what_cubepay_cannot_take_before_any_call(
    cubepay: CubePay, mocked: responses.RequestsMock, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidPaymentRequest) as raised:
        cubepay.create_payment(payment_request(**changes))
    assert raised.value.field == field
    assert len(mocked.calls) == 0


def test_create_knows_currencies_added_in_settings(mocked: responses.RequestsMock) -> None:
    cubepay = CubePay(
        CubePaySettings(
            client_id=CLIENT_ID,
            client_secret=SECRET,
            api_url=API,
            currency_ids={"EUR": 446, "BTC": 2},
        )
    )
    add_create(mocked, answer_text(CREATED))
    cubepay.create_payment(payment_request(currency="EUR"))
    assert sent_form(mocked.calls[0])["source_coin_id"] == "446"


@pytest.mark.parametrize(
    ("status", "text", "error", "message"),
    [
        (200, answer_text("source_amount must be postive", 400), ProviderRejected, "postive"),
        (200, answer_text("authentication fail", 401), ProviderRejected, "authentication"),
        (200, answer_text("coin not found", 404), ProviderRejected, "coin not found"),
        (200, answer_text("fatal error", 500), ProviderUnavailable, "fatal error"),
        (401, answer_text("missing client_id", 401), ProviderRejected, "missing client_id"),
        (503, "", ProviderUnavailable, "503"),
        (429, "", ProviderUnavailable, "429"),
        (200, "not json", ProviderUnavailable, "not JSON"),
        (200, answer_text(CREATED)[:40], ProviderUnavailable, "not JSON"),
        (200, answer_text("created"), ProviderUnavailable, "not a payment"),
    ],
)
def test_create_errors_are_not_retried(
    cubepay: CubePay,
    mocked: responses.RequestsMock,
    status: int,
    text: str,
    error: type[Exception],
    message: str,
) -> None:
    add_create(mocked, text, status=status)
    with pytest.raises(error, match=message) as raised:
        cubepay.create_payment(payment_request())
    assert type(raised.value) is error
    assert len(mocked.calls) == 1


def test_create_timeout_is_not_retried(cubepay: CubePay, mocked: responses.RequestsMock) -> None:
    mocked.add(responses.POST, f"{API}/payment/coin", body=requests.Timeout())
    with pytest.raises(ProviderUnavailable):
        cubepay.create_payment(payment_request())
    assert len(mocked.calls) == 1


# What the adapter reads, sends and names, pinned field by field ------------------------------


def test_a_form_body_declared_as_json_is_read_as_json(cubepay: CubePay) -> None:
    with pytest.raises(MalformedCallback, match="JSON"):
        cubepay.read_callback("ipn", EXAMPLE_IPN, JSON)


def test_a_body_opening_an_array_is_read_as_json(cubepay: CubePay) -> None:
    with pytest.raises(MalformedCallback, match="not an object"):
        cubepay.read_callback("ipn", b'[{"merchant_transaction_id": "M1"}]', {})


def test_json_ipn_signs_arrays_and_non_ascii_as_compact_json(cubepay: CubePay) -> None:
    values = {
        **example_as_json(),
        "items": [1, "café", {"clé": "é"}],
    }
    fields = {k: v if isinstance(v, str) else "" for k, v in values.items()}
    fields["source_coin_id"], fields["source_amount"] = "443", "500"
    fields["items"] = '[1,"café",{"clé":"é"}]'
    body = json.dumps({**values, "sign": reference_sign(fields)}, ensure_ascii=False).encode()
    callback = cubepay.read_callback("ipn", body, JSON)
    assert callback.authenticity is Authenticity.VERIFIED
    assert callback.fields["items"] == '[1,"café",{"clé":"é"}]'


def test_fetch_status_by_merchant_id_takes_the_last_record_without_ids(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    first = {k: v for k, v in CREATED.items() if k != "id"}
    later = {**first, "status": 4}
    add_query(mocked, answer_text([first, later]))
    snapshot = cubepay.fetch_status(PaymentRef(order_id="M12345678"))
    assert snapshot.provider_status == "4"


def test_fetch_status_reads_a_record_without_pay_info_or_message(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    add_query(mocked, answer_text([{"id": CREATED["id"], "status": 1}]))
    snapshot = cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert snapshot.provider_status == "1"
    assert (snapshot.amount, snapshot.currency, snapshot.paid_amount) == (None, None, None)
    assert snapshot.detail == ""


@pytest.mark.parametrize(("status", "kept"), [(" 2", "2"), ("paid", "paid")])
def test_fetch_status_keeps_a_status_code_as_a_number_else_as_sent(
    cubepay: CubePay, mocked: responses.RequestsMock, status: str, kept: str
) -> None:
    add_query(mocked, answer_text([{**CREATED, "status": status}]))
    snapshot = cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert snapshot.provider_status == kept


def test_fetch_status_prefers_a_coin_symbol_to_its_id(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    pay_info = {**CREATED["pay_info"], "coin": {"id": 99, "symbol": "DOGE"}}
    add_query(mocked, answer_text([{**CREATED, "pay_info": pay_info}]))
    snapshot = cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert snapshot.pay_currency == "DOGE"


def test_fetch_status_names_currencies_by_the_flat_coin_id_fields(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    pay_info = {k: v for k, v in CREATED["pay_info"].items() if k not in ("coin", "source_coin")}
    pay_info.update(coin_id=2, source_coin_id=443)
    add_query(mocked, answer_text([{**CREATED, "pay_info": pay_info}]))
    snapshot = cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert (snapshot.currency, snapshot.pay_currency) == ("TWD", "BTC")


@pytest.mark.parametrize(
    ("pay_info", "named"),
    [
        ("not an object", "payment/query answered a payment we cannot read: pay_info is"),
        ({"coin": "BTC"}, "pay_info.coin is not an object"),
        ({"source_coin": 1}, "pay_info.source_coin is not an object"),
        ({"source_amount": "many"}, "pay_info.source_amount is not a number"),
        ({"amount": "many"}, "pay_info.amount is not a number"),
        ({"paid_amount": "many"}, "pay_info.paid_amount is not a number"),
    ],
)
def test_fetch_status_errors_name_the_field(
    cubepay: CubePay, mocked: responses.RequestsMock, pay_info: Any, named: str
) -> None:
    add_query(mocked, answer_text([{**CREATED, "pay_info": pay_info}]))
    with pytest.raises(ProviderUnavailable) as raised:
        cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert named in str(raised.value)


def test_fetch_status_error_names_the_call_and_the_answer(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    add_query(mocked, json.dumps({"data": "x"}))
    with pytest.raises(ProviderUnavailable, match=r"^cubepay: payment/query answered without"):
        cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))


def test_fetch_status_needs_the_secret_too(mocked: responses.RequestsMock) -> None:
    cubepay = CubePay(CubePaySettings(client_id=CLIENT_ID, api_url=API))
    with pytest.raises(ProviderRejected, match="not configured"):
        cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert len(mocked.calls) == 0


def test_an_api_url_with_a_trailing_slash_is_joined_once(mocked: responses.RequestsMock) -> None:
    cubepay = CubePay(CubePaySettings(client_id=CLIENT_ID, client_secret=SECRET, api_url=API + "/"))
    add_query(mocked, answer_text([CREATED]))
    cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert mocked.calls[0].request.url == f"{API}/payment/query"


def test_create_takes_the_last_record_of_a_list(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    other = {**CREATED, "id": "C0000000000000000001"}
    add_create(mocked, answer_text([other, CREATED]))
    snapshot = cubepay.create_payment(payment_request())
    assert snapshot.provider_payment_id == CREATED["id"]


def test_create_fills_in_what_the_answer_leaves_out_from_the_request(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    pay_info = {
        k: v
        for k, v in CREATED["pay_info"].items()
        if k not in ("merchant_transaction_id", "source_amount", "source_coin")
    }
    add_create(mocked, answer_text({**CREATED, "pay_info": pay_info}))
    snapshot = cubepay.create_payment(payment_request(amount=Decimal("7.5"), currency="USD"))
    assert (snapshot.order_id, snapshot.amount, snapshot.currency) == (
        "M12345678",
        Decimal("7.5"),
        "USD",
    )


def test_create_keeps_what_the_answer_says(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    pay_info = {**CREATED["pay_info"], "merchant_transaction_id": "M-theirs"}
    add_create(mocked, answer_text({**CREATED, "pay_info": pay_info}))
    snapshot = cubepay.create_payment(payment_request(amount=Decimal("7.5"), currency="USD"))
    assert (snapshot.order_id, snapshot.amount, snapshot.currency) == (
        "M-theirs",
        Decimal("500"),
        "TWD",
    )


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        (json.dumps({"status": 500}), ProviderUnavailable, "^cubepay: payment/coin answered "),
        (json.dumps({"status": 400}), ProviderRejected, "status 400: no message$"),
        (json.dumps({"status": "odd"}), ProviderUnavailable, "status odd: no message$"),
        (
            answer_text({**CREATED, "pay_info": []}),
            ProviderUnavailable,
            "^cubepay: payment/coin answered a payment we cannot read",
        ),
    ],
)
def test_create_errors_name_the_call_and_the_answer(
    cubepay: CubePay,
    mocked: responses.RequestsMock,
    text: str,
    error: type[Exception],
    message: str,
) -> None:
    add_create(mocked, text)
    with pytest.raises(error, match=message) as raised:
        cubepay.create_payment(payment_request())
    assert type(raised.value) is error


def test_fetch_status_does_not_follow_a_redirect(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    # The signed form goes only where it was addressed, and a redirect is not worth retrying.
    mocked.add(
        responses.POST,
        f"{API}/payment/query",
        status=302,
        headers={"Location": "https://elsewhere.example/payment/query"},
    )
    with pytest.raises(ProviderRejected, match=r"302, a redirect to https://elsewhere\.example"):
        cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    assert len(mocked.calls) == 1


def test_fetch_status_sends_the_session_headers_and_keeps_no_cookie(
    cubepay: CubePay, mocked: responses.RequestsMock
) -> None:
    cubepay.session.headers["User-Agent"] = "ipn-test"
    mocked.add(
        responses.POST,
        f"{API}/payment/query",
        body=answer_text(CREATED),
        headers={"Set-Cookie": "tracking=1; Path=/"},
    )
    add_query(mocked, answer_text(CREATED))
    cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    cubepay.fetch_status(PaymentRef(provider_payment_id=CREATED["id"]))
    first, second = (call.request for call in mocked.calls)
    assert first.headers["User-Agent"] == "ipn-test"
    assert "Cookie" not in second.headers


def test_the_wait_between_attempts_grows_and_is_bounded() -> None:
    from tenacity import RetryCallState

    from ipn.providers.http import _retrying

    def wait(policy: Any, failures: int) -> float:
        state = RetryCallState(policy, None, (), {})
        state.attempt_number = failures
        return float(policy.wait(state))

    policy = _retrying(5, 60, 10)
    assert all(0.1 <= wait(policy, 1) <= 1.1 for _ in range(50))
    assert all(0.4 <= wait(policy, 3) <= 1.4 for _ in range(50))
    assert wait(_retrying(5, 60, 0.5), 12) == 0.5
