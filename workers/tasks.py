"""Celery tasks: thin wrappers over plain functions, taking ids, never ORM objects."""

from __future__ import annotations

from celery import shared_task
from flask import current_app

from ipn import processing, sweeper
from ipn.services import Services


def _services() -> Services:
    services: Services = current_app.extensions["ipn"]
    return services


def enqueue(notification_id: int) -> None:
    current_app.extensions["celery"].send_task(
        "ipn.process_notification", args=[notification_id], retry=False
    )


@shared_task(bind=True, name="ipn.process_notification", max_retries=None)
def process_notification(self, notification_id: int) -> str:  # type: ignore[no-untyped-def]
    message, countdown = processing.run(_services(), notification_id, self.request.retries)
    if countdown is not None:
        raise self.retry(countdown=countdown)
    return message


@shared_task(name="ipn.sweep_inbox")
def sweep_inbox() -> str:
    return str(sweeper.sweep_inbox(_services(), enqueue))
