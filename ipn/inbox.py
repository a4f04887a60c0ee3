"""Writing callbacks into the inbox and settling inbox rows, each a single conditional statement."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import insert, update
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.orm import Session

from ipn.config import DEFAULT_ACCOUNT
from ipn.db import Database, dumps
from ipn.metrics import observe_settled
from models import Notification, NotificationKind, NotificationStatus, utcnow

ERROR_LIMIT = 4000
TRACEBACK_LIMIT = 16000


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
    """Commit one inbox row and return its id: on PostgreSQL one round trip (an autocommit
    `INSERT ... RETURNING`). Nothing is parsed here.

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
        return _retried(_insert_postgresql, db, (*values, request_id))
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


def _retried(insert: Callable[[Database, Any], int], db: Database, values: Any) -> int:
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


def _insert_postgresql(db: Database, values: tuple[object, ...]) -> int:
    """One autocommit `INSERT ... RETURNING` on a pooled connection: no BEGIN, no COMMIT.

    Errors come back as SQLAlchemy's, a lost connection invalidating the pool as SQLAlchemy
    does on a disconnect (every idle connection is as dead as this one after a restart)."""
    try:
        # The pool's connect errors are the driver's own: SQLAlchemy wraps only its own calls.
        pooled = db.engine.raw_connection()
    except psycopg.Error as exc:
        raise _wrapped(exc, values, lost=False) from exc
    driver: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
    try:
        try:
            driver.autocommit = True
            row = driver.execute(_STORE_SQL, values, prepare=True).fetchone()
        finally:
            if not driver.broken:
                driver.autocommit = False
    except psycopg.Error as exc:
        lost = driver.broken or driver.closed
        if lost:
            pooled.invalidate(exc)
            db.engine.dispose(close=False)
        raise _wrapped(exc, values, lost) from exc
    finally:
        pooled.close()
    assert row is not None
    return int(row[0])


def _wrapped(exc: psycopg.Error, values: tuple[object, ...], lost: bool) -> StatementError:
    # Never the parameters in the message: they hold the callback's body.
    return DBAPIError.instance(
        _STORE_SQL, values, exc, psycopg.Error, hide_parameters=True, connection_invalidated=lost
    )


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
