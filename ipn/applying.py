"""A notification's change to a known payment, written in one PostgreSQL statement: the
payment's compare-and-set, its timeline line, the merchant's event and its deliveries, and the
settled inbox row, all or none (data-modifying CTEs, run by PostgreSQL as one statement).

The common case of a worker's transaction: a payment moved or noted, nothing to flag. Anything
else goes through the ORM writer of ipn.transitions, whose rules this one follows: the change
is decided by `judge`, set on the payment by `take`, and its event built by the outbox. The
statements are built once and run by the driver (ipn.db.Prepared); each write only binds its
values."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    bindparam,
    case,
    cast,
    exists,
    func,
    insert,
    null,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from ipn.db import prepared
from ipn.events import outbox
from ipn.inbox import settled_values
from ipn.polling import Schedule
from ipn.providers.base import Snapshot
from ipn.transitions import DETAILS, Change, Evidence, Verdict, take
from models import (
    Delivery,
    DeliveryStatus,
    Endpoint,
    MerchantEvent,
    Notification,
    NotificationStatus,
    Payment,
    PaymentEvent,
    new_id,
)

# What a written change may set on a payment: the state, what the snapshot adds, the clocks.
# Nothing else writes these without the compare-and-set (a pass's lease and schedule columns
# are its own).
PAYMENT_COLUMNS = (
    "status",
    "expiry_inferred",
    "paid_amount",
    "provider_status",
    *DETAILS,
    "snapshot_at",
    "updated_at",
    "next_check_at",
    "event_sequence",
)
# The inbox row's columns as `settle` writes them for a processed notification.
SETTLED_COLUMNS = tuple(settled_values(NotificationStatus.PROCESSED, payment_id="-"))


def applies(session: Session, change: Change) -> bool:
    """Whether this writer can write `change`: on PostgreSQL, a move or a note that opens no
    anomaly."""
    return (
        session.get_bind().dialect.name == "postgresql"
        and change.verdict in (Verdict.MOVE, Verdict.NOTE)
        and not change.findings
    )


@dataclass(frozen=True)
class Written:
    """What the statement did: `moved` False when the payment changed underneath (the
    compare-and-set failed, nothing written); `received_at` None when the inbox row was
    settled by another worker first (the caller rolls back)."""

    moved: bool
    received_at: datetime | None
    deliveries: list[int]


def write_and_settle(
    session: Session,
    payment: Payment,
    change: Change,
    evidence: Evidence,
    now: datetime,
    settled: dict[str, object],
    *,
    snapshot: Snapshot,
    schedule: Schedule,
) -> Written:
    """Write `change` to `payment` (as read, detached: its version is the compare-and-set)
    and settle its inbox row `evidence.notification_id` with `settled` (ipn.inbox), in one
    statement of the caller's transaction."""
    params: dict[str, Any] = {
        "held_payment": payment.id,
        "held_version": payment.version,
        "settling": evidence.notification_id,
        "now": now,
        "t_source": evidence.source,
        "t_from": change.before,
        "t_to": change.after,
        # The timeline keeps the status the provider reported, even when it is not taken.
        "t_provider_status": snapshot.provider_status,
        "t_detail": f"{evidence.description}: {change.summary}",
    }
    take(payment, change, now, evidence.source, snapshot=snapshot, schedule=schedule)
    moved = change.verdict is Verdict.MOVE
    if moved:
        outbox.keep_environment_endpoint(session)
        event_type, sequence, body = outbox.payment_changed_body(payment, now)
        params.update(
            e_id=new_id("evt_"),
            e_type=event_type,
            e_types=[event_type.value],
            e_sequence=sequence,
            e_body=body,
        )
    params.update({f"p_{name}": getattr(payment, name) for name in PAYMENT_COLUMNS})
    params.update({f"n_{name}": settled[name] for name in SETTLED_COLUMNS})
    # No parameter is named after a column: an UPDATE takes such a parameter as a value to set.
    connection = session.connection()
    [(written, received_at, deliveries)] = prepared(_statement(moved), connection.dialect).rows(
        connection, params
    )
    return Written(written, received_at, list(deliveries or []))


@cache
def _statement(announced: bool) -> Select[Any]:
    """The write, with the merchant's event and deliveries when the change is `announced`."""
    payments: Table = Payment.__table__  # type: ignore[assignment]
    cas = (
        update(payments)
        .where(
            payments.c.id == bindparam("held_payment"),
            payments.c.version == bindparam("held_version"),
        )
        .values(
            {
                **{name: _bound(f"p_{name}", payments.c[name]) for name in PAYMENT_COLUMNS},
                "version": payments.c.version + 1,
            }
        )
        .returning(payments.c.id)
        .cte("cas")
    )
    written = exists(select(cas.c.id))
    timeline = _insert_from(
        cas,
        PaymentEvent.__table__,  # type: ignore[arg-type]
        payment_id=cas.c.id,
        at="now",
        source="t_source",
        from_status="t_from",
        to_status="t_to",
        provider_status="t_provider_status",
        detail="t_detail",
        notification_id="settling",
    ).cte("timeline")
    inbox: Table = Notification.__table__  # type: ignore[assignment]
    settled = (
        update(inbox)
        .where(
            inbox.c.id == bindparam("settling"),
            inbox.c.status == NotificationStatus.RECEIVED,
            written,
        )
        .values({name: _bound(f"n_{name}", inbox.c[name]) for name in SETTLED_COLUMNS})
        .returning(inbox.c.received_at)
        .cte("settled")
    )
    ctes = [timeline]
    deliveries: ColumnElement[Any] = null()
    if announced:
        events: Table = MerchantEvent.__table__  # type: ignore[assignment]
        table: Table = Delivery.__table__  # type: ignore[assignment]
        targets = (
            select(Endpoint.id)
            .where(
                outbox.hearing(
                    bindparam("held_payment", type_=Endpoint.payment_id.type),
                    bindparam("e_types", type_=JSONB),
                )
            )
            .cte("targets")
        )
        heard = exists(select(targets.c.id))
        pending = _param("delivery_pending", events.c.status, DeliveryStatus.PENDING)
        merchant_event = _insert_from(
            cas,
            events,
            id="e_id",
            type="e_type",
            payment_id=cas.c.id,
            sequence="e_sequence",
            body="e_body",
            # An event nobody hears is delivered to nobody: it is not left pending.
            status=case(
                (heard, pending),
                else_=_param("delivery_done", events.c.status, DeliveryStatus.DELIVERED),
            ),
            created_at="now",
        ).cte("merchant_event")
        ctes.append(merchant_event)
        delivered = (
            _insert_from(
                targets,
                table,
                where=written,
                event_id="e_id",
                endpoint_id=targets.c.id,
                payment_id="held_payment",
                sequence="e_sequence",
                status=_param("delivery_pending_", table.c.status, DeliveryStatus.PENDING),
                attempts=_param("no_attempts", table.c.attempts, 0),
                next_attempt_at="now",
                created_at="now",
            )
            .returning(table.c.id)
            .cte("deliveries")
        )
        deliveries = select(func.array_agg(delivered.c.id)).scalar_subquery()
    return select(
        written.label("moved"),
        select(settled.c.received_at).scalar_subquery().label("received_at"),
        deliveries.label("deliveries"),
    ).add_cte(*ctes)


def _insert_from(
    source: Any, table: Table, /, *, where: ColumnElement[bool] | None = None, **values: Any
) -> Any:
    """INSERT one row per row of `source` (the compare-and-set: none when it failed); a
    string value names the parameter that holds the column's value."""
    columns = [
        _param(value, table.c[name]) if isinstance(value, str) else value
        for name, value in values.items()
    ]
    rows = select(*columns).select_from(source)
    if where is not None:
        rows = rows.where(where)
    return insert(table).from_select(list(values), rows)


def _bound(name: str, column: Any) -> ColumnElement[Any]:
    return bindparam(name, type_=column.type)


def _param(name: str, column: Any, value: Any = None) -> ColumnElement[Any]:
    # Cast: a parameter in a SELECT list has no type PostgreSQL could infer from its column.
    if value is None:
        return cast(bindparam(name, type_=column.type), column.type)
    return cast(bindparam(name, value, type_=column.type), column.type)
