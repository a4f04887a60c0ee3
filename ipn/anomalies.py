"""Opening anomalies once per fact, however often the fact is reported, and resolving them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ipn import alerts
from ipn.events import outbox
from models import (
    AlertKind,
    Anomaly,
    AnomalyKind,
    AnomalyStatus,
    EventSource,
    EventType,
    Payment,
    utcnow,
)


def open_anomaly(
    session: Session,
    kind: AnomalyKind,
    dedupe_key: str,
    evidence: Mapping[str, Any],
    *,
    payment_id: str | None = None,
    notification_id: int | None = None,
) -> int | None:
    """Record an anomaly; the id when it is new, None when the same fact was already recorded.

    INSERT ... ON CONFLICT DO NOTHING rather than look-then-insert: two workers reporting the
    same fact at once still open one anomaly.
    """
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = (
        insert(Anomaly)
        .values(
            kind=kind,
            dedupe_key=dedupe_key[:255],
            evidence=dict(evidence),
            payment_id=payment_id,
            notification_id=notification_id,
            status=AnomalyStatus.OPEN,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(Anomaly.id)
    )
    anomaly_id = session.execute(statement).scalar_one_or_none()
    if anomaly_id is not None:
        # Counted with the anomaly, in its transaction: the beat's send_alerts tells it.
        alerts.record(session, AlertKind.ANOMALY, kind.value)
    return anomaly_id


def resolve_anomaly(session: Session, anomaly_id: int, resolution: str, by: str) -> Anomaly:
    """Close an open anomaly with what was done about it; resolving twice is refused."""
    anomaly = session.execute(
        select(Anomaly).where(Anomaly.id == anomaly_id).with_for_update()
    ).scalar_one_or_none()
    if anomaly is None:
        raise LookupError(f"no anomaly {anomaly_id}")
    if anomaly.status is AnomalyStatus.RESOLVED:
        raise ValueError(f"anomaly {anomaly_id} is already resolved")
    now = utcnow()
    anomaly.status = AnomalyStatus.RESOLVED
    anomaly.resolution = resolution
    anomaly.resolved_by = by
    anomaly.resolved_at = now
    payment = (
        session.get(Payment, anomaly.payment_id, with_for_update=True)
        if anomaly.payment_id
        else None
    )
    outbox.anomaly_event(session, EventType.ANOMALY_RESOLVED, anomaly, payment, now)
    if payment is not None:
        from ipn.transitions import Evidence, record_note  # it imports this module

        record_note(
            session,
            payment,
            Evidence(EventSource.OPERATOR, "operator"),
            f"anomaly #{anomaly.id} ({anomaly.kind.value}) resolved by {by}: {resolution}",
            now,
            {"anomaly_id": anomaly.id, "resolved_by": by},
        )
    return anomaly
