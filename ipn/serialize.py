"""The JSON shapes of payments, notifications and anomalies, shared by the API and the CLI."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ipn.currencies import decimals
from models import (
    Anomaly,
    Delivery,
    DeliveryStatus,
    MerchantEvent,
    Notification,
    NotificationReplay,
    Payment,
    PaymentEvent,
)

# Headers whose values may be secrets, by any name a provider or proxy gives them (X-Apikey,
# X-Password, X-BPG-Signature, Proxy-Authorization, ...): shown masked, kept whole on the row
# for replays. A false positive only hides a harmless value from the operator.
SECRET_HEADER = re.compile(r"key|secret|token|passw|signature|auth|cookie|session", re.I)


# Amounts in currencies with at most this many decimals show all of them (10.00 USD).
SHOWN_DECIMALS_MAX = 8


def money(value: Decimal | None, currency: str | None = None) -> str | None:
    """Exact, without the trailing zeros a NUMERIC(48, 24) column adds, but with at least the
    currency's own decimals where it has few: the same text on PostgreSQL and SQLite."""
    if value is None:
        return None
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    places = decimals(currency) if currency else None
    if places and places <= SHOWN_DECIMALS_MAX:
        shown = len(text.split(".")[1]) if "." in text else 0
        if shown < places:
            text = format(value.quantize(Decimal(1).scaleb(-places)), "f")
    return text


def when(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


RELATIVE = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An operator's time: ISO 8601 (a date, or a time with or without an offset, read as UTC)
    or an age such as `30m`, `6h`, `2d` meaning that long ago."""
    text = text.strip()
    if match := RELATIVE.match(text):
        amount, unit = match.groups()
        try:
            return (now or datetime.now(UTC)) - timedelta(**{UNITS[unit]: int(amount)})
        except (OverflowError, ValueError):
            raise ValueError(f"{text!r} reaches before the year 1") from None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use ISO 8601 (2026-11-21T10:00:00Z) or an age (30m, 6h, 2d)"
        ) from None
    if not parsed.tzinfo:
        return parsed.replace(tzinfo=UTC)
    try:
        # In UTC now, so that a time at the edge of the calendar fails here, not in the query.
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is outside the years 1 to 9999 in UTC") from None


def payment(p: Payment) -> dict[str, Any]:
    return {
        "id": p.id,
        "provider": p.provider,
        "account": p.account,
        "order_id": p.order_id,
        "provider_payment_id": p.provider_payment_id,
        "status": p.status.value,
        "provider_status": p.provider_status,
        "amount": money(p.amount, p.currency),
        "currency": p.currency,
        "pay_amount": money(p.pay_amount, p.pay_currency),
        "pay_currency": p.pay_currency,
        "paid_amount": money(p.paid_amount, p.pay_currency),
        "pay_address": p.pay_address,
        "pay_url": p.pay_url,
        "payment_uri": p.payment_uri,
        "expires_at": when(p.expires_at),
        "next_check_at": when(p.next_check_at),
        "adopted": p.adopted,
        "created_at": when(p.created_at),
        "updated_at": when(p.updated_at),
    }


def event(e: PaymentEvent) -> dict[str, Any]:
    return {
        "at": when(e.at),
        "source": e.source.value,
        "from_status": e.from_status.value if e.from_status else None,
        "to_status": e.to_status.value,
        "provider_status": e.provider_status,
        "detail": e.detail,
        "notification_id": e.notification_id,
    }


def anomaly(a: Anomaly) -> dict[str, Any]:
    return {
        "id": a.id,
        "payment_id": a.payment_id,
        "kind": a.kind.value,
        "status": a.status.value,
        "evidence": a.evidence,
        "notification_id": a.notification_id,
        "created_at": when(a.created_at),
        "resolved_at": when(a.resolved_at),
        "resolution": a.resolution,
        "resolved_by": a.resolved_by,
    }


def payment_detail(session: Session, p: Payment) -> dict[str, Any]:
    """The payment with its whole timeline, oldest first, and its anomalies."""
    events = session.scalars(
        select(PaymentEvent).where(PaymentEvent.payment_id == p.id).order_by(PaymentEvent.id)
    )
    anomalies = session.scalars(
        select(Anomaly).where(Anomaly.payment_id == p.id).order_by(Anomaly.id)
    )
    return {
        **payment(p),
        "timeline": [event(e) for e in events],
        "anomalies": [anomaly(a) for a in anomalies],
        "events": merchant_events(session, p.id),
    }


def merchant_events(session: Session, payment_id: str) -> list[dict[str, Any]]:
    """What the merchant was told of this payment, in sequence, and how far each event got."""
    deliveries: dict[str, list[dict[str, Any]]] = {}
    for d in session.scalars(
        select(Delivery).where(Delivery.payment_id == payment_id).order_by(Delivery.id)
    ):
        deliveries.setdefault(d.event_id, []).append(delivery(d))
    return [
        {
            "id": e.id,
            "type": e.type.value,
            "sequence": e.sequence,
            "status": e.status.value,
            "created_at": when(e.created_at),
            "deliveries": deliveries.get(e.id, []),
        }
        for e in session.scalars(
            select(MerchantEvent)
            .where(MerchantEvent.payment_id == payment_id)
            .order_by(MerchantEvent.sequence, MerchantEvent.id)
        )
    ]


def delivery(d: Delivery) -> dict[str, Any]:
    return {
        "endpoint_id": d.endpoint_id,
        "status": d.status.value,
        "attempts": d.attempts,
        "next_attempt_at": when(d.next_attempt_at) if d.status is DeliveryStatus.PENDING else None,
        "delivered_at": when(d.delivered_at),
        "last_error": d.last_error,
    }


def notification(n: Notification) -> dict[str, Any]:
    return {
        "id": n.id,
        "provider": n.provider,
        "account": n.account,
        "kind": n.kind.value,
        "status": n.status.value,
        "received_at": when(n.received_at),
        "processed_at": when(n.processed_at),
        "attempts": n.attempts,
        "last_error": n.last_error,
        "outcome": n.outcome,
        "payment_id": n.payment_id,
        "verified_by": n.verified_by,
    }


def notification_detail(session: Session, n: Notification) -> dict[str, Any]:
    """The row as received: headers with secrets masked, the body as text where it is text."""
    try:
        body: str = n.body.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        body, encoding = n.body.hex(), "hex"
    replays = session.scalars(
        select(NotificationReplay)
        .where(NotificationReplay.notification_id == n.id)
        .order_by(NotificationReplay.id)
    )
    return {
        **notification(n),
        "remote_addr": n.remote_addr,
        "headers": {
            name: ("***" if SECRET_HEADER.search(name) else value)
            for name, value in n.headers.items()
        },
        "body": body,
        "body_encoding": encoding,
        "body_sha256": n.body_sha256,
        # Why the last attempt failed, as the worker saw it (the row shows why, not only what).
        "traceback": n.last_traceback,
        "replays": [
            {
                "at": when(r.at),
                "mode": r.mode.value,
                "previous_status": r.previous_status.value,
                "previous_outcome": r.previous_outcome,
                "requested_by": r.requested_by,
            }
            for r in replays
        ],
    }


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)
