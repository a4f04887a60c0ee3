"""The way out: the merchant's endpoints, the events born beside each committed change (a
transactional outbox), one delivery per event and endpoint, and every attempt at it."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, BigId, enum_column, new_id, utcnow
from models.payment import Payment


class EventType(enum.StrEnum):
    PAYMENT_CREATED = "payment.created"
    PAYMENT_CONFIRMING = "payment.confirming"
    PAYMENT_UNDERPAID = "payment.underpaid"
    PAYMENT_PAID = "payment.paid"
    PAYMENT_EXPIRED = "payment.expired"
    PAYMENT_FAILED = "payment.failed"
    PAYMENT_CANCELLED = "payment.cancelled"
    PAYMENT_REFUNDED = "payment.refunded"
    ANOMALY_OPENED = "anomaly.opened"
    ANOMALY_RESOLVED = "anomaly.resolved"


class EndpointStatus(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class EndpointOrigin(enum.StrEnum):
    API = "api"  # registered through the API or the CLI
    ENVIRONMENT = "environment"  # IPN_MERCHANT_WEBHOOK_URL, kept in step with it
    PAYMENT = "payment"  # a payment's own notify_url: hears only that payment


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Endpoint(Base):
    __tablename__ = "endpoints"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("ep_"))
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    # The event types this endpoint hears; empty: all of them.
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[EndpointStatus] = mapped_column(
        enum_column(EndpointStatus), default=EndpointStatus.ENABLED
    )
    origin: Mapped[EndpointOrigin] = mapped_column(
        enum_column(EndpointOrigin), default=EndpointOrigin.API
    )
    # `whsec_...`; None signs with IPN_MERCHANT_WEBHOOK_SECRET, which never enters the database.
    secret: Mapped[str | None] = mapped_column(String(128))
    # After a rotation the old secret signs too, until this time: shops switch without a gap.
    previous_secret: Mapped[str | None] = mapped_column(String(128))
    previous_secret_until: Mapped[datetime | None]
    payment_id: Mapped[str | None] = mapped_column(ForeignKey("payments.id"), index=True)
    # The first failed attempt since the last delivered one; long enough ago, it disables.
    failing_since: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    # A deleted endpoint stays as the target of its past deliveries, hidden from listings.
    deleted_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    # Declared so that one flush writes a payment before its own notify_url endpoint.
    payment: Mapped[Payment | None] = relationship(lazy="raise")

    def hears(self, event_type: str) -> bool:
        return not self.events or event_type in self.events


class MerchantEvent(Base):
    """One event for the merchant, written in the transaction of the change it tells of."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("payment_id", "sequence"),)

    # Sent as `webhook-id`: the same on every attempt, so the shop can drop a repeat.
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("evt_"))
    type: Mapped[EventType] = mapped_column(enum_column(EventType, length=32), index=True)
    payment_id: Mapped[str | None] = mapped_column(ForeignKey("payments.id"), index=True)
    anomaly_id: Mapped[int | None] = mapped_column(ForeignKey("anomalies.id"))
    # Per payment, only grows: the shop can tell an older event from a newer one.
    sequence: Mapped[int | None]
    # The exact JSON that is signed and sent, frozen when the change was committed.
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[DeliveryStatus] = mapped_column(
        enum_column(DeliveryStatus), default=DeliveryStatus.PENDING, index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # Declared so that one flush writes the payment before its events.
    payment: Mapped[Payment | None] = relationship(lazy="raise")


class Delivery(Base):
    """An event on its way to one endpoint."""

    __tablename__ = "event_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "endpoint_id"),
        # What is due, oldest first.
        Index("ix_event_deliveries_due", "status", "next_attempt_at"),
        # A payment's earlier events to the same endpoint go first.
        Index("ix_event_deliveries_order", "endpoint_id", "payment_id", "sequence"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("endpoints.id"))
    # The event's payment and sequence again, so the ordering rule is one indexed lookup.
    payment_id: Mapped[str | None] = mapped_column(String(32))
    sequence: Mapped[int | None]
    status: Mapped[DeliveryStatus] = mapped_column(
        enum_column(DeliveryStatus), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    # A worker attempting the delivery holds it: only the holder of the token records the
    # outcome, and nobody else attempts it until the lease ends (a killed worker's lease ends).
    lease_token: Mapped[str | None] = mapped_column(String(32))
    leased_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # Declared so that one flush writes the event and its endpoint before their deliveries.
    event: Mapped[MerchantEvent] = relationship(lazy="raise")
    endpoint: Mapped[Endpoint] = relationship(lazy="raise")


class DeliveryAttempt(Base):
    """One POST to an endpoint and what came of it. Rows are only ever inserted."""

    __tablename__ = "event_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("event_deliveries.id"), index=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("endpoints.id"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None]
    duration_ms: Mapped[int] = mapped_column(default=0)
    # The first 2 KiB of the answer, as text.
    response: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)

    delivery: Mapped[Delivery] = relationship(lazy="raise")
