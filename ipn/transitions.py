"""The payment state machine: one pure decision about what a piece of evidence does to a payment,
and one writer that alone sets a payment's state, appends its timeline and opens its anomalies,
as a compare-and-set inside the caller's transaction."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Connection, bindparam, or_, select
from sqlalchemy.orm import Session, make_transient_to_detached

from ipn.anomalies import open_anomaly
from ipn.config import DEFAULT_ACCOUNT
from ipn.db import fetch_rows
from ipn.events import outbox
from ipn.polling import Schedule
from ipn.providers.base import Decision, PaymentRef, Provider, Snapshot
from models import (
    AnomalyKind,
    EventSource,
    Payment,
    PaymentEvent,
    PaymentStatus,
)

P = PaymentStatus

# Where each state may go. Everything else is backwards or out of a terminal state.
FORWARD: dict[PaymentStatus, frozenset[PaymentStatus]] = {
    P.PENDING: frozenset(
        {P.CONFIRMING, P.UNDERPAID, P.PAID, P.EXPIRED, P.FAILED, P.CANCELLED, P.REFUNDED}
    ),
    P.CONFIRMING: frozenset({P.UNDERPAID, P.PAID, P.EXPIRED, P.FAILED, P.CANCELLED, P.REFUNDED}),
    P.UNDERPAID: frozenset({P.CONFIRMING, P.PAID, P.EXPIRED, P.FAILED, P.CANCELLED, P.REFUNDED}),
    P.PAID: frozenset({P.REFUNDED}),
}
# States that say money arrived: reported after one of the UNPAID_ENDS, a late payment.
MONEY_SEEN = frozenset({P.CONFIRMING, P.UNDERPAID, P.PAID})
UNPAID_ENDS = frozenset({P.EXPIRED, P.CANCELLED, P.FAILED})


def can_move(current: PaymentStatus, target: PaymentStatus, *, expiry_inferred: bool) -> bool:
    if target in FORWARD.get(current, frozenset()):
        return True
    # The one way out of a terminal state: our own clock said expired, the provider says paid.
    return current is P.EXPIRED and expiry_inferred and target is P.PAID


class Verdict(enum.StrEnum):
    MOVE = "move"  # the payment goes to another state
    NOTE = "note"  # same state, recorded on the timeline
    REFUSE = "refuse"  # no change, an anomaly opened for review
    DUPLICATE = "duplicate"  # nothing new: no event at all


@dataclass(frozen=True)
class Finding:
    """An anomaly a change opens, keyed by the fact it is about so a repeat opens nothing."""

    kind: AnomalyKind
    key: str
    detail: str
    proof: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    """What one piece of evidence does to a payment, decided before anything is written."""

    verdict: Verdict
    before: PaymentStatus
    after: PaymentStatus
    summary: str
    findings: tuple[Finding, ...] = ()
    # Whether the snapshot's provider status, details and clock are recorded on the payment.
    takes_snapshot: bool = False
    # The money seen once this change is written; never less than before.
    paid_amount: Decimal | None = None
    expiry_inferred: bool = False

    @property
    def outcome(self) -> str:
        """What the written change says of itself on its inbox row: the move, or the note."""
        if self.verdict is Verdict.MOVE:
            return f"{self.before.value} -> {self.after.value}"
        return self.summary


class HeldPayment(Protocol):
    """What the decision reads of the payment as we hold it (a Payment row satisfies it)."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> PaymentStatus: ...
    @property
    def provider_status(self) -> str | None: ...
    @property
    def expiry_inferred(self) -> bool: ...
    @property
    def paid_amount(self) -> Decimal | None: ...
    @property
    def snapshot_at(self) -> datetime | None: ...
    @property
    def amount(self) -> Decimal | None: ...
    @property
    def currency(self) -> str | None: ...
    @property
    def order_id(self) -> str: ...
    @property
    def provider_payment_id(self) -> str | None: ...


@dataclass(frozen=True)
class Evidence:
    """Why a snapshot is being applied: the timeline's `source` and the words that explain it."""

    source: EventSource
    description: str
    notification_id: int | None = None


@dataclass
class Applied:
    payment: Payment
    changed: bool
    summary: str
    event: PaymentEvent | None = None
    anomaly_ids: list[int] = field(default_factory=list)
    # The state the provider's answer maps to (None: a status we do not know).
    reported: PaymentStatus | None = None
    # What was decided; a refusal already on record is still a refusal, with no event.
    verdict: Verdict = Verdict.DUPLICATE


# The decision -------------------------------------------------------------------------------


def judge(
    payment: HeldPayment, snapshot: Snapshot, decision: Decision, source: EventSource
) -> Change:
    """What the provider's snapshot, mapped to `decision` by its adapter, does to the payment.
    Pure: reads nothing but its arguments, writes nothing."""
    current = payment.status
    status_text = f"status {snapshot.provider_status}"

    mismatch = _reference_mismatch(payment, snapshot)
    if mismatch:
        key = f"reference_mismatch:{payment.id}:{snapshot.provider_payment_id}:{snapshot.order_id}"
        return _refuse(
            payment, Finding(AnomalyKind.REFERENCE_MISMATCH, key, mismatch, _proof(snapshot))
        )

    money = _more_money(payment.paid_amount, snapshot.paid_amount)
    news = snapshot.provider_status != payment.provider_status or money != payment.paid_amount

    older = decision.older or _older(payment, snapshot, decision.state)
    if older:
        if not news:
            return _nothing_new(payment, source, f"{status_text}: an older copy, no change")
        return _ignore(payment, f"{older}: {status_text} ignored")

    target = decision.state
    if target is None:
        key = f"unknown_status:{payment.id}:{snapshot.provider_status}"
        return _refuse(
            payment,
            Finding(
                AnomalyKind.UNKNOWN_STATUS,
                key,
                f"unknown {status_text}: no change, flagged for review",
                _proof(snapshot),
            ),
        )

    findings = tuple(
        _finding(payment, snapshot, AnomalyKind(kind), proof, decision.note)
        for kind, proof in decision.anomalies
    )
    note = f" ({decision.note})" if decision.note else ""

    if target is current:
        # The provider itself reports how it ended: no longer ours to overturn.
        inferred = payment.expiry_inferred and target not in UNPAID_ENDS
        if not news and inferred == payment.expiry_inferred:
            return _nothing_new(payment, source, f"already {current.value}")
        return Change(
            Verdict.NOTE,
            current,
            current,
            f"{status_text}{note}",
            findings,
            takes_snapshot=True,
            paid_amount=money,
            expiry_inferred=inferred,
        )

    if not can_move(current, target, expiry_inferred=payment.expiry_inferred):
        more = money is not None and money > (payment.paid_amount or 0)
        # Money on a payment already ended unpaid is late, whatever the provider calls it now:
        # still arriving, ended unpaid again, or already sent back (refunded).
        ended = target in UNPAID_ENDS or target is P.REFUNDED
        late = current in UNPAID_ENDS and (target in MONEY_SEEN or (ended and more))
        if late:
            key = f"late_payment:{payment.id}:{snapshot.provider_status}:{_plain(money)}"
            received = f" with {_plain(money)} received" if ended else ""
            detail = (
                f"{status_text} ({target.value}){received} after {current.value}: "
                "late payment, no change, flagged for review"
            )
            return replace(
                _refuse(
                    payment,
                    Finding(AnomalyKind.LATE_PAYMENT, key, detail, _proof(snapshot)),
                    money,
                ),
                # Money on an end is kept with the provider's status, so that its next copy is
                # nothing new; and an end the provider reports is no longer ours to overturn.
                takes_snapshot=ended,
                expiry_inferred=payment.expiry_inferred and not ended,
            )
        if current in UNPAID_ENDS and target in UNPAID_ENDS:
            # Another unpaid end from the provider itself: its word, not our clock, now ends
            # the payment, so a later `paid` is late money, not an overturn.
            if not news and not payment.expiry_inferred:
                return _nothing_new(payment, source, f"{status_text}: already {current.value}")
            return Change(
                Verdict.NOTE,
                current,
                current,
                f"{status_text} ({target.value}) after {current.value}: stays {current.value}",
                findings,
                takes_snapshot=True,
                paid_amount=money,
                expiry_inferred=False,
            )
        return _ignore(
            payment,
            f"{status_text} ({target.value}) would move {current.value} backwards: ignored",
            findings,
        )

    if target is P.PAID:
        problem = _amount_problem(payment, snapshot)
        if problem:
            key = f"amount_mismatch:{payment.id}:{snapshot.amount}:{snapshot.currency}"
            detail = f"{status_text} says paid, but {problem}: not marked paid"
            return _refuse(
                payment, Finding(AnomalyKind.AMOUNT_MISMATCH, key, detail, _proof(snapshot)), money
            )

    if current is P.EXPIRED:
        note += " (overturns the expiry we inferred from our own clock)"
    return Change(
        Verdict.MOVE,
        current,
        target,
        f"{status_text}{note}",
        findings,
        takes_snapshot=True,
        paid_amount=money,
        expiry_inferred=False,
    )


def judge_expiry(payment: HeldPayment, detail: str) -> Change:
    """Our clock says the deadline has passed with nothing paid: an open payment expires."""
    if payment.status.is_terminal:
        return Change(
            Verdict.DUPLICATE,
            payment.status,
            payment.status,
            f"already {payment.status.value}",
            paid_amount=payment.paid_amount,
            expiry_inferred=payment.expiry_inferred,
        )
    return Change(
        Verdict.MOVE,
        payment.status,
        P.EXPIRED,
        detail,
        paid_amount=payment.paid_amount,
        expiry_inferred=True,
    )


def _refuse(payment: HeldPayment, finding: Finding, money: Decimal | None = None) -> Change:
    return Change(
        Verdict.REFUSE,
        payment.status,
        payment.status,
        finding.detail,
        (finding,),
        paid_amount=payment.paid_amount if money is None else money,
        expiry_inferred=payment.expiry_inferred,
    )


def _ignore(payment: HeldPayment, summary: str, findings: tuple[Finding, ...] = ()) -> Change:
    return Change(
        Verdict.NOTE,
        payment.status,
        payment.status,
        summary,
        findings,
        paid_amount=payment.paid_amount,
        expiry_inferred=payment.expiry_inferred,
    )


def _nothing_new(payment: HeldPayment, source: EventSource, summary: str) -> Change:
    # A replay is recorded even when it changes nothing: an operator asked for it.
    if source is EventSource.REPLAY:
        return _ignore(payment, f"replayed: {summary}")
    return Change(
        Verdict.DUPLICATE,
        payment.status,
        payment.status,
        f"duplicate: {summary}",
        paid_amount=payment.paid_amount,
        expiry_inferred=payment.expiry_inferred,
    )


def _older(payment: HeldPayment, snapshot: Snapshot, reported: PaymentStatus | None) -> str | None:
    """Why the snapshot predates what the payment already holds, if it does."""
    if snapshot.as_of is not None and payment.snapshot_at is not None:
        if snapshot.as_of < payment.snapshot_at:
            return (
                f"stale snapshot as of {snapshot.as_of.isoformat()}, newer one applied as of "
                f"{payment.snapshot_at.isoformat()}"
            )
        return None
    # Without the provider's clock, money seen orders the snapshots: it never goes down while
    # a payment is open (a refund or a failure is reported by its own status, not by less).
    if (
        reported is not None
        and reported.is_open
        and snapshot.paid_amount is not None
        and payment.paid_amount is not None
        and snapshot.paid_amount < payment.paid_amount
    ):
        return (
            f"older snapshot: it shows {snapshot.paid_amount} paid, "
            f"{payment.paid_amount} was already seen"
        )
    return None


def _finding(
    payment: HeldPayment,
    snapshot: Snapshot,
    kind: AnomalyKind,
    proof: Mapping[str, Any],
    note: str,
) -> Finding:
    key = f"{kind.value}:{payment.id}:{snapshot.provider_status}:{_plain(snapshot.paid_amount)}"
    detail = str(proof.get("detail") or note or f"{kind.value} reported by the provider")
    return Finding(kind, key, detail, {**proof, **_proof(snapshot)})


def _more_money(held: Decimal | None, seen: Decimal | None) -> Decimal | None:
    if seen is None:
        return held
    if held is None:
        return seen
    return max(held, seen)


def _reference_mismatch(payment: HeldPayment, snapshot: Snapshot) -> str | None:
    if snapshot.order_id and snapshot.order_id != payment.order_id:
        return (
            f"provider names order {snapshot.order_id!r}, "
            f"payment {payment.id} is order {payment.order_id!r}"
        )
    if (
        snapshot.provider_payment_id
        and payment.provider_payment_id
        and snapshot.provider_payment_id != payment.provider_payment_id
    ):
        return (
            f"provider names payment {snapshot.provider_payment_id!r}, "
            f"payment {payment.id} is {payment.provider_payment_id!r}"
        )
    return None


def _amount_problem(payment: HeldPayment, snapshot: Snapshot) -> str | None:
    """Why `paid` cannot be verified: both sides must name the same amount and currency."""
    if payment.amount is None or payment.currency is None:
        return "the payment has no amount or currency of its own to check it against"
    if snapshot.amount is None:
        return "the provider's answer names no amount"
    if snapshot.currency is None:
        return "the provider's answer names no currency we know"
    if snapshot.amount != payment.amount:
        return f"the amount is {snapshot.amount}, the payment asked {payment.amount}"
    if snapshot.currency.upper() != payment.currency.upper():
        return f"the currency is {snapshot.currency}, the payment asked {payment.currency}"
    return None


def _proof(snapshot: Snapshot) -> dict[str, Any]:
    keys = (
        "provider_status",
        "order_id",
        "provider_payment_id",
        "amount",
        "currency",
        "pay_amount",
        "pay_currency",
        "paid_amount",
        "as_of",
        "detail",
    )
    values = {key: getattr(snapshot, key) for key in keys}
    return {
        "provider_status": snapshot.provider_status,
        "snapshot": {
            key: (value if isinstance(value, str) else str(value))
            for key, value in values.items()
            if value not in (None, "")
        },
    }


def _plain(value: Decimal | None) -> str:
    return "-" if value is None else format(value.normalize(), "f")


# The writer ---------------------------------------------------------------------------------


def write(
    session: Session,
    payment: Payment,
    change: Change,
    evidence: Evidence,
    now: datetime,
    *,
    snapshot: Snapshot | None = None,
    schedule: Schedule | None = None,
) -> Applied:
    """Write a decided change: the one place a payment's state, timeline and anomalies are
    written. A refusal already on record writes nothing more, except for a replay."""
    anomaly_ids = [
        anomaly_id
        for finding in change.findings
        if (
            anomaly_id := open_anomaly(
                session,
                finding.kind,
                finding.key,
                {**finding.proof, "detail": finding.detail, "source": evidence.description},
                payment_id=payment.id,
                notification_id=evidence.notification_id,
            )
        )
        is not None
    ]
    provider_status = snapshot.provider_status if snapshot else payment.provider_status
    if change.verdict is Verdict.DUPLICATE:
        if schedule is not None:
            payment.next_check_at = schedule.next_check_at(payment, now, evidence.source)
        outbox.anomalies_opened(session, payment, anomaly_ids, now)
        return Applied(payment, False, change.summary, None, anomaly_ids, verdict=change.verdict)
    if (
        change.verdict is Verdict.REFUSE
        and not anomaly_ids
        and evidence.source is not EventSource.REPLAY
    ):
        return Applied(payment, False, f"duplicate: {change.summary}", verdict=change.verdict)

    take(payment, change, now, evidence.source, snapshot=snapshot, schedule=schedule)
    # The merchant hears of the new state, then of what it opened, in this same transaction.
    moved = change.verdict is Verdict.MOVE
    if moved:
        outbox.payment_changed(session, payment, now)
    outbox.anomalies_opened(session, payment, anomaly_ids, now)
    session.flush()  # the compare-and-set: StaleDataError if another worker moved it first
    event = _event(
        session,
        payment,
        evidence,
        change.before,
        change.after,
        provider_status,
        f"{evidence.description}: {change.summary}",
        now,
    )
    return Applied(payment, moved, change.outcome, event, anomaly_ids, verdict=change.verdict)


def take(
    payment: Payment,
    change: Change,
    now: datetime,
    source: EventSource,
    *,
    snapshot: Snapshot | None = None,
    schedule: Schedule | None = None,
) -> None:
    """Set on the payment the state and details a written change gives it (in memory only:
    its timeline, events and anomalies are the writer's)."""
    payment.status = change.after
    payment.expiry_inferred = change.expiry_inferred
    if change.paid_amount is not None:
        payment.paid_amount = change.paid_amount
    if snapshot is not None and change.takes_snapshot:
        payment.provider_status = snapshot.provider_status
        _fill_details(payment, snapshot)
        if snapshot.as_of and (payment.snapshot_at is None or snapshot.as_of > payment.snapshot_at):
            payment.snapshot_at = snapshot.as_of
    payment.updated_at = now
    if schedule is not None:
        payment.next_check_at = schedule.next_check_at(payment, now, source)


def record_creation(
    session: Session,
    payment: Payment,
    evidence: Evidence,
    detail: str,
    now: datetime,
    *,
    schedule: Schedule | None = None,
) -> PaymentEvent:
    """A new payment enters the state machine as `pending`, its first timeline line saying how."""
    payment.status = P.PENDING
    if schedule is not None:
        payment.next_check_at = schedule.next_check_at(payment, now, evidence.source)
    session.add(payment)
    session.flush()  # a concurrent record of the same payment fails here, on the unique keys
    outbox.payment_changed(session, payment, now)
    return _event(session, payment, evidence, None, P.PENDING, payment.provider_status, detail, now)


def record_note(
    session: Session,
    payment: Payment,
    evidence: Evidence,
    detail: str,
    now: datetime,
    data: Mapping[str, Any] | None = None,
) -> PaymentEvent:
    """A timeline line that changes nothing (an operator's request, say): from and to are the
    payment's state, so it tells the merchant nothing either."""
    event = _event(
        session,
        payment,
        evidence,
        payment.status,
        payment.status,
        payment.provider_status,
        detail,
        now,
    )
    event.data = dict(data) if data else None
    return event


def expire_by_clock(
    session: Session,
    payment: Payment,
    detail: str,
    now: datetime,
    schedule: Schedule,
    *,
    flag: bool = False,
) -> Applied:
    """Our clock settles an open payment past its deadline as `expired`; `flag` also opens an
    anomaly, where the provider could not be asked."""
    change = judge_expiry(payment, detail)
    if flag and change.verdict is Verdict.MOVE:
        finding = Finding(
            AnomalyKind.INFERRED_EXPIRY,
            f"inferred_expiry:{payment.id}",
            detail,
            {"last_status": payment.provider_status},
        )
        change = Change(
            change.verdict,
            change.before,
            change.after,
            change.summary,
            (finding,),
            paid_amount=change.paid_amount,
            expiry_inferred=change.expiry_inferred,
        )
    return write(
        session, payment, change, Evidence(EventSource.EXPIRY, "expiry"), now, schedule=schedule
    )


# Applying a provider's word -----------------------------------------------------------------


def find_payment(
    session: Session,
    provider: str,
    ref: PaymentRef,
    *,
    account: str = DEFAULT_ACCOUNT,
    lock: bool = False,
) -> Payment | None:
    """The payment a reference names within one account: the provider's id first, then our
    order id. One account's credentials never speak for another's payments."""
    named = _naming(provider, ref, account)
    if named is None:
        return None
    by, params = named
    query = select(Payment).where(*_named_by(by))
    if lock:
        query = query.with_for_update()
    return _one_of(session.execute(query, params).scalars().all(), ref)


def read_payment(
    connection: Connection, provider: str, ref: PaymentRef, *, account: str = DEFAULT_ACCOUNT
) -> Payment | None:
    """`find_payment` outside any session: the payment as committed when read, detached, as a
    closed session would leave it. The worker's read before its status query: a statement built
    once per kind of reference (on PostgreSQL run by the driver, ipn.db.Prepared), its rows put
    into instances directly, at a fraction of the ORM's loading."""
    named = _naming(provider, ref, account)
    if named is None:
        return None
    by, params = named
    matches = []
    for row in fetch_rows(connection, _READ_PAYMENT[by], params):
        payment = _PAYMENT_MANAGER.new_instance()
        # As the ORM's loader fills an instance: into its dict, with no history to record.
        payment.__dict__.update(zip(_PAYMENT_KEYS, row, strict=True))
        # As loaded: no pending changes, an identity key, so a session takes it as it is.
        make_transient_to_detached(payment)
        matches.append(payment)
    return _one_of(matches, ref)


# By which keys a reference names its payment: (the provider's id, our order id).
_By = tuple[bool, bool]


def _naming(provider: str, ref: PaymentRef, account: str) -> tuple[_By, dict[str, str]] | None:
    """The keys `ref` names its payment by and the values to look for, None if it has none."""
    by = (bool(ref.provider_payment_id), bool(ref.order_id))
    if by == (False, False):
        return None
    params = {"provider": provider, "account": account}
    if ref.provider_payment_id:
        params["provider_payment_id"] = ref.provider_payment_id
    if ref.order_id:
        params["order_id"] = ref.order_id
    return by, params


def _named_by(by: _By) -> list[ColumnElement[bool]]:
    keys = []
    if by[0]:
        keys.append(Payment.provider_payment_id == bindparam("provider_payment_id"))
    if by[1]:
        keys.append(Payment.order_id == bindparam("order_id"))
    return [
        Payment.provider == bindparam("provider"),
        Payment.account == bindparam("account"),
        or_(*keys),
    ]


_PAYMENT_KEYS = [prop.key for prop in Payment.__mapper__.column_attrs]
_PAYMENT_COLUMNS = [prop.columns[0].label(prop.key) for prop in Payment.__mapper__.column_attrs]
_PAYMENT_MANAGER = Payment.__mapper__.class_manager
_READ_PAYMENT = {
    by: select(*_PAYMENT_COLUMNS).where(*_named_by(by))
    for by in ((True, False), (False, True), (True, True))
}


def _one_of(matches: Sequence[Payment], ref: PaymentRef) -> Payment | None:
    if len(matches) > 1:  # two rows matched by different keys: trust the provider's id
        matches = [p for p in matches if p.provider_payment_id == ref.provider_payment_id]
    return matches[0] if matches else None


def adopt(
    session: Session,
    provider: Provider,
    snapshot: Snapshot,
    ref: PaymentRef,
    evidence: Evidence,
    now: datetime,
) -> Payment:
    """Record a payment we never created, from the provider's own verified word about it."""
    order_id = snapshot.order_id or ref.order_id or snapshot.provider_payment_id
    provider_payment_id = snapshot.provider_payment_id or ref.provider_payment_id
    payment = Payment(
        provider=provider.name,
        account=provider.account,
        order_id=order_id,
        provider_payment_id=provider_payment_id,
        amount=snapshot.amount,
        currency=snapshot.currency,
        adopted=True,
        created_at=now,
        updated_at=now,
    )
    _fill_details(payment, snapshot)
    record_creation(
        session, payment, evidence, f"adopted: first seen through {evidence.description}", now
    )
    return payment


def apply_snapshot(
    session: Session,
    provider: Provider,
    snapshot: Snapshot,
    evidence: Evidence,
    *,
    now: datetime,
    payment: Payment | None = None,
    ref: PaymentRef | None = None,
    may_adopt: bool = False,
    schedule: Schedule | None = None,
) -> Applied | None:
    """Apply what the provider says to the payment it names. None when there is no such payment
    and adoption is not allowed. The caller owns the transaction and commits."""
    if payment is None:
        ref = ref or snapshot.ref
        account = provider.account
        payment = find_payment(session, provider.name, snapshot.ref, account=account, lock=True)
        if payment is None and ref:
            payment = find_payment(session, provider.name, ref, account=account, lock=True)
        if payment is None:
            if not may_adopt:
                return None
            payment = adopt(session, provider, snapshot, ref, evidence, now)
    decision = provider.decide(snapshot, payment, now)
    change = judge(payment, snapshot, decision, evidence.source)
    applied = write(
        session,
        payment,
        change,
        evidence,
        now,
        snapshot=snapshot,
        schedule=schedule or Schedule(),
    )
    applied.reported = decision.state
    return applied


def _event(
    session: Session,
    payment: Payment,
    evidence: Evidence,
    from_status: PaymentStatus | None,
    to_status: PaymentStatus,
    provider_status: str | None,
    detail: str,
    now: datetime,
) -> PaymentEvent:
    event = PaymentEvent(
        payment_id=payment.id,
        at=now,
        source=evidence.source,
        from_status=from_status,
        to_status=to_status,
        provider_status=provider_status,
        detail=detail,
        notification_id=evidence.notification_id,
    )
    session.add(event)
    return event


# What a provider's snapshot may tell of a payment that we did not know yet.
DETAILS = (
    "provider_payment_id",
    "pay_amount",
    "pay_currency",
    "pay_address",
    "pay_url",
    "payment_uri",
    "expires_at",
)


def _fill_details(payment: Payment, snapshot: Snapshot) -> None:
    """Take what the provider knows and we do not."""
    for name in DETAILS:
        value = getattr(snapshot, name)
        if value is not None and getattr(payment, name) is None:
            setattr(payment, name, value)
