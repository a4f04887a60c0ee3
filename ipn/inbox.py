"""Writing callbacks into the inbox and settling inbox rows, each a single conditional statement."""

from __future__ import annotations

import functools
import hashlib
import os
import queue
import threading
import weakref
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from sqlalchemy import insert, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from ipn.config import DEFAULT_ACCOUNT
from ipn.db import Database, driver_error, dumps
from ipn.metrics import observe_settled
from models import Notification, NotificationKind, NotificationStatus, utcnow

ERROR_LIMIT = 4000
TRACEBACK_LIMIT = 16000

_T = TypeVar("_T")


def storable(text: str, limit: int = ERROR_LIMIT) -> str:
    """Text any backend can keep: no NUL byte, no lone surrogate (PostgreSQL refuses both, and
    an error about a poison callback often quotes it), at most `limit` characters."""
    cleaned = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return cleaned[:limit]


def store_callback(
    db: Database,
    provider: str,
    kind: str,
    body: bytes,
    headers: Mapping[str, str],
    remote_addr: str | None,
    received_at: datetime | None = None,
    request_id: str | None = None,
    account: str = DEFAULT_ACCOUNT,
) -> int:
    """Commit one inbox row and return its id, once it is committed. Nothing is parsed here.

    On PostgreSQL the rows of callbacks that arrive together are committed together: one
    round trip and one commit for all of them (see `GroupCommit`).

    A connection the server dropped (a restart) fails before the row could be written, and
    the pool is invalidated with it: the INSERT is tried once more on a fresh connection. A
    second failure raises, and the view answers 503."""
    kind = NotificationKind(kind)
    received_at = received_at or utcnow()
    headers = dict(headers)
    sha256 = hashlib.sha256(body).hexdigest()
    if db.is_postgresql:
        values = (
            provider,
            account,
            kind.value,
            received_at,
            remote_addr,
            dumps(headers),
            body,
            sha256,
        )
        return _committer(db).store((*values, request_id))
    params = {
        "provider": provider,
        "account": account,
        "kind": kind,
        "received_at": received_at,
        "remote_addr": remote_addr,
        "headers": headers,
        "body": body,
        "body_sha256": sha256,
        "status": NotificationStatus.RECEIVED,
        "request_id": request_id,
    }
    return _retried(_insert, db, params)


def _retried(insert: Callable[[Database, Any], _T], db: Database, values: Any) -> _T:
    try:
        return insert(db, values)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        return insert(db, values)


# Built once: SQLAlchemy compiles it on first use and finds it in its cache afterwards.
_STORE = insert(Notification).returning(Notification.id)

# The same row in the driver's own words, prepared once per connection by psycopg. SQLAlchemy's
# execution machinery (execution context, type processing, result wrapping) was a fifth of the
# web process's CPU per callback. tests/test_dispatch.py checks it writes what _STORE writes.
_STORE_SQL = (
    "INSERT INTO notifications (provider, account, kind, received_at, remote_addr, headers,"
    " body, body_sha256, status, attempts, request_id)"
    " VALUES (%s, %s, %s, %s, %s, %s::json, %s, %s, 'received', 0, %s) RETURNING id"
)


def _insert(db: Database, params: dict[str, object]) -> int:
    with db.engine.begin() as connection:
        return int(connection.execute(_STORE, params).scalar_one())


@functools.cache
def _store_many_sql(count: int) -> str:
    """`_STORE_SQL` for `count` rows in one statement."""
    head, values = _STORE_SQL.split(" VALUES ", 1)
    row = values.removesuffix(" RETURNING id")
    return f"{head} VALUES {', '.join([row] * count)} RETURNING id"


def _insert_postgresql(db: Database, rows: list[tuple[object, ...]]) -> list[int]:
    """The rows in one `INSERT ... RETURNING` on a pooled connection in autocommit: no BEGIN,
    no COMMIT, one round trip, all the rows committed or none. One statement of many rows costs
    the driver a fraction of a pipeline of one-row statements (about 24 against 59 us of CPU a
    row in batches of four, 92 against 164 us for one).

    Errors come back as SQLAlchemy's, a lost connection invalidating the pool as SQLAlchemy
    does on a disconnect (every idle connection is as dead as this one after a restart)."""
    try:
        # The pool's connect errors are the driver's own: SQLAlchemy wraps only its own calls.
        pooled = db.engine.raw_connection()
    except psycopg.Error as exc:
        raise driver_error(_STORE_SQL, exc, lost=False) from exc
    driver: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
    sql = _store_many_sql(len(rows))
    try:
        try:
            driver.autocommit = True
            with driver.cursor() as cursor:
                cursor.execute(sql, [v for row in rows for v in row], prepare=True)
                # The ids come from the sequence in the order of the VALUES list (one statement
                # takes them one row after another, in increasing order): sorted, they are the
                # rows' ids in order, whatever order RETURNING gives them in.
                ids = sorted(row[0] for row in cursor.fetchall())
        finally:
            if not driver.broken:
                driver.autocommit = False
    except psycopg.Error as exc:
        lost = driver.broken or driver.closed
        if lost:
            pooled.invalidate(exc)
            db.engine.dispose(close=False)
        raise driver_error(sql, exc, lost) from exc
    finally:
        pooled.close()
    return ids


class GroupCommit:
    """Commits the inbox rows of callbacks that arrive together in one round trip.

    Each request hands its row to a few writer threads per process and waits for its commit;
    a free writer takes every row that queued up while the others were committing. So at a
    trickle each row is committed on its own, as soon as it comes, and under load a commit
    (PostgreSQL's WAL flush, a round trip, a pooled connection) serves many. A batch the
    server refuses is tried again row by row, so one poison row fails only its own request."""

    WRITERS = 4
    MAX_ROWS = 64
    # A writer thread ends after this long with nothing to write; the next row starts one.
    IDLE_SECONDS = 5.0
    # A request never waits longer than this for its commit: it answers 503 instead.
    WAIT_SECONDS = 30.0

    def __init__(self, db: Database) -> None:
        self._db = db
        self._queue: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pid = -1
        self._writers = 0

    def store(self, row: tuple[object, ...]) -> int:
        slot = _Slot(row)
        self._queue.put(slot)
        with self._lock:
            if self._pid != os.getpid():
                # The writers of the process this one was forked from are not here.
                self._pid, self._writers = os.getpid(), 0
            if self._writers < self.WRITERS:
                self._writers += 1
                threading.Thread(target=self._run, name="ipn-inbox", daemon=True).start()
        if not slot.done.wait(self.WAIT_SECONDS):
            raise PoolTimeout(f"no commit of the inbox row within {self.WAIT_SECONDS}s")
        if slot.error is not None:
            raise slot.error
        assert slot.id is not None
        return slot.id

    def _run(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=self.IDLE_SECONDS)]
            except queue.Empty:
                with self._lock:
                    # A row put before the lock was taken is seen here; one put after it
                    # finds a writer fewer and starts another.
                    if self._queue.empty():
                        self._writers -= 1
                        return
                continue
            while len(batch) < self.MAX_ROWS:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit(batch)

    def _commit(self, batch: list[_Slot]) -> None:
        try:
            ids = _retried(_insert_postgresql, self._db, [slot.row for slot in batch])
        except Exception as exc:
            if len(batch) > 1 and not (isinstance(exc, DBAPIError) and exc.connection_invalidated):
                for slot in batch:
                    self._commit([slot])
                return
            for slot in batch:
                slot.error = exc
                slot.done.set()
            return
        for slot, notification_id in zip(batch, ids, strict=True):
            slot.id = notification_id
            slot.done.set()


class _Slot:
    __slots__ = ("done", "error", "id", "row")

    def __init__(self, row: tuple[object, ...]) -> None:
        self.row = row
        self.done = threading.Event()
        self.id: int | None = None
        self.error: BaseException | None = None


_committers: weakref.WeakKeyDictionary[Database, GroupCommit] = weakref.WeakKeyDictionary()
_committers_lock = threading.Lock()


def _committer(db: Database) -> GroupCommit:
    with _committers_lock:
        committer = _committers.get(db)
        if committer is None:
            committer = _committers[db] = GroupCommit(db)
        return committer


def settle(
    session: Session,
    notification_id: int,
    status: NotificationStatus,
    *,
    outcome: str | None = None,
    error: str | None = None,
    traceback: str | None = None,
    payment_id: str | None = None,
    verified_by: str | None = None,
) -> bool:
    """Move a `received` row to its final status. False when another worker settled it first.

    An error is kept with its traceback, if any; a settlement without one leaves the last
    attempt's error and traceback as they were."""
    values = settled_values(
        status,
        outcome=outcome,
        error=error,
        traceback=traceback,
        payment_id=payment_id,
        verified_by=verified_by,
    )
    result = session.execute(
        update(Notification)
        .where(Notification.id == notification_id)
        .where(Notification.status == NotificationStatus.RECEIVED)
        .values(**values)
        .returning(Notification.provider, Notification.received_at)
        .execution_options(synchronize_session=False)
    )
    settled = result.one_or_none()
    if settled is None:
        return False
    observe_settled(session, settled.provider, status, settled.received_at, outcome)
    return True


def settled_values(
    status: NotificationStatus,
    *,
    outcome: str | None = None,
    error: str | None = None,
    traceback: str | None = None,
    payment_id: str | None = None,
    verified_by: str | None = None,
) -> dict[str, object]:
    """The columns `settle` writes, for a writer that settles the row in a statement of its
    own (from a `received` row only, as `settle` does)."""
    values: dict[str, object] = {
        "status": status,
        "outcome": None if outcome is None else storable(outcome),
        "processed_at": utcnow(),
        "next_attempt_at": None,
        "replay_mode": None,
        # Said again by every attempt: a replay rejected under a changed secret verified nothing.
        "verified_by": verified_by,
    }
    if error is not None:
        values["last_error"] = storable(error)
        values["last_traceback"] = (
            None if traceback is None else storable(traceback, TRACEBACK_LIMIT)
        )
    if payment_id is not None:
        values["payment_id"] = payment_id
    return values
