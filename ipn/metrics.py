"""Prometheus metrics: per-process counters, and inbox and payment gauges read from the database
at scrape time, so every web and worker process is counted whatever process answers."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from ipn.db import Database
from models import Anomaly, AnomalyStatus, Endpoint, MerchantEvent, Notification, Payment

REGISTRY = CollectorRegistry(auto_describe=True)

CALLBACKS_RECEIVED = Counter(
    "ipn_callbacks_received",
    "Callbacks stored, by provider and kind",
    ["provider", "kind"],
    registry=REGISTRY,
)
CALLBACKS_UNSTORED = Counter(
    "ipn_callbacks_unstored",
    "Callbacks answered 503 because they could not be stored",
    ["provider"],
    registry=REGISTRY,
)


class DatabaseCollector(Collector):
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        notifications = GaugeMetricFamily(
            "ipn_notifications", "Inbox rows by provider and status", labels=["provider", "status"]
        )
        payments = GaugeMetricFamily(
            "ipn_payments", "Payments by provider and status", labels=["provider", "status"]
        )
        anomalies = GaugeMetricFamily("ipn_open_anomalies", "Anomalies waiting for review")
        events = GaugeMetricFamily(
            "ipn_events", "Merchant events by delivery status", labels=["status"]
        )
        endpoints = GaugeMetricFamily(
            "ipn_event_endpoints",
            "Merchant endpoints by status; a disabled one failed every attempt for days",
            labels=["status"],
        )
        with self.db.sessions() as session:
            for provider, status, count in session.execute(
                select(Notification.provider, Notification.status, func.count()).group_by(
                    Notification.provider, Notification.status
                )
            ):
                notifications.add_metric([provider, status.value], count)
            for provider, payment_status, count in session.execute(
                select(Payment.provider, Payment.status, func.count()).group_by(
                    Payment.provider, Payment.status
                )
            ):
                payments.add_metric([provider, payment_status.value], count)
            anomalies.add_metric(
                [],
                session.scalar(select(func.count()).where(Anomaly.status == AnomalyStatus.OPEN))
                or 0,
            )
            for event_status, count in session.execute(
                select(MerchantEvent.status, func.count()).group_by(MerchantEvent.status)
            ):
                events.add_metric([event_status.value], count)
            for endpoint_status, count in session.execute(
                select(Endpoint.status, func.count())
                .where(Endpoint.deleted_at.is_(None))
                .group_by(Endpoint.status)
            ):
                endpoints.add_metric([endpoint_status.value], count)
        yield notifications
        yield payments
        yield anomalies
        yield events
        yield endpoints


def render(db: Database) -> bytes:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(db))
    return generate_latest(REGISTRY) + generate_latest(registry)
