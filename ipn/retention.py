"""Retention: empty the bodies and headers of old settled notifications, redact the customer
data of long-final payments and clear old shop answers, a batch at a time, never touching what
an open payment, an open anomaly or an undelivered merchant event still needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Text, and_, cast, func, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from ipn.config import Settings
from ipn.services import Services
from models import (
    OPEN,
    TERMINAL,
    Anomaly,
    AnomalyStatus,
    DeliveryAttempt,
    DeliveryStatus,
    MerchantEvent,
    Notification,
    NotificationStatus,
    Payment,
    utcnow,
)

# Ids per transaction: each batch holds its row locks for a few milliseconds, so the inbox
# keeps taking callbacks while a prune runs.
BATCH = 1000

S = NotificationStatus
SETTLED = (S.PROCESSED, S.IGNORED)
# Evidence of something that went wrong: kept for the longer retention.
WENT_WRONG = (S.REJECTED, S.FAILED, S.DEAD)


@dataclass
class Removed:
    rows: int = 0
    bytes: int = 0

    def add(self, rows: int, size: int) -> None:
        self.rows += rows
        self.bytes += size


@dataclass
class PruneReport:
    dry_run: bool = False
    notifications: Removed = field(default_factory=Removed)
    payments: Removed = field(default_factory=Removed)
    answers: Removed = field(default_factory=Removed)

    @property
    def bytes(self) -> int:
        return self.notifications.bytes + self.payments.bytes + self.answers.bytes

    def __str__(self) -> str:
        verb = "would prune" if self.dry_run else "pruned"
        return (
            f"{verb} {self.notifications.rows} notifications ({size(self.notifications.bytes)}), "
            f"{self.payments.rows} payment descriptions ({size(self.payments.bytes)}), "
            f"{self.answers.rows} shop answers ({size(self.answers.bytes)}); "
            f"{size(self.bytes)} in all"
        )


def size(count: int) -> str:
    """Bytes as people read them: `512 B`, `3.4 KiB`, `76.1 MiB`."""
    if count < 1024:
        return f"{count} B"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024 / 1024:.1f} MiB"


def prune(
    services: Services,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
    batch: int = BATCH,
) -> PruneReport:
    """One retention pass over the inbox, the payments and the delivery attempts. A dry run
    counts the same rows and bytes and changes nothing."""
    now = now or utcnow()
    settings = services.settings
    report = PruneReport(dry_run=dry_run)
    steps: list[tuple[Removed, _Step]] = [
        (report.notifications, _notifications(settings, now)),
        (report.payments, _payments(settings, now)),
        (report.answers, _answers(settings, now)),
    ]
    for removed, step in steps:
        last: Any = None
        while True:
            with services.db.transaction() as session:
                end = _window(session, step, last, batch)
                if end is None:
                    break
                found = _next_batch(session, step, last, end, lock=not dry_run)
                last = end
                if not found:
                    continue
                if dry_run:
                    removed.add(len(found), sum(n for _, n in found))
                else:
                    sizes = dict(found)
                    done = session.scalars(
                        update(step.model)
                        .where(step.key.in_(list(sizes)), step.due)
                        .values(step.values)
                        .returning(step.key)
                        .execution_options(synchronize_session=False)
                    ).all()
                    removed.add(len(done), sum(sizes[key] for key in done))
    return report


@dataclass(frozen=True)
class _Step:
    model: type[Any]
    key: InstrumentedAttribute[Any]
    # What makes a row due; checked again by the UPDATE itself, so a row that became needed
    # between the read and the write (a replay, a reopened payment) is left alone.
    due: ColumnElement[bool]
    # The bytes a row gives back.
    size: ColumnElement[int]
    values: dict[str, Any]


def _window(session: Session, step: _Step, last: Any, batch: int) -> Any:
    """The key that ends the next `batch` rows of the table after `last` (None: no rows left).

    Each batch looks at this window of the primary key only, so its cost is bounded by the
    batch size whatever the planner thinks of the filters (on a freshly loaded table it thinks
    they match one row, and would sort every due row of the table for each batch).
    """
    rest = [] if last is None else [step.key > last]
    end = session.scalar(
        select(step.key).where(*rest).order_by(step.key).offset(batch - 1).limit(1)
    )
    if end is None:
        end = session.scalar(select(func.max(step.key)).where(*rest))
    return end


def _next_batch(
    session: Session, step: _Step, last: Any, end: Any, *, lock: bool
) -> list[tuple[Any, int]]:
    query = select(step.key, func.coalesce(step.size, 0)).where(step.due, step.key <= end)
    if last is not None:
        query = query.where(step.key > last)
    query = query.order_by(step.key)
    if lock:
        # PostgreSQL only (SQLite ignores it): rows a worker holds now are skipped, not
        # waited for; the next pass takes them.
        query = query.with_for_update(skip_locked=True, of=step.model)
    return [(key, int(n)) for key, n in session.execute(query)]


def needed_by_payment(payment_id: Any) -> ColumnElement[bool]:
    """True where the payment is still open, has an open anomaly or an undelivered event."""
    # An alias: asked of the payments table itself, the subquery must not correlate to it.
    other = aliased(Payment)
    return or_(
        select(other.id).where(other.id == payment_id, other.status.in_(OPEN)).exists(),
        select(Anomaly.id)
        .where(Anomaly.payment_id == payment_id, Anomaly.status == AnomalyStatus.OPEN)
        .exists(),
        select(MerchantEvent.id)
        .where(
            MerchantEvent.payment_id == payment_id,
            MerchantEvent.status == DeliveryStatus.PENDING,
        )
        .exists(),
    )


def _notifications(settings: Settings, now: datetime) -> _Step:
    kept = now - timedelta(days=settings.retention_days)
    kept_failed = now - timedelta(days=settings.retention_failed_days)
    due = and_(
        Notification.pruned_at.is_(None),
        or_(
            and_(Notification.status.in_(SETTLED), Notification.received_at < kept),
            and_(Notification.status.in_(WENT_WRONG), Notification.received_at < kept_failed),
        ),
        ~needed_by_payment(Notification.payment_id),
        ~select(Anomaly.id)
        .where(Anomaly.notification_id == Notification.id, Anomaly.status == AnomalyStatus.OPEN)
        .exists(),
    )
    return _Step(
        Notification,
        Notification.id,
        due,
        func.length(Notification.body) + func.length(cast(Notification.headers, Text)),
        {"body": b"", "headers": {}, "pruned_at": now},
    )


def _payments(settings: Settings, now: datetime) -> _Step:
    final_since = now - timedelta(days=settings.retention_failed_days)
    due = and_(
        Payment.description.is_not(None),
        Payment.status.in_(TERMINAL),
        Payment.updated_at < final_since,
        ~needed_by_payment(Payment.id),
    )
    return _Step(
        Payment,
        Payment.id,
        due,
        func.length(Payment.description),
        # A compare-and-set like every other change of a payment: a writer holding the old
        # version retries instead of writing over the redaction.
        {"description": None, "redacted_at": now, "version": Payment.version + 1},
    )


def _answers(settings: Settings, now: datetime) -> _Step:
    kept = now - timedelta(days=settings.retention_days)
    due = and_(
        DeliveryAttempt.response.is_not(None),
        DeliveryAttempt.at < kept,
        ~select(MerchantEvent.id)
        .where(
            MerchantEvent.id == DeliveryAttempt.event_id,
            MerchantEvent.status == DeliveryStatus.PENDING,
        )
        .exists(),
    )
    return _Step(
        DeliveryAttempt,
        DeliveryAttempt.id,
        due,
        func.length(DeliveryAttempt.response),
        {"response": None},
    )
