"""Celery tasks: thin wrappers over plain functions, taking ids, never ORM objects."""

from __future__ import annotations

import logging

from celery import shared_task
from flask import current_app

from ipn import alerts, processing, reconcile, retention, sweeper
from ipn.dispatch import DELIVER_TASK, PROCESS_MANY_TASK, PROCESS_TASK, enqueue, enqueue_delivery
from ipn.events import delivery
from ipn.services import Services

log = logging.getLogger(__name__)

RECONCILE_BUDGET_SECONDS = 50.0
# One claimed batch of due payments, checked by whichever worker takes it.
RECONCILE_BATCH_TASK = "ipn.reconcile_batch"
# A retry this soon is queued with a countdown; later ones are found by `deliver_due`.
SHORT_RETRY_SECONDS = 60


def _services() -> Services:
    services: Services = current_app.extensions["ipn"]
    return services


def _send(notification_id: int, countdown: int | None = None, retries: int = 0) -> None:
    enqueue(current_app.extensions["celery"], notification_id, countdown=countdown, retries=retries)


@shared_task(bind=True, name=PROCESS_TASK, max_retries=None)
def process_notification(self, notification_id: int) -> str:  # type: ignore[no-untyped-def]
    message, countdown = processing.run(_services(), notification_id, self.request.retries)
    if countdown is not None:
        raise self.retry(countdown=countdown)
    return message


@shared_task(name=PROCESS_MANY_TASK)
def process_notifications(notification_ids: list[int]) -> str:
    """Notifications stored together, one after another; each retry goes out on its own."""
    services = _services()
    done = []
    for notification_id in notification_ids:
        message, countdown = processing.run(services, notification_id, 0)
        if countdown is not None:
            try:
                _send(notification_id, countdown, retries=1)
            except Exception as exc:
                # Its next attempt is on the row: the sweeper sends it then.
                log.warning(
                    "notification %s: retry not enqueued (%s); the sweeper will pick it up",
                    notification_id,
                    type(exc).__name__,
                )
        done.append(f"{notification_id}: {message}")
    return "; ".join(done)


@shared_task(name="ipn.sweep_inbox")
def sweep_inbox() -> str:
    return str(sweeper.sweep_inbox(_services(), _send))


@shared_task(name="ipn.reconcile_due")
def reconcile_due() -> str:
    # Stop claiming before the next beat: what is left is claimed by the next one.
    sent = reconcile.enqueue_due(_services(), _send_batch, time_budget=RECONCILE_BUDGET_SECONDS)
    return f"{sent} due payments sent to be checked"


def _send_batch(payment_ids: list[str], lease: str) -> None:
    # A refused publish raises: enqueue_due releases the batch at once.
    reconcile_batch.apply_async(args=[payment_ids, lease], retry=False)


@shared_task(name=RECONCILE_BATCH_TASK)
def reconcile_batch(payment_ids: list[str], lease: str) -> str:
    return str(reconcile.check_claimed(_services(), payment_ids, lease))


def _send_delivery(delivery_id: int, countdown: float | None = None) -> None:
    enqueue_delivery(current_app.extensions["celery"], delivery_id, countdown)


@shared_task(name=DELIVER_TASK)
def deliver_event(delivery_id: int) -> str:
    outcome = delivery.deliver(_services(), delivery_id)
    for next_id in outcome.wake:
        _send_delivery(next_id)
    if outcome.retry_in is not None and outcome.retry_in <= SHORT_RETRY_SECONDS:
        _send_delivery(delivery_id, countdown=outcome.retry_in)
    return outcome.summary


@shared_task(name="ipn.deliver_due")
def deliver_due() -> str:
    return f"{delivery.deliver_due(_services(), _send_delivery)} deliveries sent"


@shared_task(name="ipn.prune")
def prune() -> str:
    return str(retention.prune(_services()))


@shared_task(name="ipn.send_alerts")
def send_alerts() -> str:
    return str(alerts.send_alerts(_services()))
