"""What a worker does with one stored notification: authenticate it, ask the provider, apply the
answer, and settle the inbox row in the same transaction as the payment's change."""

from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from traceback import format_exception
from typing import TypeVar

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    StatementError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from ipn import applying
from ipn.anomalies import open_anomaly
from ipn.config import DEFAULT_ACCOUNT
from ipn.db import fetch_rows
from ipn.errors import (
    ConcurrentUpdate,
    ForgedCallback,
    MalformedCallback,
    ProviderRejected,
    ProviderUnavailable,
    UnknownAccount,
)
from ipn.events import outbox
from ipn.inbox import TRACEBACK_LIMIT, settle, settled_values, storable
from ipn.logs import bind, bound
from ipn.metrics import CALLBACKS_VERIFIED, RETRIES, observe_settled
from ipn.polling import Schedule
from ipn.providers.base import Authenticity, Callback, PaymentRef, Provider, Snapshot
from ipn.providers.bitcoinpaygate import anomaly_key
from ipn.services import Services
from ipn.transitions import Change, Evidence, apply_snapshot, judge, read_payment
from models import (
    AnomalyKind,
    EventSource,
    Notification,
    NotificationKind,
    NotificationReplay,
    NotificationStatus,
    Payment,
    PaymentStatus,
    ReplayMode,
    utcnow,
)

log = logging.getLogger(__name__)

S = NotificationStatus
T = TypeVar("T")

# Failures that say nothing about the notification itself: try again later. Anything else is
# permanent: the same row would fail the same way again.
TRANSIENT = (
    ProviderUnavailable,
    OperationalError,
    InterfaceError,
    PoolTimeout,
    ConcurrentUpdate,
)
CAS_ATTEMPTS = 5


@dataclass(frozen=True)
class Claim:
    """The parts of an inbox row a worker needs, read under its lock when the attempt began."""

    id: int
    provider: str
    kind: str
    body: bytes
    headers: dict[str, str]
    remote_addr: str | None
    replay_mode: ReplayMode | None
    attempts: int
    # Who asked for the replay being run, for the payment's timeline.
    replayed_by: str | None = None
    account: str = "default"
    # When it arrived: a replaced secret verifies what came while it was still valid.
    received_at: datetime | None = None
    # Which of the account's secrets verified it, once read; kept on the row as it settles.
    verified_by: str | None = None


@dataclass(frozen=True)
class Outcome:
    status: NotificationStatus | None  # None: nothing done (already settled, or no such row)
    message: str
    payment_id: str | None = None


def run(services: Services, notification_id: int, retries_so_far: int) -> tuple[str, int | None]:
    """Process once, as a task would: (what happened, seconds until a retry or None).

    Nothing escapes: a transient failure is retried (finitely), anything else settles the row
    `failed` with its error and traceback.
    """
    with bound(notification_id=notification_id):
        return _run(services, notification_id, retries_so_far)


def _run(services: Services, notification_id: int, retries_so_far: int) -> tuple[str, int | None]:
    settings = services.settings
    try:
        # Not the public entry point: the context it binds must stay for the lines below.
        outcome = _process_notification(services, notification_id)
    except Exception as exc:
        if not is_transient(exc):
            # Raised before the row was claimed (or while settling it): settle it here.
            failure = Failure.of(exc)
            log.error("notification %s: %s", notification_id, failure.error)
            fail(services, notification_id, failure)
            return f"failed: {failure.error}", None
        failure = Failure.of(exc)
        if retries_so_far >= settings.task_max_retries:
            give_up(services, notification_id, failure)
            return f"failed after {retries_so_far + 1} attempts: {failure.error}", None
        countdown = backoff(retries_so_far, settings.task_retry_backoff_max)
        postpone(services, notification_id, failure, countdown)
        RETRIES.inc()
        log.warning(
            "notification %s: %s; retrying in %ss", notification_id, failure.error, countdown
        )
        return f"retrying: {failure.error}", countdown
    log.info("notification %s: %s", notification_id, outcome.message)
    return outcome.message, None


def process_notification(
    services: Services, notification_id: int, *, now: datetime | None = None
) -> Outcome:
    """Take one `received` row to its final status. Safe to run any number of times, at once."""
    with bound(notification_id=notification_id):
        return _process_notification(services, notification_id, now=now)


def _process_notification(
    services: Services, notification_id: int, *, now: datetime | None = None
) -> Outcome:
    now = now or utcnow()
    claim = _claim(services, notification_id, now)
    if claim is None:
        return Outcome(None, "nothing to do: already settled or no such notification")
    try:
        return _process(services, claim, now)
    except Exception as exc:
        if is_transient(exc):
            raise
        # Permanent (bad data, an overflow, a bug): retrying gives the same answer, so the row
        # is settled now with what went wrong, instead of waiting for the sweeper to bury it.
        failure = Failure.of(exc)
        log.error("notification %s: %s", claim.id, failure.error)
        return _settle(
            services,
            claim,
            S.FAILED,
            f"permanent error: {failure.error}",
            error=failure.error,
            traceback=failure.traceback,
        )


def _process(services: Services, claim: Claim, now: datetime) -> Outcome:
    if claim.provider not in services.providers:
        return _settle(services, claim, S.IGNORED, f"no provider named {claim.provider!r}")
    try:
        provider = services.provider(claim.provider, claim.account)
    except UnknownAccount as exc:
        return _settle(services, claim, S.IGNORED, f"{exc}; replay once it is configured")
    if not provider.configured:
        return _settle(
            services, claim, S.IGNORED, f"{provider.name} is not configured; replay once it is"
        )
    problem = _outside_allowlist(provider, claim)
    if problem:
        return _settle(services, claim, S.REJECTED, problem, error=problem)
    try:
        callback = provider.read_callback(
            claim.kind, claim.body, claim.headers, received_at=claim.received_at
        )
    except MalformedCallback as exc:
        return _settle(services, claim, S.REJECTED, f"malformed: {exc}", error=f"malformed: {exc}")
    except ForgedCallback as exc:
        return _settle(services, claim, S.REJECTED, f"forged: {exc}", error=f"forged: {exc}")
    if callback.verified_by is not None:
        secret = "current" if callback.verified_by == "current" else "previous"
        CALLBACKS_VERIFIED.labels(provider.name, provider.account, secret).inc()
        claim = replace(claim, verified_by=callback.verified_by)
    if not callback.handled:
        return _settle(services, claim, S.IGNORED, callback.reason)

    with services.db.reading_connection() as connection:
        known = read_payment(connection, provider.name, callback.ref, account=provider.account)
    if known is not None:
        bind(payment_id=known.id, order_id=known.order_id)
    else:
        bind(order_id=callback.ref.order_id)
    if known is not None and not provider.token_matches(callback, known.callback_token):
        reason = "forged: the per-payment token does not match the payment's"
        return _settle(services, claim, S.REJECTED, reason, error=reason, payment_id=known.id)

    if claim.kind == NotificationKind.ANOMALY:
        return _record_anomaly_report(services, claim, callback, known)

    try:
        snapshot, evidence, may_adopt = _evidence(provider, claim, callback, known)
    except ProviderRejected as exc:
        failure = Failure.of(exc)
        return _settle(
            services,
            claim,
            S.FAILED,
            f"provider refused: {exc}",
            error=failure.error,
            traceback=failure.traceback,
            payment_id=known.id if known else None,
        )
    if snapshot is None:
        reason = f"{callback.authenticity} callback and no status API to confirm it: not applied"
        return _settle(services, claim, S.REJECTED, reason, error=reason)

    earlier = _paid_before(provider, callback, snapshot, known, now)
    # The payment as read before the status query, taken into the first attempt as it is: its
    # version is the compare-and-set of the UPDATE, so it is not read again. An attempt after a
    # lost race reads it afresh, under lock.
    held = [known]

    def apply(session: Session) -> Outcome:
        schedule = Schedule.from_settings(services.settings)
        first = held.pop() if held else None
        held.clear()
        if first is not None and earlier is None:
            change = judge(first, snapshot, provider.decide(snapshot, first, now), evidence.source)
            if applying.applies(session, change):
                return _write_and_settle(
                    session, claim, first, change, evidence, now, schedule, snapshot=snapshot
                )
        payment = session.merge(first, load=False) if first is not None else None
        if earlier is not None:
            # The provider signed that it was paid; its answer now says what followed.
            apply_snapshot(
                session,
                provider,
                earlier,
                Evidence(evidence.source, f"verified {claim.kind} #{claim.id}", claim.id),
                now=now,
                payment=payment,
                ref=callback.ref,
                may_adopt=may_adopt,
                schedule=schedule,
            )
        applied = apply_snapshot(
            session,
            provider,
            snapshot,
            evidence,
            now=now,
            payment=payment,
            ref=callback.ref,
            may_adopt=may_adopt,
            schedule=schedule,
        )
        if applied is None:
            message = "no such payment here and nothing verified to adopt it from"
            _settle_in(session, claim, S.FAILED, message, error=message)
            return Outcome(S.FAILED, message)
        _settle_in(session, claim, S.PROCESSED, applied.summary, payment_id=applied.payment.id)
        return Outcome(S.PROCESSED, applied.summary, applied.payment.id)

    return _in_transaction(services, apply)


def _write_and_settle(
    session: Session,
    claim: Claim,
    payment: Payment,
    change: Change,
    evidence: Evidence,
    now: datetime,
    schedule: Schedule,
    *,
    snapshot: Snapshot,
) -> Outcome:
    """The common case in one statement (ipn.applying); a lost race is retried like the ORM
    writer's, from a fresh read under lock."""
    summary = change.outcome
    written = applying.write_and_settle(
        session,
        payment,
        change,
        evidence,
        now,
        settled_values(
            S.PROCESSED, outcome=summary, payment_id=payment.id, verified_by=claim.verified_by
        ),
        snapshot=snapshot,
        schedule=schedule,
    )
    if not written.moved:
        raise StaleDataError(f"payment {payment.id} changed underneath")
    if written.received_at is None:
        raise _SettledElsewhere
    observe_settled(session, claim.provider, S.PROCESSED, written.received_at, summary)
    outbox.remember(session, written.deliveries)
    return Outcome(S.PROCESSED, summary, payment.id)


@dataclass(frozen=True)
class Failure:
    """One failed attempt as the row keeps it: `Type: message`, and the traceback."""

    error: str
    traceback: str

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        # A long traceback keeps its end: the frames nearest the error, and the error itself.
        return cls(describe(exc), "".join(format_exception(exc))[-TRACEBACK_LIMIT:])


def give_up(services: Services, notification_id: int, failure: Failure) -> None:
    """Retries are spent: the row is `failed` with its last error, for an operator to replay."""
    with services.db.transaction() as session:
        settle(
            session,
            notification_id,
            S.FAILED,
            outcome="gave up after retries",
            error=failure.error,
            traceback=failure.traceback,
        )


def fail(services: Services, notification_id: int, failure: Failure) -> None:
    """Settle the row `failed` at once; if even that cannot be done, the sweeper finds it."""
    try:
        with services.db.transaction() as session:
            settle(
                session,
                notification_id,
                S.FAILED,
                outcome=f"permanent error: {failure.error}",
                error=failure.error,
                traceback=failure.traceback,
            )
    except Exception as exc:
        log.error(
            "notification %s: could not record the error (%s)", notification_id, describe(exc)
        )


def postpone(services: Services, notification_id: int, failure: Failure, countdown: int) -> None:
    """Keep the error on the row and keep the sweeper off it while a retry is scheduled."""
    retry_at = utcnow() + timedelta(seconds=countdown) + services.settings.sweep_after
    try:
        with services.db.transaction() as session:
            session.execute(
                update(Notification)
                .where(Notification.id == notification_id, Notification.status == S.RECEIVED)
                .values(
                    last_error=storable(failure.error),
                    last_traceback=storable(failure.traceback, TRACEBACK_LIMIT),
                    next_attempt_at=retry_at,
                )
            )
    except OperationalError:
        # The database is the thing failing: the retry (or the sweeper) will try again.
        log.warning("notification %s: could not record the error", notification_id)


def is_transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed: the provider or the database was unreachable,
    or a race was lost; not the notification's fault."""
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def backoff(retries_so_far: int, limit: int) -> int:
    """Exponential, with jitter so a burst of failures does not retry in lockstep."""
    base = min(limit, 5 * 2**retries_so_far)
    return max(1, int(base * random.uniform(0.75, 1.0)))


def describe(exc: BaseException) -> str:
    """`Type: message`; a database error without the SQL and parameters it carries."""
    name = type(exc).__name__
    if isinstance(exc, OperationalError):
        return f"{name}: database unavailable: {type(exc.orig).__name__}"
    if isinstance(exc, StatementError) and exc.orig is not None:
        orig = exc.orig
        return f"{name}: {type(orig).__name__}: {str(orig).strip() or 'no message'}"
    return f"{name}: {str(exc) or 'no message'}"


_LAST_REPLAY = (
    select(NotificationReplay.requested_by)
    .where(NotificationReplay.notification_id == Notification.id)
    .order_by(NotificationReplay.id.desc())
    .limit(1)
    .scalar_subquery()
)
# Built once, its values bound on each claim: building the statement costs more than running it.
_CLAIM = (
    update(Notification)
    .where(Notification.id == bindparam("claimed"), Notification.status == S.RECEIVED)
    .values(
        attempts=Notification.attempts + 1,
        last_attempt_at=bindparam("now", type_=Notification.last_attempt_at.type),
        next_attempt_at=bindparam("sweep_at", type_=Notification.next_attempt_at.type),
    )
    .returning(
        Notification.id,
        Notification.provider,
        Notification.kind,
        Notification.body,
        Notification.headers,
        Notification.remote_addr,
        Notification.replay_mode,
        Notification.attempts,
        _LAST_REPLAY,
        Notification.account,
        Notification.received_at,
        Notification.request_id,
        Notification.payment_id,
    )
)


def _claim(services: Services, notification_id: int, now: datetime) -> Claim | None:
    """Count the attempt and read what the worker needs, in one statement that commits by
    itself (one round trip on PostgreSQL): an attempt is counted even if the worker dies in it,
    so a row that kills workers still runs out of attempts."""
    params = {
        "claimed": notification_id,
        "now": now,
        "sweep_at": now + services.settings.sweep_after,
    }
    db = services.db
    if db.is_postgresql:
        with db.autocommit.connect() as connection:
            rows = fetch_rows(connection, _CLAIM, params)
    else:
        with db.engine.begin() as connection:
            rows = fetch_rows(connection, _CLAIM, params)
    if not rows:
        _bind_settled(services, notification_id)
        return None
    (id_, provider, kind, body, headers, remote_addr, replay_mode, attempts, replayed_by,
     account, received_at, request_id, payment_id) = rows[0]  # fmt: skip
    _bind_owner(request_id, provider, account, payment_id)
    return Claim(
        id_,
        provider,
        kind.value,
        body,
        dict(headers),
        remote_addr,
        replay_mode,
        attempts,
        replayed_by if replay_mode is not None else None,
        account,
        received_at,
    )


def _bind_settled(services: Services, notification_id: int) -> None:
    """A row already settled (a duplicate delivery): its lines still say whose it was."""
    with services.db.sessions() as session:
        row = session.execute(
            select(
                Notification.request_id,
                Notification.provider,
                Notification.account,
                Notification.payment_id,
            ).where(Notification.id == notification_id)
        ).one_or_none()
    if row is not None:
        _bind_owner(*row)


def _bind_owner(
    request_id: str | None, provider: str, account: str, payment_id: str | None
) -> None:
    """The row's request, provider, named account and payment on every line logged for it."""
    bind(
        request_id=request_id,
        provider=provider,
        account=None if account == DEFAULT_ACCOUNT else account,
        payment_id=payment_id,
    )


def _evidence(
    provider: Provider, claim: Claim, callback: Callback, known: Payment | None
) -> tuple[Snapshot | None, Evidence, bool]:
    """What to apply and why: the provider's answer where it has a status API, else the
    verified callback itself. The flag says whether an unknown payment may be adopted."""
    replay = claim.replay_mode is not None
    source = EventSource.REPLAY if replay else EventSource.CALLBACK
    origin = f"{'replay of ' if replay else ''}{claim.kind} #{claim.id}"
    if replay and claim.replayed_by:
        origin += f" by {claim.replayed_by}"
    verified = callback.authenticity is Authenticity.VERIFIED
    own = callback.snapshot
    stale = (
        verified
        and own is not None
        and own.as_of is not None
        and known is not None
        and known.snapshot_at is not None
        and own.as_of < known.snapshot_at
    )
    if provider.has_status_api and not (stale and claim.replay_mode is not ReplayMode.REFETCH):
        ref = callback.ref
        if known is not None:
            ref = PaymentRef(known.order_id, known.provider_payment_id or ref.provider_payment_id)
        answer = provider.fetch_status(ref)
        return answer, Evidence(source, f"status query after {origin}", claim.id), True
    if own is not None and verified:
        how = "stale" if stale else "verified"
        return own, Evidence(source, f"{how} {origin}", claim.id), True
    return None, Evidence(source, origin, claim.id), False


@dataclass(frozen=True)
class _HeldAsPaid:
    """The payment as it would stand had the provider's signed `paid` been applied first."""

    status: PaymentStatus
    created_at: datetime
    amount: Decimal | None
    currency: str | None
    pay_amount: Decimal | None
    paid_amount: Decimal | None


def _paid_before(
    provider: Provider,
    callback: Callback,
    answer: Snapshot,
    known: Payment | None,
    now: datetime,
) -> Snapshot | None:
    """The callback's own verified `paid`, when the provider's later answer only makes sense
    after it (paid, then refunded before the worker ran): it is applied first."""
    own = callback.snapshot
    if (
        own is None
        or own is answer
        or callback.authenticity is not Authenticity.VERIFIED
        or (known is not None and known.status is not PaymentStatus.PENDING)
        or provider.decide(own, known, now).state is not PaymentStatus.PAID
    ):
        return None
    held = _HeldAsPaid(
        PaymentStatus.PAID,
        known.created_at if known else now,
        known.amount if known else own.amount,
        known.currency if known else own.currency,
        known.pay_amount if known else own.pay_amount,
        own.paid_amount if own.paid_amount is not None else known.paid_amount if known else None,
    )
    if provider.decide(answer, held, now).state is not PaymentStatus.REFUNDED:
        return None
    return own


def _record_anomaly_report(
    services: Services, claim: Claim, callback: Callback, known: Payment | None
) -> Outcome:
    """A provider's report of unexpected funds: kept for review, never a state change."""
    verified = callback.authenticity is Authenticity.VERIFIED
    key = anomaly_key(callback.fields, claim.body)
    provider_name = claim.provider

    def record(session: Session) -> Outcome:
        anomaly_id = open_anomaly(
            session,
            AnomalyKind.UNEXPECTED_FUNDS,
            key,
            {
                "detail": _anomaly_report_detail(provider_name, callback, verified),
                "report": dict(callback.fields),
                "verified": verified,
                "order_id": callback.ref.order_id,
                "provider_payment_id": callback.ref.provider_payment_id,
            },
            payment_id=known.id if known else None,
            notification_id=claim.id,
        )
        if anomaly_id is not None:
            payment = session.get(Payment, known.id) if known else None
            outbox.anomalies_opened(session, payment, [anomaly_id], utcnow())
        message = (
            f"anomaly #{anomaly_id} opened"
            if anomaly_id
            else "duplicate anomaly report: already recorded"
        )
        payment_id = known.id if known else None
        _settle_in(session, claim, S.PROCESSED, message, payment_id=payment_id)
        return Outcome(S.PROCESSED, message, payment_id)

    return _in_transaction(services, record)


def _anomaly_report_detail(provider: str, callback: Callback, verified: bool) -> str:
    fields = callback.fields
    amounts = ", ".join(
        f"{name} {fields[name]}"
        for name in ("paidBtc", "paidAmount", "fiatAmount", "currency")
        if fields.get(name) not in (None, "")
    )
    about = callback.ref.order_id or callback.ref.provider_payment_id or "an unknown payment"
    return (
        f"{provider} reported unexpected funds on {about}"
        f"{f' ({amounts})' if amounts else ''}; "
        f"{'signed' if verified else 'unsigned'} report, no change, for review"
    )


def _outside_allowlist(provider: Provider, claim: Claim) -> str | None:
    """Why the sender may not send this account's callbacks, if an allowlist is set."""
    allowed = provider.settings.allowed_ips
    if not allowed:
        return None
    try:
        address = ipaddress.ip_address(claim.remote_addr or "")
    except ValueError:
        return f"forged: sender address {claim.remote_addr!r} is not an IP address"
    if any(address in network for network in allowed):
        return None
    return f"forged: sender {address} is outside the {claim.provider} allowlist"


def _settle(
    services: Services,
    claim: Claim,
    status: NotificationStatus,
    outcome: str,
    *,
    error: str | None = None,
    traceback: str | None = None,
    payment_id: str | None = None,
) -> Outcome:
    with services.db.transaction() as session:
        if not settle(
            session,
            claim.id,
            status,
            outcome=outcome,
            error=error,
            traceback=traceback,
            payment_id=payment_id,
            verified_by=claim.verified_by,
        ):
            return Outcome(None, "settled meanwhile by another worker")
    return Outcome(status, outcome, payment_id)


def _settle_in(
    session: Session,
    claim: Claim,
    status: NotificationStatus,
    outcome: str,
    *,
    error: str | None = None,
    payment_id: str | None = None,
) -> None:
    if not settle(
        session,
        claim.id,
        status,
        outcome=outcome,
        error=error,
        payment_id=payment_id,
        verified_by=claim.verified_by,
    ):
        raise _SettledElsewhere


class _SettledElsewhere(Exception):
    """Another worker settled the row first: roll back this one's effect."""


def _in_transaction(services: Services, work: Callable[[Session], Outcome]) -> Outcome:
    """Run `work` in one transaction, again from the start when a compare-and-set or a unique
    key says another worker got there first."""
    for attempt in range(CAS_ATTEMPTS):
        try:
            with services.db.transaction() as session:
                return work(session)
        except _SettledElsewhere:
            return Outcome(None, "settled meanwhile by another worker")
        except (StaleDataError, IntegrityError) as exc:
            log.info("transaction lost a race (%s); attempt %s", type(exc).__name__, attempt + 1)
    raise ConcurrentUpdate(f"gave up after {CAS_ATTEMPTS} races")
