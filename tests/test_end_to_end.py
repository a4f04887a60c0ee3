"""End to end over real HTTP on loopback: the receiver creates payments at the provider sandbox,
the sandbox moves them and sends its signed callbacks, and each path ends in the state that
../shared/providers/README.md gives it, with anomalies where the rules say so."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import time_machine
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from ipn import create_app, processing
from ipn.config import Settings
from ipn.dispatch import Dispatcher
from ipn.reconcile import reconcile_due
from ipn.sandbox import create_app as create_sandbox
from ipn.sandbox import sandbox_environment
from ipn.services import Services

from conftest import Backend, clean

TOKEN = "e2e-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(app: Flask, port: int) -> BaseWSGIServer:
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class Live:
    receiver: str
    sandbox: str
    services: Services

    def create(self, provider: str, order_id: str, **fields: Any) -> dict[str, Any]:
        body = {
            "provider": provider,
            "order_id": order_id,
            "amount": "10.00",
            "currency": "USD",
            **fields,
        }
        response = requests.post(
            f"{self.receiver}/api/payments",
            json=body,
            timeout=10,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 201, response.text
        payment: dict[str, Any] = response.json()
        return payment

    def act(
        self, provider: str, payment: dict[str, Any], action: str, **body: Any
    ) -> dict[str, Any]:
        reference = payment["provider_payment_id"] or payment["order_id"]
        response = requests.post(
            f"{self.sandbox}/sandbox/payments/{provider}/{reference}/{action}",
            json=body,
            timeout=15,
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        for delivery in answer.get("deliveries", []):
            assert (delivery["status_code"], delivery["body"]) == (200, "success"), delivery
        return answer

    def show(self, payment: dict[str, Any]) -> dict[str, Any]:
        response = requests.get(
            f"{self.receiver}/api/payments/{payment['id']}",
            timeout=10,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 200
        shown: dict[str, Any] = response.json()
        return shown

    def reconcile(self, payment: dict[str, Any]) -> dict[str, Any]:
        response = requests.post(
            f"{self.receiver}/api/payments/{payment['id']}/reconcile",
            timeout=15,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def wait(self, payment: dict[str, Any], status: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.show(payment)
            if shown["status"] == status:
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"payment is {shown['status']}, not {status}: {shown['timeline']}"
                )
            time.sleep(0.05)


@pytest.fixture
def live(backend: Backend) -> Iterator[Live]:
    clean(backend.db)
    receiver_port, sandbox_port = free_port(), free_port()
    receiver = f"http://127.0.0.1:{receiver_port}"
    sandbox = f"http://127.0.0.1:{sandbox_port}"
    settings = Settings.from_env(
        {
            **backend.env,
            **sandbox_environment(sandbox),
            "IPN_PUBLIC_URL": receiver,
            "IPN_API_TOKEN": TOKEN,
        }
    )
    app = create_app(settings)
    services: Services = app.extensions["ipn"]
    # The worker's own function, run on the dispatcher's thread instead of through a broker:
    # these tests are about the providers' paths, the queue has tests of its own.
    app.extensions["ipn.dispatcher"] = Dispatcher(
        lambda notification_id: processing.run(services, notification_id, 0)
    )
    servers = [
        serve(app, receiver_port),
        serve(create_sandbox(settings, receiver_url=receiver, fault_delay=1.5), sandbox_port),
    ]
    yield Live(receiver, sandbox, services)
    for server in servers:
        server.shutdown()
    services.db.engine.dispose()


def kinds(shown: dict[str, Any]) -> list[str]:
    return [anomaly["kind"] for anomaly in shown["anomalies"]]


def moves(shown: dict[str, Any]) -> list[tuple[str | None, str]]:
    return [
        (e["from_status"], e["to_status"])
        for e in shown["timeline"]
        if e["from_status"] != e["to_status"]
    ]


# --- paid, for every provider ---------------------------------------------------------------

PAY_FIELDS = {
    "cubepay": {"pay_currency": "BTC"},
    "bitcoinpaygate": {},
    "coinbarpay": {
        "currency": "EUR",
        "pay_currency": "BTC",
        "customer_email": "mario.rossi@example.com",
    },
    "cryptoprocessing": {"pay_currency": "BTC"},
}


@pytest.mark.parametrize("provider", sorted(PAY_FIELDS))
def test_create_pay_callback_paid(live: Live, provider: str) -> None:
    payment = live.create(provider, f"e2e-{provider}", **PAY_FIELDS[provider])
    assert payment["status"] == "pending" and payment["expires_at"]
    assert payment["pay_address"] or payment["pay_url"]
    live.act(provider, payment, "pay")
    shown = live.wait(payment, "paid")
    assert moves(shown)[0] == (None, "pending")
    sources = [e["source"] for e in shown["timeline"]]
    assert sources[0] == "create" and "callback" in sources
    paid_event = next(e for e in shown["timeline"] if e["to_status"] == "paid")
    assert paid_event["notification_id"] is not None
    assert shown["anomalies"] == []


# --- CubePay: no IPN but on success, so polling finds the rest ------------------------------


def test_cubepay_underpaid_is_found_by_polling(live: Live) -> None:
    payment = live.create("cubepay", "cube-under", pay_currency="BTC")
    live.act("cubepay", payment, "underpay")
    assert live.show(payment)["status"] == "pending"  # no IPN for a partial payment
    assert live.reconcile(payment)["status"] == "underpaid"


def test_cubepay_expires_after_six_hours_by_polling(live: Live) -> None:
    payment = live.create("cubepay", "cube-expire", pay_currency="BTC")
    created = datetime.fromisoformat(payment["created_at"].replace("Z", "+00:00"))
    grace = live.services.settings.expiry_grace
    with time_machine.travel(created + timedelta(hours=6) - timedelta(minutes=1), tick=True):
        assert reconcile_due(live.services).checked == 1
        assert live.show(payment)["status"] == "pending"
    with time_machine.travel(
        created + timedelta(hours=6) + grace + timedelta(seconds=5), tick=True
    ):
        report = reconcile_due(live.services, now=datetime.now(UTC))
        assert report.changed == 1
        shown = live.show(payment)
    assert shown["status"] == "expired"


def test_cubepay_refund_is_found_by_polling_a_paid_payment(live: Live) -> None:
    payment = live.create("cubepay", "cube-refund", pay_currency="BTC")
    live.act("cubepay", payment, "pay")
    live.wait(payment, "paid")
    live.act("cubepay", payment, "refund")
    assert live.reconcile(payment)["status"] == "refunded"


# --- BitcoinPaygate: a notification on every change, anomalies for late funds ---------------


def test_bitcoinpaygate_underpaid_expired_and_late(live: Live) -> None:
    under = live.create("bitcoinpaygate", "bpg-under")
    live.act("bitcoinpaygate", under, "underpay")
    live.wait(under, "underpaid")

    late = live.create("bitcoinpaygate", "bpg-late")
    live.act("bitcoinpaygate", late, "expire")
    live.wait(late, "expired")
    live.act("bitcoinpaygate", late, "pay-late")
    deadline = time.monotonic() + 20
    while "unexpected_funds" not in kinds(shown := live.show(late)):
        assert time.monotonic() < deadline, shown
        time.sleep(0.05)
    assert shown["status"] == "expired"


# --- CoinbarPay: callbacks for executed, canceled, timeout; refunds only by polling ---------


def test_coinbarpay_expired_and_refunded(live: Live) -> None:
    fields = PAY_FIELDS["coinbarpay"]
    expiring = live.create("coinbarpay", "cb-expire", **fields)
    live.act("coinbarpay", expiring, "expire")
    live.wait(expiring, "expired")

    refunded = live.create("coinbarpay", "cb-refund", **fields)
    live.act("coinbarpay", refunded, "pay")
    live.wait(refunded, "paid")
    live.act("coinbarpay", refunded, "refund")
    assert live.reconcile(refunded)["status"] == "refunded"
    assert moves(live.show(refunded))[-1] == ("paid", "refunded")


# --- CryptoProcessing: callbacks are the only evidence --------------------------------------


def test_cryptoprocessing_underpaid_expired_and_late(live: Live) -> None:
    under = live.create("cryptoprocessing", "cp-under", pay_currency="BTC")
    live.act("cryptoprocessing", under, "underpay")
    live.wait(under, "underpaid")

    late = live.create("cryptoprocessing", "cp-late", pay_currency="BTC")
    live.act("cryptoprocessing", late, "expire")
    live.wait(late, "expired")
    live.act("cryptoprocessing", late, "pay-late")
    deadline = time.monotonic() + 20
    while "late_payment" not in kinds(shown := live.show(late)):
        assert time.monotonic() < deadline, shown
        time.sleep(0.05)
    assert shown["status"] == "expired"


# --- a provider that misbehaves on create ---------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "mode", "retry_status"),
    [
        # Refused outright: nothing was created, the retry creates it.
        ("cryptoprocessing", "error500", 201),
        # Created, but the answer was lost. CubePay can be asked about our order id: the retry
        # finds the payment (200). CryptoProcessing cannot: it refuses the reused foreign_id, and
        # the payment is adopted when its first callback comes.
        ("cubepay", "garbage", 200),
        ("cubepay", "timeout", 200),
        ("cryptoprocessing", "garbage", 502),
    ],
)
def test_create_against_a_failing_provider_is_502_and_a_retry_never_creates_twice(
    live: Live, provider: str, mode: str, retry_status: int
) -> None:
    create_path = {"cubepay": "/payment/coin", "cryptoprocessing": "/requests"}[provider]
    requests.post(
        f"{live.sandbox}/sandbox/faults",
        timeout=5,
        json={"provider": provider, "mode": mode, "count": 1, "path": create_path},
    )
    order_id = f"{provider}-{mode}"
    body = {
        "provider": provider,
        "order_id": order_id,
        "amount": "10.00",
        "currency": "USD",
        "pay_currency": "BTC",
    }
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with pytest.MonkeyPatch.context() as patch:
        # The receiver's read timeout is shorter than the sandbox's fault delay.
        adapter = live.services.provider(provider)
        patch.setattr(adapter, "http", replace(adapter.http, read_timeout=0.5))
        failed = requests.post(
            f"{live.receiver}/api/payments", json=body, headers=headers, timeout=15
        )
    assert failed.status_code == 502, failed.text
    assert "provider" in failed.json()["error"]
    listed = requests.get(
        f"{live.receiver}/api/payments?order_id={order_id}", headers=headers, timeout=5
    ).json()
    assert listed["items"] == []
    retried = requests.post(f"{live.receiver}/api/payments", json=body, headers=headers, timeout=15)
    assert retried.status_code == retry_status, retried.text
    at_provider = [
        p
        for p in requests.get(f"{live.sandbox}/sandbox/payments", timeout=5).json()["items"]
        if p["order_id"] == order_id
    ]
    assert len(at_provider) == 1
    recorded = requests.get(
        f"{live.receiver}/api/payments?order_id={order_id}", headers=headers, timeout=5
    ).json()["items"]
    assert len(recorded) == (1 if retry_status < 300 else 0)
    if retry_status == 200:
        assert recorded[0]["provider_payment_id"] == at_provider[0]["payment_id"]
