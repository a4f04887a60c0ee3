"""When to ask a provider about an open payment next: often just after creation and near its
deadline, rarely in between, and not at all once it is settled."""

from __future__ import annotations

from datetime import datetime, timedelta

from models import EventSource, Payment

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
# Providers whose only evidence is their callback: our clock settles expiry after their retries.
CALLBACK_ONLY_RETRY_WINDOW = {"cryptoprocessing": timedelta(hours=24)}


def deadline(payment: Payment, grace: timedelta) -> datetime | None:
    """When an unpaid payment is settled `expired` (after one last question, where we can ask)."""
    if payment.expires_at is None:
        return None
    return (
        payment.expires_at + CALLBACK_ONLY_RETRY_WINDOW.get(payment.provider, timedelta()) + grace
    )


def next_check_at(
    payment: Payment,
    now: datetime,
    source: EventSource,
    grace: timedelta = timedelta(minutes=10),
) -> datetime | None:
    if payment.status.is_terminal:
        return None
    due = deadline(payment, grace)
    if payment.provider in CALLBACK_ONLY_RETRY_WINDOW:
        # Nothing to ask: the only check left is the deadline itself.
        return due
    age = now - payment.created_at
    interval = next((step for limit, step in EARLY_SCHEDULE if age < limit), LATE_INTERVAL)
    if payment.expires_at is not None and abs(payment.expires_at - now) <= NEAR_DEADLINE:
        interval = min(interval, NEAR_DEADLINE_INTERVAL)
    if source is EventSource.CALLBACK:
        interval = max(interval, AFTER_CALLBACK)
    planned = now + interval
    if due is not None:
        planned = min(planned, max(due, now))
    return planned
