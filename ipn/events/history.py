"""What the merchant was told: events picked by filter, each with its deliveries and every
attempt, and redelivery of a filter's events (a dry run only lists them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from ipn import serialize
from ipn.events import delivery
from ipn.services import Services
from models import Delivery, DeliveryAttempt, DeliveryStatus, EventType, MerchantEvent

PAGE = 500


@dataclass(frozen=True)
class EventFilter:
    payment_id: str | None = None
    type: EventType | None = None
    status: DeliveryStatus | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __bool__(self) -> bool:
        return any(
            value is not None
            for value in (self.payment_id, self.type, self.status, self.since, self.until)
        )

    def apply(self, query: Select[Any]) -> Select[Any]:
        if self.payment_id:
            query = query.where(MerchantEvent.payment_id == self.payment_id)
        if self.type:
            query = query.where(MerchantEvent.type == self.type)
        if self.status:
            query = query.where(MerchantEvent.status == self.status)
        if self.since:
            query = query.where(MerchantEvent.created_at >= self.since)
        if self.until:
            query = query.where(MerchantEvent.created_at < self.until)
        return query


def item(e: MerchantEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "type": e.type.value,
        "payment_id": e.payment_id,
        "anomaly_id": e.anomaly_id,
        "sequence": e.sequence,
        "status": e.status.value,
        "created_at": serialize.when(e.created_at),
    }


def detail(session: Session, e: MerchantEvent) -> dict[str, Any]:
    """The event as sent (its body), where it is going, and every attempt, oldest first."""
    deliveries = session.scalars(
        select(Delivery).where(Delivery.event_id == e.id).order_by(Delivery.id)
    )
    attempts = session.scalars(
        select(DeliveryAttempt).where(DeliveryAttempt.event_id == e.id).order_by(DeliveryAttempt.id)
    )
    return {
        **item(e),
        "body": json.loads(e.body),
        "deliveries": [serialize.delivery(d) for d in deliveries],
        "attempts": [attempt(a) for a in attempts],
    }


def attempt(a: DeliveryAttempt) -> dict[str, Any]:
    return {
        "at": serialize.when(a.at),
        "endpoint_id": a.endpoint_id,
        "status_code": a.status_code,
        "duration_ms": a.duration_ms,
        "error": a.error,
        "response": a.response,
    }


def matching_ids(services: Services, which: EventFilter) -> Iterator[str]:
    """Ids of the matching events, oldest first, a page at a time (keyset)."""
    return services.db.keyset(which.apply(select(MerchantEvent.id)), MerchantEvent.id, PAGE)


def redeliver(services: Services, event_ids: list[str], now: datetime) -> list[str]:
    """Queue these events again; the ids of those that went to at least one endpoint."""
    queued: list[str] = []
    for start in range(0, len(event_ids), PAGE):
        with services.db.transaction() as session:
            queued += delivery.redeliver(session, event_ids[start : start + PAGE], now)
    return queued
