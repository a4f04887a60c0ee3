"""The provider sandbox: its APIs check keys, its actions move payments, its callbacks verify."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
import requests
import time_machine
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from ipn.config import Settings
from ipn.sandbox import SANDBOX_CREDENTIALS, create_app, sandbox_environment, serve, wire
from ipn.sandbox import signing as sandbox_signing

START = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
CREDS = SANDBOX_CREDENTIALS


# -- signing, written again here from the provider files -------------------------------------


def cubepay_sign(pairs: list[tuple[str, str]], secret: str) -> str:
    kept = sorted((k, v) for k, v in pairs if k != "sign")
    text = "&".join(f"{k}={v}" for k, v in kept) + f"&client_secret={secret}"
    return hashlib.sha256(text.encode()).hexdigest().upper()


def hmac_hex(key: str, body: bytes, digest: str) -> str:
    return hmac.new(key.encode(), body, digest).hexdigest()


def compact(value: Any) -> bytes:
    """What JSON.stringify writes; the tests only send Decimal-free bodies, so json is enough."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def parse(body: bytes) -> Any:
    return json.loads(body, parse_float=Decimal)


# -- fixtures --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Recorder:
    """A tiny receiver on a free local port that keeps what it is sent and answers `success`."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    status: int = 200
    answer: bytes = b"success"
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.received) >= count, timeout)
        return list(self.received)

    def only(self, path: str) -> Received:
        matching = [r for r in self.received if r.path == path]
        assert len(matching) == 1, [r.path for r in self.received]
        return matching[0]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with recorder.changed:
                recorder.received.append(Received(self.path, headers, body))
                recorder.changed.notify_all()
            self.send_response(recorder.status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(recorder.answer)))
            self.end_headers()
            self.wfile.write(recorder.answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    recorder.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield recorder
    server.shutdown()
    server.server_close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings() -> Settings:
    return Settings(database_url="sqlite://")


@pytest.fixture
def app(settings: Settings, clock: Clock, recorder: Recorder) -> Flask:
    return create_app(
        settings, clock=clock, receiver_url=recorder.url, fault_delay=0.3, delivery_timeout=3
    )


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


# -- creating payments as a merchant would ---------------------------------------------------


def cubepay_fields(recorder: Recorder, **changes: str) -> list[tuple[str, str]]:
    fields = {
        "client_id": CREDS["CUBEPAY_CLIENT_ID"],
        "coin_id": "2",
        "source_coin_id": "447",
        "source_amount": "500",
        "item_name": "Test item name",
        "merchant_transaction_id": "M12345678",
        "other": "tok_5f2b9c",
        "ipn_url": f"{recorder.url}/ipn/cubepay",
        **changes,
    }
    pairs = list(fields.items())
    return [*pairs, ("sign", cubepay_sign(pairs, CREDS["CUBEPAY_CLIENT_SECRET"]))]


def cubepay_create(client: FlaskClient, recorder: Recorder, **changes: str) -> dict[str, Any]:
    response = client.post(
        "/payment/coin",
        data=urlencode(cubepay_fields(recorder, **changes)),
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 200, response.data
    body = parse(response.data)
    assert body["status"] == 200
    return body["data"]


def cubepay_query(client: FlaskClient, **by: str) -> dict[str, Any]:
    pairs = [("client_id", CREDS["CUBEPAY_CLIENT_ID"]), *by.items()]
    pairs.append(("sign", cubepay_sign(pairs, CREDS["CUBEPAY_CLIENT_SECRET"])))
    response = client.post(
        "/payment/query", data=urlencode(pairs), content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 200, response.data
    data = parse(response.data)["data"]
    assert isinstance(data, list) and len(data) == 1
    return data[0]


def bpg_auth(name: str | None = None, secret: str | None = None) -> dict[str, str]:
    name = name or CREDS["BITCOINPAYGATE_API_KEY_NAME"]
    secret = secret or CREDS["BITCOINPAYGATE_API_KEY_SECRET"]
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()}


def bpg_create(
    client: FlaskClient, recorder: Recorder, order_id: str = "2015-03-10/123/1"
) -> dict[str, Any]:
    body = {
        "amount": "10.00",
        "currency": "USD",
        "notificationUrl": f"{recorder.url}/ipn/bitcoinpaygate/notification",
        "anomalyNotificationUrl": f"{recorder.url}/ipn/bitcoinpaygate/anomaly",
        "message": "payment for cookies",
        "merchantTransactionId": order_id,
    }
    response = client.post(
        "/v2/payments/new", data=compact(body), headers=bpg_auth(), content_type="application/json"
    )
    assert response.status_code == 200, response.data
    created: dict[str, Any] = parse(response.data)
    return created


def bpg_status(client: FlaskClient, payment_id: str) -> dict[str, Any]:
    response = client.get(f"/v2/payments/{payment_id}", headers=bpg_auth())
    assert response.status_code == 200, response.data
    status: dict[str, Any] = parse(response.data)
    return status


COINBAR = "/coinbar/api/v2/pay/gateway"


def coinbar_body(order_id: str = "order-1001") -> dict[str, Any]:
    return {
        "service_client_id": CREDS["COINBARPAY_SERVICE_CLIENT_ID"],
        "payment_request_id": order_id,
        "input_coin": "EUR",
        "products": [
            {
                "product_name": f"Order #{order_id}",
                "product_price": 8.99,
                "product_amount": 1,
                "product_id": order_id,
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


def coinbar_headers(
    raw: bytes, secret: str | None = None, key: str | None = None
) -> dict[str, str]:
    return {
        "CBPAY-API-KEY": key or CREDS["COINBARPAY_SERVICE_CLIENT_ID"],
        "SIGNATURE": hmac_hex(secret or CREDS["COINBARPAY_SECRET_KEY"], raw, "sha256"),
        "source": "web",
    }


def coinbar_create(client: FlaskClient, order_id: str = "order-1001") -> dict[str, Any]:
    raw = compact(coinbar_body(order_id))
    response = client.post(
        f"{COINBAR}/initiate",
        data=raw,
        headers=coinbar_headers(raw),
        content_type="application/json",
    )
    assert response.status_code == 200, response.data
    created: dict[str, Any] = parse(response.data)
    return created


def coinbar_status(client: FlaskClient, order_id: str, signed: bytes = b"{}") -> Any:
    return client.get(f"{COINBAR}/payment/{order_id}/status", headers=coinbar_headers(signed))


def cp_body(foreign_id: str = "order_12345") -> dict[str, Any]:
    return {
        "amount": "100.00",
        "currency": {"iso": "EUR"},
        "payment_currency": {"iso": "BTC", "network_name": "bitcoin"},
        "life_time_duration": 3600,
        "end_user_email": "test@test.com",
        "description": "Order 12345",
        "foreign_id": foreign_id,
    }


def cp_headers(raw: bytes, secret: str | None = None, key: str | None = None) -> dict[str, str]:
    return {
        "X-Processing-Key": key or CREDS["CRYPTOPROCESSING_API_KEY"],
        "X-Processing-Signature": hmac_hex(
            secret or CREDS["CRYPTOPROCESSING_SECRET"], raw, "sha512"
        ),
    }


def cp_create(client: FlaskClient, foreign_id: str = "order_12345") -> dict[str, Any]:
    raw = compact(cp_body(foreign_id))
    response = client.post(
        "/api/payments/v1/requests",
        data=raw,
        headers=cp_headers(raw),
        content_type="application/json",
    )
    assert response.status_code == 200, response.data
    data: dict[str, Any] = parse(response.data)["data"]
    return data


def act(
    client: FlaskClient, provider: str, ident: str, action: str, **options: Any
) -> dict[str, Any]:
    response = client.post(f"/sandbox/payments/{provider}/{ident}/{action}", json=options)
    assert response.status_code == 200, response.data
    result: dict[str, Any] = parse(response.data)
    return result


def control(client: FlaskClient, provider: str, ident: str) -> dict[str, Any]:
    response = client.get(f"/sandbox/payments/{provider}/{ident}")
    assert response.status_code == 200, response.data
    view: dict[str, Any] = parse(response.data)
    return view


# -- wire and signing ------------------------------------------------------------------------


def test_sandbox_signing_reproduces_the_provider_files_vectors() -> None:
    assert (
        sandbox_signing.cubepay_sign(
            {"akey": "100", "client_id": "exampleclientid", "ekey1": "100", "ekey2": "200"}
            | {"wkey3": "250"},
            "exampleclientkey",
        )
        == "5235D1A5A1E376D9D6E2A278E2265F6C41AAC8D2913AA6569518B06D2451E591"
    )
    assert (
        sandbox_signing.cubepay_sign(
            {"client_id": "exampleclientid", "id": "C1536678153791231775"},
            "exampleclientsecret",
        )
        == "BB5C2F63181246064BB3B7F0EB6C77F2CDCF7CB264DC9F9160D7057EFE7CCEE0"
    )
    ipn = parse_qsl(
        "client_id=exampleclientid&source_coin_id=443&source_amount=500&item_name=Test+item+name"
        "&merchant_transaction_id=M12345678&other=tok_5f2b9c&send_coin_id=&send_amount="
        "&receive_address=",
        keep_blank_values=True,
    )
    assert (
        sandbox_signing.cubepay_sign(ipn, "exampleclientsecret")
        == "5E25AFAFB5C31B384697A601A853D55032692BE33BA541FEDE567DF53E69ACC0"
    )
    bpg_body = (
        b'{"paymentId":"95bf1d853cf2e040f0ce219221f9b17206525941","status":"CONFIRMED",'
        b'"merchantTransactionId":"2015-03-10/123/1","currentTime":"2018-01-12T15:16:32Z"}'
    )
    assert (
        sandbox_signing.bitcoinpaygate_signature(bpg_body, "examplehmackey")
        == "2f63d990dd9703a3c92e8c9d6664c6bd78da8c9e"
    )
    coinbar = compact(
        coinbar_body("order-1001")
        | {
            "service_client_id": "2cb63353-2541-4c4e-90d4-7bf1d4b42c5c",
            "products": [
                {
                    "product_name": "Order #1001",
                    "product_price": 8.99,
                    "product_amount": 1,
                    "product_id": "1001",
                    "product_type": "ecommerce",
                }
            ],
        }
    )
    assert (
        sandbox_signing.coinbarpay_signature(coinbar, "your_secret_key")
        == "164e169b6277bc1b24762cc70866114f2415db74c855055995f76f06ec1ffe2b"
    )
    assert (
        sandbox_signing.coinbarpay_signature(b"{}", "your_secret_key")
        == "b043c2e564f32f8ef68649bba92f78cc717066ed4a6e6acc2c8d369675799c34"
    )
    assert sandbox_signing.cryptoprocessing_signature(
        b'{"currency":"BTC","foreign_id":"123456"}', "AbCdEfG123456"
    ) == (
        "03c25fcf7cd35e7d995e402cd5d51edd72d48e1471e865907967809a0c189ba5"
        "5b90815f20e2bb10f82c7a9e9d865546fda58989c2ae9e8e2ff7bc29195fa1ec"
    )


def test_wire_writes_decimals_digit_for_digit_and_refuses_floats() -> None:
    value = {"a": Decimal("0.00045145423250897323"), "b": Decimal("10.00"), "c": 1, "d": "é"}
    assert wire.dumps(value) == '{"a":0.00045145423250897323,"b":10.00,"c":1,"d":"é"}'
    assert wire.loads(wire.dumps(value)) == value
    assert wire.dumps({"e": Decimal("1E+2")}) == '{"e":100}'
    with pytest.raises(TypeError):
        wire.dumps({"f": 0.1})


def test_sandbox_environment_points_a_receiver_at_the_sandbox() -> None:
    env = sandbox_environment("http://127.0.0.1:8001/")
    assert set(env) == {
        "CUBEPAY_CLIENT_ID",
        "CUBEPAY_CLIENT_SECRET",
        "CUBEPAY_API_URL",
        "BITCOINPAYGATE_API_KEY_NAME",
        "BITCOINPAYGATE_API_KEY_SECRET",
        "BITCOINPAYGATE_HMAC_KEY",
        "BITCOINPAYGATE_API_URL",
        "COINBARPAY_SERVICE_CLIENT_ID",
        "COINBARPAY_SECRET_KEY",
        "COINBARPAY_API_URL",
        "CRYPTOPROCESSING_API_KEY",
        "CRYPTOPROCESSING_SECRET",
        "CRYPTOPROCESSING_API_URL",
    }
    assert env["CUBEPAY_API_URL"] == "http://127.0.0.1:8001"
    settings = Settings.from_env({"DATABASE_URL": "sqlite://", **env})
    assert all(settings.provider(name).configured for name in ("cubepay", "coinbarpay"))
    assert settings.bitcoinpaygate.hmac_key == CREDS["BITCOINPAYGATE_HMAC_KEY"]
    assert settings.cryptoprocessing.api_url == "http://127.0.0.1:8001"


# -- credentials -----------------------------------------------------------------------------


def test_cubepay_create_checks_client_id_and_sign(client: FlaskClient, recorder: Recorder) -> None:
    good = cubepay_fields(recorder)
    forged = [(k, v) for k, v in good if k != "sign"] + [("sign", "0" * 64)]
    stranger = cubepay_fields(recorder, client_id="someone-else")
    tampered = [(k, "600" if k == "source_amount" else v) for k, v in good]
    for fields in (forged, stranger, tampered):
        response = client.post(
            "/payment/coin",
            data=urlencode(fields),
            content_type="application/x-www-form-urlencoded",
        )
        assert response.status_code == 401
        assert parse(response.data)["status"] == 401
        assert isinstance(parse(response.data)["data"], str)
    assert client.get("/sandbox/payments").json == {"items": []}

    data = cubepay_create(client, recorder)
    assert data["id"].startswith("C") and len(data["id"]) == 20 and data["id"][1:].isdigit()
    assert data["status"] == 0
    info = data["pay_info"]
    assert info["coin"] == {"id": 2, "symbol": "BTC", "name": "Bitcoin"}
    assert info["source_coin"]["id"] == 447 and info["source_coin"]["symbol"] == "USD"
    assert info["source_amount"] == 500
    # 500 USD at the sandbox's fixed 50 000 a BTC.
    assert info["amount"] == Decimal("0.01000000")
    assert info["paid_amount"] == 0
    assert info["merchant_transaction_id"] == "M12345678"
    assert info["item_name"] == "Test item name"
    assert info["address"] and data["pay_url"]
    assert "fee" in info and "send_info" in data


def test_bitcoinpaygate_create_needs_basic_auth(client: FlaskClient, recorder: Recorder) -> None:
    body = compact({"amount": 10, "currency": "USD", "message": "m", "merchantTransactionId": "x"})
    for headers in ({}, bpg_auth(secret="wrong"), bpg_auth(name="wrong")):
        response = client.post(
            "/v2/payments/new", data=body, headers=headers, content_type="application/json"
        )
        assert response.status_code == 401
        assert isinstance(response.json, list) and response.json[0]["message"]
    response = client.post(
        "/v2/payments/new", data=body, headers=bpg_auth(), content_type="application/json"
    )
    assert response.status_code == 400
    assert [m["message"] for m in response.json] == ["notificationUrl is required"]

    created = bpg_create(client, recorder)
    assert len(created["paymentId"]) == 40
    assert created["amount"] == Decimal("0.00020000")
    assert created["merchantTransactionId"] == "2015-03-10/123/1"
    assert created["paymentAddress"].startswith(f"bitcoin:{created['address']}?amount=0.0002")
    expires = datetime.fromisoformat(created["expirationTime"].replace("Z", "+00:00"))
    assert expires == START + timedelta(minutes=15)


def test_coinbarpay_checks_api_key_and_signature_of_the_raw_body(client: FlaskClient) -> None:
    raw = compact(coinbar_body())
    spaced = json.dumps(coinbar_body()).encode()
    attempts = [
        (raw, coinbar_headers(raw, secret="wrong")),
        (raw, coinbar_headers(raw, key="someone-else")),
        # The signature of the compact form does not cover the same object sent with spaces.
        (spaced, coinbar_headers(raw)),
    ]
    for body, headers in attempts:
        response = client.post(
            f"{COINBAR}/initiate", data=body, headers=headers, content_type="application/json"
        )
        assert response.status_code == 401
        assert response.json["result"] is False and response.json["error"]

    created = coinbar_create(client)
    assert created["result"] == "success"
    assert created["payment_total_price"] == Decimal("8.99")
    assert created["trade_pair"] == "BTC/EUR"
    assert created["destination_amount"] == Decimal("0.0001798")
    assert created["payment_string"].startswith("bitcoin:")
    # The status GET signs `{}`, or the empty string; nothing else.
    assert coinbar_status(client, "order-1001").status_code == 200
    assert coinbar_status(client, "order-1001", signed=b"").status_code == 200
    assert coinbar_status(client, "order-1001", signed=b"[]").status_code == 401
    assert coinbar_status(client, "order-404").status_code == 404


def test_cryptoprocessing_checks_key_and_signature(client: FlaskClient) -> None:
    raw = compact(cp_body())
    response = client.post(
        "/api/payments/v1/requests",
        data=raw,
        headers=cp_headers(raw, secret="wrong"),
        content_type="application/json",
    )
    assert response.status_code == 403
    assert response.json["code"] == "bad_header_signature"
    response = client.post(
        "/api/payments/v1/requests",
        data=raw,
        headers=cp_headers(raw, key="someone-else"),
        content_type="application/json",
    )
    assert response.status_code == 403
    assert response.json["code"] == "bad_header_key"

    data = cp_create(client)
    assert data["status"] == "created"
    assert data["amount"] == "100.00"
    assert data["currency"] == {"iso": "EUR"}
    assert data["foreign_id"] == "order_12345"
    assert data["life_time"] == int((START + timedelta(hours=1)).timestamp())
    assert data["payment_link"] and data["address"] and data["id"]


def test_configured_settings_replace_the_sandbox_credentials(
    clock: Clock, recorder: Recorder
) -> None:
    env = {
        "DATABASE_URL": "sqlite://",
        "CUBEPAY_CLIENT_ID": "shop-client",
        "CUBEPAY_CLIENT_SECRET": "shop-secret",
        # BitcoinPaygate configured without an HMAC key: its notifications come unsigned.
        "BITCOINPAYGATE_API_KEY_NAME": "shop-key",
        "BITCOINPAYGATE_API_KEY_SECRET": "shop-key-secret",
    }
    app = create_app(Settings.from_env(env), clock=clock, receiver_url=recorder.url)
    client = app.test_client()
    response = client.post(
        "/payment/coin",
        data=urlencode(cubepay_fields(recorder)),
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 401
    pairs = [(k, v) for k, v in cubepay_fields(recorder, client_id="shop-client") if k != "sign"]
    pairs.append(("sign", cubepay_sign(pairs, "shop-secret")))
    response = client.post(
        "/payment/coin", data=urlencode(pairs), content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 200

    body = compact(
        {
            "amount": "10",
            "currency": "EUR",
            "notificationUrl": f"{recorder.url}/n",
            "message": "m",
            "merchantTransactionId": "o-1",
        }
    )
    response = client.post(
        "/v2/payments/new", data=body, headers=bpg_auth(), content_type="application/json"
    )
    assert response.status_code == 401
    response = client.post(
        "/v2/payments/new",
        data=body,
        headers=bpg_auth("shop-key", "shop-key-secret"),
        content_type="application/json",
    )
    assert response.status_code == 200
    act(client, "bitcoinpaygate", "o-1", "pay")
    assert "x-bpg-signature" not in recorder.only("/n").headers
    sources = app.test_client().get("/sandbox/").json["providers"]
    assert sources["cubepay"]["credentials"] == "settings"
    assert sources["coinbarpay"]["credentials"] == "sandbox"


def test_without_a_clock_the_sandbox_reads_the_system_time_in_utc(
    settings: Settings, recorder: Recorder
) -> None:
    with time_machine.travel(START, tick=False) as traveller:
        client = create_app(settings, receiver_url=recorder.url).test_client()
        created = bpg_create(client, recorder)
        assert created["expirationTime"] == "2024-05-01T12:15:00Z"
        traveller.shift(timedelta(minutes=14, seconds=59))
        assert bpg_status(client, created["paymentId"])["status"] == "NEW"
        traveller.shift(timedelta(seconds=1))
        assert bpg_status(client, created["paymentId"])["status"] == "EXPIRED"


def test_serve_runs_the_sandbox_threaded(
    settings: Settings, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, Any, dict[str, Any]]] = []
    monkeypatch.setattr(
        "werkzeug.serving.run_simple",
        lambda host, port, app, **options: calls.append((host, port, app, options)),
    )
    serve("127.0.0.1", 8123, settings, receiver_url=recorder.url)
    [(host, port, app, options)] = calls
    assert (host, port, options["threaded"]) == ("127.0.0.1", 8123, True)
    described = app.test_client().get("/sandbox/").json
    assert described["callback_urls"]["coinbarpay"] == f"{recorder.url}/ipn/coinbarpay"


# -- CubePay ---------------------------------------------------------------------------------


def test_cubepay_pay_sends_a_signed_form_ipn_and_query_says_paid(
    client: FlaskClient, recorder: Recorder
) -> None:
    data = cubepay_create(client, recorder)
    result = act(client, "cubepay", data["id"], "pay")
    assert result["status"] == 2
    assert result["deliveries"][0]["status_code"] == 200
    assert result["deliveries"][0]["body"] == "success"

    ipn = recorder.only("/ipn/cubepay")
    assert ipn.header("Content-Type") == "application/x-www-form-urlencoded"
    pairs = parse_qsl(ipn.body.decode(), keep_blank_values=True)
    fields = dict(pairs)
    assert [k for k, _ in pairs] == [
        "client_id",
        "source_coin_id",
        "source_amount",
        "item_name",
        "merchant_transaction_id",
        "other",
        "send_coin_id",
        "send_amount",
        "receive_address",
        "sign",
    ]
    assert fields["client_id"] == CREDS["CUBEPAY_CLIENT_ID"]
    assert fields["other"] == "tok_5f2b9c"
    assert fields["merchant_transaction_id"] == "M12345678"
    assert fields["source_amount"] == "500" and fields["item_name"] == "Test item name"
    assert fields["sign"] == cubepay_sign(pairs, CREDS["CUBEPAY_CLIENT_SECRET"])

    for found in (
        cubepay_query(client, id=data["id"]),
        cubepay_query(client, merchant_transaction_id="M12345678"),
    ):
        assert found["status"] == 2
        assert found["pay_info"]["paid_amount"] == found["pay_info"]["amount"]


def test_cubepay_statuses_for_partial_unconfirmed_cancel_refund_and_expiry(
    client: FlaskClient, recorder: Recorder, clock: Clock
) -> None:
    underpaid = cubepay_create(client, recorder, merchant_transaction_id="under")
    result = act(client, "cubepay", underpaid["id"], "underpay", amount="0.004")
    assert result["status"] == 1 and result["deliveries"] == []
    info = cubepay_query(client, id=underpaid["id"])["pay_info"]
    assert info["paid_amount"] == Decimal("0.004") < info["amount"]

    slow = cubepay_create(client, recorder, merchant_transaction_id="slow")
    assert act(client, "cubepay", slow["id"], "pay", confirmed=False)["status"] == 1
    assert recorder.received == []
    assert act(client, "cubepay", slow["id"], "confirm")["status"] == 2
    assert len(recorder.received) == 1

    refunded = act(client, "cubepay", "slow", "refund")
    assert refunded["status"] == 6 and refunded["deliveries"] == []
    assert [h["status"] for h in refunded["payment"]["history"]][-2:] == [5, 6]

    cancelled = cubepay_create(client, recorder, merchant_transaction_id="cancel")
    assert act(client, "cubepay", cancelled["id"], "cancel")["status"] == -1
    late = cubepay_create(client, recorder, merchant_transaction_id="late")
    assert act(client, "cubepay", late["id"], "expire")["status"] == -1
    result = act(client, "cubepay", late["id"], "pay-late")
    assert result["status"] == -1 and result["deliveries"] == []
    assert result["payment"]["late_amount"] == result["payment"]["pay_amount"]

    timed_out = cubepay_create(client, recorder, merchant_transaction_id="clock")
    clock.advance(hours=6)
    assert cubepay_query(client, id=timed_out["id"])["status"] == -1
    assert len(recorder.received) == 1


# -- BitcoinPaygate --------------------------------------------------------------------------


def test_bitcoinpaygate_notification_is_a_signed_snapshot(
    client: FlaskClient, recorder: Recorder
) -> None:
    created = bpg_create(client, recorder)
    assert (
        act(client, "bitcoinpaygate", created["paymentId"], "pay", confirmed=False)["status"]
        == "UNCONFIRMED"
    )
    assert act(client, "bitcoinpaygate", created["paymentId"], "confirm")["status"] == "CONFIRMED"

    notes = recorder.wait_for(2)
    assert [n.path for n in notes] == ["/ipn/bitcoinpaygate/notification"] * 2
    for note in notes:
        assert note.header("X-BPG-Signature") == hmac_hex(
            CREDS["BITCOINPAYGATE_HMAC_KEY"], note.body, "sha1"
        )
    snapshot = parse(notes[-1].body)
    assert snapshot["status"] == "CONFIRMED"
    assert snapshot["paymentId"] == created["paymentId"]
    assert snapshot["merchantTransactionId"] == "2015-03-10/123/1"
    assert snapshot["amount"] == Decimal("10.00") and snapshot["currency"] == "USD"
    assert snapshot["paidBtc"] == snapshot["amountBtc"] == created["amount"]
    assert snapshot["remainingToPayBtc"] == 0
    assert snapshot["currentTime"] and snapshot["notificationType"] == "REGULAR"
    assert len(snapshot["btcTransactions"]) == 1
    assert parse(notes[0].body)["status"] == "UNCONFIRMED"

    assert bpg_status(client, created["paymentId"])["status"] == "CONFIRMED"


def test_bitcoinpaygate_underpaid_expired_late_and_overpaid(
    client: FlaskClient, recorder: Recorder
) -> None:
    under = bpg_create(client, recorder, "under")["paymentId"]
    assert act(client, "bitcoinpaygate", under, "underpay")["status"] == "UNDERPAID"
    assert bpg_status(client, under)["remainingToPayBtc"] == Decimal("0.0001")
    # The remainder never came.
    assert act(client, "bitcoinpaygate", under, "expire")["status"] == "INVALID"

    late = bpg_create(client, recorder, "late")["paymentId"]
    assert act(client, "bitcoinpaygate", late, "expire")["status"] == "EXPIRED"
    result = act(client, "bitcoinpaygate", late, "pay-late")
    assert result["status"] == "EXPIRED"
    anomaly = recorder.only("/ipn/bitcoinpaygate/anomaly")
    assert anomaly.header("X-BPG-Signature") == hmac_hex(
        CREDS["BITCOINPAYGATE_HMAC_KEY"], anomaly.body, "sha1"
    )
    report = parse(anomaly.body)
    assert report["paymentId"] == late and report["paidBtc"] == Decimal("0.0002")
    assert report["notificationType"] != "REGULAR"
    assert bpg_status(client, late)["paidBtc"] == 0

    over = bpg_create(client, recorder, "over")["paymentId"]
    assert act(client, "bitcoinpaygate", over, "overpay")["status"] == "INVALID"

    statuses = [parse(r.body)["status"] for r in recorder.received if r.path.endswith("tion")]
    assert statuses == ["UNDERPAID", "INVALID", "EXPIRED", "INVALID"]
    for action in ("refund", "cancel"):
        response = client.post(f"/sandbox/payments/bitcoinpaygate/{over}/{action}")
        assert response.status_code == 409


def test_bitcoinpaygate_expires_by_the_clock_and_resends_on_request(
    client: FlaskClient, recorder: Recorder, clock: Clock
) -> None:
    stale = bpg_create(client, recorder, "stale")["paymentId"]
    clock.advance(minutes=15)
    assert bpg_status(client, stale)["status"] == "EXPIRED"
    assert recorder.received == []
    # The expiry callback the clock owed goes out when the expiry is acted out.
    assert act(client, "bitcoinpaygate", stale, "expire")["deliveries"][0]["status_code"] == 200
    assert parse(recorder.only("/ipn/bitcoinpaygate/notification").body)["status"] == "EXPIRED"

    paid = bpg_create(client, recorder, "paid")["paymentId"]
    response = client.get(f"/v2/payments/notify/{paid}", headers=bpg_auth())
    assert response.json == {"value": 402}
    act(client, "bitcoinpaygate", paid, "pay")
    response = client.get(f"/v2/payments/notify/{paid}", headers=bpg_auth())
    assert response.json == {"value": 200}
    received = recorder.wait_for(3)
    assert [parse(r.body)["status"] for r in received[1:]] == ["CONFIRMED", "CONFIRMED"]
    assert client.get("/v2/payments/notify/nope", headers=bpg_auth()).status_code == 404


# -- CoinbarPay ------------------------------------------------------------------------------


def test_coinbarpay_success_callback_is_signed_and_status_agrees(
    client: FlaskClient, recorder: Recorder
) -> None:
    created = coinbar_create(client)
    assert act(client, "coinbarpay", "order-1001", "pay")["status"] == "SUCCESS"

    callback = recorder.only("/ipn/coinbarpay")
    assert callback.header("Content-Type") == "application/json"
    assert callback.header("CBPAY-API-KEY") == CREDS["COINBARPAY_SERVICE_CLIENT_ID"]
    assert callback.header("SIGNATURE") == hmac_hex(
        CREDS["COINBARPAY_SECRET_KEY"], callback.body, "sha256"
    )
    body = parse(callback.body)
    assert body["status"] == "SUCCESS"
    assert body["payment_request_id_client"] == "order-1001"
    assert body["payment_id_coinbar"] == created["payment_id_coinbar"]
    assert body["service_client_id"] == CREDS["COINBARPAY_SERVICE_CLIENT_ID"]
    assert body["input_coin"] == "EUR"
    assert body["payment_detail"]["total_price"] == Decimal("8.99")
    assert body["payment_detail"]["destination_amount"] == created["destination_amount"]

    status = parse(coinbar_status(client, "order-1001").data)
    assert status["status"] == "SUCCESS"
    assert status["payment_detail"]["total_price"] == Decimal("8.99")
    assert status["payment_request_id_client"] == "order-1001"

    refunded = act(client, "coinbarpay", "order-1001", "refund")
    assert refunded["status"] == "FAILED" and refunded["deliveries"] == []
    assert parse(coinbar_status(client, "order-1001").data)["status"] == "FAILED"


def test_coinbarpay_timeout_cancel_partial_and_late(
    client: FlaskClient, recorder: Recorder, clock: Clock
) -> None:
    coinbar_create(client, "expire-me")
    result = act(client, "coinbarpay", "expire-me", "expire")
    assert result["status"] == "FAILED"
    body = parse(recorder.only("/ipn/coinbarpay").body)
    assert body["status"] == "FAILED" and body["status_descr"] == "Timeout"

    coinbar_create(client, "cancel-me")
    assert act(client, "coinbarpay", "cancel-me", "cancel")["status"] == "CANCELED"
    assert parse(recorder.received[-1].body)["status"] == "CANCELED"

    coinbar_create(client, "partial")
    result = act(client, "coinbarpay", "partial", "underpay")
    assert result["status"] == "PENDING" and result["deliveries"] == []
    result = act(client, "coinbarpay", "partial", "pay-late")
    # The timeout's callback goes; the late funds change nothing the provider shows.
    assert [parse(d["request"]["body"])["status_descr"] for d in result["deliveries"]] == [
        "Timeout"
    ]
    assert result["status"] == "FAILED"

    coinbar_create(client, "slow")
    clock.advance(minutes=30)
    status = parse(coinbar_status(client, "slow").data)
    assert status["status"] == "FAILED" and status["status_descr"] == "Timeout"
    assert len(recorder.received) == 3


# -- CryptoProcessing ------------------------------------------------------------------------


def test_cryptoprocessing_paid_callback_is_signed(client: FlaskClient, recorder: Recorder) -> None:
    data = cp_create(client)
    assert act(client, "cryptoprocessing", data["id"], "pay")["status"] == "paid"

    callback = recorder.only("/ipn/cryptoprocessing")
    assert callback.header("X-Processing-Key") == CREDS["CRYPTOPROCESSING_API_KEY"]
    assert callback.header("X-Processing-Signature") == hmac_hex(
        CREDS["CRYPTOPROCESSING_SECRET"], callback.body, "sha512"
    )
    body = parse(callback.body)
    assert body["type"] == "payment_request"
    assert body["status"] == "paid"
    assert body["payment_request_id"] == data["id"]
    assert body["foreign_id"] == "order_12345"
    assert body["payment_request_amount"] == {"currency": {"iso": "EUR"}, "amount": "100.00"}
    sent = body["currency_sent"]
    assert sent["currency"] == {"iso": "BTC", "network_name": "bitcoin"}
    assert sent["expected_amount"] == sent["received_amount"] == "0.00200000"
    assert Decimal(sent["remaining_amount"]) == 0
    assert body["expires_at"] == data["life_time"]
    assert control(client, "cryptoprocessing", "order_12345")["status"] == "paid"


def test_cryptoprocessing_processing_failed_expired_late_and_overpaid(
    client: FlaskClient, recorder: Recorder
) -> None:
    partial = cp_create(client, "partial")["id"]
    assert act(client, "cryptoprocessing", partial, "underpay")["status"] == "processing"
    sent = parse(recorder.received[-1].body)["currency_sent"]
    assert Decimal(0) < Decimal(sent["received_amount"]) < Decimal(sent["expected_amount"])
    assert act(client, "cryptoprocessing", partial, "expire")["status"] == "failed"

    empty = cp_create(client, "empty")["id"]
    assert act(client, "cryptoprocessing", empty, "expire")["status"] == "expired"
    result = act(client, "cryptoprocessing", empty, "pay-late")
    assert result["status"] == "expired"
    late = parse(recorder.received[-1].body)
    assert late["status"] == "expired"
    assert Decimal(late["currency_sent"]["received_amount"]) == Decimal("0.002")

    over = cp_create(client, "over")["id"]
    assert act(client, "cryptoprocessing", over, "overpay")["status"] == "paid"
    sent = parse(recorder.received[-1].body)["currency_sent"]
    assert Decimal(sent["received_amount"]) > Decimal(sent["expected_amount"])

    statuses = [parse(r.body)["status"] for r in recorder.received]
    assert statuses == ["processing", "failed", "expired", "expired", "paid"]
    assert client.post(f"/sandbox/payments/cryptoprocessing/{over}/refund").status_code == 409


# -- control API -----------------------------------------------------------------------------


def test_control_api_lists_suppresses_resends_and_refuses(
    client: FlaskClient, recorder: Recorder
) -> None:
    data = cp_create(client)
    result = act(client, "cryptoprocessing", data["id"], "pay", callback=False)
    assert result["status"] == "paid" and result["deliveries"] == []
    assert recorder.received == []
    assert client.post(f"/sandbox/payments/cryptoprocessing/{data['id']}/resend").status_code == 409

    recorder.status, recorder.answer = 503, b"try later"
    coinbar_create(client)
    delivery = act(client, "coinbarpay", "order-1001", "pay")["deliveries"][0]
    assert delivery["status_code"] == 503 and delivery["body"] == "try later"
    recorder.status, recorder.answer = 200, b"success"
    resent = client.post("/sandbox/payments/coinbarpay/order-1001/resend").json["deliveries"][0]
    assert resent["status_code"] == 200 and resent["resend"] is True
    assert recorder.received[0].body == recorder.received[1].body

    items = client.get("/sandbox/payments").json["items"]
    assert [(i["provider"], i["status"]) for i in items] == [
        ("cryptoprocessing", "paid"),
        ("coinbarpay", "SUCCESS"),
    ]
    assert len(items[1]["callbacks"]) == 2 and items[0]["amount"] == "100.00"

    assert client.get("/sandbox/payments/coinbarpay/nope").status_code == 404
    assert client.get("/sandbox/payments/nobody/order-1001").status_code == 404
    assert client.post("/sandbox/payments/coinbarpay/order-1001/pay").status_code == 409
    response = client.post("/sandbox/payments/coinbarpay/order-1001/pay", json={"amount": "lots"})
    assert response.status_code == 400
    assert client.post("/sandbox/payments/coinbarpay/order-1001/explode").status_code in (404, 405)


def test_an_unreachable_receiver_is_reported_not_raised(
    settings: Settings, clock: Clock, recorder: Recorder
) -> None:
    app = create_app(settings, clock=clock, receiver_url="http://127.0.0.1:9", delivery_timeout=1)
    client = app.test_client()
    cp_create(client)
    delivery = act(client, "cryptoprocessing", "order_12345", "pay")["deliveries"][0]
    assert delivery["status_code"] is None and "ConnectionError" in delivery["error"]


# -- faults ----------------------------------------------------------------------------------


def test_faults_hit_the_next_calls_of_one_provider_and_then_stop(
    client: FlaskClient, recorder: Recorder
) -> None:
    created = bpg_create(client, recorder)
    payment_id = created["paymentId"]
    response = client.post(
        "/sandbox/faults", json={"provider": "bitcoinpaygate", "mode": "rate429", "count": 2}
    )
    assert response.status_code == 201
    coinbar_create(client)  # another provider is not affected
    for _ in range(2):
        response = client.get(f"/v2/payments/{payment_id}", headers=bpg_auth())
        assert response.status_code == 429 and response.headers["Retry-After"]
    assert bpg_status(client, payment_id)["status"] == "NEW"

    expectations = {
        "error500": lambda r: r.status_code == 500 and r.json[0]["message"],
        "unauthorized": lambda r: r.status_code == 401,
        "garbage": lambda r: r.status_code == 200 and r.data.startswith(b"<html>"),
        "truncated": lambda r: (
            r.status_code == 200
            and int(r.headers["Content-Length"]) > len(r.data)
            and not _is_json(r.data)
        ),
    }
    for mode, misbehaved in expectations.items():
        client.post("/sandbox/faults", json={"provider": "bitcoinpaygate", "mode": mode})
        assert misbehaved(client.get(f"/v2/payments/{payment_id}", headers=bpg_auth())), mode
        assert bpg_status(client, payment_id)["status"] == "NEW"

    client.post("/sandbox/faults", json={"provider": "cubepay", "mode": "timeout", "count": 1})
    started = time.monotonic()
    cubepay_create(client, recorder)  # slow, but answered and created
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    cubepay_create(client, recorder, merchant_transaction_id="fast")
    assert time.monotonic() - started < 0.3

    client.post("/sandbox/faults", json={"provider": "coinbarpay", "mode": "error500", "count": 5})
    assert client.get("/sandbox/faults").json["faults"] == [
        {"provider": "coinbarpay", "mode": "error500", "remaining": 5, "path": None}
    ]
    assert client.delete("/sandbox/faults").json == {"faults": []}
    assert coinbar_status(client, "order-1001").status_code == 200
    assert client.post(
        "/sandbox/faults", json={"provider": "x", "mode": "timeout"}
    ).status_code == (400)


def test_faults_over_a_real_socket_time_out_and_cut_the_body(
    settings: Settings, clock: Clock, recorder: Recorder
) -> None:
    app = create_app(settings, clock=clock, receiver_url=recorder.url, fault_delay=1.0)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        raw = compact(cp_body())
        requests.post(f"{base}/sandbox/faults", json={"provider": "coinbarpay", "mode": "timeout"})
        coinbar_raw = compact(coinbar_body())
        with pytest.raises(requests.Timeout):
            requests.post(
                f"{base}{COINBAR}/initiate",
                data=coinbar_raw,
                headers={**coinbar_headers(coinbar_raw), "Content-Type": "application/json"},
                timeout=0.3,
            )
        # The provider did the work; only the answer was lost.
        assert requests.get(f"{base}/sandbox/payments/coinbarpay/order-1001").status_code == 200

        requests.post(
            f"{base}/sandbox/faults", json={"provider": "cryptoprocessing", "mode": "truncated"}
        )
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.post(
                f"{base}/api/payments/v1/requests",
                data=raw,
                headers={**cp_headers(raw), "Content-Type": "application/json"},
                timeout=3,
            )

        def create(order_id: str) -> int:
            raw = compact(coinbar_body(order_id))
            headers = {**coinbar_headers(raw), "Content-Type": "application/json"}
            return requests.post(f"{base}{COINBAR}/initiate", data=raw, headers=headers).status_code

        orders = [f"parallel-{n}" for n in range(16)]
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(create, orders)) == [200] * 16
        listed = requests.get(f"{base}/sandbox/payments").json()["items"]
        assert sorted(i["order_id"] for i in listed if i["order_id"] in orders) == sorted(orders)
    finally:
        server.shutdown()


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


# -- the routes the official SDKs call --------------------------------------------------------


def cubepay_call(client: FlaskClient, path: str, **fields: str) -> Any:
    pairs = [("client_id", CREDS["CUBEPAY_CLIENT_ID"]), *fields.items()]
    pairs.append(("sign", cubepay_sign(pairs, CREDS["CUBEPAY_CLIENT_SECRET"])))
    response = client.post(
        path, data=urlencode(pairs), content_type="application/x-www-form-urlencoded"
    )
    return response.status_code, parse(response.data)


def test_cubepay_currency_lists_and_hosted_payment_page_as_the_sdk_calls_them(
    client: FlaskClient, recorder: Recorder
) -> None:
    status, coins = cubepay_call(client, "/currency/coin")
    assert status == 200 and coins["status"] == 200
    assert {"id": 2, "name": "Bitcoin", "symbol": "BTC"} in coins["data"]
    assert all(c["id"] < 300 for c in coins["data"])
    status, fiats = cubepay_call(client, "/currency/fiat")
    assert status == 200
    assert {f["symbol"] for f in fiats["data"]} >= {"USD", "TWD"}
    assert all(f["id"] >= 300 for f in fiats["data"])
    # A wrong sign is refused as on every other call.
    forged = client.post(
        "/currency/coin",
        data=urlencode([("client_id", CREDS["CUBEPAY_CLIENT_ID"]), ("sign", "0" * 64)]),
        content_type="application/x-www-form-urlencoded",
    )
    assert forged.status_code == 401

    status, page = cubepay_call(
        client,
        "/payment",
        source_coin_id="447",
        source_amount="100",
        item_name="Test Item Name",
        merchant_transaction_id="page-1",
        ipn_url=f"{recorder.url}/ipn/cubepay",
    )
    assert status == 200 and isinstance(page["data"], str)
    assert page["data"].startswith("http://localhost/sandbox/payments/cubepay/C")
    # The page's payment is a payment like any other: queried by the merchant's id, moved.
    queried = cubepay_query(client, merchant_transaction_id="page-1")
    assert queried["status"] == 0 and queried["pay_info"]["source_amount"] == Decimal(100)
    assert client.post("/sandbox/payments/cubepay/page-1/pay").status_code == 200
    assert cubepay_query(client, merchant_transaction_id="page-1")["status"] == 2


def test_bitcoinpaygate_answers_under_api_v2_as_its_official_client_calls_it(
    client: FlaskClient, recorder: Recorder
) -> None:
    body = compact(
        {
            "amount": "10.00",
            "currency": "USD",
            "notificationUrl": f"{recorder.url}/ipn/bitcoinpaygate/notification",
            "message": "cookies",
            "merchantTransactionId": "api-1",
        }
    )
    created = client.post(
        "/api/v2/payments/new", data=body, headers=bpg_auth(), content_type="application/json"
    )
    assert created.status_code == 200, created.data
    payment_id = parse(created.data)["paymentId"]
    status = client.get(f"/api/v2/payments/{payment_id}", headers=bpg_auth())
    assert status.status_code == 200 and parse(status.data)["status"] == "NEW"
    assert client.get(f"/api/v2/payments/{payment_id}").status_code == 401
    assert bpg_status(client, payment_id)["merchantTransactionId"] == "api-1"
    resend = client.get(f"/api/v2/payments/notify/{payment_id}", headers=bpg_auth())
    assert resend.status_code == 200


# -- the timeout fault -----------------------------------------------------------------------


def test_timeout_fault_holds_past_the_receivers_read_timeout_by_default(
    recorder: Recorder,
) -> None:
    default = Settings(database_url="sqlite://")
    described = create_app(default, receiver_url=recorder.url).test_client().get("/sandbox/").json
    assert float(described["timeout_fault_seconds"]) > default.http.read_timeout

    settings = Settings.from_env({"IPN_HTTP_READ_TIMEOUT": "0.4"})
    app = create_app(settings, receiver_url=recorder.url)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        requests.post(f"{base}/sandbox/faults", json={"provider": "cubepay", "mode": "timeout"})
        pairs = [("client_id", CREDS["CUBEPAY_CLIENT_ID"]), ("id", "C1")]
        pairs.append(("sign", cubepay_sign(pairs, CREDS["CUBEPAY_CLIENT_SECRET"])))
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(
                f"{base}/payment/query",
                data=urlencode(pairs),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                timeout=(1, settings.http.read_timeout),
            )
        assert time.monotonic() - started < 3
    finally:
        server.shutdown()
