"""Merchant events end to end: changes made by real callbacks in a real `celery worker`, their
events carried by the real broker and POSTed over real HTTP to a shop that verifies them with the
`standardwebhooks` library; the shop failing for a while, the worker killed mid-delivery, and the
same callback twenty times at once, and every change reaches the shop as one event."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from threading import Barrier

import pytest
import requests
from flask import Flask
from sqlalchemy import func, select

from ipn import create_app
from ipn.config import Settings
from ipn.dispatch import delivery_sender
from ipn.events import delivery, endpoints
from ipn.services import Services
from ipn.transitions import Evidence, record_creation
from models import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    EventSource,
    MerchantEvent,
    Notification,
    NotificationStatus,
    Payment,
    PaymentStatus,
    utcnow,
)

from conftest import Backend, Worker, count_notifications, wait_for
from faults_support import MerchantShop, forget_queue, merchant_shop, serving, unique_queue
from helpers import cryptoprocessing_callback, cryptoprocessing_headers, events

pytestmark = pytest.mark.worker

D = DeliveryStatus
P = PaymentStatus
CP_REQUEST_ID = "019c0ebf-81e5-751d-aa57-fb9e2cba23c2"
# Attempts end after 2 s; the shop's slow answers come after 4 s. The schedule is long enough to
# outlast every failure the tests stage (about 40 s of retries), short enough to retry often.
EVENT_ENV = {
    "IPN_MERCHANT_ALLOW_PRIVATE": "1",
    "IPN_EVENT_TIMEOUT": "2",
    "IPN_EVENT_CONNECT_TIMEOUT": "1",
    "IPN_EVENT_RETRY_SCHEDULE": ",".join(["1"] * 10 + ["2"] * 20),
}
# A CryptoProcessing payment request's callbacks, in order: (status, BTC received), and the state
# each one moves the payment to (0.0094 BTC expected).
STEPS = [
    ("processing", "0", P.CONFIRMING),
    ("processing", "0.005", P.UNDERPAID),
    ("paid", "0.0094", P.PAID),
]
PAYMENTS = 5
CONCURRENT = 20


@pytest.fixture
def worker_env(backend: Backend) -> dict[str, str]:
    """What the app and its workers share beyond the backend: a queue of this test's own, and
    event delivery fast enough to watch."""
    return {"IPN_QUEUE": unique_queue(backend.env["IPN_QUEUE"]), **EVENT_ENV}


@pytest.fixture
def live_app(backend: Backend, settings: Settings, worker_env: dict[str, str]) -> Iterator[Flask]:
    """The app as deployed: its own dispatchers publishing to the backend's broker."""
    app = create_app(backend.settings(**worker_env))
    yield app
    app.extensions["ipn"].db.engine.dispose()
    forget_queue(app.extensions["ipn"].settings.redis_url, worker_env["IPN_QUEUE"])


@pytest.fixture
def shop(live_app: Flask) -> Iterator[MerchantShop]:
    """The shop, registered as the merchant's one endpoint (hearing every event type)."""
    services: Services = live_app.extensions["ipn"]
    with merchant_shop() as server:
        with services.db.transaction() as session:
            _, server.secret = endpoints.register(
                session,
                server.url,
                [],
                "the shop",
                settings=services.settings,
                now=utcnow(),
            )
        yield server


# Helpers ----------------------------------------------------------------------------------------


def create_payment(services: Services, order_id: str) -> Payment:
    """A CryptoProcessing payment recorded as the API records one: `payment.created` included."""
    now = datetime.now(UTC)
    payment = Payment(
        provider="cryptoprocessing",
        order_id=order_id,
        amount=Decimal("0.3"),
        currency="ETH",
        created_at=now,
        updated_at=now,
    )
    with services.db.transaction() as session:
        record_creation(session, payment, Evidence(EventSource.CREATE, "create"), "created", now)
    return payment


def callback(order_id: str, request_id: str, status: str, received: str) -> bytes:
    body = cryptoprocessing_callback(status, foreign_id=order_id, received=received)
    return body.replace(CP_REQUEST_ID.encode(), request_id.encode())


def post_callback(app: Flask, body: bytes) -> None:
    response = app.test_client().post(
        "/ipn/cryptoprocessing", data=body, headers=cryptoprocessing_headers(body)
    )
    assert (response.status_code, response.get_data()) == (200, b"success")


def merchant_events(services: Services) -> list[MerchantEvent]:
    with services.db.sessions() as session:
        return list(
            session.scalars(
                select(MerchantEvent).order_by(MerchantEvent.payment_id, MerchantEvent.sequence)
            )
        )


def deliveries(services: Services) -> list[Delivery]:
    with services.db.sessions() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def attempt_errors(services: Services) -> list[str]:
    with services.db.sessions() as session:
        return [
            error or ""
            for error in session.scalars(select(DeliveryAttempt.error).order_by(DeliveryAttempt.id))
        ]


def processed_count_is(services: Services, expected: int) -> Callable[[], bool]:
    return lambda: count_notifications(services.db, NotificationStatus.PROCESSED) == expected


def all_delivered(services: Services) -> bool:
    rows = merchant_events(services)
    return bool(rows) and all(row.status is D.DELIVERED for row in rows)


def changes_made(services: Services, payments: list[Payment]) -> int:
    """The committed state changes on the payments' timelines, creation included."""
    return sum(
        1
        for payment in payments
        for line in events(services.db, payment.id)
        if line.from_status != line.to_status
    )


def assert_in_sequence_order(shop: MerchantShop) -> None:
    """Per payment, every arrival (retries included) comes in sequence order, and the first
    arrivals of its events are 1, 2, 3, ... with none missing."""
    by_payment: dict[str | None, list[int]] = {}
    first: dict[str | None, list[int]] = {}
    seen: set[str] = set()
    for arrival in shop.received():
        assert arrival.sequence is not None, arrival
        by_payment.setdefault(arrival.payment_id, []).append(arrival.sequence)
        if arrival.webhook_id not in seen:
            seen.add(arrival.webhook_id)
            first.setdefault(arrival.payment_id, []).append(arrival.sequence)
    for payment_id, sequences in by_payment.items():
        assert sequences == sorted(sequences), (payment_id, sequences)
        assert first[payment_id] == list(range(1, len(first[payment_id]) + 1)), (
            payment_id,
            first[payment_id],
        )


def as_timestamp(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


# 1. A shop refusing, timing out and unreachable for a while, then back ------------------------


def test_every_change_reaches_a_shop_that_failed_for_a_while(
    live_app: Flask,
    start_worker: Callable[..., Worker],
    worker_env: dict[str, str],
    shop: MerchantShop,
) -> None:
    """Five payments, each created and moved three times by real callbacks, while the shop
    answers 500, then answers too late, then refuses connections, then is back: every change
    is one event, every event is delivered, in each payment's order, retries with their id."""
    services: Services = live_app.extensions["ipn"]
    shop.mode = "error"
    start_worker(env=worker_env, concurrency=2)
    orders = {f"order_ev_{n}": str(uuid.uuid4()) for n in range(PAYMENTS)}
    payments = [create_payment(services, order) for order in orders]

    # One round of callbacks at a time: a payment's callbacks arriving together could be
    # applied in any order, and `paid` then `processing` is one change, not two.
    for round_number, (status, received, _) in enumerate(STEPS, start=1):
        for order, request_id in orders.items():
            post_callback(live_app, callback(order, request_id, status, received))
        wait_for(
            processed_count_is(services, round_number * PAYMENTS),
            timeout=30,
            message=f"the worker to apply round {round_number} of the callbacks",
        )
    wait_for(
        lambda: len({a.payment_id for a in shop.received("error")}) == PAYMENTS,
        timeout=20,
        message="each payment's first event to be refused with a 500",
    )

    shop.mode = "slow"
    wait_for(
        lambda: sum("timed out" in e for e in attempt_errors(services)) >= 2,
        timeout=20,
        message="attempts to time out on the slow shop",
    )

    shop.stop()
    refused_before = sum("connection refused" in e for e in attempt_errors(services))
    wait_for(
        lambda: (
            sum("connection refused" in e for e in attempt_errors(services)) >= refused_before + 2
        ),
        timeout=20,
        message="attempts to find the shop's port closed",
    )

    shop.start(mode="ok")
    wait_for(lambda: all_delivered(services), timeout=60, message="every event to be delivered")

    changes = changes_made(services, payments)
    assert changes == PAYMENTS * (1 + len(STEPS))
    rows = merchant_events(services)
    assert len(rows) == changes
    for payment in payments:
        timeline = [
            e.to_status for e in events(services.db, payment.id) if e.from_status != e.to_status
        ]
        assert timeline == [P.PENDING, *(state for _, _, state in STEPS)]
        mine = [row for row in rows if row.payment_id == payment.id]
        assert [row.type.value for row in mine] == [
            "payment.created" if state is P.PENDING else f"payment.{state.value}"
            for state in timeline
        ]
        assert [row.sequence for row in mine] == list(range(1, len(timeline) + 1))
    assert all(row.status is D.DELIVERED for row in rows)
    assert all(row.status is D.DELIVERED for row in deliveries(services))
    assert len(deliveries(services)) == changes

    assert shop.rejected == []
    assert set(shop.ids) == {row.id for row in rows}
    # What the shop read from each verified body is the event as stored.
    stored = {row.id: (row.type.value, row.payment_id, row.sequence) for row in rows}
    for arrival in shop.received():
        assert (arrival.type, arrival.payment_id, arrival.sequence) == stored[arrival.webhook_id]
    assert_in_sequence_order(shop)
    # Each kind of failure was met, and the events it hit went again with their own ids.
    errors = attempt_errors(services)
    assert any(e == "answered 500" for e in errors), errors
    assert any("timed out" in e for e in errors), errors
    assert any("connection refused" in e for e in errors), errors
    retried = [webhook_id for webhook_id, n in Counter(shop.ids).items() if n > 1]
    assert len(retried) >= PAYMENTS, Counter(shop.ids)
    with services.db.sessions() as session:
        most = session.scalar(select(func.max(Delivery.attempts)))
        delivered_once = session.scalar(
            select(func.count())
            .select_from(DeliveryAttempt)
            .where(DeliveryAttempt.status_code == 200)
        )
    assert most is not None and most > 2
    # One successful attempt per event: none was delivered twice.
    assert delivered_once == changes


# 2. A worker killed with SIGKILL mid-delivery -------------------------------------------------


def test_a_delivery_cut_by_a_killed_worker_goes_again_with_its_id(
    live_app: Flask,
    start_worker: Callable[..., Worker],
    worker_env: dict[str, str],
    shop: MerchantShop,
) -> None:
    """The shop holds the first request; the worker and its pool are SIGKILLed inside it. The
    delivery keeps the lease the dead attempt took until it ends, then goes again, from a fresh
    worker, with the same `webhook-id`: delivered, once on record, one event row."""
    services: Services = live_app.extensions["ipn"]
    send = delivery_sender(live_app.extensions["celery"])
    # Made before the shop holds, and delivered: the payment's next event is then first in line.
    payment = create_payment(services, "order_kill")
    worker = start_worker(env=worker_env, concurrency=1)
    wait_for(lambda: all_delivered(services), timeout=30, message="payment.created to be delivered")
    shop.mode = "hold"

    post_callback(live_app, callback("order_kill", str(uuid.uuid4()), "paid", "0.0094"))
    wait_for(lambda: shop.received("hold"), timeout=30, message="the shop to hold the delivery")
    worker.kill()

    [_, paid] = merchant_events(services)
    assert (paid.type.value, paid.sequence, paid.status) == ("payment.paid", 2, D.PENDING)
    [held] = [d for d in deliveries(services) if d.event_id == paid.id]
    assert (held.status, held.attempts) == (D.PENDING, 0)
    assert held.leased_until is not None  # the dead attempt's lease
    with services.db.sessions() as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(DeliveryAttempt)
                .where(DeliveryAttempt.event_id == paid.id)
            )
            == 0
        )

    shop.mode = "ok"
    shop.release()
    start_worker(env=worker_env, concurrency=1)
    # No beat runs here: the test finds due deliveries as the beat's `ipn.deliver_due` does
    # (every 10 s there, every second here), and enqueues them to the real broker.
    last_beat = 0.0

    def delivered_after_beats() -> bool:
        nonlocal last_beat
        if time.monotonic() - last_beat >= 1:
            last_beat = time.monotonic()
            delivery.deliver_due(services, send)
        return all_delivered(services)

    wait_for(delivered_after_beats, timeout=45, message="the cut delivery to go again")

    assert shop.rejected == []
    cut, again = [a for a in shop.received() if a.webhook_id == paid.id]
    assert (cut.mode, again.mode) == ("hold", "ok")
    assert (again.type, again.payment_id, again.sequence) == ("payment.paid", payment.id, 2)
    # Not before the dead attempt's lease ended: no two attempts at once.
    assert again.at >= as_timestamp(held.leased_until)
    assert len(shop.ids) == 3  # payment.created once, payment.paid cut and sent again
    [row] = [d for d in deliveries(services) if d.event_id == paid.id]
    assert (row.status, row.attempts, row.lease_token) == (D.DELIVERED, 1, None)
    with services.db.sessions() as session:
        codes = list(
            session.scalars(
                select(DeliveryAttempt.status_code).where(DeliveryAttempt.event_id == paid.id)
            )
        )
    assert codes == [200]
    assert [row.type.value for row in merchant_events(services)] == [
        "payment.created",
        "payment.paid",
    ]
    assert all_delivered(services)


# 3. Twenty concurrent copies of one callback --------------------------------------------------


def test_concurrent_copies_of_a_callback_make_one_event(
    live_app: Flask,
    start_worker: Callable[..., Worker],
    worker_env: dict[str, str],
    shop: MerchantShop,
) -> None:
    """The same `paid` callback twenty times at once over real HTTP, two pool processes racing:
    one change, so one `payment.paid` event (after the creation's), delivered under one id."""
    services: Services = live_app.extensions["ipn"]
    payment = create_payment(services, "order_dup")
    start_worker(env=worker_env, concurrency=2)
    body = callback("order_dup", str(uuid.uuid4()), "paid", "0.0094")
    headers = cryptoprocessing_headers(body)
    start = Barrier(CONCURRENT)

    with serving(live_app) as url:

        def post(_: int) -> tuple[int, bytes]:
            start.wait(timeout=30)
            response = requests.post(
                f"{url}/ipn/cryptoprocessing", data=body, headers=headers, timeout=60
            )
            return response.status_code, response.content

        with ThreadPoolExecutor(CONCURRENT) as pool:
            answers = list(pool.map(post, range(CONCURRENT)))

    assert answers == [(200, b"success")] * CONCURRENT
    wait_for(
        lambda: count_notifications(services.db, NotificationStatus.PROCESSED) == CONCURRENT,
        timeout=60,
        message=f"all {CONCURRENT} copies to be processed",
    )
    wait_for(lambda: all_delivered(services), timeout=30, message="the events to be delivered")

    with services.db.sessions() as session:
        outcomes = list(session.scalars(select(Notification.outcome)))
    assert outcomes.count("pending -> paid") == 1, outcomes
    assert changes_made(services, [payment]) == 2
    created, paid = merchant_events(services)
    assert [(e.type.value, e.sequence) for e in (created, paid)] == [
        ("payment.created", 1),
        ("payment.paid", 2),
    ]
    assert len(deliveries(services)) == 2
    assert shop.rejected == []
    # However often the shop heard it, it heard each change under one id and no other.
    assert set(shop.ids) == {created.id, paid.id}
    assert next(a.type for a in shop.received() if a.webhook_id == paid.id) == "payment.paid"
    assert shop.ids.index(created.id) < shop.ids.index(paid.id)
    assert_in_sequence_order(shop)
