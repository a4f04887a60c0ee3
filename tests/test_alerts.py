"""Alerts reach a real HTTP endpoint: grouped (one message for a burst, with its count),
rate-limited, about the right conditions, and an unreachable endpoint breaks nothing."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, update

from ipn import alerts, sweeper
from ipn.anomalies import open_anomaly
from ipn.config import Settings
from ipn.inbox import store_callback
from ipn.services import Services
from models import Alert, AnomalyKind, Notification, PaymentStatus, utcnow

from conftest import Backend
from helpers import make_payment

PUBLIC_URL = "https://ipn.example.com"


class Receiver:
    """A chat webhook on a free local port that keeps what it is sent."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                receiver.messages.append(json.loads(self.rfile.read(length)))
                self.send_response(receiver.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/B000"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def texts(self) -> list[str]:
        return [message["text"] for message in self.messages]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def services_for(backend: Backend, url: str) -> Services:
    return Services.from_settings(
        backend.settings(IPN_ALERT_WEBHOOK_URL=url, IPN_PUBLIC_URL=PUBLIC_URL)
    )


@pytest.fixture
def services(settings: Settings, backend: Backend, receiver: Receiver) -> Iterator[Services]:
    services = services_for(backend, receiver.url)
    yield services
    services.db.engine.dispose()


def bury(services: Services, count: int, provider: str = "cubepay") -> None:
    """`count` rows out of attempts, then the sweeper's pass that makes them `dead`."""
    old = utcnow() - timedelta(hours=1)
    for _ in range(count):
        store_callback(services.db, provider, "ipn", b"{}", {}, None, received_at=old)
    with services.db.transaction() as session:
        session.execute(update(Notification).values(attempts=services.settings.max_attempts))
    report = sweeper.sweep_inbox(services, lambda notification_id: None)
    assert len(report.dead) == count


def test_a_burst_of_dead_rows_gives_one_message_with_the_count(
    services: Services, receiver: Receiver
) -> None:
    bury(services, 50)
    report = alerts.send_alerts(services)
    assert report.sent == ["dead:cubepay"]
    assert len(receiver.messages) == 1
    [text] = receiver.texts
    assert text.startswith("50 notifications from cubepay went dead")
    assert text.endswith(f"\n{PUBLIC_URL}/console/notifications?status=dead")
    # Told once: nothing new, nothing sent, however often the beat runs.
    alerts.send_alerts(services)
    alerts.send_alerts(services, now=utcnow() + timedelta(hours=1))
    assert len(receiver.messages) == 1


def test_the_same_alert_waits_out_its_quiet_period_and_then_tells_the_total(
    services: Services, receiver: Receiver
) -> None:
    bury(services, 2)
    now = utcnow()
    alerts.send_alerts(services, now=now)
    assert len(receiver.messages) == 1
    with services.db.transaction() as session:
        session.execute(update(Notification).values(status="processed"))
    bury(services, 3)
    alerts.send_alerts(services, now=now + timedelta(minutes=1))
    alerts.send_alerts(services, now=now + timedelta(minutes=14))
    assert len(receiver.messages) == 1
    alerts.send_alerts(services, now=now + timedelta(minutes=16))
    assert len(receiver.messages) == 2
    assert receiver.texts[1].startswith("3 notifications from cubepay went dead")


def test_a_new_anomaly_gives_one_message(services: Services, receiver: Receiver) -> None:
    for _ in range(2):  # the same fact twice: one anomaly
        with services.db.transaction() as session:
            open_anomaly(session, AnomalyKind.AMOUNT_MISMATCH, "pay_1:amount", {"detail": "x"})
    alerts.send_alerts(services)
    assert receiver.texts == [
        f"1 new anomaly (amount_mismatch) to review\n{PUBLIC_URL}/console/anomalies"
    ]


def test_a_provider_silent_with_open_payments_is_reported(
    services: Services, receiver: Receiver
) -> None:
    long_ago = utcnow() - timedelta(hours=7)
    make_payment(services.db, order_id="o-1", created_at=long_ago)
    make_payment(services.db, order_id="o-2", created_at=long_ago, provider="bitcoinpaygate")
    # BitcoinPaygate called an hour ago: not silent.
    an_hour_ago = utcnow() - timedelta(hours=1)
    store_callback(
        services.db, "bitcoinpaygate", "notification", b"{}", {}, None, received_at=an_hour_ago
    )
    alerts.send_alerts(services)
    assert receiver.texts == [
        f"cubepay: no callback for more than 6 h while 1 payment is open\n"
        f"{PUBLIC_URL}/console/notifications"
    ]


def test_a_silent_provider_without_open_payments_is_not_reported(
    services: Services, receiver: Receiver
) -> None:
    long_ago = utcnow() - timedelta(hours=7)
    make_payment(services.db, order_id="o-1", created_at=long_ago, status=PaymentStatus.PAID)
    # Open, but not for the whole window: the provider may not have had anything to say yet.
    make_payment(services.db, order_id="o-2", created_at=utcnow() - timedelta(hours=1))
    alerts.send_alerts(services)
    assert receiver.messages == []


def test_status_queries_failing_above_the_threshold_are_reported(
    services: Services, receiver: Receiver
) -> None:
    threshold = services.settings.alert_check_failures
    now = utcnow()
    for number in range(threshold):
        make_payment(
            services.db,
            order_id=f"o-{number}",
            last_checked_at=now - timedelta(minutes=5),
            last_check_error="ProviderUnavailable: 502",
        )
    alerts.send_alerts(services, now=now)
    assert receiver.messages == []  # at the threshold, not above it
    make_payment(
        services.db,
        order_id="o-last",
        last_checked_at=now - timedelta(minutes=1),
        last_check_error="ProviderUnavailable: timed out",
    )
    # An old failure does not count.
    make_payment(
        services.db,
        order_id="o-old",
        last_checked_at=now - timedelta(hours=1),
        last_check_error="ProviderUnavailable: 502",
    )
    alerts.send_alerts(services, now=now)
    assert receiver.texts == [
        f"cubepay: status queries failed for {threshold + 1} payments in the last 15 min\n"
        f"{PUBLIC_URL}/console/payments"
    ]


def test_an_unreachable_endpoint_raises_nothing_and_is_tried_again(
    settings: Settings, backend: Backend, receiver: Receiver
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
    down = services_for(backend, unreachable)
    bury(down, 4)
    report = alerts.send_alerts(down)
    assert report.unsent == ["dead:cubepay"] and report.sent == []
    with down.db.sessions() as session:
        alert = session.execute(select(Alert)).scalar_one()
        assert alert.count == 4 and alert.sent_at is None and alert.last_error
    # An endpoint that answers an error is no better.
    receiver.status = 500
    up = services_for(backend, receiver.url)
    assert alerts.send_alerts(up).unsent == ["dead:cubepay"]
    receiver.status = 200
    assert alerts.send_alerts(up).sent == ["dead:cubepay"]
    assert len(receiver.messages) == 2
    assert receiver.texts[-1].startswith("4 notifications from cubepay went dead")
    for services in (down, up):
        services.db.engine.dispose()


def test_without_a_public_url_there_is_no_link(backend: Backend, settings: Settings) -> None:
    text = alerts.text_of(backend.settings(), alerts.AlertKind.DEAD, "cubepay", 1)
    assert text.startswith("1 notification from cubepay went dead")
    assert "http" not in text


def test_the_beat_sends_alerts_every_minute(app: Flask) -> None:
    celery = app.extensions["celery"]
    entry = celery.conf.beat_schedule["send-alerts"]
    assert entry["task"] == "ipn.send_alerts"
    assert entry["schedule"] == timedelta(minutes=1)
    celery.loader.import_default_modules()  # what a worker does at start
    assert "ipn.send_alerts" in celery.tasks


def test_without_a_webhook_nothing_is_sent_or_evaluated(
    backend: Backend, settings: Settings
) -> None:
    services = Services.from_settings(backend.settings())
    make_payment(services.db, created_at=utcnow() - timedelta(days=1))
    assert str(alerts.send_alerts(services)) == "0 alerts sent, 0 could not be sent"
    with services.db.sessions() as session:
        assert session.execute(select(Alert)).first() is None
    services.db.engine.dispose()
