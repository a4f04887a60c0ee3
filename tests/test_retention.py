"""Retention: exactly the bytes that are old enough and needed by nothing are removed, the rows
and the timeline stay, a dry run changes nothing, and a pruned notification cannot be replayed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from console.support import csrf_token, sign_in
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Text, cast, func, select

from ipn import retention
from ipn.config import ConfigurationError, Settings
from ipn.services import Services
from models import (
    Anomaly,
    AnomalyKind,
    AnomalyStatus,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Endpoint,
    EventSource,
    EventType,
    MerchantEvent,
    Notification,
    NotificationKind,
    NotificationStatus,
    Payment,
    PaymentEvent,
    PaymentStatus,
    utcnow,
)

from conftest import Backend
from helpers import count, make_payment

S = NotificationStatus
BODY = b"order_id=M1&status=paid&email=buyer%40example.com" + b"x" * 50
HEADERS = {"Content-Type": "application/x-www-form-urlencoded", "X-Signature": "abc"}
DESCRIPTION = "Order for Jane Doe <jane@example.com>"


@dataclass(frozen=True)
class Case:
    """One notification: its status, age in days, what may still need it, and the verdict."""

    status: NotificationStatus
    days: int
    # "open" / "final" payment, "anomaly" (an open one on the row), "resolved" (a closed one),
    # "payment-anomaly" / "pending-event" / "delivered-event" on its final payment.
    needed_by: str | None
    pruned: bool


CASES = [
    Case(S.PROCESSED, 91, None, True),
    Case(S.PROCESSED, 89, None, False),
    Case(S.IGNORED, 91, None, True),
    Case(S.IGNORED, 89, None, False),
    Case(S.REJECTED, 91, None, False),
    Case(S.REJECTED, 366, None, True),
    Case(S.FAILED, 364, None, False),
    Case(S.FAILED, 366, None, True),
    Case(S.DEAD, 200, None, False),
    Case(S.DEAD, 366, None, True),
    Case(S.RECEIVED, 400, None, False),
    Case(S.PROCESSED, 91, "final", True),
    Case(S.PROCESSED, 91, "open", False),
    Case(S.FAILED, 400, "open", False),
    Case(S.PROCESSED, 91, "anomaly", False),
    Case(S.REJECTED, 400, "anomaly", False),
    Case(S.PROCESSED, 91, "resolved", True),
    Case(S.PROCESSED, 91, "payment-anomaly", False),
    Case(S.PROCESSED, 91, "pending-event", False),
    Case(S.PROCESSED, 91, "delivered-event", True),
]


@dataclass(frozen=True)
class PaymentCase:
    status: PaymentStatus
    days: int
    needed_by: str | None
    redacted: bool


PAYMENT_CASES = [
    PaymentCase(PaymentStatus.PAID, 366, None, True),
    PaymentCase(PaymentStatus.EXPIRED, 366, None, True),
    PaymentCase(PaymentStatus.PAID, 364, None, False),
    PaymentCase(PaymentStatus.PENDING, 400, None, False),
    PaymentCase(PaymentStatus.UNDERPAID, 400, None, False),
    PaymentCase(PaymentStatus.PAID, 400, "payment-anomaly", False),
    PaymentCase(PaymentStatus.PAID, 400, "pending-event", False),
    PaymentCase(PaymentStatus.PAID, 400, "delivered-event", True),
]


class World:
    """Rows built straight into the database, each one a case of the tables above."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.now = utcnow()
        self.orders = 0
        self.endpoint = self._endpoint()

    def ago(self, days: int) -> datetime:
        return self.now - timedelta(days=days)

    def _endpoint(self) -> str:
        with self.services.db.transaction() as session:
            endpoint = Endpoint(url="https://shop.example/hook")
            session.add(endpoint)
            session.flush()
            return endpoint.id

    def payment(self, status: PaymentStatus, days: int = 0) -> str:
        self.orders += 1
        return make_payment(
            self.services.db,
            order_id=f"order-{self.orders}",
            status=status,
            description=DESCRIPTION,
            amount=Decimal("5"),
            created_at=self.ago(days + 1),
            updated_at=self.ago(days),
        ).id

    def need(self, needed_by: str | None, payment_id: str | None, notification_id: int | None):
        with self.services.db.transaction() as session:
            if needed_by in ("anomaly", "resolved", "payment-anomaly"):
                on_row = needed_by != "payment-anomaly"
                session.add(
                    Anomaly(
                        payment_id=None if on_row else payment_id,
                        notification_id=notification_id if on_row else None,
                        kind=AnomalyKind.UNKNOWN_STATUS,
                        dedupe_key=f"case-{self.orders}-{notification_id}",
                        evidence={},
                        status=AnomalyStatus.RESOLVED
                        if needed_by == "resolved"
                        else AnomalyStatus.OPEN,
                    )
                )
            elif needed_by in ("pending-event", "delivered-event"):
                self.event(
                    session,
                    payment_id,
                    DeliveryStatus.PENDING
                    if needed_by == "pending-event"
                    else DeliveryStatus.DELIVERED,
                )

    def event(
        self, session: Any, payment_id: str | None, status: DeliveryStatus, answer_days: int = 0
    ) -> int:
        event = MerchantEvent(
            type=EventType.PAYMENT_PAID, payment_id=payment_id, body="{}", status=status
        )
        session.add(event)
        session.flush()
        delivery = Delivery(event_id=event.id, endpoint_id=self.endpoint, status=status)
        session.add(delivery)
        session.flush()
        attempt = DeliveryAttempt(
            delivery_id=delivery.id,
            event_id=event.id,
            endpoint_id=self.endpoint,
            at=self.ago(answer_days),
            status_code=200,
            response="ok " * 10,
        )
        session.add(attempt)
        session.flush()
        return attempt.id

    def notification(self, case: Case) -> int:
        payment_id = None
        if case.needed_by == "open":
            payment_id = self.payment(PaymentStatus.PENDING)
        elif case.needed_by is not None and case.needed_by not in ("anomaly", "resolved"):
            payment_id = self.payment(PaymentStatus.PAID)
        with self.services.db.transaction() as session:
            row = Notification(
                provider="cubepay",
                kind=NotificationKind.IPN,
                received_at=self.ago(case.days),
                headers=HEADERS,
                body=BODY,
                body_sha256="0" * 64,
                status=case.status,
                outcome="applied",
                payment_id=payment_id,
            )
            session.add(row)
            session.flush()
            if payment_id is not None:
                session.add(
                    PaymentEvent(
                        payment_id=payment_id,
                        source=EventSource.CALLBACK,
                        to_status=PaymentStatus.PAID,
                        notification_id=row.id,
                    )
                )
            notification_id = row.id
        self.need(case.needed_by, payment_id, notification_id)
        return notification_id

    def final_payment(self, case: PaymentCase) -> str:
        payment_id = self.payment(case.status, case.days)
        self.need(case.needed_by, payment_id, None)
        return payment_id


def row_bytes(services: Services) -> int:
    """The body's bytes and the headers as the database keeps their JSON (compact on SQLite)."""
    with services.db.sessions() as session:
        stored = session.scalar(select(func.length(cast(Notification.headers, Text))).limit(1))
    assert stored is not None and stored >= len(json.dumps(HEADERS, separators=(",", ":")))
    return len(BODY) + int(stored)


def snapshot(services: Services) -> list[tuple[Any, ...]]:
    with services.db.sessions() as session:
        rows = session.scalars(select(Notification).order_by(Notification.id))
        notes = [(n.id, n.body, n.headers, n.pruned_at) for n in rows]
        payments = [
            (p.id, p.description, p.redacted_at, p.version)
            for p in session.scalars(select(Payment).order_by(Payment.id))
        ]
        answers = [
            (a.id, a.response)
            for a in session.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id))
        ]
    return [*notes, *payments, *answers]


@pytest.mark.parametrize("batch", [1000, 2])
def test_prune_removes_exactly_what_is_old_and_needed_by_nothing(
    services: Services, batch: int
) -> None:
    world = World(services)
    notes = {world.notification(case): case for case in CASES}
    payments = {world.final_payment(case): case for case in PAYMENT_CASES}
    with services.db.transaction() as session:
        old_answer = world.event(session, None, DeliveryStatus.DELIVERED, answer_days=91)
        young_answer = world.event(session, None, DeliveryStatus.DELIVERED, answer_days=89)
        pending_answer = world.event(session, None, DeliveryStatus.PENDING, answer_days=91)
    timeline = count(services.db, PaymentEvent)
    before = snapshot(services)
    size = row_bytes(services)

    dry = retention.prune(services, dry_run=True, batch=batch)
    assert snapshot(services) == before

    report = retention.prune(services, batch=batch)

    expected_notes = [n for n, case in notes.items() if case.pruned]
    # Payments made for the notification cases are all final for less than a year: kept.
    expected_payments = [p for p, case in payments.items() if case.redacted]
    assert (report.notifications.rows, report.notifications.bytes) == (
        len(expected_notes),
        len(expected_notes) * size,
    )
    assert (report.payments.rows, report.payments.bytes) == (
        len(expected_payments),
        len(expected_payments) * len(DESCRIPTION),
    )
    assert (report.answers.rows, report.answers.bytes) == (1, len("ok " * 10))
    assert (dry.notifications, dry.payments, dry.answers) == (
        report.notifications,
        report.payments,
        report.answers,
    )
    with services.db.sessions() as session:
        for notification_id, case in notes.items():
            row = session.get(Notification, notification_id)
            assert row is not None, case
            # The row and its metadata stay either way.
            assert (row.status, row.outcome, row.provider) == (case.status, "applied", "cubepay")
            if case.pruned:
                assert (row.body, row.headers, row.pruned_at is not None) == (b"", {}, True), case
            else:
                assert (row.body, row.headers, row.pruned_at) == (BODY, HEADERS, None), case
        for payment_id, pcase in payments.items():
            payment = session.get(Payment, payment_id)
            assert payment is not None
            assert payment.status is pcase.status
            if pcase.redacted:
                assert (payment.description, payment.redacted_at is not None) == (None, True)
            else:
                assert (payment.description, payment.redacted_at) == (DESCRIPTION, None), pcase
        answers = {
            a.id: a.response
            for a in session.scalars(
                select(DeliveryAttempt).where(
                    DeliveryAttempt.id.in_([old_answer, young_answer, pending_answer])
                )
            )
        }
    assert answers == {old_answer: None, young_answer: "ok " * 10, pending_answer: "ok " * 10}
    assert count(services.db, PaymentEvent) == timeline

    again = retention.prune(services, batch=batch)
    assert (again.notifications.rows, again.payments.rows, again.answers.rows) == (0, 0, 0)


def test_settings_are_refused_in_one_line_naming_them(backend: Backend) -> None:
    settings = backend.settings()
    assert (settings.retention_days, settings.retention_failed_days) == (90, 365)
    assert backend.settings(IPN_RETENTION_DAYS="30").retention_days == 30
    for env, named in (
        ({"IPN_RETENTION_DAYS": "0"}, "IPN_RETENTION_DAYS"),
        ({"IPN_RETENTION_DAYS": "ninety"}, "IPN_RETENTION_DAYS"),
        ({"IPN_RETENTION_FAILED_DAYS": "-1"}, "IPN_RETENTION_FAILED_DAYS"),
        ({"IPN_RETENTION_DAYS": "400"}, "IPN_RETENTION_FAILED_DAYS"),
    ):
        with pytest.raises(ConfigurationError, match=named) as refused:
            Settings.from_env({**backend.env, **env})
        assert "\n" not in str(refused.value)


def ipn(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=list(args))


def old_processed(services: Services) -> int:
    return World(services).notification(Case(S.PROCESSED, 100, None, True))


def test_the_command_prunes_says_how_much_and_refuses_bad_arguments(
    app: Flask, services: Services
) -> None:
    notification_id = old_processed(services)
    size = row_bytes(services)

    dry = ipn(app, "prune", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"would prune 1 notifications ({size} B)" in dry.output
    assert "retention 90 days (365 for rejected, failed and dead)" in dry.output

    done = ipn(app, "prune", "--json")
    assert done.exit_code == 0, done.output
    answer = json.loads(done.output)
    assert answer["notifications"] == {"rows": 1, "bytes": size}
    assert answer["dry_run"] is False
    with services.db.sessions() as session:
        row = session.get(Notification, notification_id)
        assert row is not None and row.pruned_at is not None

    for args, says in (
        (["--batch", "0"], "--batch"),
        (["--batch", "many"], "--batch"),
        (["--older-than", "3"], "No such option"),
        (["everything"], "unexpected extra argument"),
    ):
        refused = ipn(app, "prune", *args)
        assert refused.exit_code == 2, refused.output
        assert says in refused.output


def test_a_pruned_notification_cannot_be_replayed(
    app: Flask, client: FlaskClient, services: Services, api_headers: dict[str, str]
) -> None:
    notification_id = old_processed(services)
    retention.prune(services)

    answer = client.post(
        f"/api/notifications/{notification_id}/replay", headers=api_headers, json={}
    )
    assert answer.status_code == 409
    assert f"notification {notification_id} was pruned" in answer.get_json()["error"]
    assert "body is gone" in answer.get_json()["error"]

    refused = ipn(app, "replay", str(notification_id))
    assert refused.exit_code == 1
    assert f"notification {notification_id} was pruned" in refused.output

    shown = ipn(app, "notifications", "show", str(notification_id))
    assert shown.exit_code == 0, shown.output
    assert "body: pruned on " in shown.output

    sign_in(client)
    token = csrf_token(client, "/console/notifications")
    console = client.post(
        f"/console/notifications/{notification_id}/replay", data={"csrf_token": token}
    )
    assert console.status_code == 409
    assert "body is gone" in console.get_data(as_text=True)

    # A bulk replay leaves it out instead of failing on it.
    bulk = ipn(app, "replay", "--status", "processed", "--dry-run")
    assert bulk.exit_code == 0, bulk.output
    assert "would replay 0 notifications" in bulk.output
    with services.db.sessions() as session:
        row = session.get(Notification, notification_id)
        assert row is not None and row.status is S.PROCESSED


def test_the_beat_runs_the_prune_daily(app: Flask, services: Services) -> None:
    from workers import tasks

    celery = app.extensions["celery"]
    assert celery.conf.beat_schedule["prune"]["task"] == "ipn.prune"
    assert celery.conf.beat_schedule["prune"]["schedule"] == timedelta(days=1)
    old_processed(services)
    with app.app_context():
        assert tasks.prune.run().startswith("pruned 1 notifications")
