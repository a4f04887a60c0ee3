"""Celery tasks: thin wrappers over plain functions, taking ids, never ORM objects."""

from __future__ import annotations

from celery import shared_task
from flask import current_app

from ipn import processing, reconcile, sweeper
from ipn.dispatch import PROCESS_TASK, enqueue
from ipn.services import Services

RECONCILE_BUDGET_SECONDS = 50.0


def _services() -> Services:
    services: Services = current_app.extensions["ipn"]
    return services


def _send(notification_id: int) -> None:
    enqueue(current_app.extensions["celery"], notification_id)


@shared_task(bind=True, name=PROCESS_TASK, max_retries=None)
def process_notification(self, notification_id: int) -> str:  # type: ignore[no-untyped-def]
    message, countdown = processing.run(_services(), notification_id, self.request.retries)
    if countdown is not None:
        raise self.retry(countdown=countdown)
    return message


@shared_task(name="ipn.sweep_inbox")
def sweep_inbox() -> str:
    return str(sweeper.sweep_inbox(_services(), _send))


@shared_task(name="ipn.reconcile_due")
def reconcile_due() -> str:
    # Stop claiming before the next beat: an unfinished pass is picked up by the next one.
    return str(reconcile.reconcile_due(_services(), time_budget=RECONCILE_BUDGET_SECONDS))
