"""The queue end to end: callbacks posted to the app with its real dispatcher, carried by the real
broker (Redis, or kombu's SQLAlchemy transport in the embedded mode) to a real `celery worker`
process, and applied exactly once however often they arrive."""

from __future__ import annotations

import ast
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
import requests
from flask import Flask
from sqlalchemy import select

from ipn import create_app
from ipn.config import Settings
from ipn.db import Database
from ipn.dispatch import in_messages
from ipn.inbox import store_callback
from ipn.replay import replay
from models import (
    EventSource,
    Notification,
    NotificationReplay,
    NotificationStatus,
    Payment,
    PaymentStatus,
    ReplayMode,
)

from conftest import ROOT, Backend, Worker, count_notifications, wait_for
from faults_support import (
    celery_send,
    cp_headers,
    cp_paid_callback,
    forget_queue,
    serving,
    state_changes,
    unique_queue,
)
from helpers import anomalies, events, load_payment, make_payment, notification

pytestmark = pytest.mark.worker

N = NotificationStatus
CONCURRENT = 20


@pytest.fixture
def worker_env(backend: Backend) -> dict[str, str]:
    """What the app and its workers share beyond the backend: a queue of this test's own."""
    return {"IPN_QUEUE": unique_queue(backend.env["IPN_QUEUE"])}


@pytest.fixture
def live_app(backend: Backend, settings: Settings, worker_env: dict[str, str]) -> Iterator[Flask]:
    """The app as deployed: its own dispatcher publishing to the backend's broker."""
    app = create_app(backend.settings(**worker_env))
    yield app
    app.extensions["ipn"].db.engine.dispose()
    forget_queue(app.extensions["ipn"].settings.redis_url, worker_env["IPN_QUEUE"])


def cp_payment(db: Database) -> Payment:
    return make_payment(
        db,
        provider="cryptoprocessing",
        order_id="order_12345",
        amount=Decimal("0.3"),
        currency="ETH",
    )


def notification_ids(db: Database) -> list[int]:
    with db.sessions() as session:
        return list(session.scalars(select(Notification.id).order_by(Notification.id)))


def post_callback(app: Flask, body: bytes, headers: dict[str, str]) -> int:
    """Post through the app (real dispatcher) and return the stored row's id."""
    db = app.extensions["ipn"].db
    before = set(notification_ids(db))
    response = app.test_client().post("/ipn/cryptoprocessing", data=body, headers=headers)
    assert (response.status_code, response.get_data()) == (200, b"success")
    [notification_id] = set(notification_ids(db)) - before
    return notification_id


def settled(db: Database, notification_id: int) -> Notification | None:
    row = notification(db, notification_id)
    return row if row.status is not N.RECEIVED else None


def test_paid_callback_is_applied_by_the_worker(
    live_app: Flask, start_worker: Callable[..., Worker], worker_env: dict[str, str]
) -> None:
    db = live_app.extensions["ipn"].db
    payment = cp_payment(db)
    start_worker(env=worker_env)
    body = cp_paid_callback()

    notification_id = post_callback(live_app, body, cp_headers(body))

    row = wait_for(
        lambda: settled(db, notification_id), timeout=60, message="the worker to settle the row"
    )
    assert row.status is N.PROCESSED, (row.outcome, row.last_error)
    assert row.attempts == 1
    assert row.payment_id == payment.id
    assert load_payment(db, payment.id).status is PaymentStatus.PAID
    [event] = events(db, payment.id)
    assert event.notification_id == notification_id
    assert event.source is EventSource.CALLBACK
    assert (event.from_status, event.to_status) == (PaymentStatus.PENDING, PaymentStatus.PAID)
    assert f"#{notification_id}" in event.detail


def test_concurrent_duplicates_have_exactly_one_effect(
    live_app: Flask, start_worker: Callable[..., Worker], worker_env: dict[str, str]
) -> None:
    """The same callback 20 times at once over real HTTP, two pool processes racing: every copy
    is stored and processed, the payment moves once, its timeline has one line."""
    db = live_app.extensions["ipn"].db
    payment = cp_payment(db)
    start_worker(env=worker_env, concurrency=2)
    body = cp_paid_callback()
    headers = cp_headers(body)
    start = threading.Barrier(CONCURRENT)

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
    assert count_notifications(db) == CONCURRENT
    wait_for(
        lambda: count_notifications(db, N.PROCESSED) == CONCURRENT,
        timeout=120,
        message=f"all {CONCURRENT} rows to be processed",
    )
    assert load_payment(db, payment.id).status is PaymentStatus.PAID
    timeline = events(db, payment.id)
    assert len(timeline) == 1
    assert len(state_changes(timeline)) == 1
    with db.sessions() as session:
        outcomes = list(session.scalars(select(Notification.outcome)))
    assert outcomes.count("pending -> paid") == 1, outcomes
    assert timeline[0].notification_id in notification_ids(db)


def test_forged_callback_is_rejected_by_the_worker(
    live_app: Flask, start_worker: Callable[..., Worker], worker_env: dict[str, str]
) -> None:
    db = live_app.extensions["ipn"].db
    payment = cp_payment(db)
    start_worker(env=worker_env)
    body = cp_paid_callback()
    headers = cp_headers(body)
    forged = body.replace(b'"amount":"0.3"', b'"amount":"0.4"')
    assert len(forged) == len(body) and sum(a != b for a, b in zip(forged, body, strict=True)) == 1

    notification_id = post_callback(live_app, forged, headers)

    row = wait_for(
        lambda: settled(db, notification_id), timeout=60, message="the worker to settle the row"
    )
    assert row.status is N.REJECTED
    assert row.last_error is not None and row.last_error.startswith("forged")
    after = load_payment(db, payment.id)
    assert (after.status, after.provider_status, after.paid_amount) == (
        PaymentStatus.PENDING,
        None,
        None,
    )
    assert events(db, payment.id) == []
    assert anomalies(db) == []


def test_replay_of_a_processed_notification_through_the_worker(
    live_app: Flask, start_worker: Callable[..., Worker], worker_env: dict[str, str]
) -> None:
    """`ipn replay`: the row runs again, the payment stays where it is, the timeline says so."""
    services = live_app.extensions["ipn"]
    db = services.db
    payment = cp_payment(db)
    start_worker(env=worker_env)
    body = cp_paid_callback()
    notification_id = post_callback(live_app, body, cp_headers(body))
    wait_for(
        lambda: settled(db, notification_id), timeout=60, message="the worker to settle the row"
    )
    assert load_payment(db, payment.id).status is PaymentStatus.PAID

    assert replay(services, [notification_id], ReplayMode.STORED, celery_send(live_app)) == [
        notification_id
    ]

    # replay() returned with the row `received` again: `processed` now is the replay's doing.
    row = wait_for(
        lambda: (r := notification(db, notification_id)).status is N.PROCESSED and r,
        timeout=60,
        message="the replay to be processed",
    )
    # A replay starts its own count of attempts; the first run's is on the replay's record.
    assert row.attempts == 1
    assert row.replay_mode is None
    assert load_payment(db, payment.id).status is PaymentStatus.PAID
    first, again = events(db, payment.id)
    assert (first.source, first.from_status, first.to_status) == (
        EventSource.CALLBACK,
        PaymentStatus.PENDING,
        PaymentStatus.PAID,
    )
    assert again.source is EventSource.REPLAY
    assert again.from_status == again.to_status == PaymentStatus.PAID
    assert again.notification_id == notification_id
    with db.sessions() as session:
        [record] = session.scalars(select(NotificationReplay))
    assert (record.notification_id, record.mode, record.previous_status) == (
        notification_id,
        ReplayMode.STORED,
        N.PROCESSED,
    )
    assert record.data is not None and record.data["attempts"] == 1


def test_poison_rows_settle_in_the_worker_and_the_queue_goes_on(
    live_app: Flask, start_worker: Callable[..., Worker], worker_env: dict[str, str]
) -> None:
    """A signed callback whose amount no column keeps, then a genuine one: the first is
    rejected with its reason by the worker, not retried, and the second is applied."""
    db = live_app.extensions["ipn"].db
    payment = cp_payment(db)
    start_worker(env=worker_env)
    poison = cp_paid_callback().replace(b'"received_amount":"0"', b'"received_amount":1e999')
    assert poison != cp_paid_callback()
    poisoned = post_callback(live_app, poison, cp_headers(poison))
    row = wait_for(lambda: settled(db, poisoned), message="the poison row to be settled")
    assert row.status is N.REJECTED, (row.status, row.last_error)
    assert row.attempts == 1
    assert "currency_sent.received_amount" in (row.last_error or "")
    genuine = post_callback(live_app, cp_paid_callback(), cp_headers(cp_paid_callback()))
    row = wait_for(lambda: settled(db, genuine), message="the genuine callback to be applied")
    assert row.status is N.PROCESSED, (row.outcome, row.last_error)
    assert load_payment(db, payment.id).status is PaymentStatus.PAID


def test_ids_published_in_one_message_are_each_settled_by_the_worker(
    live_app: Flask, start_worker: Callable[..., Worker], worker_env: dict[str, str]
) -> None:
    """The callback view's publisher puts ids stored together in one message: a forged copy, a
    poison row and a genuine callback in one are each settled on their own, in order."""
    db = live_app.extensions["ipn"].db
    payment = cp_payment(db)
    genuine = cp_paid_callback()
    forged = genuine.replace(b'"amount":"0.3"', b'"amount":"0.4"')
    poison = genuine.replace(b'"received_amount":"0"', b'"received_amount":1e999')
    ids = [
        store_callback(db, "cryptoprocessing", "callback", forged, cp_headers(genuine), None),
        store_callback(db, "cryptoprocessing", "callback", poison, cp_headers(poison), None),
        store_callback(db, "cryptoprocessing", "callback", genuine, cp_headers(genuine), None),
    ]
    assert len(in_messages(ids)) == 1
    live_app.extensions["ipn.dispatcher"].send_batch(ids)
    start_worker(env=worker_env)

    rows = wait_for(
        lambda: (rows := [settled(db, i) for i in ids]) and all(rows) and rows,
        timeout=60,
        message="the worker to settle all three",
    )
    assert [(row.status, row.attempts) for row in rows] == [
        (N.REJECTED, 1),
        (N.REJECTED, 1),
        (N.PROCESSED, 1),
    ], [(row.status, row.last_error) for row in rows]
    assert (rows[0].last_error or "").startswith("forged")
    assert "currency_sent.received_amount" in (rows[1].last_error or "")
    assert load_payment(db, payment.id).status is PaymentStatus.PAID
    [event] = events(db, payment.id)
    assert event.notification_id == ids[2]


def _imports(path: Path) -> set[str]:
    """Every module a source file imports, at its top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _sources() -> list[Path]:
    return sorted([*(ROOT / "ipn").rglob("*.py"), *(ROOT / "workers").glob("*.py")])


def test_nothing_imports_the_worker_entry_module() -> None:
    """`workers.main` builds the app when imported; importing it from the code the app is
    built of closes the circle ipn → ipn.app → workers.app → workers.main → ipn."""
    importers = [p.relative_to(ROOT) for p in _sources() if "workers.main" in _imports(p)]
    assert importers == []


def test_one_function_enqueues_a_notification() -> None:
    callers = [p.relative_to(ROOT) for p in _sources() if "send_task(" in p.read_text()]
    assert callers == [Path("ipn/dispatch.py")]
