"""The worker's one-statement writer (PostgreSQL) writes exactly what the ORM writer writes: the
payment, its timeline line, the merchant's event and its deliveries, and the settled row."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event, inspect, select

from ipn import applying
from ipn.db import Prepared
from ipn.events import signing
from ipn.polling import Schedule
from ipn.processing import process_notification
from ipn.providers.base import Snapshot
from ipn.services import Services
from ipn.transitions import Change, Verdict, take
from models import (
    Delivery,
    Endpoint,
    EventSource,
    MerchantEvent,
    NotificationStatus,
    Payment,
    PaymentStatus,
    utcnow,
)

from helpers import (
    JSON,
    PROVIDER_URL,
    bitcoinpaygate_payment,
    bpg_signature,
    bpg_snapshot,
    events,
    load_payment,
    notification,
)

# Columns that name the payment itself, or say when it was written.
OWN = {"id", "order_id", "provider_payment_id", "created_at", "updated_at", "next_check_at"}


def add_endpoint(services: Services, events: list[str]) -> str:
    now = utcnow()
    endpoint = Endpoint(
        url="https://shop.example/events",
        secret=signing.new_secret(),
        events=events,
        created_at=now,
        updated_at=now,
    )
    with services.db.transaction() as session:
        session.add(endpoint)
    return endpoint.id


def pay(
    client: FlaskClient, app: Flask, services: Services, api: responses.RequestsMock, n: int
) -> tuple[str, int]:
    """One pending payment, its signed CONFIRMED callback stored and processed."""
    payment_id, order_id = f"bpg{n:037d}", f"order-{n}"
    payment = bitcoinpaygate_payment(services.db, order_id=order_id, provider_payment_id=payment_id)
    api.get(
        f"{PROVIDER_URL}/bitcoinpaygate/v2/payments/{payment_id}",
        body=bpg_snapshot("CONFIRMED", payment_id=payment_id, order_id=order_id),
    )
    body = bpg_snapshot("CONFIRMED", payment_id=payment_id, order_id=order_id)
    headers = {**JSON, "X-BPG-Signature": bpg_signature(body)}
    response = client.post("/ipn/bitcoinpaygate/notification", data=body, headers=headers)
    assert response.status_code == 200
    notification_id = app.extensions["ipn.dispatcher"].submitted[-1]
    outcome = process_notification(services, notification_id)
    assert outcome.status is NotificationStatus.PROCESSED
    return payment.id, notification_id


def written(services: Services, payment_id: str, notification_id: int) -> dict[str, Any]:
    """Everything the change wrote, without what names the payment or says when."""
    payment = load_payment(services.db, payment_id)
    row = notification(services.db, notification_id)
    with services.db.sessions() as session:
        [merchant_event] = session.scalars(
            select(MerchantEvent).where(MerchantEvent.payment_id == payment_id)
        )
        sent = session.scalars(select(Delivery).where(Delivery.payment_id == payment_id)).all()
    body = json.loads(merchant_event.body)
    data = {k: v for k, v in body["data"].items() if k not in OWN}
    return {
        "payment": {
            column: getattr(payment, column)
            for column in payment.__table__.columns.keys()
            if column not in OWN
        },
        "checked after": payment.next_check_at and payment.next_check_at - payment.updated_at,
        "timeline": [
            (e.source, e.from_status, e.to_status, e.provider_status, e.notification_id == row.id)
            for e in events(services.db, payment_id)
        ],
        "details": [e.detail.replace(f"#{row.id}", "#N") for e in events(services.db, payment_id)],
        "event": (merchant_event.type, merchant_event.sequence, merchant_event.status, data),
        "event stamped": body["timestamp"] is not None and merchant_event.created_at is not None,
        "deliveries": sorted(
            (d.endpoint_id, d.status, d.attempts, d.sequence, d.event_id == merchant_event.id)
            for d in sent
        ),
        "settled": (row.status, row.outcome, row.payment_id == payment_id, row.verified_by),
        "settled when": (row.processed_at is not None, row.next_attempt_at, row.replay_mode),
    }


def test_one_statement_writes_what_the_orm_writer_writes(
    client: FlaskClient,
    app: Flask,
    services: Services,
    provider_api: responses.RequestsMock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_endpoint(services, [])
    add_endpoint(services, ["payment.paid"])
    add_endpoint(services, ["payment.refunded"])  # hears nothing of this change

    with monkeypatch.context() as orm_only:
        orm_only.setattr(applying, "applies", lambda *_: False)
        by_orm = pay(client, app, services, provider_api, 1)

    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        statements.append(sql)

    run_by_driver = Prepared.rows

    def count_driver(prepared: Prepared, *args: Any) -> Any:
        statements.append(prepared.sql)
        return run_by_driver(prepared, *args)

    event.listen(services.db.engine, "before_cursor_execute", count)
    try:
        with monkeypatch.context() as counted:
            counted.setattr(Prepared, "rows", count_driver)
            by_statement = pay(client, app, services, provider_api, 2)
    finally:
        event.remove(services.db.engine, "before_cursor_execute", count)

    orm, one = written(services, *by_orm), written(services, *by_statement)
    assert one == orm
    assert one["payment"]["status"] is PaymentStatus.PAID
    assert len(one["deliveries"]) == 2
    if services.db.is_postgresql:
        # The payment made (1; the callback is stored by the driver's own statement, not
        # counted here); then claimed, looked up, written with its notification settled (3, by
        # the driver).
        assert len(statements) == 4


def test_the_statement_sets_every_column_a_change_may_give_a_payment() -> None:
    """`take` (the ORM writer's) may set no column the one statement leaves out."""
    now = utcnow()
    payment = Payment(
        id="pay_1",
        provider="bitcoinpaygate",
        order_id="order-1",
        status=PaymentStatus.PENDING,
        expiry_inferred=True,
        event_sequence=0,
        created_at=now - timedelta(minutes=5),
        updated_at=now - timedelta(minutes=5),
    )
    snapshot = Snapshot(
        "CONFIRMED",
        order_id="order-1",
        provider_payment_id="bpg-1",
        amount=Decimal("10.00"),
        currency="USD",
        pay_amount=Decimal("0.001"),
        pay_currency="BTC",
        paid_amount=Decimal("0.001"),
        pay_address="bc1q",
        pay_url="https://pay.example/1",
        payment_uri="bitcoin:bc1q",
        expires_at=now + timedelta(minutes=10),
        as_of=now,
    )
    change = Change(
        Verdict.MOVE,
        PaymentStatus.PENDING,
        PaymentStatus.PAID,
        "paid",
        takes_snapshot=True,
        paid_amount=Decimal("0.001"),
    )
    take(payment, change, now, EventSource.CALLBACK, snapshot=snapshot, schedule=Schedule())
    set_by_take = {
        name
        for name, attribute in inspect(payment).attrs.items()
        if attribute.history.has_changes()
    }
    assert set_by_take - {"id", "provider", "order_id", "created_at"} <= set(
        applying.PAYMENT_COLUMNS
    )
    assert {"status", "paid_amount", "pay_address", "snapshot_at", "next_check_at"} <= set_by_take
