"""Writing callbacks into the inbox and settling inbox rows, each a single conditional statement."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import insert, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ipn.config import DEFAULT_ACCOUNT
from ipn.db import Database
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
    params = {
        "provider": provider,
        "account": account,
        "kind": NotificationKind(kind),
        "received_at": received_at or utcnow(),
        "remote_addr": remote_addr,
        "headers": dict(headers),
        "body": body,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "status": NotificationStatus.RECEIVED,
        "request_id": request_id,
    }
    try:
        return _insert(db, params)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        return _insert(db, params)


# Built once: SQLAlchemy compiles it on first use and finds it in its cache afterwards.
_STORE = insert(Notification).returning(Notification.id)


def _insert(db: Database, params: dict[str, object]) -> int:
    if db.is_postgresql:
        # No BEGIN and no COMMIT around it: a single statement commits by itself.
        with db.autocommit.connect() as connection:
            return int(connection.execute(_STORE, params).scalar_one())
    with db.engine.begin() as connection:
        return int(connection.execute(_STORE, params).scalar_one())


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
