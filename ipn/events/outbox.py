"""The transactional outbox: an event row, and one delivery per endpoint that hears it, written in
the transaction of the change the event tells of. A change that rolls back takes its event with
it; a change that commits cannot lose its event. Once committed, the new deliveries are handed to
the queue; whatever the queue misses, `deliver_due` finds."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, cast, literal_column, or_, select
from sqlalchemy import event as orm_event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from ipn import serialize
from ipn.config import EventSettings
from models import (
    Anomaly,
    Delivery,
    DeliveryStatus,
    Endpoint,
    EndpointOrigin,
    EndpointStatus,
    EventType,
    MerchantEvent,
    Payment,
    PaymentStatus,
    new_id,
    utcnow,
)

# The endpoint IPN_MERCHANT_WEBHOOK_URL configures; its secret stays in the environment.
ENVIRONMENT_ENDPOINT = "ep_environment"

UNSET = "IPN_MERCHANT_WEBHOOK_URL is no longer set"

_SETTINGS = "ipn.events.settings"
_NEW = "ipn.events.new_deliveries"


def install(sessions: sessionmaker[Session], settings: EventSettings) -> None:
    """Give every session of this factory the event settings the outbox reads."""
    sessions.configure(info={_SETTINGS: settings})


def wake_after_commit(sessions: sessionmaker[Session], wake: Callable[[list[int]], None]) -> None:
    """After each commit that wrote deliveries, hand their ids to `wake` (the queue)."""

    def committed(session: Session) -> None:
        new: list[Delivery | int] = session.info.pop(_NEW, [])
        if new:
            wake([d if isinstance(d, int) else d.id for d in new])

    def rolled_back(session: Session) -> None:
        session.info.pop(_NEW, None)

    orm_event.listen(sessions, "after_commit", committed)
    orm_event.listen(sessions, "after_rollback", rolled_back)


def payment_event_type(status: PaymentStatus) -> EventType:
    return EventType(f"payment.{status.value}")


def payment_changed(session: Session, payment: Payment, now: datetime) -> MerchantEvent:
    """The payment reached its current state (`pending` at creation: `payment.created`)."""
    event_type, sequence, data = _payment_state(payment)
    return record(session, event_type, data, now, payment_id=payment.id, sequence=sequence)


def payment_changed_body(payment: Payment, now: datetime) -> tuple[EventType, int, str]:
    """What `payment_changed` writes, for a writer of its own: the type, the sequence (bumped
    on the payment) and the body of the event."""
    event_type, sequence, data = _payment_state(payment)
    return event_type, sequence, body(event_type, data, now)


def _payment_state(payment: Payment) -> tuple[EventType, int, dict[str, Any]]:
    event_type = (
        EventType.PAYMENT_CREATED
        if payment.status is PaymentStatus.PENDING
        else payment_event_type(payment.status)
    )
    sequence = _next_sequence(payment)
    return event_type, sequence, {**serialize.payment(payment), "sequence": sequence}


def anomaly_event(
    session: Session,
    event_type: EventType,
    anomaly: Anomaly,
    payment: Payment | None,
    now: datetime,
) -> MerchantEvent:
    """`anomaly.opened` or `anomaly.resolved`; in its payment's sequence when it has one."""
    sequence = _next_sequence(payment) if payment is not None else None
    data = serialize.anomaly(anomaly)
    if sequence is not None:
        data["sequence"] = sequence
    return record(
        session,
        event_type,
        data,
        now,
        payment_id=payment.id if payment else None,
        sequence=sequence,
        anomaly_id=anomaly.id,
    )


def anomalies_opened(
    session: Session, payment: Payment | None, anomaly_ids: list[int], now: datetime
) -> None:
    """`anomaly.opened` for each anomaly just opened (an anomaly already on record opens none)."""
    if not anomaly_ids:
        return
    # Read without flushing: the payment's own UPDATE stays one statement, at the writer's flush.
    with session.no_autoflush:
        anomalies = session.scalars(
            select(Anomaly).where(Anomaly.id.in_(anomaly_ids)).order_by(Anomaly.id)
        ).all()
    for anomaly in anomalies:
        anomaly_event(session, EventType.ANOMALY_OPENED, anomaly, payment, now)


def record(
    session: Session,
    event_type: EventType,
    data: dict[str, Any],
    now: datetime,
    *,
    payment_id: str | None = None,
    sequence: int | None = None,
    anomaly_id: int | None = None,
) -> MerchantEvent:
    """Write one event and its deliveries inside the caller's transaction."""
    event = MerchantEvent(
        id=new_id("evt_"),
        type=event_type,
        payment_id=payment_id,
        anomaly_id=anomaly_id,
        sequence=sequence,
        body=body(event_type, data, now),
        created_at=now,
    )
    # Read without flushing: the writer's own flush is the compare-and-set.
    with session.no_autoflush:
        targets = [e for e in endpoints_for(session, payment_id) if e.hears(event_type.value)]
    session.add(event)
    # An event nobody hears is delivered to nobody: it is not left pending.
    event.status = DeliveryStatus.PENDING if targets else DeliveryStatus.DELIVERED
    deliveries = [
        Delivery(
            event_id=event.id,
            endpoint_id=endpoint.id,
            payment_id=payment_id,
            sequence=sequence,
            status=DeliveryStatus.PENDING,
            next_attempt_at=now,
            created_at=now,
        )
        for endpoint in targets
    ]
    session.add_all(deliveries)
    remember(session, deliveries)
    return event


def body(event_type: EventType, data: dict[str, Any], now: datetime) -> str:
    """The event as the merchant receives it (and as it is signed)."""
    # ASCII only: whatever a sender put in an anomaly's evidence (a lone surrogate, a NUL) is
    # escaped, so the body always encodes, and signs, the same.
    return json.dumps(
        {"type": event_type.value, "timestamp": serialize.when(now), "data": data},
        separators=(",", ":"),
        default=str,
    )


def remember(session: Session, deliveries: list[Delivery] | list[int]) -> None:
    """Deliveries (or their ids) to hand to the queue once this transaction commits."""
    session.info.setdefault(_NEW, []).extend(deliveries)


def endpoints_for(session: Session, payment_id: str | None) -> list[Endpoint]:
    """The enabled endpoints that hear events of this payment: every merchant-wide one, and the
    payment's own notify_url. One query, which reads the environment's endpoint row too."""
    scope: ColumnElement[bool] = Endpoint.payment_id.is_(None)
    if payment_id is not None:
        scope = or_(scope, Endpoint.payment_id == payment_id)
    query = (
        select(Endpoint)
        .where(or_(and_(Endpoint.deleted_at.is_(None), scope), Endpoint.id == ENVIRONMENT_ENDPOINT))
        .order_by(Endpoint.created_at, Endpoint.id)
    )
    found = list(session.scalars(query))
    environment = next((e for e in found if e.id == ENVIRONMENT_ENDPOINT), None)
    if _keep_environment_endpoint(session, environment):
        found = list(session.scalars(query))
    _IN_STEP.setdefault(session.get_bind(), set()).add(_webhook_url(session))
    # The status is read in memory: a change in this transaction may not be flushed yet.
    return [
        e
        for e in found
        if e.status is EndpointStatus.ENABLED and e.deleted_at is None and _in_scope(e, payment_id)
    ]


def hearing(payment_id: ColumnElement[str], event_types: ColumnElement[Any]) -> ColumnElement[bool]:
    """The endpoints `endpoints_for` finds that hear an event of the payment, as a condition
    for a writer that picks them in its own statement (PostgreSQL): `event_types` is a JSONB
    array holding the event's type."""
    events = cast(Endpoint.events, JSONB)
    # `Endpoint.hears`: no list (or an empty one) hears everything.
    hears_all = or_(
        Endpoint.events.is_(None),
        events == literal_column("'[]'::jsonb"),
        events == literal_column("'null'::jsonb"),
    )
    return and_(
        Endpoint.status == EndpointStatus.ENABLED,
        Endpoint.deleted_at.is_(None),
        or_(Endpoint.payment_id.is_(None), Endpoint.payment_id == payment_id),
        or_(hears_all, events.contains(event_types)),
    )


def keep_environment_endpoint(session: Session) -> None:
    """Bring the endpoint of IPN_MERCHANT_WEBHOOK_URL in step with this process's settings, as
    `endpoints_for` does, once per process and database: for a writer that picks endpoints in
    its own statement (with `hearing`), the settings do not change while the process runs."""
    url = _webhook_url(session)
    if url in _IN_STEP.get(session.get_bind(), ()):
        return
    with session.no_autoflush:
        _keep_environment_endpoint(session, session.get(Endpoint, ENVIRONMENT_ENDPOINT))
    _IN_STEP.setdefault(session.get_bind(), set()).add(url)


# By database, the webhook URLs whose endpoint row this process brought in step with them.
_IN_STEP: weakref.WeakKeyDictionary[Any, set[str | None]] = weakref.WeakKeyDictionary()


def _webhook_url(session: Session) -> str | None:
    settings: EventSettings | None = session.info.get(_SETTINGS)
    return settings.webhook_url if settings else None


def _in_scope(endpoint: Endpoint, payment_id: str | None) -> bool:
    return endpoint.payment_id is None or endpoint.payment_id == payment_id


def _next_sequence(payment: Payment) -> int:
    # On the payment row, so the compare-and-set that guards its state guards this too.
    payment.event_sequence = (payment.event_sequence or 0) + 1
    return payment.event_sequence


def _keep_environment_endpoint(session: Session, current: Endpoint | None) -> bool:
    """The endpoint row of IPN_MERCHANT_WEBHOOK_URL follows the environment: created when set,
    its URL updated when changed, disabled when unset. True when it was just created."""
    url = _webhook_url(session)
    if current is None:
        if url:
            insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
            session.execute(
                insert(Endpoint)
                .values(
                    id=ENVIRONMENT_ENDPOINT,
                    url=url,
                    description="IPN_MERCHANT_WEBHOOK_URL",
                    events=[],
                    status=EndpointStatus.ENABLED,
                    origin=EndpointOrigin.ENVIRONMENT,
                    created_at=utcnow(),
                    updated_at=utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["id"])
            )
            return True
        return False
    if url and current.url != url:
        current.url = url
        current.updated_at = utcnow()
    if url and current.disabled_reason == UNSET:
        current.status, current.disabled_reason = EndpointStatus.ENABLED, None
        current.updated_at = utcnow()
    elif not url and current.status is EndpointStatus.ENABLED:
        current.status, current.disabled_reason = EndpointStatus.DISABLED, UNSET
        current.updated_at = utcnow()
    return False
