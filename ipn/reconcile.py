"""Reconciliation: ask providers about every payment that is due, apply the answers through the
same transitions as callbacks, and settle expiries, a batch at a time with any number of passes
running at once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from ipn import rate_limit
from ipn.errors import ConcurrentUpdate, ProviderError
from ipn.polling import Schedule
from ipn.providers.base import PaymentRef, Provider, Snapshot
from ipn.services import Services
from ipn.transitions import Evidence, Verdict, apply_snapshot, expire_by_clock
from models import EventSource, Payment, PaymentStatus, utcnow

log = logging.getLogger(__name__)

# A claimed payment is not due again for this long, so a second pass running at the same time
# skips it; the check itself reschedules it properly.
LEASE = timedelta(minutes=5)
CAS_ATTEMPTS = 5


@dataclass(frozen=True)
class Check:
    payment_id: str
    # "changed" | "unchanged" | "expired" | "skipped" | "budget" | "failed" | "final"
    outcome: str
    message: str


# A pass keeps the first failures for its log; all are counted (an outage over a large backlog
# must not grow memory with every payment).
FAILURES_KEPT = 100


@dataclass
class PassReport:
    checked: int = 0
    changed: int = 0
    expired: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[Check] = field(default_factory=list)

    def add(self, check: Check) -> None:
        if check.outcome in ("skipped", "budget"):
            self.skipped += 1
            return
        self.checked += 1
        if check.outcome == "changed":
            self.changed += 1
        elif check.outcome == "expired":
            self.changed += 1
            self.expired += 1
        elif check.outcome == "failed":
            self.failed += 1
            if len(self.failures) < FAILURES_KEPT:
                self.failures.append(check)

    def __str__(self) -> str:
        return (
            f"checked {self.checked}, changed {self.changed} (expired {self.expired}), "
            f"skipped {self.skipped}, provider errors {len(self.failures)}"
        )


def count_due(services: Services, now: datetime, provider: str | None = None) -> int:
    query = select(func.count()).select_from(Payment).where(Payment.next_check_at <= now)
    if provider:
        query = query.where(Payment.provider == provider)
    with services.db.sessions() as session:
        return int(session.scalar(query) or 0)


def reconcile_due(
    services: Services,
    *,
    now: datetime | None = None,
    provider: str | None = None,
    time_budget: float | None = None,
    on_check: Callable[[Check], None] | None = None,
) -> PassReport:
    """One pass over the payments due now, the longest overdue first. Each batch is claimed
    with FOR UPDATE SKIP LOCKED and leased before commit: concurrent passes never check a
    payment twice. A provider whose call budget runs out is left for the next pass, its
    payments keeping their place in the queue."""
    now = now or utcnow()
    report = PassReport()
    started = time.monotonic()
    spent: set[str] = set()
    while time_budget is None or time.monotonic() - started < time_budget:
        batch = claim_due(services, now, provider=provider, exclude=spent)
        if not batch:
            break
        for claimed in batch:
            if claimed.provider in spent:
                _reschedule(services, claimed.payment_id, claimed.due_at)
                report.skipped += 1
                continue
            check = check_payment(services, claimed.payment_id, now=now)
            if check.outcome == "budget":
                spent.add(claimed.provider)
                _reschedule(services, claimed.payment_id, claimed.due_at)
            report.add(check)
            if on_check:
                on_check(check)
    if report.checked or report.skipped:
        log.info("reconciliation pass: %s", report)
    return report


@dataclass(frozen=True)
class Claimed:
    payment_id: str
    provider: str
    due_at: datetime


def claim_due(
    services: Services,
    now: datetime,
    *,
    provider: str | None = None,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[Claimed]:
    with services.db.transaction() as session:
        query = (
            select(Payment.id, Payment.provider, Payment.next_check_at)
            .where(Payment.next_check_at <= now)
            .order_by(Payment.next_check_at, Payment.id)
            .limit(services.settings.reconcile_batch)
            .with_for_update(skip_locked=True)
        )
        if provider:
            query = query.where(Payment.provider == provider)
        if exclude:
            query = query.where(Payment.provider.not_in(exclude))
        rows = [
            Claimed(payment_id, name, due_at or now)
            for payment_id, name, due_at in session.execute(query)
        ]
        if rows:
            # Leased: not due again (for this or any other pass) until checked or released.
            session.execute(
                update(Payment)
                .where(Payment.id.in_([row.payment_id for row in rows]))
                .values(next_check_at=now + LEASE)
                .execution_options(synchronize_session=False)
            )
        return rows


def check_payment(
    services: Services, payment_id: str, *, now: datetime | None = None, force: bool = False
) -> Check:
    """Ask the provider about one payment and apply the answer. `force` asks even when it is
    not due; a final payment (settled, watch over) is never asked."""
    now = now or utcnow()
    schedule = Schedule.from_settings(services.settings)
    with services.db.sessions() as session:
        payment = session.get(Payment, payment_id)
    if payment is None:
        return Check(payment_id, "failed", "no such payment")
    if payment.status.is_terminal and schedule.next_check_at(payment, now) is None:
        _reschedule(services, payment_id, None)
        return Check(payment_id, "final", f"final: {payment.status.value}")
    provider = services.provider(payment.provider)
    if not provider.configured:
        _reschedule(services, payment_id, now + timedelta(hours=1))
        return Check(payment_id, "skipped", f"{provider.name} is not configured")
    if not provider.has_status_api:
        return _settle_by_clock(services, payment, schedule, now)
    limit = services.settings.poll_limits.get(provider.name)
    if limit and not rate_limit.take(services.db, provider.name, limit[0], limit[1], now):
        return Check(
            payment_id, "budget", f"{provider.name} call budget of {limit[0]} a {limit[1]} is spent"
        )
    try:
        snapshot = provider.fetch_status(PaymentRef(payment.order_id, payment.provider_payment_id))
    except ProviderError as exc:
        _record_failure(services, payment_id, schedule, now)
        return Check(payment_id, "failed", str(exc))
    return _apply_answer(services, provider, payment_id, snapshot, schedule, now)


def _apply_answer(
    services: Services,
    provider: Provider,
    payment_id: str,
    snapshot: Snapshot,
    schedule: Schedule,
    now: datetime,
) -> Check:
    for _ in range(CAS_ATTEMPTS):
        try:
            with services.db.transaction() as session:
                payment = session.get(Payment, payment_id, with_for_update=True)
                assert payment is not None
                applied = apply_snapshot(
                    session,
                    provider,
                    snapshot,
                    Evidence(EventSource.POLL, "reconciliation status query"),
                    now=now,
                    payment=payment,
                    schedule=schedule,
                )
                assert applied is not None
                payment.checks += 1
                payment.poll_failures = 0
                payment.last_checked_at = now
                deadline = schedule.deadline(payment)
                # Only an answer that says unpaid lets our clock decide: an unknown status, a
                # refused `paid` or an answer about another payment is for review, not expiry.
                if (
                    applied.reported is PaymentStatus.PENDING
                    and applied.verdict is not Verdict.REFUSE
                    and payment.status is PaymentStatus.PENDING
                    and deadline
                    and now >= deadline
                ):
                    _expire(
                        session,
                        payment,
                        now,
                        f"past the deadline {deadline.isoformat()} and {provider.name} "
                        f"still says {snapshot.provider_status}: expired by our clock",
                        schedule,
                    )
                    return Check(payment_id, "expired", "expired by our clock")
                payment.next_check_at = schedule.next_check_at(payment, now)
                return Check(
                    payment_id, "changed" if applied.changed else "unchanged", applied.summary
                )
        except StaleDataError:
            continue
    raise ConcurrentUpdate(f"payment {payment_id}: gave up after {CAS_ATTEMPTS} races")


def _settle_by_clock(
    services: Services, payment: Payment, schedule: Schedule, now: datetime
) -> Check:
    """No status API: the only question is whether the deadline has passed."""
    deadline = schedule.deadline(payment)
    if payment.status.is_terminal or deadline is None or now < deadline:
        _reschedule(services, payment.id, schedule.next_check_at(payment, now))
        return Check(payment.id, "unchanged", "nothing to ask; waiting for callbacks")
    with services.db.transaction() as session:
        locked = session.get(Payment, payment.id, with_for_update=True)
        assert locked is not None
        if locked.status.is_terminal:
            return Check(payment.id, "unchanged", f"already {locked.status.value}")
        detail = (
            f"no status API and no final callback by {deadline.isoformat()} (expiry, "
            "callback retries and grace): expired by our clock"
        )
        _expire(session, locked, now, detail, schedule, flag=True)
    return Check(payment.id, "expired", "expired by our clock")


def _expire(
    session: Session,
    payment: Payment,
    now: datetime,
    detail: str,
    schedule: Schedule,
    *,
    flag: bool = False,
) -> None:
    expire_by_clock(session, payment, detail, now, schedule, flag=flag)


def _reschedule(services: Services, payment_id: str, when: datetime | None) -> None:
    with services.db.transaction() as session:
        session.execute(
            update(Payment)
            .where(Payment.id == payment_id)
            .values(next_check_at=when)
            .execution_options(synchronize_session=False)
        )


def _record_failure(services: Services, payment_id: str, schedule: Schedule, now: datetime) -> None:
    """No usable answer: nothing changes but the count of failures and a later next check."""
    with services.db.transaction() as session:
        payment = session.get(Payment, payment_id, with_for_update=True)
        assert payment is not None
        payment.poll_failures += 1
        payment.checks += 1
        payment.last_checked_at = now
        payment.next_check_at = schedule.after_failure(payment, now)
