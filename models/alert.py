"""Alerts waiting to be sent or recently sent: one row per alert, counting what happened since
its last message, so that a burst is told once and the same alert waits out a quiet period."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigId, enum_column


class AlertKind(enum.StrEnum):
    DEAD = "dead"  # notifications the sweeper gave up on (key: provider)
    ANOMALY = "anomaly"  # anomalies opened (key: anomaly kind)
    CHECKS_FAILING = "checks_failing"  # status queries failing (key: provider)
    PROVIDER_SILENT = "provider_silent"  # no callback for too long with open payments


class Alert(Base):
    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("kind", "key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[AlertKind] = mapped_column(enum_column(AlertKind, length=32))
    key: Mapped[str] = mapped_column(String(255))
    # What happened since the last message: occurrences (dead rows, anomalies) or, for a
    # condition, its latest measure; 0 when nothing is waiting.
    count: Mapped[int] = mapped_column(default=0)
    first_at: Mapped[datetime | None]
    last_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]
    # Why the last message could not be sent (cleared by the next one that is).
    last_error: Mapped[str | None] = mapped_column(String(255))
