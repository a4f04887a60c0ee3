"""The inbox sweeper: rows still `received` long after their last attempt are enqueued again
(lost messages, a broker outage, a killed worker); rows out of attempts go `dead`."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, or_, select

from ipn import alerts
from ipn.metrics import observe_settled
from ipn.services import Services
from models import AlertKind, Notification, NotificationStatus, utcnow

log = logging.getLogger(__name__)

BATCH = 500


@dataclass
class SweepReport:
    requeued: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"requeued {len(self.requeued)}, dead {len(self.dead)}, "
            f"could not enqueue {len(self.unsent)}"
        )


def sweep_inbox(
    services: Services, send: Callable[[int], None], *, now: datetime | None = None
) -> SweepReport:
    """One pass over due rows, a batch at a time in id order (keyset, never `.all()` of all).

    Each batch is claimed with FOR UPDATE SKIP LOCKED and its next sweep time pushed out before
    commit, so two sweepers at once never both enqueue a row.
    """
    now = now or utcnow()
    settings = services.settings
    report = SweepReport()
    cutoff = now - settings.sweep_after
    due = and_(
        Notification.status == NotificationStatus.RECEIVED,
        or_(
            and_(Notification.next_attempt_at.is_(None), Notification.received_at <= cutoff),
            Notification.next_attempt_at <= now,
        ),
    )
    last_id = 0
    while True:
        to_send: list[int] = []
        with services.db.transaction() as session:
            rows = (
                session.execute(
                    select(Notification)
                    .where(due, Notification.id > last_id)
                    .order_by(Notification.id)
                    .limit(BATCH)
                    .with_for_update(skip_locked=True)
                )
                .scalars()
                .all()
            )
            if not rows:
                break
            dead: Counter[str] = Counter()
            for row in rows:
                if row.attempts >= settings.max_attempts:
                    row.status = NotificationStatus.DEAD
                    row.processed_at = now
                    row.outcome = f"dead after {row.attempts} attempts"
                    row.last_error = row.last_error or "no attempt finished"
                    observe_settled(session, row.provider, row.status, row.received_at)
                    report.dead.append(row.id)
                    dead[row.provider] += 1
                else:
                    row.next_attempt_at = now + settings.sweep_after
                    to_send.append(row.id)
            for provider, count in dead.items():
                alerts.record(session, AlertKind.DEAD, provider, count, now=now)
            last_id = rows[-1].id
        for notification_id in to_send:
            try:
                send(notification_id)
                report.requeued.append(notification_id)
            except Exception as exc:
                log.warning("sweeper could not enqueue %s: %s", notification_id, type(exc).__name__)
                report.unsent.append(notification_id)
    if report.requeued or report.dead or report.unsent:
        log.info("inbox sweep: %s", report)
    return report
