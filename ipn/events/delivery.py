"""Delivering events: one attempt at a time per delivery, signed at the moment it is sent, in each
payment's sequence order per endpoint, on a growing schedule until the endpoint answers 2xx.

An attempt holds its delivery by a lease with an owner token (as a reconciliation check holds a
payment): a worker killed mid-attempt leaves a lease that ends, and the delivery is attempted
again with the same `webhook-id`, so the shop can tell it already has it."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Exists, Select, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from ipn.events import outbox, signing, urls
from ipn.services import Services
from models import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Endpoint,
    EndpointStatus,
    MerchantEvent,
    utcnow,
)

log = logging.getLogger(__name__)

D = DeliveryStatus
ANSWER_KEPT = 2048
ERROR_KEPT = 500


@dataclass
class Outcome:
    """What one call of `deliver` did, and what the caller should hand to the queue."""

    summary: str
    # Deliveries that may go now: the next of the same payment once this one is settled.
    wake: list[int] = field(default_factory=list)
    # Seconds until this delivery is due again, when it is to be tried again.
    retry_in: float | None = None


@dataclass(frozen=True)
class _Held:
    """A leased delivery and what its attempt needs, read in the claiming transaction."""

    delivery_id: int
    token: str
    endpoint_id: str
    event_id: str
    body: str
    url: str
    secrets: tuple[str, ...]


Post = Callable[..., urls.Answer]


def deliver(
    services: Services,
    delivery_id: int,
    *,
    now: datetime | None = None,
    post: Post | None = None,
) -> Outcome:
    """Attempt one delivery if it is due, its turn and free; record what came of it."""
    now = now or utcnow()
    held = _lease(services, delivery_id, now)
    if isinstance(held, Outcome):
        return held
    events = services.settings.events
    headers = signing.headers(held.secrets, held.event_id, int(time.time()), held.body)
    started = time.monotonic()
    answer: urls.Answer | None = None
    error: str | None = None
    try:
        answer = (post or urls.post)(
            held.url,
            held.body.encode(),
            headers,
            allow_private=events.allow_private,
            connect_timeout=events.connect_timeout,
            total_timeout=events.total_timeout,
        )
    except urls.DeliveryError as exc:  # UnsafeURL among them: refused before any connection
        error = str(exc)[:ERROR_KEPT] or type(exc).__name__
    duration_ms = answer.duration_ms if answer else int((time.monotonic() - started) * 1000)
    return _record(services, held, answer, error, duration_ms, now)


def deliver_due(
    services: Services, send: Callable[[int], None], *, now: datetime | None = None
) -> int:
    """Hand every delivery that is due and whose turn it is to the queue; the count sent.
    Picks up what a lost enqueue, a killed worker or a long retry delay left behind."""
    now = now or utcnow()
    batch = services.settings.reconcile_batch
    with services.db.sessions() as session:
        ids = list(
            session.scalars(_due(now).order_by(Delivery.next_attempt_at, Delivery.id).limit(batch))
        )
    for delivery_id in ids:
        send(delivery_id)
    return len(ids)


def redeliver(session: Session, event_ids: Iterable[str], now: datetime) -> list[str]:
    """Send these events again, with their own `webhook-id`s, to every endpoint that hears them
    now (endpoints registered since included); the ids of the events queued."""
    queued: list[str] = []
    touched: list[Delivery] = []
    for event in session.scalars(
        select(MerchantEvent)
        .where(MerchantEvent.id.in_(list(event_ids)))
        .order_by(MerchantEvent.created_at, MerchantEvent.id)
    ):
        existing = {
            d.endpoint_id: d
            for d in session.scalars(select(Delivery).where(Delivery.event_id == event.id))
        }
        targets = [
            e for e in outbox.endpoints_for(session, event.payment_id) if e.hears(event.type)
        ]
        for endpoint in targets:
            delivery = existing.get(endpoint.id)
            if delivery is None:
                delivery = Delivery(
                    event_id=event.id,
                    endpoint_id=endpoint.id,
                    payment_id=event.payment_id,
                    sequence=event.sequence,
                    created_at=now,
                )
                session.add(delivery)
            delivery.status = D.PENDING
            delivery.attempts = 0
            delivery.next_attempt_at = now
            delivery.lease_token = delivery.leased_until = None
            delivery.last_error = None
            touched.append(delivery)
        if targets:
            event.status = D.PENDING
            queued.append(event.id)
    session.flush()
    outbox.remember(session, touched)
    return queued


def backoff(settings_schedule: tuple[int, ...], attempts: int) -> timedelta | None:
    """The wait after `attempts` failed attempts; None once the schedule is spent."""
    if attempts > len(settings_schedule):
        return None
    return timedelta(seconds=settings_schedule[attempts - 1])


# The lease ----------------------------------------------------------------------------------


def _due(now: datetime) -> Select[int]:
    """Pending, due, free, and first in line for its endpoint and payment."""
    earlier = aliased(Delivery)
    return (
        select(Delivery.id)
        .join(Endpoint, Endpoint.id == Delivery.endpoint_id)
        .where(
            Endpoint.status == EndpointStatus.ENABLED,
            Delivery.status == D.PENDING,
            Delivery.next_attempt_at <= now,
            or_(Delivery.leased_until.is_(None), Delivery.leased_until < now),
            ~_waits_for(earlier),
        )
    )


def _waits_for(earlier: type[Delivery]) -> Exists:
    """An earlier event of the same payment is still on its way to the same endpoint."""
    return exists().where(
        *_ahead_of(earlier, Delivery.endpoint_id, Delivery.payment_id, Delivery.sequence)
    )


def _ahead_of(
    earlier: type[Delivery], endpoint_id: Any, payment_id: Any, sequence: Any
) -> tuple[ColumnElement[bool], ...]:
    """`earlier` is a pending delivery of the same payment's earlier event to the same endpoint
    (given as columns, to correlate, or as one delivery's values)."""
    return (
        earlier.endpoint_id == endpoint_id,
        earlier.payment_id == payment_id,
        earlier.sequence < sequence,
        earlier.status == D.PENDING,
    )


def _lease(services: Services, delivery_id: int, now: datetime) -> _Held | Outcome:
    events = services.settings.events
    token = secrets.token_hex(16)
    earlier = aliased(Delivery)
    with services.db.transaction() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return Outcome(f"no delivery {delivery_id}")
        if delivery.status is not D.PENDING:
            return Outcome(f"delivery {delivery_id} already {delivery.status.value}")
        if delivery.next_attempt_at and delivery.next_attempt_at > now:
            return Outcome(f"delivery {delivery_id} not due until {delivery.next_attempt_at}")
        if delivery.leased_until and delivery.leased_until >= now:
            return Outcome(f"delivery {delivery_id} is being attempted")
        blocking = (
            session.scalar(
                select(func.min(earlier.sequence)).where(
                    *_ahead_of(
                        earlier, delivery.endpoint_id, delivery.payment_id, delivery.sequence
                    )
                )
            )
            if delivery.payment_id is not None
            else None
        )
        if blocking is not None:
            return Outcome(f"delivery {delivery_id} waits for sequence {blocking}")
        endpoint = session.get(Endpoint, delivery.endpoint_id)
        assert endpoint is not None
        if endpoint.deleted_at is not None:
            _settle(session, delivery, D.FAILED, "not sent: endpoint deleted")
            return Outcome(
                f"delivery {delivery_id} failed: endpoint deleted", _next_in_line(session, delivery)
            )
        if endpoint.status is not EndpointStatus.ENABLED:
            # Enabling the endpoint sends it everything that waited.
            return Outcome(f"delivery {delivery_id} waits: endpoint {endpoint.id} is disabled")
        keys = _secrets(endpoint, events.webhook_secret, now)
        if not keys:
            _settle(session, delivery, D.FAILED, "not sent: no secret to sign with")
            return Outcome(
                f"delivery {delivery_id} failed: no secret", _next_in_line(session, delivery)
            )
        # The compare-and-set that makes the lease ours alone.
        taken = session.execute(
            update(Delivery)
            .where(
                Delivery.id == delivery_id,
                Delivery.status == D.PENDING,
                or_(Delivery.leased_until.is_(None), Delivery.leased_until < now),
            )
            .values(lease_token=token, leased_until=now + events.lease)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if not taken:
            return Outcome(f"delivery {delivery_id} is being attempted")
        event = session.get(MerchantEvent, delivery.event_id)
        assert event is not None
        return _Held(delivery_id, token, endpoint.id, event.id, event.body, endpoint.url, keys)


def _secrets(endpoint: Endpoint, merchant_secret: str | None, now: datetime) -> tuple[str, ...]:
    """The secrets that sign: the current one, and the previous one during a rotation."""
    current = endpoint.secret or merchant_secret
    keys = [current] if current else []
    if (
        endpoint.previous_secret
        and endpoint.previous_secret_until
        and endpoint.previous_secret_until > now
    ):
        keys.append(endpoint.previous_secret)
    return tuple(keys)


# The outcome --------------------------------------------------------------------------------


def _record(
    services: Services,
    held: _Held,
    answer: urls.Answer | None,
    error: str | None,
    duration_ms: int,
    now: datetime,
) -> Outcome:
    events = services.settings.events
    delivered = answer is not None and 200 <= answer.status_code < 300
    if answer is not None and not delivered:
        error = f"answered {answer.status_code}"
    with services.db.transaction() as session:
        # The endpoint first, then the delivery: the order enabling or deleting an endpoint takes
        # them in, so the two never wait for each other. FOR NO KEY UPDATE, not FOR UPDATE:
        # every attempt inserted for this endpoint holds a key-share lock on its row (the foreign
        # key), which FOR UPDATE would wait for while they wait for ours.
        endpoint = session.get(Endpoint, held.endpoint_id, with_for_update={"key_share": True})
        delivery = session.get(Delivery, held.delivery_id, with_for_update=True)
        assert endpoint is not None and delivery is not None
        session.add(
            DeliveryAttempt(
                delivery_id=delivery.id,
                event_id=delivery.event_id,
                endpoint_id=delivery.endpoint_id,
                at=now,
                status_code=answer.status_code if answer else None,
                duration_ms=duration_ms,
                response=answer.body[:ANSWER_KEPT].decode("utf-8", "replace") if answer else None,
                error=error,
            )
        )
        if delivery.lease_token != held.token or delivery.status is not D.PENDING:
            # Our lease ended and another attempt took over: the attempt is on record, its
            # outcome is the other attempt's to write.
            return Outcome(f"delivery {delivery.id}: lease lost, attempt recorded")
        delivery.attempts += 1
        delivery.lease_token = delivery.leased_until = None
        if delivered:
            delivery.delivered_at = now
            _settle(session, delivery, D.DELIVERED, None)
            endpoint.failing_since = None
            return Outcome(
                f"delivery {delivery.id} delivered ({answer.status_code if answer else '-'})",
                _next_in_line(session, delivery),
            )
        endpoint.failing_since = endpoint.failing_since or now
        if now - endpoint.failing_since >= events.disable_after:
            _disable(endpoint, now)
        wait = backoff(events.retry_schedule, delivery.attempts)
        if wait is None:
            _settle(session, delivery, D.FAILED, error)
            return Outcome(
                f"delivery {delivery.id} failed after {delivery.attempts} attempts: {error}",
                _next_in_line(session, delivery),
            )
        delivery.last_error = error
        delivery.next_attempt_at = now + wait
        return Outcome(
            f"delivery {delivery.id} attempt {delivery.attempts} failed ({error}); "
            f"again in {int(wait.total_seconds())} s",
            retry_in=wait.total_seconds(),
        )


def _settle(
    session: Session, delivery: Delivery, status: DeliveryStatus, error: str | None
) -> None:
    delivery.status = status
    delivery.lease_token = delivery.leased_until = None
    if error is not None:
        delivery.last_error = error
    session.flush()
    refresh_event_status(session, delivery.event_id)


def refresh_event_status(session: Session, event_id: str) -> None:
    """An event is delivered once every delivery is, failed once none is pending and one failed."""
    statuses = set(session.scalars(select(Delivery.status).where(Delivery.event_id == event_id)))
    event_status = (
        D.PENDING if D.PENDING in statuses else D.FAILED if D.FAILED in statuses else D.DELIVERED
    )
    session.execute(
        update(MerchantEvent)
        .where(MerchantEvent.id == event_id)
        .values(status=event_status)
        .execution_options(synchronize_session=False)
    )


def _next_in_line(session: Session, delivery: Delivery) -> list[int]:
    """The payment's next pending delivery to the same endpoint, now free to go."""
    if delivery.payment_id is None or delivery.sequence is None:
        return []
    following = session.scalar(
        select(Delivery.id)
        .where(
            Delivery.endpoint_id == delivery.endpoint_id,
            Delivery.payment_id == delivery.payment_id,
            Delivery.sequence > delivery.sequence,
            Delivery.status == D.PENDING,
        )
        .order_by(Delivery.sequence)
        .limit(1)
    )
    return [following] if following is not None else []


def _disable(endpoint: Endpoint, now: datetime) -> None:
    """An endpoint that failed every attempt for `disable_after` stops receiving; what is still
    on its way waits, and goes when an operator enables it again."""
    since = endpoint.failing_since
    endpoint.status = EndpointStatus.DISABLED
    endpoint.disabled_reason = f"every attempt failed since {since.isoformat() if since else '-'}"
    endpoint.updated_at = now
    log.warning(
        "merchant endpoint %s disabled: every attempt failed since %s",
        endpoint.id,
        since.isoformat() if since else "-",
    )
