"""The callback view's publisher: ids go to the broker in batches, a broker failure pauses
publishing instead of costing a connection attempt per id, and whatever was not published
stays `received` for the inbox sweeper."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from psycopg.pq import Trace
from sqlalchemy import event, select

from ipn import create_app
from ipn.config import Settings
from ipn.db import Database
from ipn.dispatch import IDS_PER_MESSAGE, Dispatcher, RedisPublisher, enqueue_many
from ipn.inbox import store_callback
from ipn.services import Services
from ipn.sweeper import sweep_inbox
from models import Notification, NotificationKind, NotificationStatus, utcnow

from conftest import Backend, count_notifications
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
    """One statement; on PostgreSQL one round trip in autocommit, counted in libpq's own trace
    of the connection: no BEGIN, no COMMIT and no ping go with it."""
    db = Database(settings.database_url)
    statements: list[str] = []
    traces: list[Path] = []

    @event.listens_for(db.engine, "before_cursor_execute")
    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    @event.listens_for(db.engine, "connect")
    def trace(dbapi_connection: Any, _record: Any) -> None:
        if db.is_postgresql:
            path = Path(tempfile.mkdtemp()) / "libpq.trace"
            traces.append(path)
            dbapi_connection.pgconn.trace(os.open(path, os.O_WRONLY | os.O_CREAT))
            dbapi_connection.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)

    try:
        store_callback(db, "cubepay", "ipn", b"a=1", {}, None)  # connects, reads the dialect
        statements.clear()
        sizes = [path.stat().st_size for path in traces]
        notification_id = store_callback(db, "cubepay", "ipn", b"a=1", {}, "127.0.0.1")
        assert notification_id > 0
        if not db.is_postgresql:
            # SQLite takes its write lock with a BEGIN IMMEDIATE of its own (ipn.db).
            inserts = [s for s in statements if not s.startswith("BEGIN")]
            assert len(inserts) == 1 and inserts[0].startswith("INSERT INTO notifications")
            assert "RETURNING" in inserts[0]
            return
        sent = []
        for path, size in zip(traces, sizes, strict=True):
            with open(path, "rb") as handle:
                handle.seek(size)
                lines = handle.read().decode("utf-8", "replace").splitlines()
            sent += [line.split("\t")[2] for line in lines if line.startswith("F\t")]
        # Each simple Query and each Sync of the extended protocol waits for the server once.
        assert [m for m in sent if m in ("Query", "Sync")] == ["Sync"], sent
        assert db.engine.pool._pre_ping is False
    finally:
        db.engine.dispose()


def test_a_stored_callback_reads_back_as_it_arrived(settings: Settings) -> None:
    """PostgreSQL's row is written by the driver's own statement, SQLite's by the model's: both
    read back the same through the model."""
    db = Database(settings.database_url)
    received = utcnow() - timedelta(seconds=3)
    headers = {"Content-Type": "application/json", "X-Odd": "caf\u00e9 \u0000 \\"}
    body = b'{"amount": 1e999}\x00\xff'
    try:
        notification_id = store_callback(
            db,
            "cubepay",
            "ipn",
            body,
            headers,
            "203.0.113.9",
            received_at=received,
            request_id="req-1",
            account="eur-shop",
        )
        with db.sessions() as session:
            row = session.get(Notification, notification_id)
            assert row is not None
            stored = {c: getattr(row, c) for c in Notification.__table__.columns.keys()}
    finally:
        db.engine.dispose()
    assert stored == {
        "id": notification_id,
        "provider": "cubepay",
        "account": "eur-shop",
        "kind": NotificationKind.IPN,
        "received_at": received,
        "remote_addr": "203.0.113.9",
        "headers": headers,
        "body": body,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "status": NotificationStatus.RECEIVED,
        "attempts": 0,
        "last_attempt_at": None,
        "next_attempt_at": None,
        "last_error": None,
        "last_traceback": None,
        "outcome": None,
        "processed_at": None,
        "replay_mode": None,
        "payment_id": None,
        "pruned_at": None,
        "request_id": "req-1",
        "verified_by": None,
    }


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_connection_the_server_dropped_costs_no_callback(backend: Backend) -> None:
    """After a restart every idle connection is dead: the first INSERT fails on one, the pool
    is thrown away, and the same INSERT goes through on a new connection."""
    db = Database(backend.env["DATABASE_URL"])
    try:
        first = store_callback(db, "cubepay", "ipn", b"a=1", {}, None)
        # Three idle connections in the pool, as a busy process has; the server drops them.
        held = [db.engine.raw_connection() for _ in range(3)]
        pids = [connection.driver_connection.info.backend_pid for connection in held]  # type: ignore[union-attr]
        for connection in held:
            connection.close()
        with Database(backend.env["DATABASE_URL"]).engine.connect() as other:
            for pid in pids:
                assert other.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar_one()
        second = store_callback(db, "cubepay", "ipn", b"a=2", {}, None)
        assert second > first
        with db.sessions() as session:
            bodies = session.scalars(select(Notification.body).order_by(Notification.id)).all()
        assert bodies[-2:] == [b"a=1", b"a=2"]
    finally:
        db.engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_published_messages_are_what_celery_itself_sends(backend: Backend) -> None:
    """The callback view's publisher writes each message as `send_task` does, down to the
    envelope's keys: only the fresh ids differ. A Celery upgrade that changes the format
    fails here, not in production."""
    queue = f"{backend.env['IPN_QUEUE']}-format"
    app = create_app(backend.settings(IPN_QUEUE=queue))
    client = redis.Redis.from_url(backend.env["REDIS_URL"])
    try:
        enqueue_many(app.extensions["celery"], [41, 42, 43])
        (celery_sent,) = client.lrange(queue, 0, -1)
        client.delete(queue)
        RedisPublisher(backend.env["REDIS_URL"], queue)([41, 42, 43])
        ours = client.lrange(queue, 0, -1)
        client.delete(queue)
        # Two messages' worth of ids: in order, IDS_PER_MESSAGE to the first.
        RedisPublisher(backend.env["REDIS_URL"], queue)(list(range(1, IDS_PER_MESSAGE + 3)))
        # The workers' BRPOP takes from the right: first published, first processed.
        taken: list[Any] = [client.rpop(queue) for _ in range(2)]
        assert client.llen(queue) == 0
        assert [json.loads(m)["headers"]["argsrepr"] for m in taken] == [
            repr([list(range(1, IDS_PER_MESSAGE + 1))]),
            repr([[IDS_PER_MESSAGE + 1, IDS_PER_MESSAGE + 2]]),
        ]
    finally:
        client.delete(queue)
        client.close()

    fresh = {"id", "root_id", "correlation_id", "delivery_tag", "reply_to", "origin"}

    def comparable(raw: bytes | str) -> dict[str, Any]:
        message = json.loads(raw)
        message["body"] = json.loads(base64.b64decode(message["body"]))
        for part in ("headers", "properties"):
            message[part] = {k: ("<fresh>" if k in fresh else v) for k, v in message[part].items()}
        return message

    assert comparable(ours[-1]) == comparable(celery_sent)
    headers = json.loads(ours[-1])["headers"]
    assert (
        headers["root_id"] == headers["id"] == json.loads(ours[-1])["properties"]["correlation_id"]
    )
