"""Payments, their normalized states, and the append-only timeline that explains each state."""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigId, enum_column, new_id, utcnow


class PaymentStatus(enum.StrEnum):
    PENDING = "pending"
    CONFIRMING = "confirming"
    UNDERPAID = "underpaid"
    PAID = "paid"
    EXPIRED = "expired"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL

    @property
    def is_open(self) -> bool:
        return self not in TERMINAL


TERMINAL = frozenset(
    {
        PaymentStatus.PAID,
        PaymentStatus.EXPIRED,
        PaymentStatus.FAILED,
        PaymentStatus.CANCELLED,
        PaymentStatus.REFUNDED,
    }
)
OPEN = frozenset(set(PaymentStatus) - TERMINAL)


class EventSource(enum.StrEnum):
    CREATE = "create"
    CALLBACK = "callback"
    POLL = "poll"
    EXPIRY = "expiry"
    REPLAY = "replay"
    OPERATOR = "operator"


class Payment(Base):
    __tablename__ = "payments"
    __table_args__ = (
        # An order id is the merchant's reference within one account: two shops may both
        # have an order 1001 at the same provider.
        UniqueConstraint("provider", "account", "order_id"),
        UniqueConstraint("provider", "provider_payment_id"),
        # A pass claims in this order: the longest overdue first.
        Index("ix_payments_next_check_at", "next_check_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("pay_"))
    provider: Mapped[str] = mapped_column(String(32))
    # Which of the provider's merchant accounts (IPN_ACCOUNTS_FILE) it was created with: its
    # status is asked with that account's credentials.
    account: Mapped[str] = mapped_column(String(40), default="default", server_default="default")
    order_id: Mapped[str] = mapped_column(String(255), index=True)
    provider_payment_id: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[PaymentStatus] = mapped_column(
        enum_column(PaymentStatus), default=PaymentStatus.PENDING
    )
    provider_status: Mapped[str | None] = mapped_column(String(64))
    amount: Mapped[Decimal | None]
    currency: Mapped[str | None] = mapped_column(String(16))
    pay_amount: Mapped[Decimal | None]
    pay_currency: Mapped[str | None] = mapped_column(String(16))
    paid_amount: Mapped[Decimal | None]
    pay_address: Mapped[str | None] = mapped_column(String(255))
    pay_url: Mapped[str | None] = mapped_column(Text)
    payment_uri: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime | None]
    # True when `expired` came from our clock, not the provider: the one expiry a later
    # verified completion may overturn.
    expiry_inferred: Mapped[bool] = mapped_column(default=False)
    adopted: Mapped[bool] = mapped_column(default=False)
    # The provider's own clock on the newest snapshot applied; older snapshots are stale.
    snapshot_at: Mapped[datetime | None]
    next_check_at: Mapped[datetime | None]
    checks: Mapped[int] = mapped_column(default=0)
    # Status queries in a row that got no usable answer: drives the backoff of the next one.
    poll_failures: Mapped[int] = mapped_column(default=0, server_default="0")
    last_checked_at: Mapped[datetime | None]
    # Why the last status query failed (cleared by the next one that succeeds); `poll_failures`
    # counts the failures in a row.
    last_check_error: Mapped[str | None] = mapped_column(Text)
    # A reconciliation pass that claims the payment writes a fresh token and an expiry: only
    # the holder of the token may apply an answer, and nobody else asks until the lease ends.
    lease_token: Mapped[str | None] = mapped_column(String(32))
    leased_until: Mapped[datetime | None]
    # Per-payment secret the provider echoes back (CubePay `other`); never logged or shown.
    callback_token: Mapped[str | None] = mapped_column(String(64))
    # The sequence of the payment's newest merchant event; bumped in the transaction of the
    # change, under the compare-and-set below, so two events never share a number.
    event_sequence: Mapped[int] = mapped_column(default=0, server_default="0")
    # Every UPDATE is a compare-and-set on this column (SQLAlchemy raises StaleDataError when
    # the row changed underneath): concurrent workers cannot both apply a transition.
    version: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When retention removed what the shop said of its customer (the description).
    redacted_at: Mapped[datetime | None]

    __mapper_args__ = {"version_id_col": version}

    def __repr__(self) -> str:
        return f"<Payment {self.id} {self.provider}:{self.order_id} {self.status.value}>"


class PaymentEvent(Base):
    """One line of a payment's timeline. Rows are only ever inserted."""

    __tablename__ = "payment_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    payment_id: Mapped[str] = mapped_column(ForeignKey("payments.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    source: Mapped[EventSource] = mapped_column(enum_column(EventSource))
    from_status: Mapped[PaymentStatus | None] = mapped_column(enum_column(PaymentStatus))
    to_status: Mapped[PaymentStatus] = mapped_column(enum_column(PaymentStatus))
    provider_status: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
    notification_id: Mapped[int | None] = mapped_column(ForeignKey("notifications.id"))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
