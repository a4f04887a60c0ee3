"""When to ask a provider about a payment next: often just after creation and near its deadline,
rarely in between, now and then during a watch window after it settles, then never."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from ipn.config import Settings
from models import EventSource, Payment, PaymentStatus

# (age of the payment below which, interval between checks)
EARLY_SCHEDULE = (
    (timedelta(minutes=10), timedelta(minutes=1)),
    (timedelta(hours=1), timedelta(minutes=5)),
    (timedelta(hours=6), timedelta(minutes=15)),
)
LATE_INTERVAL = timedelta(hours=1)
NEAR_DEADLINE = timedelta(minutes=15)
NEAR_DEADLINE_INTERVAL = timedelta(minutes=2)
# A verified callback just told us the truth: the next question can wait this long.
AFTER_CALLBACK = timedelta(minutes=15)
WATCH_INTERVAL = timedelta(hours=1)
REFUND_WATCH_INTERVAL = timedelta(hours=6)
# After a failed status query: 1, 2, 4, ... minutes, at most an hour.
FAILURE_BACKOFF_MAX = timedelta(hours=1)
# Providers that refund without a callback: paid payments stay watched for a refund window.
REFUNDS_UNANNOUNCED = frozenset({"cubepay", "coinbarpay"})
# Providers whose only evidence is their callback: our clock settles expiry after their retries.
CALLBACK_ONLY_RETRY_WINDOW = {"cryptoprocessing": timedelta(hours=24)}


@dataclass(frozen=True)
class Schedule:
    expiry_grace: timedelta = timedelta(minutes=10)
    late_payment_watch: timedelta = timedelta(hours=24)
    refund_window: timedelta = timedelta(days=30)

    @classmethod
    def from_settings(cls, settings: Settings) -> Schedule:
        return cls(
            settings.expiry_grace, settings.late_payment_watch, settings.coinbarpay_refund_window
        )

    def deadline(self, payment: Payment) -> datetime | None:
        """When an unpaid payment is settled `expired` (after one last question, where we can
        ask): its expiry, plus the provider's callback retries where we cannot ask, plus grace."""
        if payment.expires_at is None:
            return None
        retries = CALLBACK_ONLY_RETRY_WINDOW.get(payment.provider, timedelta())
        return payment.expires_at + retries + self.expiry_grace

    def next_check_at(
        self, payment: Payment, now: datetime, source: EventSource = EventSource.POLL
    ) -> datetime | None:
        if payment.status.is_terminal:
            return self._watch(payment, now)
        due = self.deadline(payment)
        if payment.provider in CALLBACK_ONLY_RETRY_WINDOW:
            # Nothing to ask: the only check left is the deadline itself.
            return due if due is None or due > now else now + NEAR_DEADLINE_INTERVAL
        age = now - payment.created_at
        interval = next((step for limit, step in EARLY_SCHEDULE if age < limit), LATE_INTERVAL)
        if payment.expires_at is not None and abs(payment.expires_at - now) <= NEAR_DEADLINE:
            interval = min(interval, NEAR_DEADLINE_INTERVAL)
        if source is EventSource.CALLBACK:
            interval = max(interval, AFTER_CALLBACK)
        planned = now + interval
        # The deadline pulls the next check in, never to now: past it, the interval decides.
        if due is not None and now < due:
            planned = min(planned, due)
        return planned

    def after_failure(self, payment: Payment, now: datetime) -> datetime:
        """Back off after a status query that got no usable answer."""
        step = timedelta(minutes=2 ** min(payment.poll_failures, 10))
        return now + min(step, FAILURE_BACKOFF_MAX)

    def _watch(self, payment: Payment, now: datetime) -> datetime | None:
        if payment.provider in CALLBACK_ONLY_RETRY_WINDOW:
            return None  # nothing to ask; late callbacks still arrive on their own
        if payment.status is PaymentStatus.PAID and payment.provider in REFUNDS_UNANNOUNCED:
            # Neither sends a callback for a refund (CoinbarPay's SUCCESS turns FAILED, CubePay's
            # status goes 5 then 6): keep asking for a while.
            until = payment.updated_at + self.refund_window
            return min(now + REFUND_WATCH_INTERVAL, until) if now < until else None
        if payment.status in (PaymentStatus.EXPIRED, PaymentStatus.CANCELLED):
            until = (payment.expires_at or payment.updated_at) + self.late_payment_watch
            return min(now + WATCH_INTERVAL, until) if now < until else None
        return None
