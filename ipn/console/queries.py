"""What the console's pages show, read from the database a page at a time (keyset, newest first)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from ipn.replay import ReplayFilter
from models import (
    Anomaly,
    AnomalyKind,
    AnomalyStatus,
    DeliveryStatus,
    MerchantEvent,
    Notification,
    NotificationKind,
    NotificationStatus,
    Payment,
)

PAGE_SIZE = 50
RECENT_FAILURES = 10
FAILED = (NotificationStatus.FAILED, NotificationStatus.DEAD, NotificationStatus.REJECTED)


@dataclass(frozen=True)
class InboxFilter:
    """The inbox filters; `reference` is an order id, a provider payment id or our payment id."""

    provider: str | None = None
    kind: NotificationKind | None = None
    status: NotificationStatus | None = None
    since: datetime | None = None
    until: datetime | None = None
    reference: str | None = None
    account: str | None = None

    @property
    def replay_filter(self) -> ReplayFilter:
        return ReplayFilter(self.provider, self.status, self.since, self.until, self.account)

    def apply(self, query: Select[Any]) -> Select[Any]:
        query = self.replay_filter.apply(query)
        if self.kind:
            query = query.where(Notification.kind == self.kind)
        if self.reference:
            payments = select(Payment.id).where(
                or_(
                    Payment.id == self.reference,
                    Payment.order_id == self.reference,
                    Payment.provider_payment_id == self.reference,
                )
            )
            query = query.where(Notification.payment_id.in_(payments))
        return query


@dataclass
class Page:
    rows: Sequence[Any]
    # The key to ask for the next (older) page with, or None on the last page.
    next: Any = None


def _keyset(session: Session, query: Select[Any], key: Any, before: Any) -> Page:
    if before is not None:
        query = query.where(key < before)
    rows = list(session.scalars(query.order_by(key.desc()).limit(PAGE_SIZE + 1)))
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    return Page(rows, getattr(rows[-1], key.key) if more and rows else None)


def notifications(session: Session, which: InboxFilter, before: int | None) -> Page:
    return _keyset(session, which.apply(select(Notification)), Notification.id, before)


def payments(
    session: Session, reference: str | None, before: str | None, *, account: str | None = None
) -> Page:
    query = select(Payment)
    if account:
        query = query.where(Payment.account == account)
    if reference:
        query = query.where(
            or_(
                Payment.id == reference,
                Payment.order_id == reference,
                Payment.provider_payment_id == reference,
            )
        )
    return _keyset(session, query, Payment.id, before)


def open_anomalies(session: Session, kind: AnomalyKind | None) -> list[Anomaly]:
    """The open queue, oldest first: what has waited longest is at the top."""
    query = select(Anomaly).where(Anomaly.status == AnomalyStatus.OPEN)
    if kind:
        query = query.where(Anomaly.kind == kind)
    return list(session.scalars(query.order_by(Anomaly.created_at, Anomaly.id).limit(500)))


def open_anomaly_counts(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Anomaly.kind, func.count())
        .where(Anomaly.status == AnomalyStatus.OPEN)
        .group_by(Anomaly.kind)
    )
    return {kind.value: int(count) for kind, count in rows}


def merchant_events(session: Session, status: DeliveryStatus | None, before: str | None) -> Page:
    query = select(MerchantEvent)
    if status:
        query = query.where(MerchantEvent.status == status)
    return _keyset(session, query, MerchantEvent.id, before)


@dataclass
class Overview:
    by_status: dict[str, int] = field(default_factory=dict)
    by_provider: dict[str, dict[str, int]] = field(default_factory=dict)
    oldest_received: datetime | None = None
    open_anomalies: dict[str, int] = field(default_factory=dict)
    last_callback: dict[str, datetime] = field(default_factory=dict)
    last_status_query: dict[str, datetime] = field(default_factory=dict)
    recent_failures: list[Notification] = field(default_factory=list)


def overview(session: Session) -> Overview:
    result = Overview()
    for provider, status, count in session.execute(
        select(Notification.provider, Notification.status, func.count()).group_by(
            Notification.provider, Notification.status
        )
    ):
        result.by_status[status.value] = result.by_status.get(status.value, 0) + int(count)
        result.by_provider.setdefault(provider, {})[status.value] = int(count)
    result.oldest_received = session.scalar(
        select(func.min(Notification.received_at)).where(
            Notification.status == NotificationStatus.RECEIVED
        )
    )
    result.open_anomalies = open_anomaly_counts(session)
    result.last_callback = {
        provider: at
        for provider, at in session.execute(
            select(Notification.provider, func.max(Notification.received_at)).group_by(
                Notification.provider
            )
        )
    }
    # `last_checked_at` is set by a status query that got an answer (a failure leaves it).
    result.last_status_query = {
        provider: at
        for provider, at in session.execute(
            select(Payment.provider, func.max(Payment.last_checked_at)).group_by(Payment.provider)
        )
        if at is not None
    }
    result.recent_failures = list(
        session.scalars(
            select(Notification)
            .where(Notification.status.in_(FAILED))
            .order_by(Notification.id.desc())
            .limit(RECENT_FAILURES)
        )
    )
    return result


@dataclass(frozen=True)
class Body:
    """A callback body as an operator reads it: JSON pretty-printed, form fields as pairs."""

    format: str  # "json" | "form" | "text" | "hex"
    text: str = ""
    fields: tuple[tuple[str, str], ...] = ()


def readable_body(body: str, encoding: str) -> Body:
    if encoding != "utf-8":
        return Body("hex", body)
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict | list):
        return Body("json", json.dumps(parsed, indent=2, ensure_ascii=False, sort_keys=True))
    try:
        pairs = parse_qsl(body, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        pairs = []
    if pairs:
        return Body("form", body, tuple(pairs))
    return Body("text", body)
