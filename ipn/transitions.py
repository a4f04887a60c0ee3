"""The payment state machine: a provider's snapshot applied to a payment, forward only, as one
compare-and-set with its timeline event and any anomalies, inside the caller's transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from ipn.anomalies import open_anomaly
from ipn.polling import Schedule
from ipn.providers.base import PaymentRef, Provider, Snapshot
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


def find_payment(
    session: Session, provider: str, ref: PaymentRef, *, lock: bool = False
) -> Payment | None:
    """The payment a reference names: the provider's id first, then our order id."""
    conditions = []
    if ref.provider_payment_id:
        conditions.append(Payment.provider_payment_id == ref.provider_payment_id)
    if ref.order_id:
        conditions.append(Payment.order_id == ref.order_id)
    if not conditions:
        return None
    query = select(Payment).where(Payment.provider == provider, or_(*conditions))
    if lock:
        query = query.with_for_update()
    matches = session.execute(query).scalars().all()
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
        order_id=order_id,
        provider_payment_id=provider_payment_id,
        status=P.PENDING,
        amount=snapshot.amount,
        currency=snapshot.currency,
        adopted=True,
        created_at=now,
        updated_at=now,
    )
    _fill_details(payment, snapshot)
    session.add(payment)
    session.flush()  # a concurrent adoption of the same payment fails here, on the unique keys
    _record(
        session,
        payment,
        evidence,
        None,
        P.PENDING,
        snapshot.provider_status,
        f"adopted: first seen through {evidence.description}",
        now,
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
        payment = find_payment(session, provider.name, snapshot.ref, lock=True) or (
            find_payment(session, provider.name, ref, lock=True) if ref else None
        )
        if payment is None:
            if not may_adopt:
                return None
            payment = adopt(session, provider, snapshot, ref, evidence, now)
    schedule = schedule or Schedule()
    current = payment.status
    status_text = f"{provider.name} status {snapshot.provider_status}"

    mismatch = _reference_mismatch(payment, snapshot)
    if mismatch:
        return _refuse(
            session,
            payment,
            evidence,
            snapshot,
            now,
            AnomalyKind.REFERENCE_MISMATCH,
            f"reference_mismatch:{payment.id}:{snapshot.provider_payment_id}:{snapshot.order_id}",
            mismatch,
        )

    if payment.snapshot_at and snapshot.as_of and snapshot.as_of < payment.snapshot_at:
        detail = (
            f"stale snapshot ignored: {status_text} as of {snapshot.as_of.isoformat()}, "
            f"newer one applied as of {payment.snapshot_at.isoformat()}"
        )
        event = _note(
            session, payment, evidence, snapshot, f"{evidence.description}: {detail}", now
        )
        return Applied(payment, False, detail, event)

    decision = provider.decide(snapshot, payment)
    anomaly_ids = [
        anomaly_id
        for kind, proof in decision.anomalies
        if (
            anomaly_id := open_anomaly(
                session,
                AnomalyKind(kind),
                f"{kind}:{payment.id}:{snapshot.provider_status}",
                {**proof, "provider_status": snapshot.provider_status},
                payment_id=payment.id,
                notification_id=evidence.notification_id,
            )
        )
        is not None
    ]
    target = decision.state
    note = f" ({decision.note})" if decision.note else ""

    if target is None:
        return _refuse(
            session,
            payment,
            evidence,
            snapshot,
            now,
            AnomalyKind.UNKNOWN_STATUS,
            f"unknown_status:{payment.id}:{snapshot.provider_status}",
            f"unknown {status_text}: no change, flagged for review",
        )

    if target is P.PAID and current is not P.PAID:
        problem = _amount_problem(payment, snapshot)
        if problem:
            return _refuse(
                session,
                payment,
                evidence,
                snapshot,
                now,
                AnomalyKind.AMOUNT_MISMATCH,
                f"amount_mismatch:{payment.id}:{snapshot.amount}:{snapshot.currency}",
                f"{status_text} says paid, but {problem}: not marked paid",
            )

    if target is current:
        payment.next_check_at = schedule.next_check_at(payment, now, evidence.source)
        if snapshot.provider_status == payment.provider_status and not anomaly_ids:
            if evidence.source is EventSource.REPLAY:
                event = _note(
                    session,
                    payment,
                    evidence,
                    snapshot,
                    f"{evidence.description}: {status_text}, no change",
                    now,
                )
                return Applied(payment, False, "replayed: no change", event)
            return Applied(payment, False, f"duplicate: already {current.value}")
        payment.provider_status = snapshot.provider_status
        _fill_details(payment, snapshot)
        payment.updated_at = now
        event = _note(
            session,
            payment,
            evidence,
            snapshot,
            f"{evidence.description}: {status_text}{note}",
            now,
        )
        return Applied(payment, False, f"still {current.value}: {status_text}", event, anomaly_ids)

    if not can_move(current, target, expiry_inferred=payment.expiry_inferred):
        if current in UNPAID_ENDS and target in MONEY_SEEN:
            return _refuse(
                session,
                payment,
                evidence,
                snapshot,
                now,
                AnomalyKind.LATE_PAYMENT,
                f"late_payment:{payment.id}:{snapshot.provider_status}",
                f"{status_text} ({target.value}) after {current.value}: "
                "late payment, no change, flagged for review",
            )
        detail = f"{status_text} ({target.value}) would move {current.value} backwards: ignored"
        event = _note(
            session, payment, evidence, snapshot, f"{evidence.description}: {detail}", now
        )
        return Applied(payment, False, detail, event, anomaly_ids)

    overturned = current is P.EXPIRED
    payment.status = target
    payment.provider_status = snapshot.provider_status
    payment.expiry_inferred = False
    if snapshot.as_of:
        payment.snapshot_at = snapshot.as_of
    _fill_details(payment, snapshot)
    payment.updated_at = now
    payment.next_check_at = schedule.next_check_at(payment, now, evidence.source)
    if overturned:
        note += " (overturns the expiry we inferred from our own clock)"
    session.flush()  # the compare-and-set: StaleDataError if another worker moved it first
    event = _record(
        session,
        payment,
        evidence,
        current,
        target,
        snapshot.provider_status,
        f"{evidence.description}: {status_text}{note}",
        now,
    )
    return Applied(payment, True, f"{current.value} -> {target.value}", event, anomaly_ids)


def _refuse(
    session: Session,
    payment: Payment,
    evidence: Evidence,
    snapshot: Snapshot,
    now: datetime,
    kind: AnomalyKind,
    key: str,
    detail: str,
) -> Applied:
    """Leave the payment as it is, open an anomaly, and say so on the timeline once per fact."""
    anomaly_id = open_anomaly(
        session,
        kind,
        key,
        {
            "detail": detail,
            "provider_status": snapshot.provider_status,
            "snapshot": _jsonable(snapshot),
            "source": evidence.description,
        },
        payment_id=payment.id,
        notification_id=evidence.notification_id,
    )
    if anomaly_id is None and evidence.source is not EventSource.REPLAY:
        return Applied(payment, False, f"duplicate: {detail}")
    event = _note(session, payment, evidence, snapshot, f"{evidence.description}: {detail}", now)
    return Applied(payment, False, detail, event, [anomaly_id] if anomaly_id else [])


def _note(
    session: Session,
    payment: Payment,
    evidence: Evidence,
    snapshot: Snapshot,
    detail: str,
    now: datetime,
) -> PaymentEvent:
    """A timeline event that moved nothing: to_status equals from_status."""
    return _record(
        session,
        payment,
        evidence,
        payment.status,
        payment.status,
        snapshot.provider_status,
        detail,
        now,
    )


def _record(
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


def _reference_mismatch(payment: Payment, snapshot: Snapshot) -> str | None:
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


def _amount_problem(payment: Payment, snapshot: Snapshot) -> str | None:
    if (
        payment.amount is not None
        and snapshot.amount is not None
        and snapshot.amount != payment.amount
    ):
        return f"the amount is {snapshot.amount}, the payment asked {payment.amount}"
    if (
        payment.currency
        and snapshot.currency
        and snapshot.currency.upper() != payment.currency.upper()
    ):
        return f"the currency is {snapshot.currency}, the payment asked {payment.currency}"
    return None


def _fill_details(payment: Payment, snapshot: Snapshot) -> None:
    """Take what the provider knows and we do not; the paid amount always follows the provider."""
    for name in (
        "provider_payment_id",
        "pay_amount",
        "pay_currency",
        "pay_address",
        "pay_url",
        "payment_uri",
        "expires_at",
    ):
        value = getattr(snapshot, name)
        if value is not None and getattr(payment, name) is None:
            setattr(payment, name, value)
    if snapshot.paid_amount is not None:
        payment.paid_amount = snapshot.paid_amount


def _jsonable(snapshot: Snapshot) -> dict[str, Any]:
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
        key: (str(value) if value is not None and not isinstance(value, str) else value)
        for key, value in values.items()
        if value not in (None, "")
    }
