"""Builds the Celery app bound to the Flask app, configured for at-least-once delivery."""

from __future__ import annotations

import os
import weakref
from datetime import timedelta
from typing import Any

from celery import Celery, Task
from celery.signals import setup_logging, worker_process_init, worker_process_shutdown
from flask import Flask
from prometheus_client import multiprocess

from ipn.config import Settings
from ipn.logs import configure_logging

SWEEP_EVERY = timedelta(minutes=1)
RECONCILE_EVERY = timedelta(minutes=1)
DELIVER_DUE_EVERY = timedelta(seconds=10)
# Retention counts in days: once a day is enough, and a second beat running it changes nothing.
PRUNE_EVERY = timedelta(days=1)
SEND_ALERTS_EVERY = timedelta(minutes=1)

# The Flask apps this process built a Celery app for (a worker builds one), so that a forked
# pool process can reach their engines without importing the entry module that built them.
_BUILT: weakref.WeakSet[Flask] = weakref.WeakSet()


def make_celery(flask_app: Flask, settings: Settings) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with flask_app.app_context():
                return self.run(*args, **kwargs)

    celery = Celery(flask_app.name, task_cls=FlaskTask)
    transport_options: dict[str, Any] = {}
    if settings.redis_url:
        transport_options = {
            # An unacknowledged message (its worker died) comes back after this long.
            "visibility_timeout": settings.visibility_timeout,
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
            # Publishing fails at once when Redis is down instead of retrying for seconds: the
            # dispatcher and the inbox sweeper own the retrying, and the row is already safe.
            "max_retries": 0,
            "retry_on_timeout": False,
        }
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    celery.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # A task is acknowledged only once it has run; a worker killed mid-task leaves its
        # message to be delivered again, and the idempotent transition makes that harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        beat_schedule={
            "sweep-inbox": {"task": "ipn.sweep_inbox", "schedule": SWEEP_EVERY},
            "reconcile-due": {"task": "ipn.reconcile_due", "schedule": RECONCILE_EVERY},
            "deliver-events": {"task": "ipn.deliver_due", "schedule": DELIVER_DUE_EVERY},
            "prune": {"task": "ipn.prune", "schedule": PRUNE_EVERY},
            "send-alerts": {"task": "ipn.send_alerts", "schedule": SEND_ALERTS_EVERY},
        },
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        include=["workers.tasks"],
    )
    celery.set_default()
    _BUILT.add(flask_app)
    return celery


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    """A forked pool process must not share the parent's database connections."""
    for flask_app in list(_BUILT):
        flask_app.extensions["ipn"].db.dispose()


@worker_process_shutdown.connect
def _metrics_gone(pid: int | None = None, **_: Any) -> None:
    """A pool process that exits takes its live gauges with it; its counters stay."""
    multiprocess.mark_process_dead(pid or os.getpid())


@setup_logging.connect
def _logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Celery leaves logging to us when this signal has a receiver: the worker and beat log
    like the web process (ipn.logs), at the level of their --loglevel."""
    for flask_app in list(_BUILT):
        configure_logging(flask_app.extensions["ipn"].settings, level=loglevel)
