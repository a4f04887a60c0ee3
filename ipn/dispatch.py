"""Hands stored notification ids to the queue (`enqueue`, the one way a notification reaches a
worker), from a background thread for the callback view, so a slow broker never holds up the
answer to a provider; whatever cannot be sent is left for the inbox sweeper."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from functools import partial

from celery import Celery

from ipn.metrics import DISPATCH_DROPPED, DISPATCH_FAILED, DISPATCH_QUEUE

log = logging.getLogger(__name__)

# The worker's task for one stored notification (workers.tasks.process_notification).
PROCESS_TASK = "ipn.process_notification"
# The worker's task for one delivery of a merchant event (workers.tasks.deliver_event).
DELIVER_TASK = "ipn.deliver_event"


def enqueue(celery: Celery, notification_id: int) -> None:
    """Publish one notification id for a worker. Raises when the broker cannot take it: the
    row is already committed, so the caller logs and leaves it to the inbox sweeper."""
    # No publish retries: the dispatcher and the sweeper own the retrying.
    celery.send_task(PROCESS_TASK, args=[notification_id], retry=False)


def sender(celery: Celery) -> Callable[[int], None]:
    """`enqueue` bound to one Celery app: the `send` the sweeper and replay take."""
    return partial(enqueue, celery)


def enqueue_delivery(celery: Celery, delivery_id: int, countdown: float | None = None) -> None:
    """Publish one delivery id for a worker; a lost publish is found again by `deliver_due`."""
    celery.send_task(DELIVER_TASK, args=[delivery_id], countdown=countdown, retry=False)


def delivery_sender(celery: Celery) -> Callable[[int], None]:
    return partial(enqueue_delivery, celery)


class Dispatcher:
    """A bounded queue drained by one daemon thread per process (restarted after a fork)."""

    def __init__(
        self, send: Callable[[int], None], capacity: int = 10_000, *, what: str = "notification"
    ) -> None:
        self._send = send
        self._what = what
        self._capacity = capacity
        self._pid = -1
        self._lock = threading.Lock()
        self._queue: queue.Queue[int] = queue.Queue(capacity)
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def submit(self, notification_id: int) -> None:
        """Never blocks: a full queue drops the id (the row is safe in the inbox)."""
        self._ensure_thread()
        try:
            self._queue.put_nowait(notification_id)
            DISPATCH_QUEUE.labels(self._what).inc()
        except queue.Full:
            self.dropped += 1
            DISPATCH_DROPPED.labels(self._what).inc()
            log.warning(
                "dispatch queue full; %s %s left for the sweeper", self._what, notification_id
            )

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted was sent or given up; True if the queue emptied."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            # After a fork the parent's thread is gone and its queue may hold stale state.
            self._queue = queue.Queue(self._capacity)
            thread = threading.Thread(target=self._run, name="ipn-dispatch", daemon=True)
            thread.start()
            self._pid = os.getpid()

    def _run(self) -> None:
        q = self._queue
        while True:
            notification_id = q.get()
            try:
                self._send(notification_id)
                self.sent += 1
            except Exception as exc:
                self.failed += 1
                DISPATCH_FAILED.labels(self._what).inc()
                log.warning(
                    "could not enqueue %s %s (%s); the sweeper will pick it up",
                    self._what,
                    notification_id,
                    type(exc).__name__,
                )
            finally:
                DISPATCH_QUEUE.labels(self._what).dec()
                q.task_done()
