"""The callback view's publisher: ids go to the broker in batches, a broker failure pauses
publishing instead of costing a connection attempt per id, and whatever was not published
stays `received` for the inbox sweeper."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import event

from ipn import create_app
from ipn.config import Settings
from ipn.db import Database
from ipn.dispatch import Dispatcher
from ipn.inbox import store_callback
from ipn.services import Services
from ipn.sweeper import sweep_inbox
from models import NotificationStatus, utcnow

from conftest import count_notifications
from helpers import CUBEPAY_IPN, FORM


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ids_that_queue_up_behind_a_publish_go_out_in_one_batch() -> None:
    released = threading.Event()
    batches: list[list[int]] = []

    def publish(ids: list[int]) -> None:
        if not batches:
            batches.append(ids)
            released.wait(timeout=30)
            return
        batches.append(ids)

    dispatcher = Dispatcher(send_batch=publish)
    dispatcher.submit(0)
    for _ in range(500):
        if batches:
            break
        threading.Event().wait(0.01)
    for notification_id in range(1, 101):
        dispatcher.submit(notification_id)
    released.set()
    assert dispatcher.drain(timeout=30)
    assert batches == [[0], list(range(1, 101))]
    assert (dispatcher.sent, dispatcher.failed, dispatcher.batches) == (101, 0, 2)


def test_a_broker_failure_pauses_publishing_and_nothing_is_tried_per_id() -> None:
    clock = Clock()
    attempts: list[list[int]] = []
    broker_up = False

    def publish(ids: list[int]) -> None:
        attempts.append(ids)
        if not broker_up:
            raise ConnectionError("broker down")

    dispatcher = Dispatcher(send_batch=publish, pause=1.0, clock=clock)
    dispatcher.submit(1)
    assert dispatcher.drain(timeout=10)
    assert attempts == [[1]] and dispatcher.paused
    for notification_id in range(2, 200):
        dispatcher.submit(notification_id)
    assert dispatcher.drain(timeout=10)
    # Given up at once while paused: no attempt, and counted for the sweeper.
    assert attempts == [[1]]
    assert (dispatcher.sent, dispatcher.failed) == (0, 199)

    broker_up = True
    clock.now += 1.5
    assert not dispatcher.paused
    dispatcher.submit(200)
    assert dispatcher.drain(timeout=10)
    assert attempts == [[1], [200]]
    assert (dispatcher.sent, dispatcher.failed) == (1, 199)


def test_a_per_id_sender_is_paused_after_its_first_failure() -> None:
    clock = Clock()
    tried: list[int] = []

    def refuse(notification_id: int) -> None:
        tried.append(notification_id)
        raise ConnectionError("broker down")

    dispatcher = Dispatcher(refuse, pause=1.0, clock=clock)
    for notification_id in range(50):
        dispatcher.submit(notification_id)
    assert dispatcher.drain(timeout=10)
    assert tried == [0]
    assert dispatcher.failed == 50


def test_rows_never_published_are_swept(settings: Settings) -> None:
    """The broker refuses every batch: the callbacks are answered, the rows stay `received`,
    and the sweeper hands each of them to the queue once they are due."""
    app = create_app(settings)

    def refuse(ids: list[int]) -> None:
        raise ConnectionError("broker down")

    dispatcher = Dispatcher(send_batch=refuse)
    app.extensions["ipn.dispatcher"] = dispatcher
    services: Services = app.extensions["ipn"]
    client: FlaskClient = app.test_client()
    try:
        for _ in range(4):
            response = client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM)
            assert response.get_data() == b"success"
        assert dispatcher.drain(timeout=10)
        assert (dispatcher.sent, dispatcher.failed) == (0, 4)
        assert count_notifications(services.db, NotificationStatus.RECEIVED) == 4
        swept: list[int] = []
        report = sweep_inbox(
            services,
            swept.append,
            now=utcnow() + services.settings.sweep_after + timedelta(seconds=1),
        )
        assert len(report.requeued) == len(swept) == 4
    finally:
        services.db.engine.dispose()


def test_storing_a_callback_is_one_statement(settings: Settings) -> None:
    """One statement; on PostgreSQL in autocommit, so no BEGIN or COMMIT goes with it, and no
    ping before it."""
    db = Database(settings.database_url)
    statements: list[str] = []

    @event.listens_for(db.engine, "before_cursor_execute")
    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    try:
        store_callback(db, "cubepay", "ipn", b"a=1", {}, None)  # connects, reads the dialect
        statements.clear()
        notification_id = store_callback(db, "cubepay", "ipn", b"a=1", {}, "127.0.0.1")
        # SQLite takes its write lock with a BEGIN IMMEDIATE of its own (ipn.db).
        inserts = [s for s in statements if not s.startswith("BEGIN")]
        assert len(inserts) == 1 and inserts[0].startswith("INSERT INTO notifications")
        assert "RETURNING" in inserts[0]
        if db.is_postgresql:
            assert statements == inserts
            assert db.engine.pool._pre_ping is False  # type: ignore[attr-defined]
        assert notification_id > 0
    finally:
        db.engine.dispose()
