"""The inbox: each callback as it arrived (raw bytes, headers, address, time) and its fate."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigId, enum_column, utcnow


class NotificationStatus(enum.StrEnum):
    RECEIVED = "received"  # stored, not yet handled (or handled and waiting to retry)
    PROCESSED = "processed"  # acted on: its effect, if any, is applied
    REJECTED = "rejected"  # forged or malformed: kept, never applied
    FAILED = "failed"  # gave up after retries or a permanent provider error
    DEAD = "dead"  # the sweeper gave up on it; only an operator replay revives it
    IGNORED = "ignored"  # provider not configured, or a kind we do not handle

    @property
    def is_settled(self) -> bool:
        return self is not NotificationStatus.RECEIVED


class NotificationKind(enum.StrEnum):
    IPN = "ipn"
    NOTIFICATION = "notification"
    ANOMALY = "anomaly"
    CALLBACK = "callback"


class ReplayMode(enum.StrEnum):
    STORED = "stored"  # run the stored callback through the same path again
    REFETCH = "refetch"  # ask the provider afresh, whatever the stored callback says


class Notification(Base):
    __tablename__ = "notifications"
    __table_args__ = (
        Index("ix_notifications_status_due", "status", "next_attempt_at"),
        Index("ix_notifications_provider_received", "provider", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(32))
    # The account whose callback path it came to: its credentials verify it.
    account: Mapped[str] = mapped_column(String(40), default="default", server_default="default")
    kind: Mapped[NotificationKind] = mapped_column(enum_column(NotificationKind))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    headers: Mapped[dict[str, str]] = mapped_column(JSON)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    # SHA-256 of the body: duplicates share it. Not unique: every delivery is kept.
    body_sha256: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[NotificationStatus] = mapped_column(
        enum_column(NotificationStatus), default=NotificationStatus.RECEIVED
    )
    attempts: Mapped[int] = mapped_column(default=0)
    last_attempt_at: Mapped[datetime | None]
    # When the sweeper may next pick the row up if nothing else has; pushed out by each attempt.
    next_attempt_at: Mapped[datetime | None]
    # The last failed attempt's exception as `Type: message`, and its traceback (kept on the
    # row, as dj-stripe's WebhookEventTrigger does, so the row itself shows why).
    last_error: Mapped[str | None] = mapped_column(Text)
    last_traceback: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[datetime | None]
    # Set by an operator replay until the replay has run, so its effect is told as a replay.
    replay_mode: Mapped[ReplayMode | None] = mapped_column(enum_column(ReplayMode))
    payment_id: Mapped[str | None] = mapped_column(ForeignKey("payments.id"), index=True)
    # When retention emptied the body and headers: the row and its verdict stay, the bytes
    # are gone, so it can no longer be replayed.
    pruned_at: Mapped[datetime | None]
    # The id of the request that brought it (the caller's sane X-Request-Id, else one of ours):
    # the worker's log lines for the row carry it too.
    request_id: Mapped[str | None] = mapped_column(String(64))
    # Which of the account's secrets verified it: `current`, or a replaced one still valid
    # (`previous until ...`); none for a row not verified by a signature.
    verified_by: Mapped[str | None] = mapped_column(String(64))


class NotificationReplay(Base):
    """One operator replay of a notification: when, how, and what it was before."""

    __tablename__ = "notification_replays"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    notification_id: Mapped[int] = mapped_column(ForeignKey("notifications.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    mode: Mapped[ReplayMode] = mapped_column(enum_column(ReplayMode))
    previous_status: Mapped[NotificationStatus] = mapped_column(enum_column(NotificationStatus))
    previous_outcome: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(String(64), default="operator")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
