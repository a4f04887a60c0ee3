"""Creating payments through the API: the request each provider receives is exactly what its
file specifies, bad input is refused naming the field before anything is sent, and a provider
failure records nothing and leaves the create safe to send again."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import pytest
import requests
import responses
from flask.testing import FlaskClient

from ipn.payments import parse_create_request
from ipn.services import Services
from models import EventSource, Payment, PaymentStatus

from helpers import PROVIDER_URL, count, events, load_payment

CUBEPAY_CREATE = f"{PROVIDER_URL}/cubepay/payment/coin"
CUBEPAY_QUERY = f"{PROVIDER_URL}/cubepay/payment/query"
BPG_CREATE = f"{PROVIDER_URL}/bitcoinpaygate/v2/payments/new"
COINBAR_CREATE = f"{PROVIDER_URL}/coinbarpay/coinbar/api/v2/pay/gateway/initiate"
COINBAR_STATUS = f"{PROVIDER_URL}/coinbarpay/coinbar/api/v2/pay/gateway/payment/order-7/status"
CP_CREATE = f"{PROVIDER_URL}/cryptoprocessing/api/payments/v1/requests"

CUBEPAY_ANSWER = {
    "status": 200,
    "data": {
        "id": "C1536678153791231775",
        "status": 0,
        "status_message": "unpaid",
        "pay_url": "https://pay.cubepay.test/C1536678153791231775",
        "pay_info": {
            "coin": {"id": 2, "symbol": "BTC"},
            "address": "bc1qcubeaddress",
            "amount": "0.00042",
            "paid_amount": "0",
            "merchant_transaction_id": "order-7",
            "source_coin": {"id": 447, "symbol": "USD"},
            "source_amount": "10.50",
        },
    },
}


def create(client: FlaskClient, headers: dict[str, str], **fields: Any) -> Any:
    body = {"order_id": "order-7", "amount": "10.50", "currency": "USD", **fields}
    return client.post("/api/payments", headers=headers, json=body)


def test_cubepay_create_sends_the_signed_form_and_records_the_payment(
    client: FlaskClient,
    services: Services,
    api_headers: dict[str, str],
    provider_api: responses.RequestsMock,
) -> None:
    provider_api.post(CUBEPAY_QUERY, json={"status": 404, "data": "not found"})
    provider_api.post(CUBEPAY_CREATE, json=CUBEPAY_ANSWER)
    response = create(client, api_headers, provider="cubepay", pay_currency="BTC")
    assert response.status_code == 201, response.get_json()
    sent = provider_api.calls[-1].request
    fields = dict(parse_qsl(sent.body, keep_blank_values=True))
    # Recomputed here from the bytes sent, following cubepay.md step by step.
    given = fields.pop("sign")
    plain = "&".join(f"{k}={fields[k]}" for k in sorted(fields))
    expected = hashlib.sha256(f"{plain}&client_secret=exampleclientsecret".encode())
    assert given == expected.hexdigest().upper()
    assert fields["source_amount"] == "10.50" and fields["coin_id"] == "2"
    assert fields["source_coin_id"] == "447"
    assert fields["ipn_url"] == "http://localhost:8000/ipn/cubepay"
    assert fields["client_id"] == "exampleclientid"
    payment = response.get_json()
    assert payment["status"] == "pending" and payment["provider_payment_id"].startswith("C")
    assert (payment["pay_amount"], payment["pay_currency"]) == ("0.00042000", "BTC")
    assert payment["pay_address"] == "bc1qcubeaddress"
    recorded = load_payment(services.db, payment["id"])
    # The per-payment token went out as `other` and is kept to check the IPN against.
    assert recorded.callback_token == fields["other"]
    assert recorded.expires_at is not None
    [event] = events(services.db, payment["id"])
    assert event.source is EventSource.CREATE and event.to_status is PaymentStatus.PENDING


def test_bitcoinpaygate_create_uses_basic_auth_and_both_callback_urls(
    client: FlaskClient, api_headers: dict[str, str], provider_api: responses.RequestsMock
) -> None:
    provider_api.post(
        BPG_CREATE,
        json={
            "paymentId": "bpg-1",
            "amount": "0.0005",
            "address": "bc1qbpg",
            "label": "x",
            "message": "m",
            "paymentAddress": "bitcoin:bc1qbpg?amount=0.0005",
            "expirationTime": "2026-11-21T12:00:00Z",
            "exchangeRate": "21000",
            "merchantTransactionId": "order-7",
            "paymentPageUrl": "https://pay.bpg.test/bpg-1",
        },
    )
    response = create(client, api_headers, provider="bitcoinpaygate")
    assert response.status_code == 201, response.get_json()
    sent = provider_api.calls[-1].request
    assert (
        sent.headers["Authorization"] == "Basic " + base64.b64encode(b"keyname:keysecret").decode()
    )
    body = json.loads(sent.body)
    assert body["amount"] == "10.50" and body["merchantTransactionId"] == "order-7"
    assert body["notificationUrl"] == "http://localhost:8000/ipn/bitcoinpaygate/notification"
    assert body["anomalyNotificationUrl"] == "http://localhost:8000/ipn/bitcoinpaygate/anomaly"
    payment = response.get_json()
    assert payment["expires_at"] == "2026-11-21T12:00:00Z"
    assert payment["payment_uri"] == "bitcoin:bc1qbpg?amount=0.0005"


def test_coinbarpay_create_signs_the_exact_compact_bytes(
    client: FlaskClient, api_headers: dict[str, str], provider_api: responses.RequestsMock
) -> None:
    provider_api.get(COINBAR_STATUS, status=404, json={"result": False, "error": "not found"})
    provider_api.post(
        COINBAR_CREATE,
        json={
            "result": "success",
            "request_token": "t",
            "payment_id_coinbar": "cb-1",
            "payment_total_price": 10.5,
            "trade_pair": "BTC/EUR",
            "payment_string": "bitcoin:bc1q",
            "destination_coin_change": 19913.425,
            "destination_amount": 0.00045145423250897323,
            "destination_address": "bc1qcoinbar",
            "destination_memo": None,
        },
    )
    response = create(
        client,
        api_headers,
        provider="coinbarpay",
        currency="EUR",
        pay_currency="BTC",
        customer_email="mario.rossi@example.com",
    )
    assert response.status_code == 201, response.get_json()
    sent = provider_api.calls[-1].request
    raw = sent.body if isinstance(sent.body, bytes) else sent.body.encode()
    assert (
        sent.headers["SIGNATURE"] == hmac.new(b"your_secret_key", raw, hashlib.sha256).hexdigest()
    )
    assert sent.headers["source"] == "web"
    # Compact, and numbers as JavaScript writes them (10.50 is 10.5 there).
    assert b'": ' not in raw and b', "' not in raw and b'"product_price":10.5,' in raw
    assert list(json.loads(raw)) == [
        "service_client_id",
        "payment_request_id",
        "input_coin",
        "products",
        "email",
        "timestamp",
        "destination_coin",
    ]
    assert response.get_json()["pay_amount"] == "0.00045145423250897323"


def test_cryptoprocessing_create_signs_the_exact_bytes(
    client: FlaskClient, api_headers: dict[str, str], provider_api: responses.RequestsMock
) -> None:
    provider_api.post(
        CP_CREATE,
        json={
            "data": {
                "id": "cp-1",
                "amount": "10.50",
                "currency": "USD",
                "status": "created",
                "life_time": 1900000000,
                "payment_link": "https://pay.cp.test/cp-1",
                "foreign_id": "order-7",
            }
        },
    )
    response = create(client, api_headers, provider="cryptoprocessing", pay_currency="BTC")
    assert response.status_code == 201, response.get_json()
    sent = provider_api.calls[-1].request
    raw = sent.body if isinstance(sent.body, bytes) else sent.body.encode()
    assert (
        sent.headers["X-Processing-Signature"]
        == hmac.new(b"AbCdEfG123456", raw, hashlib.sha512).hexdigest()
    )
    assert sent.headers["X-Processing-Key"] == "cp-api-key"
    body = json.loads(raw)
    assert body["foreign_id"] == "order-7" and body["amount"] == "10.50"
    assert body["life_time_duration"] == 3600
    assert response.get_json()["pay_url"] == "https://pay.cp.test/cp-1"


@pytest.mark.parametrize(
    ("fields", "status", "field"),
    [
        ({"provider": "paypal"}, 422, "provider"),
        ({"provider": "cubepay", "amount": "-1"}, 422, "amount"),
        ({"provider": "cubepay", "amount": "0"}, 422, "amount"),
        ({"provider": "cubepay", "amount": "ten"}, 422, "amount"),
        ({"provider": "cubepay", "amount": "10.001"}, 422, "amount"),
        ({"provider": "cubepay", "amount": "NaN"}, 422, "amount"),
        ({"provider": "cubepay", "amount": True}, 422, "amount"),
        # The money column is NUMERIC(48, 24): 24 digits before the point at most.
        ({"provider": "cubepay", "amount": "1e999"}, 422, "amount"),
        ({"provider": "cubepay", "amount": "1e24"}, 422, "amount"),
        ({"provider": "cubepay", "amount": "1000000000000000000000000.00"}, 422, "amount"),
        ({"provider": "cubepay", "amount": "1e9999999999999999999"}, 422, "amount"),
        ({"provider": "cubepay", "amount": "Infinity"}, 422, "amount"),
        # Text the database cannot keep is refused before the provider creates anything.
        ({"provider": "cubepay", "description": "a\x00b"}, 422, "description"),
        ({"provider": "cubepay", "description": "\ud800"}, 422, "description"),
        ({"provider": "cubepay", "description": "x" * 5000}, 422, "description"),
        ({"provider": "cubepay", "customer_email": "a@b\x00"}, 422, "customer_email"),
        ({"provider": "cubepay", "pay_currency": "BTC\x00"}, 422, "pay_currency"),
        ({"provider": "cubepay", "currency": "\ud800"}, 422, "currency"),
        ({"provider": "cubepay", "order_id": ""}, 422, "order_id"),
        ({"provider": "cubepay", "order_id": 42}, 422, "order_id"),
        ({"provider": "cubepay", "currency": "XYZ"}, 422, "currency"),
        ({"provider": "cubepay", "currency": "EUR", "pay_currency": "BTC"}, 422, "currency"),
        ({"provider": "cubepay"}, 422, "pay_currency"),
        ({"provider": "coinbarpay", "pay_currency": "BTC"}, 422, "customer_email"),
        ({"provider": "cubepay", "customer_email": "nobody"}, 422, "customer_email"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_nothing_is_sent(
    client: FlaskClient,
    services: Services,
    api_headers: dict[str, str],
    provider_api: responses.RequestsMock,
    fields: dict[str, Any],
    status: int,
    field: str,
) -> None:
    response = create(client, api_headers, **fields)
    assert response.status_code == status
    assert response.get_json()["field"] == field
    assert len(provider_api.calls) == 0
    assert count(services.db, Payment) == 0


@pytest.mark.parametrize("number", [b"1e999", b"1E24", b"1" + b"0" * 24])
def test_huge_json_number_amount_is_refused_before_the_provider(
    client: FlaskClient,
    services: Services,
    api_headers: dict[str, str],
    provider_api: responses.RequestsMock,
    number: bytes,
) -> None:
    body = (
        b'{"provider":"cubepay","order_id":"o","amount":' + number + b',"currency":"USD",'
        b'"pay_currency":"BTC"}'
    )
    response = client.post(
        "/api/payments", data=body, headers={**api_headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 422 and response.get_json()["field"] == "amount"
    assert len(provider_api.calls) == 0
    assert count(services.db, Payment) == 0


@pytest.mark.parametrize(
    ("amount", "currency"),
    [("999999999999999999999999.99", "USD"), ("123456789012345678.123456789012345678", "ETH")],
)
def test_the_largest_amounts_the_column_keeps_are_accepted(amount: str, currency: str) -> None:
    """Magnitude, not digit count: 24 digits before the point and the currency's decimals."""
    parsed = parse_create_request(
        {"provider": "cubepay", "order_id": "o", "amount": amount, "currency": currency},
        {"cubepay": object()},
    )
    assert parsed.amount == Decimal(amount)


def test_float_amount_with_too_many_decimals_is_refused(
    client: FlaskClient, api_headers: dict[str, str], provider_api: responses.RequestsMock
) -> None:
    body = (
        b'{"provider":"cubepay","order_id":"o","amount":10.123,"currency":"USD",'
        b'"pay_currency":"BTC"}'
    )
    response = client.post(
        "/api/payments", data=body, headers={**api_headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 422 and response.get_json()["field"] == "amount"
    assert client.post("/api/payments", data=b"[1]", headers=api_headers).status_code == 400
    assert len(provider_api.calls) == 0


def test_second_create_of_an_order_is_409(
    client: FlaskClient,
    services: Services,
    api_headers: dict[str, str],
    provider_api: responses.RequestsMock,
) -> None:
    provider_api.post(
        CP_CREATE, json={"data": {"id": "cp-1", "status": "created", "life_time": 1900000000}}
    )
    assert create(client, api_headers, provider="cryptoprocessing").status_code == 201
    again = create(client, api_headers, provider="cryptoprocessing")
    assert again.status_code == 409
    assert len(provider_api.calls) == 1
    assert count(services.db, Payment) == 1


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 500, "body": "internal error"},
        {"status": 400, "json": [{"message": "currency not supported"}]},
        {"status": 200, "body": '{"paymentId": "trunc'},
        {"body": requests.ConnectTimeout("timed out")},
    ],
)
def test_provider_failure_is_502_records_nothing_and_the_retry_works(
    client: FlaskClient,
    services: Services,
    api_headers: dict[str, str],
    provider_api: responses.RequestsMock,
    failure: dict[str, Any],
) -> None:
    provider_api.post(BPG_CREATE, **failure)
    response = create(client, api_headers, provider="bitcoinpaygate")
    assert response.status_code == 502
    assert "provider" in response.get_json()["error"]
    if failure.get("status") == 400:
        assert "currency not supported" in response.get_json()["error"]
    assert count(services.db, Payment) == 0
    provider_api.replace(
        responses.POST,
        BPG_CREATE,
        json={
            "paymentId": "bpg-2",
            "amount": "0.0005",
            "address": "bc1q",
            "expirationTime": "2026-11-21T12:00:00Z",
            "merchantTransactionId": "order-7",
        },
    )
    assert create(client, api_headers, provider="bitcoinpaygate").status_code == 201
    assert count(services.db, Payment) == 1


def test_retry_after_a_timeout_finds_the_payment_instead_of_creating_twice(
    client: FlaskClient,
    services: Services,
    api_headers: dict[str, str],
    provider_api: responses.RequestsMock,
) -> None:
    """CubePay created it but our client timed out; the retry asks by order id first."""
    provider_api.post(CUBEPAY_QUERY, json={"status": 404, "data": "not found"})
    provider_api.post(CUBEPAY_CREATE, body=requests.ReadTimeout("slow"))
    assert create(client, api_headers, provider="cubepay", pay_currency="BTC").status_code == 502
    answer = dict(CUBEPAY_ANSWER)
    answer["data"] = [CUBEPAY_ANSWER["data"]]
    provider_api.replace(responses.POST, CUBEPAY_QUERY, json=answer)
    response = create(client, api_headers, provider="cubepay", pay_currency="BTC")
    assert response.status_code == 200
    creates = [c for c in provider_api.calls if c.request.url == CUBEPAY_CREATE]
    assert len(creates) == 1
    payment = response.get_json()
    assert payment["provider_payment_id"] == "C1536678153791231775"
    assert payment["amount"] == "10.50" and payment["currency"] == "USD"


def test_cli_create_and_bad_arguments(
    app: Any, services: Services, provider_api: responses.RequestsMock
) -> None:
    provider_api.post(
        CP_CREATE,
        json={
            "data": {
                "id": "cp-9",
                "status": "created",
                "life_time": 1900000000,
                "payment_link": "https://pay.cp.test/9",
            }
        },
    )
    runner = app.test_cli_runner()
    result = runner.invoke(
        args=[
            "payments",
            "create",
            "--provider",
            "cryptoprocessing",
            "--order-id",
            "cli-1",
            "--amount",
            "5.00",
            "--currency",
            "EUR",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "created pay_" in result.output
    bad = runner.invoke(
        args=[
            "payments",
            "create",
            "--provider",
            "cryptoprocessing",
            "--order-id",
            "cli-2",
            "--amount",
            "5.001",
            "--currency",
            "EUR",
        ]
    )
    assert bad.exit_code != 0 and "--amount" in bad.output
    with services.db.sessions() as session:
        [payment] = session.query(Payment).all()
    assert payment.amount == Decimal("5.00") and payment.order_id == "cli-1"
