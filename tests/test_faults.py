"""Faults: a worker killed mid-task, Redis down, PostgreSQL restarting, a provider that hangs or
answers garbage. Each breaks only servers of its own (a throwaway Redis or PostgreSQL cluster, a
fake provider), never the shared ones, and every callback still ends with exactly one effect."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from decimal import Decimal
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import func, select

from ipn import create_app, migrate
from ipn.config import Settings
from ipn.db import Database
from ipn.sweeper import sweep_inbox
from models import EventSource, Notification, NotificationStatus, Payment, PaymentStatus

from conftest import Backend, Worker, count_notifications, wait_for
from faults_support import (
    BPG_ORDER_ID,
    BPG_PAYMENT_ID,
    PG_BIN,
    FakeBitcoinPaygate,
    bpg_notification,
    celery_send,
    cp_headers,
    cp_paid_callback,
    fake_bitcoinpaygate,
    forget_queue,
    state_changes,
    throwaway_postgres,
    throwaway_redis,
    unique_queue,
)
from helpers import events, later, load_payment, make_payment, notification

pytestmark = pytest.mark.fault

N = NotificationStatus
P = PaymentStatus
PROCESSING_TIMEOUT = 90.0


# Fixtures and small helpers ---------------------------------------------------------------------


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Teardown in reverse order of start: workers stop before the servers they talk to."""
    with ExitStack() as resources:
        yield resources


@pytest.fixture
def bpg() -> Iterator[FakeBitcoinPaygate]:
    with fake_bitcoinpaygate() as fake:
        yield fake


def build_app(backend: Backend, stack: ExitStack, **env: str) -> Flask:
    """The app as deployed (its own dispatcher), on the backend plus `env`; disposed at the end."""
    app = create_app(backend.settings(**env))
    settings = app.extensions["ipn"].settings
    stack.callback(forget_queue, settings.redis_url, settings.queue)
    stack.callback(app.extensions["ipn"].db.engine.dispose)
    return app


def start(
    start_worker: Callable[..., Worker], stack: ExitStack, env: dict[str, str], **kwargs: object
) -> Worker:
    worker = start_worker(env=env, **kwargs)
    stack.callback(worker.stop)
    return worker


def post(app: Flask, path: str, body: bytes, headers: dict[str, str]) -> int:
    """Post a callback that must be answered `success`; the id of the row it stored."""
    db = app.extensions["ipn"].db
    before = count_notifications(db)
    response = app.test_client().post(path, data=body, headers=headers)
    assert (response.status_code, response.get_data()) == (200, b"success")
    with db.sessions() as session:
        newest = session.scalar(select(func.max(Notification.id)))
    assert count_notifications(db) == before + 1 and newest is not None
    return int(newest)


def bpg_payment(db: Database) -> Payment:
    return make_payment(
        db,
        provider="bitcoinpaygate",
        order_id=BPG_ORDER_ID,
        provider_payment_id=BPG_PAYMENT_ID,
        amount=Decimal("10.00"),
        currency="USD",
    )


def cp_payment(db: Database, order_id: str) -> Payment:
    return make_payment(
        db, provider="cryptoprocessing", order_id=order_id, amount=Decimal("0.3"), currency="ETH"
    )


def processed(db: Database, notification_id: int) -> Notification | None:
    row = notification(db, notification_id)
    return row if row.status is N.PROCESSED else None


def assert_untouched(db: Database, payment_id: str) -> None:
    payment = load_payment(db, payment_id)
    assert (payment.status, payment.provider_status, payment.paid_amount) == (P.PENDING, None, None)
    assert events(db, payment_id) == []


def assert_paid_once(db: Database, payment_id: str, notification_id: int | None = None) -> None:
    assert load_payment(db, payment_id).status is P.PAID
    timeline = events(db, payment_id)
    assert len(timeline) == 1, [(e.source, e.from_status, e.to_status) for e in timeline]
    [change] = state_changes(timeline)
    assert (change.source, change.from_status, change.to_status) == (
        EventSource.CALLBACK,
        P.PENDING,
        P.PAID,
    )
    if notification_id is not None:
        assert change.notification_id == notification_id


# a. A worker killed mid-task ---------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["whole worker", "pool process"])
def test_worker_killed_mid_task_loses_nothing(
    backend: Backend,
    settings: Settings,
    start_worker: Callable[..., Worker],
    bpg: FakeBitcoinPaygate,
    stack: ExitStack,
    tmp_path: Path,
    victim: str,
) -> None:
    """SIGKILL while the task waits for the provider's status answer. The row stays `received`
    and the payment untouched; then the message comes back (killed pool process: Celery's
    task_reject_on_worker_lost; killed worker: the inbox sweeper on the embedded broker, Redis's
    visibility timeout in production) and the payment moves exactly once."""
    env = {"IPN_QUEUE": unique_queue(backend.env["IPN_QUEUE"]), "BITCOINPAYGATE_API_URL": bpg.url}
    redis_server = None
    if backend.name == "postgresql":
        # Its own Redis: a short visibility timeout below restores every unacknowledged message
        # in the server, which must not reach other sessions' messages on the shared one.
        redis_server = stack.enter_context(throwaway_redis(tmp_path))
        env["REDIS_URL"] = redis_server.url
    app = build_app(backend, stack, **env)
    services = app.extensions["ipn"]
    db = services.db
    payment = bpg_payment(db)
    bpg.hold()
    worker = start(start_worker, stack, env, concurrency=1)
    body, headers = bpg_notification("CONFIRMED")

    notification_id = post(app, "/ipn/bitcoinpaygate/notification", body, headers)
    wait_for(lambda: bpg.queries >= 1, timeout=60, message="the task to ask the provider")

    if victim == "whole worker":
        worker.kill()
    else:
        [child] = worker.children()
        os.kill(child, signal.SIGKILL)
    row = notification(db, notification_id)
    assert (row.status, row.attempts) == (N.RECEIVED, 1)
    assert_untouched(db, payment.id)

    if victim == "pool process":
        # Celery alone sends the task again, to a fresh pool process (the provider still holds
        # every answer, so nothing can have been applied yet).
        wait_for(
            lambda: bpg.queries >= 2,
            timeout=60,
            message="Celery to redeliver the task of the killed pool process",
        )
        assert notification(db, notification_id).status is N.RECEIVED
        assert_untouched(db, payment.id)
        bpg.release()
    elif redis_server is None:
        bpg.release()
        start(start_worker, stack, env, concurrency=1)
        report = sweep_inbox(
            services,
            celery_send(app),
            now=later(seconds=services.settings.sweep_after.total_seconds() + 60),
        )
        assert report.requeued == [notification_id], str(report)
    else:
        bpg.release()
        visibility = 5
        # The message is still unacknowledged in Redis; once older than the visibility timeout,
        # a starting worker puts it back on the queue.
        wait_for(
            lambda: (ages := redis_server.unacked_ages()) and min(ages) > visibility + 0.5,
            timeout=30,
            message="the unacknowledged message to outlive the visibility timeout",
        )
        start(
            start_worker, stack, {**env, "IPN_VISIBILITY_TIMEOUT": str(visibility)}, concurrency=1
        )

    row = wait_for(
        lambda: processed(db, notification_id),
        timeout=PROCESSING_TIMEOUT,
        message="the notification to be processed after the kill",
    )
    assert row.attempts >= 2
    assert_paid_once(db, payment.id, notification_id)


# b. Redis down ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_callbacks_while_redis_is_down_are_answered_and_swept(
    backend: Backend,
    settings: Settings,
    start_worker: Callable[..., Worker],
    stack: ExitStack,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    callbacks = 30
    redis_server = stack.enter_context(throwaway_redis(tmp_path))
    env = {"IPN_QUEUE": unique_queue(backend.env["IPN_QUEUE"]), "REDIS_URL": redis_server.url}
    app = build_app(backend, stack, **env)
    services = app.extensions["ipn"]
    db = services.db
    orders = [f"order_{n:02d}" for n in range(callbacks + 1)]
    payments = [cp_payment(db, order) for order in orders]
    late_order = orders.pop()
    client = app.test_client()
    # Running through the outage: it must find its broker again by itself.
    start(start_worker, stack, env)

    redis_server.kill()
    seconds = []
    for order in orders:
        body = cp_paid_callback(order, request_id=str(uuid.uuid4()))
        began = time.perf_counter()
        response = client.post("/ipn/cryptoprocessing", data=body, headers=cp_headers(body))
        seconds.append(time.perf_counter() - began)
        assert (response.status_code, response.get_data()) == (200, b"success")
    slowest, mean = max(seconds), sum(seconds) / len(seconds)
    print(f"\nanswers with Redis down: slowest {slowest * 1000:.1f} ms, mean {mean * 1000:.1f} ms")
    record_property("answer_ms_slowest_redis_down", round(slowest * 1000, 1))
    record_property("answer_ms_mean_redis_down", round(mean * 1000, 1))

    dispatcher = app.extensions["ipn.dispatcher"]
    assert dispatcher.drain(timeout=120)
    assert (dispatcher.sent, dispatcher.failed) == (0, callbacks)
    assert count_notifications(db) == count_notifications(db, N.RECEIVED) == callbacks

    redis_server.start()
    report = sweep_inbox(
        services,
        celery_send(app),
        now=later(seconds=services.settings.sweep_after.total_seconds() + 60),
    )
    assert (len(report.requeued), report.dead, report.unsent) == (callbacks, [], []), str(report)
    wait_for(
        lambda: count_notifications(db, N.PROCESSED) == callbacks,
        timeout=PROCESSING_TIMEOUT,
        message=f"all {callbacks} swept notifications to be processed",
    )
    for payment in payments[:callbacks]:
        assert_paid_once(db, payment.id)

    # And the live path is back: a new callback goes out through the dispatcher, unswept.
    body = cp_paid_callback(late_order, request_id=str(uuid.uuid4()))
    late = post(app, "/ipn/cryptoprocessing", body, cp_headers(body))
    wait_for(lambda: processed(db, late), timeout=PROCESSING_TIMEOUT, message="a new callback")
    assert dispatcher.sent == 1
    assert_paid_once(db, payments[-1].id, late)


# c. PostgreSQL restarting ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.skipif(not (PG_BIN / "initdb").exists(), reason=f"no initdb in {PG_BIN}")
def test_callbacks_while_the_database_restarts(
    backend: Backend,
    start_worker: Callable[..., Worker],
    stack: ExitStack,
) -> None:
    """No `success` without a commit: while the database is down every callback gets 503, so
    the provider sends it again; once it is back, the same callbacks are stored and applied."""
    cluster = stack.enter_context(throwaway_postgres())
    schema = Database(cluster.url)
    migrate.upgrade(schema)
    schema.engine.dispose()
    env = {"IPN_QUEUE": unique_queue(backend.env["IPN_QUEUE"]), "DATABASE_URL": cluster.url}
    app = build_app(backend, stack, **env)
    db = app.extensions["ipn"].db
    orders = [f"order_pg_{n}" for n in range(6)]
    payments = {order: cp_payment(db, order) for order in orders}
    bodies = {order: cp_paid_callback(order, request_id=str(uuid.uuid4())) for order in orders}
    client = app.test_client()
    start(start_worker, stack, env)

    first = post(app, "/ipn/cryptoprocessing", bodies[orders[0]], cp_headers(bodies[orders[0]]))
    wait_for(lambda: processed(db, first), timeout=PROCESSING_TIMEOUT, message="a first callback")

    cluster.stop("immediate")
    for order in orders[1:]:
        body = bodies[order]
        response = client.post("/ipn/cryptoprocessing", data=body, headers=cp_headers(body))
        assert response.status_code == 503, response.get_data()
        assert response.get_data() != b"success"
    cluster.start()

    for order in orders[1:]:
        body = bodies[order]
        response = client.post("/ipn/cryptoprocessing", data=body, headers=cp_headers(body))
        assert (response.status_code, response.get_data()) == (200, b"success")
    wait_for(
        lambda: count_notifications(db, N.PROCESSED) == len(orders),
        timeout=PROCESSING_TIMEOUT,
        message="the callbacks sent again after the restart to be processed",
    )
    assert count_notifications(db) == len(orders)  # the refused ones were never stored
    for payment in payments.values():
        assert_paid_once(db, payment.id)


# d. A provider that hangs or answers garbage ----------------------------------------------------


@pytest.mark.parametrize("fault", ["timeout", "garbage"])
def test_provider_failure_is_retried_until_the_provider_answers(
    backend: Backend,
    settings: Settings,
    start_worker: Callable[..., Worker],
    bpg: FakeBitcoinPaygate,
    stack: ExitStack,
    fault: str,
) -> None:
    bpg.mode = "slow" if fault == "timeout" else "garbage"
    env = {
        "IPN_QUEUE": unique_queue(backend.env["IPN_QUEUE"]),
        "BITCOINPAYGATE_API_URL": bpg.url,
        # The fake answers after 3 s when slow.
        "IPN_HTTP_READ_TIMEOUT": "1",
        # Plenty: the test repairs the provider after the second attempt.
        "IPN_TASK_MAX_RETRIES": "20",
    }
    app = build_app(backend, stack, **env)
    db = app.extensions["ipn"].db
    payment = bpg_payment(db)
    start(start_worker, stack, env, concurrency=1)
    body, headers = bpg_notification("CONFIRMED")

    notification_id = post(app, "/ipn/bitcoinpaygate/notification", body, headers)
    row = wait_for(
        lambda: (r := notification(db, notification_id)).attempts >= 2 and r.last_error and r,
        timeout=PROCESSING_TIMEOUT,
        message="a second attempt with the first one's error on the row",
    )
    assert row.status is N.RECEIVED
    expected = "timed out" if fault == "timeout" else "not JSON"
    assert expected in (row.last_error or ""), row.last_error
    assert_untouched(db, payment.id)

    bpg.mode = "ok"
    row = wait_for(
        lambda: processed(db, notification_id),
        timeout=PROCESSING_TIMEOUT,
        message="the notification to be processed once the provider answers",
    )
    assert row.attempts >= 2
    assert_paid_once(db, payment.id, notification_id)


def test_provider_broken_for_good_ends_failed(
    backend: Backend,
    settings: Settings,
    start_worker: Callable[..., Worker],
    bpg: FakeBitcoinPaygate,
    stack: ExitStack,
) -> None:
    bpg.mode = "garbage"
    env = {
        "IPN_QUEUE": unique_queue(backend.env["IPN_QUEUE"]),
        "BITCOINPAYGATE_API_URL": bpg.url,
        "IPN_TASK_MAX_RETRIES": "1",
    }
    app = build_app(backend, stack, **env)
    services = app.extensions["ipn"]
    db = services.db
    payment = bpg_payment(db)
    start(start_worker, stack, env, concurrency=1)
    body, headers = bpg_notification("CONFIRMED")

    notification_id = post(app, "/ipn/bitcoinpaygate/notification", body, headers)
    row = wait_for(
        lambda: (r := notification(db, notification_id)).status is not N.RECEIVED and r,
        timeout=PROCESSING_TIMEOUT,
        message="the retries to run out",
    )
    assert row.status is N.FAILED
    assert row.last_error is not None and "not JSON" in row.last_error
    # One try and one retry, each with IPN_HTTP_ATTEMPTS requests: finite, as configured.
    assert row.attempts == 2
    assert bpg.queries == 2 * int(backend.env["IPN_HTTP_ATTEMPTS"])
    assert_untouched(db, payment.id)
    # A failed row is an operator's to replay: the sweeper leaves it alone.
    report = sweep_inbox(services, celery_send(app), now=later(hours=2))
    assert (report.requeued, report.dead, report.unsent) == ([], [], [])
    assert notification(db, notification_id).status is N.FAILED
