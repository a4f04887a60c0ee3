"""Prometheus metrics: counters and histograms each process writes to its own file in
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode, see ipn.metric_files), summed
over every web and worker process at scrape time, and gauges read from the database then."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from ipn import rate_limit
from ipn.config import PROVIDERS
from ipn.db import Database
from models import (
    TERMINAL,
    Anomaly,
    AnomalyStatus,
    Endpoint,
    MerchantEvent,
    Notification,
    NotificationStatus,
    Payment,
    ProviderCalls,
    utcnow,
)

# Seconds: from a fast callback answer to a provider that hangs until its deadline.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Seconds from receipt to settlement: a worker at once, a retry, the sweeper after minutes.
LAG_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 24 * 3600)
PASS_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120)

# Not registered anywhere: in multiprocess mode the values live in files, and the scrape reads
# them with a MultiProcessCollector (render below).
CALLBACKS = Counter(
    "ipn_callbacks", "Callbacks stored, by provider and kind", ["provider", "kind"], registry=None
)
CALLBACKS_REFUSED = Counter(
    "ipn_callbacks_refused",
    "Callbacks answered without being stored: 413 too large, 400 cut short, 503 not stored",
    ["provider", "code"],
    registry=None,
)
# secret="previous": still signed with a replaced secret; at zero for a while, it can go.
CALLBACKS_VERIFIED = Counter(
    "ipn_callbacks_verified",
    "Callbacks whose signature verified, by account and by the secret that verified it",
    ["provider", "account", "secret"],
    registry=None,
)
CALLBACK_DURATION = Histogram(
    "ipn_callback_duration_seconds",
    "Time the callback view took to answer, whatever it answered",
    ["provider"],
    buckets=REQUEST_BUCKETS,
    registry=None,
)
SETTLED = Counter(
    "ipn_notifications_settled",
    "Inbox rows settled, by provider and final status (processed, rejected, ignored, failed, dead)",
    ["provider", "status"],
    registry=None,
)
REJECTED = Counter(
    "ipn_notifications_rejected",
    "Inbox rows settled rejected, by reason class (forged, malformed, unconfirmed)",
    ["provider", "reason"],
    registry=None,
)
PROCESSING_LAG = Histogram(
    "ipn_processing_lag_seconds",
    "Time from a callback's receipt to its row being settled",
    ["provider"],
    buckets=LAG_BUCKETS,
    registry=None,
)
RETRIES = Counter(
    "ipn_notification_retries",
    "Processing attempts that failed transiently and were scheduled again",
    registry=None,
)
PROVIDER_REQUESTS = Counter(
    "ipn_provider_requests",
    "HTTP requests to providers (each attempt), by operation and outcome (ok, 4xx, 5xx, "
    "timeout, unreachable, garbage)",
    ["provider", "operation", "outcome"],
    registry=None,
)
PROVIDER_REQUEST_DURATION = Histogram(
    "ipn_provider_request_duration_seconds",
    "Time of one HTTP request to a provider, answer read",
    ["provider", "operation"],
    buckets=REQUEST_BUCKETS,
    registry=None,
)
RECONCILE_CHECKS = Counter(
    "ipn_reconcile_checks",
    "Payments a reconciliation pass handled, by outcome (changed, unchanged, expired, failed, "
    "budget, skipped, busy, final)",
    ["provider", "outcome"],
    registry=None,
)
RECONCILE_PASS_DURATION = Histogram(
    "ipn_reconcile_pass_duration_seconds",
    "Time of one reconciliation pass",
    buckets=PASS_BUCKETS,
    registry=None,
)
RECONCILE_PASS_PAYMENTS = Counter(
    "ipn_reconcile_pass_payments",
    "Payments of reconciliation passes: checked, changed, failed, skipped (skipped_budget: the "
    "provider's call budget was spent)",
    ["result"],
    registry=None,
)
DISPATCH_QUEUE = Gauge(
    "ipn_dispatch_queue_depth",
    "Ids waiting in the web processes' dispatch queues for the broker",
    ["what"],
    multiprocess_mode="livesum",
    registry=None,
)
DISPATCH_DROPPED = Counter(
    "ipn_dispatch_dropped",
    "Ids dropped because a dispatch queue was full (left for the sweeper)",
    ["what"],
    registry=None,
)
DISPATCH_FAILED = Counter(
    "ipn_dispatch_failed",
    "Ids the broker did not take (left for the sweeper)",
    ["what"],
    registry=None,
)

# Every provider's series exist from the start at 0, so that `increase()` sees the first dead
# row or failed query instead of a series that begins at 1.
OUTCOMES = ("ok", "4xx", "5xx", "timeout", "unreachable", "garbage")
for _provider in PROVIDERS:
    for _status in NotificationStatus:
        if _status.is_settled:
            SETTLED.labels(_provider, _status.value)
    for _outcome in OUTCOMES:
        PROVIDER_REQUESTS.labels(_provider, "status", _outcome)

_PENDING = "ipn.metrics.settled"
_REJECT_CLASSES = ("forged", "malformed")


def observe_settled(
    session: Session,
    provider: str,
    status: NotificationStatus,
    received_at: datetime,
    outcome: str | None = None,
) -> None:
    """Count one settled row once `session` commits; nothing if it rolls back."""
    session.info.setdefault(_PENDING, []).append((provider, status, received_at, outcome))


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    now = utcnow()
    for provider, status, received_at, outcome in session.info.pop(_PENDING, []):
        SETTLED.labels(provider, status.value).inc()
        if status is NotificationStatus.REJECTED:
            REJECTED.labels(provider, reject_class(outcome)).inc()
        PROCESSING_LAG.labels(provider).observe(max(0.0, (now - received_at).total_seconds()))


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)


def reject_class(outcome: str | None) -> str:
    """`forged: ...` and `malformed: ...` say so; the rest could not be confirmed."""
    head = (outcome or "").split(":", 1)[0]
    return head if head in _REJECT_CLASSES else "unconfirmed"


class DatabaseCollector(Collector):
    """Gauges read from the database at each scrape, so every process's work is in them."""

    def __init__(self, db: Database, poll_limits: Mapping[str, tuple[int, str]]) -> None:
        self.db = db
        self.poll_limits = poll_limits

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        notifications = GaugeMetricFamily(
            "ipn_notifications", "Inbox rows by provider and status", labels=["provider", "status"]
        )
        oldest = GaugeMetricFamily(
            "ipn_oldest_received_age_seconds",
            "Age of the oldest inbox row still `received` (0 when none waits)",
        )
        payments = GaugeMetricFamily(
            "ipn_payments", "Payments by provider and status", labels=["provider", "status"]
        )
        open_payments = GaugeMetricFamily(
            "ipn_open_payments", "Payments not yet final, by provider", labels=["provider"]
        )
        silence = GaugeMetricFamily(
            "ipn_last_callback_age_seconds",
            "Seconds since the provider's last stored callback; for a provider with open "
            "payments and no callback yet, since its oldest open payment was created",
            labels=["provider"],
        )
        overdue = GaugeMetricFamily(
            "ipn_payments_check_overdue",
            "Payments whose next status check is due and not leased by a pass",
        )
        budget = GaugeMetricFamily(
            "ipn_provider_calls_left",
            "Status calls left in the provider's budget for the current period",
            labels=["provider", "period"],
        )
        anomalies = GaugeMetricFamily(
            "ipn_open_anomalies", "Anomalies waiting for review, by kind", labels=["kind"]
        )
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
            first = session.scalar(
                select(func.min(Notification.received_at)).where(
                    Notification.status == NotificationStatus.RECEIVED
                )
            )
            oldest.add_metric([], _age(now, first))
            for provider, payment_status, count in session.execute(
                select(Payment.provider, Payment.status, func.count()).group_by(
                    Payment.provider, Payment.status
                )
            ):
                payments.add_metric([provider, payment_status.value], count)
            opened: dict[str, tuple[int, datetime | None]] = {
                provider: (count, created)
                for provider, count, created in session.execute(
                    select(Payment.provider, func.count(), func.min(Payment.created_at))
                    .where(Payment.status.not_in(TERMINAL))
                    .group_by(Payment.provider)
                )
            }
            for provider, (count, _) in sorted(opened.items()):
                open_payments.add_metric([provider], count)
            last: dict[str, datetime] = {
                provider: received
                for provider, received in session.execute(
                    select(Notification.provider, func.max(Notification.received_at)).group_by(
                        Notification.provider
                    )
                )
            }
            for provider in sorted(set(last) | set(opened)):
                since = last.get(provider) or opened[provider][1]
                silence.add_metric([provider], _age(now, since))
            overdue.add_metric(
                [],
                session.scalar(
                    select(func.count())
                    .select_from(Payment)
                    .where(Payment.next_check_at <= now)
                    .where((Payment.leased_until.is_(None)) | (Payment.leased_until <= now))
                )
                or 0,
            )
            for provider, (limit, period) in sorted(self.poll_limits.items()):
                used = session.scalar(
                    select(ProviderCalls.calls).where(
                        ProviderCalls.provider == provider,
                        ProviderCalls.period == rate_limit.period_key(period, now),
                    )
                )
                budget.add_metric([provider, period], max(0, limit - (used or 0)))
            for kind, count in session.execute(
                select(Anomaly.kind, func.count())
                .where(Anomaly.status == AnomalyStatus.OPEN)
                .group_by(Anomaly.kind)
            ):
                anomalies.add_metric([kind.value], count)
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
        yield from (notifications, oldest, payments, open_payments, silence, overdue, budget)
        yield from (anomalies, events, endpoints)


def _age(now: datetime, then: datetime | None) -> float:
    return 0.0 if then is None else max(0.0, (now - then).total_seconds())


def render(db: Database, poll_limits: Mapping[str, tuple[int, str]]) -> bytes:
    """Every process's counters and histograms, then the database's gauges."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(DatabaseCollector(db, poll_limits))
    return generate_latest(registry)
