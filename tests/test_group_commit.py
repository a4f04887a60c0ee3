"""The inbox's group commit on PostgreSQL: rows that arrive together are committed together,
each request gets its own row's id, and a row the server refuses fails only its own request."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import DBAPIError

from ipn.db import Database
from ipn.inbox import GroupCommit, _insert_postgresql, _Slot, store_callback
from models import Notification, utcnow

from conftest import Backend, clean, count_notifications

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


@pytest.fixture
def db(backend: Backend) -> Iterator[Database]:
    clean(backend.db)
    db = Database(backend.env["DATABASE_URL"])
    yield db
    db.engine.dispose()


def row(body: bytes, remote_addr: str = "127.0.0.1") -> tuple[object, ...]:
    return ("cubepay", "default", "ipn", utcnow(), remote_addr, "{}", body, "0" * 64, None)


def test_concurrent_callbacks_each_get_their_own_row(db: Database) -> None:
    """Forty requests at once: each id returned is the row of that request's body, and fewer
    pooled connections were taken than rows committed (they went in batches)."""
    checkouts: list[int] = []
    event.listen(db.engine, "checkout", lambda *_: checkouts.append(1))
    start = threading.Barrier(40)
    stored: dict[bytes, int] = {}

    def one(n: int) -> None:
        body = f"callback {n}".encode()
        start.wait()
        stored[body] = store_callback(db, "cubepay", "ipn", body, {}, None)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    with db.sessions() as session:
        rows = dict(session.execute(select(Notification.body, Notification.id)).all())
    assert rows == stored and len(stored) == 40
    assert len(checkouts) < 40


def test_a_row_the_server_refuses_fails_alone(db: Database) -> None:
    """A batch holding a row PostgreSQL refuses (an address longer than its column) is tried
    again row by row: the good rows are committed, the bad one's request gets the error."""
    committer = GroupCommit(db)
    slots = [_Slot(row(b"good 1")), _Slot(row(b"bad", "x" * 65)), _Slot(row(b"good 2"))]
    committer._commit(slots)

    assert all(slot.done.is_set() for slot in slots)
    good = [slots[0], slots[2]]
    assert [slot.error for slot in good] == [None, None]
    assert isinstance(slots[1].error, DBAPIError) and slots[1].id is None
    with db.sessions() as session:
        bodies = dict(session.execute(select(Notification.id, Notification.body)).all())
    assert bodies == {slots[0].id: b"good 1", slots[2].id: b"good 2"}
    assert count_notifications(db) == 2


def test_a_batch_is_all_or_nothing(db: Database) -> None:
    """The statements of one batch are one transaction: when the row-by-row retry is not
    possible (the connection is gone), no row of the batch is left behind."""
    with pytest.raises(DBAPIError):
        _insert_postgresql(db, [row(b"good"), row(b"bad", "x" * 65)])
    assert count_notifications(db) == 0


def test_each_row_of_a_full_batch_gets_its_own_id(db: Database) -> None:
    """One statement of the most rows a batch takes: the ids come back in the rows' order."""
    rows = [row(f"callback {n}".encode()) for n in range(GroupCommit.MAX_ROWS)]
    ids = _insert_postgresql(db, rows)
    with db.sessions() as session:
        bodies = dict(session.execute(select(Notification.id, Notification.body)).all())
    assert [bodies[notification_id] for notification_id in ids] == [r[6] for r in rows]
    assert len(set(ids)) == len(rows) == count_notifications(db)
