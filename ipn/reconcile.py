"""Reconciliation: ask providers about every payment that is due, apply the answers through the
same transitions as callbacks, and settle expiries, a batch at a time with any number of passes
running at once."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import bindparam, func, or_, select, tuple_, update
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from ipn import rate_limit
from ipn.config import DEFAULT_ACCOUNT
from ipn.errors import ConcurrentUpdate, ProviderError, UnknownAccount
from ipn.logs import bind, bound
from ipn.metrics import RECONCILE_CHECKS, RECONCILE_PASS_DURATION, RECONCILE_PASS_PAYMENTS
from ipn.polling import Schedule
from ipn.providers.base import PaymentRef, Provider, Snapshot
from ipn.services import Services
from ipn.transitions import (
    Evidence,
    Verdict,
    apply_snapshot,
    expire_by_clock,
    judge,
    record_note,
)
from models import EventSource, Payment, PaymentStatus, ProviderCalls, utcnow

log = logging.getLogger(__name__)

# A claimed payment is leased for this long (longer where a provider call may take longer): no
# other pass claims it meanwhile, and the holder asks about it only while enough of the lease is
# left for a whole provider call, so an answer never arrives after someone else has asked.
LEASE = timedelta(minutes=5)
CAS_ATTEMPTS = 5
ERROR_LIMIT = 500
# The answers of a batch are written together: as many as are ready, waiting at most this long
# (wall time) for up to this many.
WRITE_GATHER_SECONDS = 0.01
WRITE_GROUP = 32


@dataclass(frozen=True)
class Check:
    payment_id: str
    # "changed" | "unchanged" | "expired" | "skipped" | "budget" | "failed" | "final"
    # | "busy" (another check holds the payment) | "deferred" (left for the next claim)
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
    # Of the skipped, those whose provider's call budget was spent.
    skipped_budget: int = 0
    failures: list[Check] = field(default_factory=list)

    def add(self, check: Check) -> None:
        if check.outcome == "deferred":
            return
        if check.outcome in ("skipped", "budget", "busy"):
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
            f"skipped {self.skipped}, provider errors {self.failed}"
        )


def count_due(services: Services, now: datetime, provider: str | None = None) -> int:
    query = (
        select(func.count())
        .select_from(Payment)
        .where(Payment.next_check_at <= now)
        .where(or_(Payment.leased_until.is_(None), Payment.leased_until <= now))
    )
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
    """One pass in this process over the payments due by `now` (default: the pass's start), the
    longest overdue first: a batch is claimed, then checked (`check_claimed`), until none is
    left. Each batch is claimed with FOR UPDATE SKIP LOCKED under a lease of its own token:
    concurrent passes never check a payment twice. Each check runs at its own time and
    schedules the next one after it, past the pass's cut, so a pass asks about a payment once.
    The time budget is looked at before every payment; what a pass does not reach, and the
    payments of a provider whose call budget runs out, keep their place in the queue."""
    due_by = now or utcnow()
    report = PassReport()
    started = time.monotonic()
    # The (provider, account) pairs whose call budget this pass has used up.
    spent = spent_budgets(services, due_by)

    def out_of_time() -> bool:
        return time_budget is not None and time.monotonic() - started >= time_budget

    while not out_of_time():
        batch = claim_due(services, due_by, provider=provider, exclude=spent)
        if not batch:
            break
        check_claimed(
            services,
            [claimed.payment_id for claimed in batch],
            batch[0].lease,
            report=report,
            spent=spent,
            out_of_time=out_of_time,
            on_check=on_check,
        )
    if report.checked or report.skipped:
        log.info("reconciliation pass: %s", report)
    observe_pass(report, time.monotonic() - started)
    return report


def enqueue_due(
    services: Services,
    send: Callable[[list[str], str], None],
    *,
    now: datetime | None = None,
    time_budget: float | None = None,
) -> int:
    """The beat's part of a pass: claim every payment due by `now` a batch at a time and hand
    each batch (its ids and lease token) to `send`, for any worker to check with
    `check_claimed`; how many payments were sent. Accounts whose call budget is spent are left
    out. A batch the broker refuses is released at once; a batch whose worker dies keeps its
    lease until it runs out, and is claimed again then."""
    due_by = now or utcnow()
    started = time.monotonic()
    spent = spent_budgets(services, due_by)
    sent = 0
    # Each claim starts past the last: the payments this pass leased stay due until they are
    # checked, and a claim from the front would walk past all of them again.
    after: tuple[datetime, str] | None = None
    while time_budget is None or time.monotonic() - started < time_budget:
        batch = claim_due(services, due_by, exclude=spent, after=after)
        if not batch:
            if after is None:
                break
            # Once more from the front, for the payments a worker gave back meanwhile.
            after = None
            continue
        after = (batch[-1].due_at, batch[-1].payment_id)
        ids = [claimed.payment_id for claimed in batch]
        try:
            send(ids, batch[0].lease)
        except Exception:
            _release(services, ids, batch[0].lease)
            raise
        sent += len(ids)
    if sent:
        log.info("reconciliation: %d due payments sent to be checked", sent)
    return sent


def spent_budgets(services: Services, now: datetime) -> set[tuple[str, str]]:
    """The (provider, account) pairs whose call budget for the current period is used up."""
    limits = {}
    for adapter in [*services.providers.values(), *services.accounts.values()]:
        limit = _call_limit(services, adapter)
        if limit:
            limits[(adapter.name, adapter.account)] = (
                limit[0],
                rate_limit.period_key(limit[1], now),
            )
    if not limits:
        return set()
    query = select(
        ProviderCalls.provider, ProviderCalls.account, ProviderCalls.period, ProviderCalls.calls
    ).where(ProviderCalls.period.in_({period for _, period in limits.values()}))
    with services.db.sessions() as session:
        rows = session.execute(query).all()
    return {
        (name, account)
        for name, account, period, calls in rows
        if (name, account) in limits
        and limits[(name, account)][1] == period
        and calls >= limits[(name, account)][0]
    }


def _call_limit(services: Services, provider: Provider) -> tuple[int, str] | None:
    return provider.settings.poll_limit or services.settings.poll_limits.get(provider.name)


def observe_pass(report: PassReport, seconds: float) -> None:
    RECONCILE_PASS_DURATION.observe(seconds)
    for result, count in (
        ("checked", report.checked),
        ("changed", report.changed),
        ("failed", report.failed),
        ("skipped", report.skipped),
        ("skipped_budget", report.skipped_budget),
    ):
        RECONCILE_PASS_PAYMENTS.labels(result).inc(count)


@dataclass(frozen=True)
class Claimed:
    payment_id: str
    provider: str
    account: str
    # The claim's owner token: only a check holding it may apply an answer.
    lease: str
    # When it was due: with the id, where the next claim of the same pass starts.
    due_at: datetime


def lease_length(services: Services) -> timedelta:
    return max(LEASE, 4 * _call_bound(services))


def claim_due(
    services: Services,
    now: datetime,
    *,
    provider: str | None = None,
    exclude: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset(),
    after: tuple[datetime, str] | None = None,
) -> list[Claimed]:
    """Claim the next batch of payments due by `now` that nobody holds, in one statement: a
    fresh token and a lease expiry written on each. `after` (the `due_at` and id of the last
    payment claimed) starts the claim past it, in due order."""
    token = secrets.token_hex(16)
    clock = utcnow()
    due = (
        select(Payment.id)
        .where(Payment.next_check_at <= now)
        .where(or_(Payment.leased_until.is_(None), Payment.leased_until <= clock))
        .order_by(Payment.next_check_at, Payment.id)
        .limit(services.settings.reconcile_batch)
        .with_for_update(skip_locked=True)
    )
    if provider:
        due = due.where(Payment.provider == provider)
    if exclude:
        due = due.where(tuple_(Payment.provider, Payment.account).not_in(sorted(exclude)))
    if after is not None:
        due = due.where(tuple_(Payment.next_check_at, Payment.id) > tuple_(*after))
    statement = (
        update(Payment)
        .where(Payment.id.in_(due.scalar_subquery()))
        .values(
            lease_token=token,
            leased_until=clock + lease_length(services),
        )
        .returning(Payment.id, Payment.provider, Payment.account, Payment.next_check_at)
        .execution_options(synchronize_session=False)
    )
    with services.db.transaction() as session:
        # Only due payments are claimed: none has an empty next_check_at.
        rows = sorted(session.execute(statement), key=lambda row: (row[3], row[0]))
    return [
        Claimed(payment_id, name, account, token, cast(datetime, due_at))
        for payment_id, name, account, due_at in rows
    ]


@dataclass
class _Asked:
    """One status query made for a batch: what came back (a snapshot or the error), and when."""

    payment: Payment
    provider: Provider
    now: datetime
    snapshot: Snapshot | None = None
    error: Exception | None = None


def check_claimed(
    services: Services,
    payment_ids: list[str],
    lease: str,
    *,
    report: PassReport | None = None,
    spent: set[tuple[str, str]] | None = None,
    out_of_time: Callable[[], bool] = lambda: False,
    on_check: Callable[[Check], None] | None = None,
) -> PassReport:
    """Check one claimed batch: the payments read once, the call budget of each account taken
    for all its payments in one statement, the status queries made concurrently (at most
    `reconcile_concurrency` in flight), and each answer written once, as it arrives, together
    with the others that arrived meanwhile, only while the lease is still this batch's own.
    Whatever is left over goes back to the queue at once."""
    report = report if report is not None else PassReport()
    spent = spent if spent is not None else set()
    schedule = Schedule.from_settings(services.settings)

    def done(check: Check, provider: str) -> None:
        if check.outcome == "budget":
            report.skipped_budget += 1
        if check.outcome != "deferred":
            RECONCILE_CHECKS.labels(provider, check.outcome).inc()
        report.add(check)
        if on_check:
            on_check(check)

    try:
        with services.db.sessions() as session:
            payments = list(
                session.scalars(
                    select(Payment)
                    .where(Payment.id.in_(payment_ids), Payment.lease_token == lease)
                    .order_by(Payment.next_check_at, Payment.id)
                )
            )
        held = {payment.id for payment in payments}
        for payment_id in payment_ids:
            if payment_id not in held:
                done(_lease_lost(payment_id), "unknown")
        to_ask: dict[tuple[str, str], list[tuple[Payment, Provider]]] = {}
        for payment in payments:
            with bound(payment_id=payment.id, provider=payment.provider):
                ready = _before_asking(services, payment, schedule, lease, spent)
            if isinstance(ready, Check):
                done(ready, payment.provider)
            else:
                to_ask.setdefault((payment.provider, payment.account), []).append((payment, ready))
        asking: list[tuple[Payment, Provider]] = []
        for (name, account), group in to_ask.items():
            limit = _call_limit(services, group[0][1])
            granted = len(group)
            if limit:
                granted = rate_limit.take_many(
                    services.db, name, limit[0], limit[1], utcnow(), len(group), account=account
                )
            asking.extend(group[:granted])
            if granted < len(group):
                spent.add((name, account))
                for payment, provider in group[granted:]:
                    done(_budget_spent(payment.id, provider, limit), name)
        _ask_and_write(services, asking, schedule, lease, out_of_time, done)
    finally:
        # Whatever the batch did not finish goes back to the queue at once, not in 5 minutes.
        _release(services, payment_ids, lease)
    return report


def _before_asking(
    services: Services,
    payment: Payment,
    schedule: Schedule,
    lease: str,
    spent: set[tuple[str, str]],
) -> Provider | Check:
    """The adapter to ask about a claimed payment with, or the check that needs no question."""
    now = utcnow()
    payment_id = payment.id
    if (payment.provider, payment.account) in spent:
        return Check(payment_id, "budget", f"{payment.provider} call budget is spent")
    try:
        return _adapter_to_ask(services, payment, schedule, now, lease)
    except Exception as exc:
        return _failed(services, payment_id, schedule, now, exc, lease)


def _budget_spent(payment_id: str, provider: Provider, limit: tuple[int, str] | None) -> Check:
    whose = provider.name
    if provider.account != DEFAULT_ACCOUNT:
        whose += f"/{provider.account}"
    assert limit is not None
    return Check(payment_id, "budget", f"{whose} call budget of {limit[0]} a {limit[1]} is spent")


def _ask_and_write(
    services: Services,
    asking: list[tuple[Payment, Provider]],
    schedule: Schedule,
    lease: str,
    out_of_time: Callable[[], bool],
    done: Callable[[Check, str], None],
) -> None:
    """The status queries on a bounded pool of threads; the answers written by this thread in
    the order they arrive, each write taking every answer that is ready."""
    if not asking:
        return
    bound_ = _call_bound(services)

    def ask(payment: Payment, provider: Provider) -> _Asked | Check:
        with bound(payment_id=payment.id, provider=payment.provider, order_id=payment.order_id):
            if out_of_time():
                return Check(payment.id, "deferred", "the pass is out of time")
            now = utcnow()
            if payment.leased_until is None or payment.leased_until - now < bound_:
                # The answer might come after the lease ends and another pass has asked too.
                return Check(payment.id, "deferred", "too little of the lease left to ask")
            asked = _Asked(payment, provider, now)
            try:
                asked.snapshot = provider.fetch_status(
                    PaymentRef(payment.order_id, payment.provider_payment_id)
                )
            except Exception as exc:
                asked.error = exc
            return asked

    workers = min(services.settings.reconcile_concurrency, len(asking))
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="reconcile") as pool,
        services.db.engine.connect() as connection,
        # One connection for the batch's writes: no pool checkout (and ping) per write.
        services.db.sessions(bind=connection) as session,
    ):
        pending = {pool.submit(ask, payment, provider) for payment, provider in asking}
        while pending:
            ready, pending = wait(pending, return_when=FIRST_COMPLETED)
            # A moment more for answers on their way: a write of many costs about one of one.
            gathering = time.monotonic() + WRITE_GATHER_SECONDS
            while pending and len(ready) < WRITE_GROUP and time.monotonic() < gathering:
                more, pending = wait(
                    pending,
                    timeout=max(0.0, gathering - time.monotonic()),
                    return_when=FIRST_COMPLETED,
                )
                ready |= more
            answers: list[_Asked] = []
            for future in ready:
                outcome = future.result()
                if isinstance(outcome, Check):
                    done(outcome, "unknown")
                else:
                    answers.append(outcome)
            answers.sort(key=lambda asked: asked.now)
            for asked, check in _write_answers(services, session, answers, schedule, lease):
                done(check, asked.provider.name)


def _write_answers(
    services: Services,
    session: Session,
    answers: list[_Asked],
    schedule: Schedule,
    lease: str,
) -> list[tuple[_Asked, Check]]:
    """Apply answers to the payments as read for the batch, in one transaction: one statement
    locks those whose lease is still this batch's own and not run out, with their versions.
    An answer that tells nothing new (`unchanged`) needs no transition: its check is recorded
    with the others in one statement. Any other answer goes through the state machine, each
    UPDATE a compare-and-set on the version. A payment whose version moved since it was read (a
    callback), or a group whose write fails, is applied on its own instead, from the payment as
    it is now."""
    fast = {
        asked.payment.id: asked
        for asked in answers
        if asked.snapshot is not None and _lease_left(asked.payment)
    }
    results: dict[str, Check] = {}
    if fast:
        try:
            with session.begin():
                # The leases still this batch's own, locked until the answers are written.
                # Core, not the ORM: these rows are only compared, never loaded as payments.
                held = (
                    session.connection()
                    .execute(
                        select(Payment.id, Payment.version)
                        .where(
                            Payment.id.in_(list(fast)),
                            Payment.lease_token == lease,
                            Payment.leased_until > utcnow(),
                        )
                        .with_for_update()
                    )
                    .all()
                )
                unchanged: list[dict[str, object]] = []
                for payment_id, version in held:
                    asked = fast[payment_id]
                    assert asked.snapshot is not None
                    if version != asked.payment.version:
                        continue
                    summary = _nothing_new(
                        asked.payment, asked.provider, asked.snapshot, schedule, asked.now
                    )
                    if summary is not None:
                        unchanged.append(
                            {
                                "b_id": payment_id,
                                "b_version": version,
                                "b_lease": lease,
                                "b_now": asked.now,
                                "b_next": schedule.next_check_at(asked.payment, asked.now),
                            }
                        )
                        results[payment_id] = Check(payment_id, "unchanged", summary)
                        continue
                    session.add(asked.payment)
                    results[payment_id] = _apply(
                        session,
                        asked.payment,
                        asked.provider,
                        asked.snapshot,
                        schedule,
                        asked.now,
                    )
                if unchanged:
                    written = session.connection().execute(_RECORD_UNCHANGED, unchanged)
                    if written.rowcount != len(unchanged):
                        raise ConcurrentUpdate("a payment changed while its check was written")
                for payment_id in set(fast) - {payment_id for payment_id, _ in held}:
                    results[payment_id] = _lease_lost(payment_id)
        except Exception as exc:
            results.clear()
            log.debug("reconciliation: a batch write fell back to one at a time: %s", exc)
    out = []
    for asked in answers:
        check = results.get(asked.payment.id)
        if check is None:
            with bound(payment_id=asked.payment.id, provider=asked.provider.name):
                check = _write_one(services, asked, schedule, lease)
        out.append((asked, check))
    return out


# A check whose answer told nothing new, recorded as `_apply` records it (the next check, the
# lease ended, a new version), for many payments in one statement.
_RECORD_UNCHANGED = (
    update(Payment)
    .where(
        Payment.id == bindparam("b_id"),
        Payment.version == bindparam("b_version"),
        Payment.lease_token == bindparam("b_lease"),
    )
    .values(
        checks=Payment.checks + 1,
        poll_failures=0,
        last_check_error=None,
        last_checked_at=bindparam("b_now"),
        lease_token=None,
        leased_until=None,
        next_check_at=bindparam("b_next"),
        version=Payment.version + 1,
    )
)


def _nothing_new(
    payment: Payment, provider: Provider, snapshot: Snapshot, schedule: Schedule, now: datetime
) -> str | None:
    """The summary of an answer that changes nothing on the payment, as the state machine
    judges it (no event, no anomaly, no expiry due); None for any other answer."""
    decision = provider.decide(snapshot, payment, now)
    change = judge(payment, snapshot, decision, EventSource.POLL)
    if change.verdict is not Verdict.DUPLICATE or change.findings:
        return None
    if _past_deadline_unpaid(payment, decision.state, change.verdict, schedule, now):
        return None
    return change.summary


def _past_deadline_unpaid(
    payment: Payment,
    reported: PaymentStatus | None,
    verdict: Verdict,
    schedule: Schedule,
    now: datetime,
) -> bool:
    """Whether our clock expires the payment: only an answer that says unpaid lets it decide;
    an unknown status, a refused `paid` or an answer about another payment is for review."""
    deadline = schedule.deadline(payment)
    return bool(
        reported is PaymentStatus.PENDING
        and verdict is not Verdict.REFUSE
        and payment.status is PaymentStatus.PENDING
        and deadline
        and now >= deadline
    )


def _lease_left(payment: Payment) -> bool:
    return payment.leased_until is not None and payment.leased_until > utcnow()


def _write_one(services: Services, asked: _Asked, schedule: Schedule, lease: str) -> Check:
    payment_id = asked.payment.id
    if not _lease_left(asked.payment):
        return Check(payment_id, "busy", "the lease ran out before the answer: it is not applied")
    try:
        if asked.error is not None:
            if isinstance(asked.error, ProviderError):
                error = str(asked.error)
            else:
                error = describe_error(asked.error)
                log.warning("reconciliation: payment %s failed: %s", payment_id, error)
            _record_failure(services, payment_id, schedule, asked.now, error, lease)
            return Check(payment_id, "failed", error)
        assert asked.snapshot is not None
        return _apply_answer(
            services, asked.provider, payment_id, asked.snapshot, schedule, asked.now, lease
        )
    except Exception as exc:
        return _failed(services, payment_id, schedule, asked.now, exc, lease)


def check_payment(
    services: Services,
    payment_id: str,
    *,
    now: datetime | None = None,
    force: bool = False,
    lease: str | None = None,
    requested_by: str | None = None,
) -> Check:
    """Ask the provider about one payment and apply the answer, at the check's own time.

    A pass hands in the token of its claim. Without one the check leases the payment itself:
    only when it is due, or with `force` whatever its schedule says (the API's reconcile and
    `ipn reconcile --payment`); a payment another check holds is left to it. A final payment
    (settled, watch over) is never asked. A failure of any kind is recorded on the payment
    (`poll_failures`, `last_check_error`) and returned as a `failed` check, so one bad answer
    cannot stop a pass; only an error that stops even that record is raised.

    With `requested_by` (an operator asking from the console), the timeline also gets a line
    saying who asked and what came of it, whatever the check changed."""
    with bound(payment_id=payment_id):
        return _check_payment(services, payment_id, now, force, lease, requested_by)


def _check_payment(
    services: Services,
    payment_id: str,
    now: datetime | None,
    force: bool,
    lease: str | None,
    requested_by: str | None,
) -> Check:
    now = now or utcnow()
    if requested_by is not None:
        check = check_payment(services, payment_id, now=now, force=force, lease=lease)
        _record_request(services, payment_id, requested_by, check, now)
        return check
    if lease is None:
        taken = _lease_one(services, payment_id, now, force)
        if isinstance(taken, Check):
            return taken
        lease = taken
    schedule = Schedule.from_settings(services.settings)
    try:
        return _check(services, payment_id, schedule, now, lease)
    except Exception as exc:
        return _failed(services, payment_id, schedule, now, exc, lease)
    finally:
        _release(services, [payment_id], lease)


def _failed(
    services: Services,
    payment_id: str,
    schedule: Schedule,
    now: datetime,
    exc: BaseException,
    lease: str,
) -> Check:
    """A check that went wrong for a reason of its own: logged, kept on the payment, and
    scheduled again like a provider error, so the pass goes on."""
    error = describe_error(exc)
    log.warning("reconciliation: payment %s failed: %s", payment_id, error)
    _record_failure(services, payment_id, schedule, now, error, lease)
    return Check(payment_id, "failed", error)


def _adapter_to_ask(
    services: Services, payment: Payment, schedule: Schedule, now: datetime, lease: str
) -> Provider | Check:
    """The adapter of the payment's account, or the check that ends without a question: final
    for good, an account or provider not configured, or a provider without a status API (our
    clock alone settles it)."""
    if payment.status.is_terminal and schedule.next_check_at(payment, now) is None:
        _reschedule(services, payment.id, None)
        return Check(payment.id, "final", f"final: {payment.status.value}")
    try:
        provider = services.provider(payment.provider, payment.account)
    except UnknownAccount as exc:
        _reschedule(services, payment.id, now + timedelta(hours=1))
        return Check(payment.id, "skipped", str(exc))
    if not provider.configured:
        _reschedule(services, payment.id, now + timedelta(hours=1))
        return Check(payment.id, "skipped", f"{provider.name} is not configured")
    if not provider.has_status_api:
        return _settle_by_clock(services, payment, schedule, now, lease)
    return provider


def _check(
    services: Services, payment_id: str, schedule: Schedule, now: datetime, lease: str
) -> Check:
    with services.db.sessions() as session:
        payment = session.get(Payment, payment_id)
    if payment is None:
        return Check(payment_id, "failed", "no such payment")
    bind(provider=payment.provider, order_id=payment.order_id)
    if payment.lease_token != lease:
        return _lease_lost(payment_id)
    provider = _adapter_to_ask(services, payment, schedule, now, lease)
    if isinstance(provider, Check):
        return provider
    if payment.leased_until is None or payment.leased_until - now < _call_bound(services):
        # The answer might come after the lease ends and another pass has asked too.
        return Check(payment_id, "deferred", "too little of the lease left to ask")
    limit = provider.settings.poll_limit or services.settings.poll_limits.get(provider.name)
    if limit and not rate_limit.take(
        services.db, provider.name, limit[0], limit[1], now, account=provider.account
    ):
        whose = provider.name
        if provider.account != DEFAULT_ACCOUNT:
            whose += f"/{provider.account}"
        return Check(
            payment_id, "budget", f"{whose} call budget of {limit[0]} a {limit[1]} is spent"
        )
    try:
        snapshot = provider.fetch_status(PaymentRef(payment.order_id, payment.provider_payment_id))
    except ProviderError as exc:
        _record_failure(services, payment_id, schedule, now, str(exc), lease)
        return Check(payment_id, "failed", str(exc))
    return _apply_answer(services, provider, payment_id, snapshot, schedule, now, lease)


def _record_request(
    services: Services, payment_id: str, requested_by: str, check: Check, now: datetime
) -> None:
    """A timeline line for an operator's check: who asked, and the check's outcome. It changes
    nothing (from and to are the payment's status), so it carries no merchant event."""
    with services.db.transaction() as session:
        payment = session.get(Payment, payment_id)
        if payment is None:
            return
        record_note(
            session,
            payment,
            Evidence(EventSource.OPERATOR, "operator"),
            f"reconcile asked by {requested_by}: {check.outcome}: {check.message}"[:ERROR_LIMIT],
            now,
            {"requested_by": requested_by, "outcome": check.outcome},
        )


def _lease_one(services: Services, payment_id: str, now: datetime, force: bool) -> str | Check:
    """Lease one payment for a check of its own: its token, or why it cannot be checked now."""
    token = secrets.token_hex(16)
    statement = (
        update(Payment)
        .where(Payment.id == payment_id)
        .where(or_(Payment.leased_until.is_(None), Payment.leased_until <= now))
        .values(lease_token=token, leased_until=now + lease_length(services))
        .execution_options(synchronize_session=False)
    )
    if not force:
        statement = statement.where(Payment.next_check_at <= now)
    with services.db.transaction() as session:
        if session.execute(statement).rowcount == 1:  # type: ignore[attr-defined]
            return token
        payment = session.get(Payment, payment_id)
    if payment is None:
        return Check(payment_id, "failed", "no such payment")
    if payment.leased_until is not None and payment.leased_until > now:
        return Check(payment_id, "busy", "another check is asking about it now")
    if payment.next_check_at is None:
        return Check(payment_id, "final", f"final: {payment.status.value}")
    return Check(payment_id, "skipped", f"not due until {payment.next_check_at.isoformat()}")


def _lease_lost(payment_id: str) -> Check:
    return Check(payment_id, "busy", "the lease passed to another check: its answer is not applied")


def _call_bound(services: Services) -> timedelta:
    """How long one provider call can take at most: its deadline and one last socket wait."""
    http = services.settings.http
    return timedelta(seconds=http.total_timeout + http.read_timeout)


def describe_error(exc: BaseException) -> str:
    """An error in a line: a database error's own words, without the statement and parameters
    SQLAlchemy adds (they may hold a payment's callback token)."""
    cause = exc.orig if isinstance(exc, StatementError) and exc.orig is not None else exc
    words = " ".join(str(cause).split())
    text = f"{type(cause).__name__}: {words}" if words else type(cause).__name__
    return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 1] + "…"


def _apply_answer(
    services: Services,
    provider: Provider,
    payment_id: str,
    snapshot: Snapshot,
    schedule: Schedule,
    now: datetime,
    lease: str,
) -> Check:
    for _ in range(CAS_ATTEMPTS):
        try:
            with services.db.transaction() as session:
                payment = session.get(Payment, payment_id, with_for_update=True)
                assert payment is not None
                if payment.lease_token != lease:
                    return _lease_lost(payment_id)
                return _apply(session, payment, provider, snapshot, schedule, now)
        except StaleDataError:
            continue
    raise ConcurrentUpdate(f"payment {payment_id}: gave up after {CAS_ATTEMPTS} races")


def _apply(
    session: Session,
    payment: Payment,
    provider: Provider,
    snapshot: Snapshot,
    schedule: Schedule,
    now: datetime,
) -> Check:
    """Apply one answer to a payment whose lease the caller holds, in the caller's transaction;
    the lease ends with the same write."""
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
    payment.last_check_error = None
    payment.last_checked_at = now
    payment.lease_token = None
    payment.leased_until = None
    if _past_deadline_unpaid(payment, applied.reported, applied.verdict, schedule, now):
        deadline = schedule.deadline(payment)
        assert deadline is not None
        _expire(
            session,
            payment,
            now,
            f"past the deadline {deadline.isoformat()} and {provider.name} "
            f"still says {snapshot.provider_status}: expired by our clock",
            schedule,
        )
        return Check(payment.id, "expired", "expired by our clock")
    payment.next_check_at = schedule.next_check_at(payment, now)
    return Check(payment.id, "changed" if applied.changed else "unchanged", applied.summary)


def _settle_by_clock(
    services: Services, payment: Payment, schedule: Schedule, now: datetime, lease: str
) -> Check:
    """No status API: the only question is whether the deadline has passed."""
    deadline = schedule.deadline(payment)
    if payment.status.is_terminal or deadline is None or now < deadline:
        _reschedule(services, payment.id, schedule.next_check_at(payment, now))
        return Check(payment.id, "unchanged", "nothing to ask; waiting for callbacks")
    with services.db.transaction() as session:
        locked = session.get(Payment, payment.id, with_for_update=True)
        assert locked is not None
        if locked.lease_token != lease:
            return _lease_lost(payment.id)
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


def _release(services: Services, payment_ids: list[str], lease: str) -> None:
    """End a lease, only where it is still this one (another check may hold it by now)."""
    with services.db.engine.begin() as connection:
        connection.execute(
            update(Payment)
            .where(Payment.id.in_(payment_ids), Payment.lease_token == lease)
            .values(lease_token=None, leased_until=None)
        )


def _record_failure(
    services: Services,
    payment_id: str,
    schedule: Schedule,
    now: datetime,
    error: str,
    lease: str,
) -> None:
    """No usable answer: nothing changes but the count of failures, the error and a later next
    check; and nothing at all once the lease has passed to another check."""
    with services.db.transaction() as session:
        payment = session.get(Payment, payment_id, with_for_update=True)
        if payment is None or payment.lease_token != lease:
            return
        payment.poll_failures += 1
        payment.checks += 1
        payment.last_checked_at = now
        payment.last_check_error = error
        payment.next_check_at = schedule.after_failure(payment, now)
