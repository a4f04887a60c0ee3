"""Anomalies: what needs a human (late funds, amount mismatches, unknown statuses) and its end."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigId, enum_column, utcnow


class AnomalyKind(enum.StrEnum):
    LATE_PAYMENT = "late_payment"
    AMOUNT_MISMATCH = "amount_mismatch"
    REFERENCE_MISMATCH = "reference_mismatch"
    UNKNOWN_STATUS = "unknown_status"
    UNEXPECTED_FUNDS = "unexpected_funds"
    PROVIDER_FAILURE = "provider_failure"
    INFERRED_EXPIRY = "inferred_expiry"


class AnomalyStatus(enum.StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


class Anomaly(Base):
    __tablename__ = "anomalies"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    payment_id: Mapped[str | None] = mapped_column(ForeignKey("payments.id"), index=True)
    # Indexed: retention asks of every old notification whether an open anomaly still needs it.
    notification_id: Mapped[int | None] = mapped_column(ForeignKey("notifications.id"), index=True)
    kind: Mapped[AnomalyKind] = mapped_column(enum_column(AnomalyKind, length=32))
    # One anomaly per fact however often the fact is reported: duplicates hit this unique key.
    dedupe_key: Mapped[str] = mapped_column(String(255), unique=True)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[AnomalyStatus] = mapped_column(
        enum_column(AnomalyStatus), default=AnomalyStatus.OPEN
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None]
    resolution: Mapped[str | None] = mapped_column(Text)
    resolved_by: Mapped[str | None] = mapped_column(String(64))
