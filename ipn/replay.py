"""Replaying notifications through the same path: pick them by id or filter, record each replay
on the row, and enqueue them; a dry run only lists."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select

from ipn.services import Services
from models import Notification, NotificationReplay, NotificationStatus, ReplayMode, utcnow

PAGE = 500

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayFilter:
    provider: str | None = None
    status: NotificationStatus | None = None
    since: datetime | None = None
    until: datetime | None = None
    # One merchant account's rows (with or without a provider: account names may repeat).
    account: str | None = None

    def __bool__(self) -> bool:
        return any(
            value is not None
            for value in (self.provider, self.status, self.since, self.until, self.account)
        )

    def apply(self, query: Select[Any]) -> Select[Any]:
        if self.provider:
            query = query.where(Notification.provider == self.provider)
        if self.account:
            query = query.where(Notification.account == self.account)
        if self.status:
            query = query.where(Notification.status == self.status)
        if self.since:
            query = query.where(Notification.received_at >= self.since)
        if self.until:
            query = query.where(Notification.received_at < self.until)
        return query


def matching_ids(services: Services, which: ReplayFilter) -> Iterator[int]:
    """Ids of the matching rows in id order, a page at a time (keyset), never all at once.
    Pruned rows are left out: their bodies are gone, there is nothing to replay."""
    query = which.apply(select(Notification.id)).where(Notification.pruned_at.is_(None))
    return services.db.keyset(query, Notification.id, PAGE)


def replay(
    services: Services,
    ids: Sequence[int],
    mode: ReplayMode,
    send: Callable[[int], None],
    *,
    requested_by: str = "operator",
) -> list[int]:
    """Put each row back to `received` with a record of the replay, then enqueue it. Ids that
    do not exist, and pruned rows, are skipped (the caller checks them first when it must say
    so: see `pruned`)."""
    done: list[int] = []
    now = utcnow()
    for notification_id in ids:
        with services.db.transaction() as session:
            row = session.get(Notification, notification_id, with_for_update=True)
            if row is None or row.pruned_at is not None:
                continue
            session.add(
                NotificationReplay(
                    notification_id=row.id,
                    at=now,
                    mode=mode,
                    previous_status=row.status,
                    previous_outcome=row.outcome,
                    requested_by=requested_by,
                    data={
                        "attempts": row.attempts,
                        "last_error": row.last_error,
                        "processed_at": row.processed_at.isoformat() if row.processed_at else None,
                    },
                )
            )
            # A fresh start for everything the sweeper reads: a replayed row has its own
            # attempts, and is not buried again (as dead, with an old error) before it had one.
            row.status = NotificationStatus.RECEIVED
            row.replay_mode = mode
            row.attempts = 0
            row.last_attempt_at = None
            row.last_error = None
            row.last_traceback = None
            row.outcome = None
            row.processed_at = None
            row.next_attempt_at = now + services.settings.sweep_after
        # After the commit; if the broker is down the sweeper sends it later.
        try:
            send(notification_id)
        except Exception as exc:
            log.warning(
                "replay of %s not enqueued (%s); the sweeper will send it",
                notification_id,
                type(exc).__name__,
            )
        done.append(notification_id)
    return done


def existing(services: Services, ids: Sequence[int]) -> set[int]:
    with services.db.sessions() as session:
        return set(session.scalars(select(Notification.id).where(Notification.id.in_(ids))))


def pruned(services: Services, ids: Sequence[int]) -> dict[int, datetime]:
    """The rows among `ids` whose body and headers retention removed, with when: a replay of
    them could only fail, so callers refuse it and say why."""
    with services.db.sessions() as session:
        rows = session.execute(
            select(Notification.id, Notification.pruned_at).where(
                Notification.id.in_(ids), Notification.pruned_at.is_not(None)
            )
        )
        return {notification_id: at for notification_id, at in rows if at is not None}


def pruned_message(found: dict[int, datetime]) -> str:
    ids = sorted(found)
    if len(ids) == 1:
        which = f"notification {ids[0]} was pruned on {found[ids[0]].date().isoformat()}"
    else:
        which = f"notifications {', '.join(map(str, ids))} were pruned"
    return f"{which} (retention): its body is gone, there is nothing to replay"
