"""Hands stored notification ids to the queue (`enqueue`, the one way a notification reaches a
worker), from a background thread for the callback view, so a slow broker never holds up the
answer to a provider; whatever cannot be sent is left for the inbox sweeper."""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from ipn.metrics import DISPATCH_DROPPED, DISPATCH_FAILED, DISPATCH_QUEUE

log = logging.getLogger(__name__)

# The worker's task for one stored notification (workers.tasks.process_notification): the
# sweeper's, a replay's and a retry's.
PROCESS_TASK = "ipn.process_notification"
# The worker's task for notifications stored together (workers.tasks.process_notifications).
PROCESS_MANY_TASK = "ipn.process_notifications"
# Ids in one message at most. Receiving and acknowledging a message costs the worker's consumer
# about a millisecond of CPU whatever it carries, which at 200 callbacks a second was a third of
# the worker's time when each id had its own; a burst still spreads over the pool's threads.
IDS_PER_MESSAGE = 8
# The worker's task for one delivery of a merchant event (workers.tasks.deliver_event).
DELIVER_TASK = "ipn.deliver_event"
# Ids published in one broker round trip at most.
BATCH_SIZE = 500
# How long publishing stops after a broker failure: long enough that a dead broker is tried
# about once a second, not once per callback; short enough that a broker back up is used at
# once (anything given up meanwhile waits for the sweeper).
PAUSE_SECONDS = 1.0
# How long the thread lets ids gather after the first before it publishes: a publish costs a
# broker round trip and about a millisecond of Celery's own work whatever its size, which at a
# few hundred callbacks a second would otherwise be paid once per id, on the web process's CPU.
LINGER_SECONDS = 0.02


def enqueue(
    celery: Celery, notification_id: int, *, countdown: int | None = None, retries: int = 0
) -> None:
    """Publish one notification id for a worker, after `countdown` seconds as its `retries`-th
    retry if given. Raises when the broker cannot take it: the row is already committed (and
    a retry's next attempt set), so the caller logs and leaves it to the inbox sweeper."""
    # No publish retries: the dispatcher and the sweeper own the retrying.
    celery.send_task(
        PROCESS_TASK, args=[notification_id], countdown=countdown, retries=retries, retry=False
    )


def in_messages(notification_ids: list[int]) -> list[list[int]]:
    """The ids as they go out: in their order, `IDS_PER_MESSAGE` to a message at most."""
    return [
        notification_ids[start : start + IDS_PER_MESSAGE]
        for start in range(0, len(notification_ids), IDS_PER_MESSAGE)
    ]


def enqueue_many(celery: Celery, notification_ids: list[int]) -> None:
    """Publish many ids in one broker round trip (a Redis pipeline; one by one on a transport
    without batches), several to a message. Raises when the broker fails: which of them went
    out is then unknown, and the sweeper enqueues again whatever stays `received`."""
    with celery.producer_or_acquire() as producer, producer.batch(max_size=BATCH_SIZE):
        for ids in in_messages(notification_ids):
            celery.send_task(PROCESS_MANY_TASK, args=[ids], retry=False, producer=producer)


class RedisPublisher:
    """Publishes `ipn.process_notifications` for many ids in one LPUSH onto the Redis list the
    workers consume, several ids to a message, each message as Celery's `send_task` writes it
    (task protocol 2 in kombu's Redis envelope). Building every message through Celery and
    kombu cost about 0.2 ms of the web process's CPU per callback; this costs a few
    microseconds. tests/test_dispatch.py holds its messages against `send_task`'s, and real
    workers run them throughout the tests.

    Raises when Redis fails, like `enqueue_many`; nothing is retried here."""

    def __init__(self, url: str, queue_name: str, task: str = PROCESS_MANY_TASK) -> None:
        # No retries (redis-py retries three times by default): the dispatcher pauses instead.
        self._client = redis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )
        self._queue = queue_name
        self._task = task
        self._reply_to = str(uuid.uuid4())

    def __call__(self, notification_ids: list[int]) -> None:
        # LPUSH of many values keeps their order for the consumer's BRPOP: first in, first out.
        messages = (self.message(ids) for ids in in_messages(notification_ids))
        self._client.lpush(self._queue, *messages)

    def message(self, notification_ids: list[int]) -> str:
        task_id = str(uuid.uuid4())
        args = json.dumps([[notification_ids], {}, _NO_WORKFLOW])
        return json.dumps(
            {
                "body": base64.b64encode(args.encode()).decode(),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {
                    **_TASK_HEADERS,
                    "task": self._task,
                    "id": task_id,
                    "root_id": task_id,
                    "argsrepr": repr([notification_ids]),
                    "origin": f"gen{os.getpid()}@{_HOST}",
                },
                "properties": {
                    "correlation_id": task_id,
                    "reply_to": self._reply_to,
                    "delivery_mode": 2,
                    "delivery_info": {"exchange": "", "routing_key": self._queue},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": str(uuid.uuid4()),
                },
            }
        )


_HOST = socket.gethostname()
_NO_WORKFLOW = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_TASK_HEADERS: dict[str, Any] = {
    "lang": "py",
    "shadow": None,
    "eta": None,
    "expires": None,
    "group": None,
    "group_index": None,
    "retries": 0,
    "timelimit": [None, None],
    "parent_id": None,
    "kwargsrepr": "{}",
    "ignore_result": None,
    "replaced_task_nesting": 0,
    "stamped_headers": None,
    "stamps": {},
}


def sender(celery: Celery) -> Callable[[int], None]:
    """`enqueue` bound to one Celery app: the `send` the sweeper and replay take."""
    return partial(enqueue, celery)


def batch_sender(celery: Celery) -> Callable[[list[int]], None]:
    """`enqueue_many` bound to one Celery app: what the callback view's dispatcher takes."""
    return partial(enqueue_many, celery)


def enqueue_delivery(celery: Celery, delivery_id: int, countdown: float | None = None) -> None:
    """Publish one delivery id for a worker; a lost publish is found again by `deliver_due`."""
    celery.send_task(DELIVER_TASK, args=[delivery_id], countdown=countdown, retry=False)


def delivery_sender(celery: Celery) -> Callable[[int], None]:
    return partial(enqueue_delivery, celery)


class Dispatcher:
    """A bounded queue drained by one daemon thread per process (restarted after a fork).

    The thread takes whatever has queued up and publishes it as one batch. After a broker
    failure it stops publishing for `pause` seconds: ids submitted meanwhile are counted as
    failed at once and left in the inbox for the sweeper, so a dead broker costs neither the
    request threads nor the dispatch thread a connection attempt per id."""

    def __init__(
        self,
        send: Callable[[int], None] | None = None,
        capacity: int = 10_000,
        *,
        what: str = "notification",
        send_batch: Callable[[list[int]], None] | None = None,
        pause: float = PAUSE_SECONDS,
        linger: float = LINGER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if send_batch is None:
            if send is None:
                raise TypeError("a Dispatcher needs send or send_batch")
            send_batch = partial(_one_by_one, send)
        # What publishes one batch: the broker end of this dispatcher.
        self.send_batch = send_batch
        self._what = what
        self._capacity = capacity
        self._pause = pause
        self._linger = linger
        self._clock = clock
        self._paused_until = 0.0
        self._pid = -1
        self._lock = threading.Lock()
        self._queue: queue.Queue[int] = queue.Queue(capacity)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.batches = 0

    @property
    def paused(self) -> bool:
        return self._clock() < self._paused_until

    def submit(self, notification_id: int) -> None:
        """Never blocks: a full queue drops the id (the row is safe in the inbox)."""
        if self.paused:
            self._give_up([notification_id])
            return
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
            batch = [q.get()]
            if self._linger:
                time.sleep(self._linger)
            while len(batch) < BATCH_SIZE:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            try:
                self._publish(batch)
            finally:
                DISPATCH_QUEUE.labels(self._what).dec(len(batch))
                for _ in batch:
                    q.task_done()

    def _publish(self, batch: list[int]) -> None:
        if self.paused:
            self._give_up(batch)
            return
        try:
            self.send_batch(batch)
        except Exception as exc:
            self._paused_until = self._clock() + self._pause
            self._give_up(batch)
            log.warning(
                "could not enqueue %s %s %s (%s); the sweeper will pick them up, "
                "publishing paused for %ss",
                len(batch),
                self._what,
                "id" if len(batch) == 1 else "ids",
                type(exc).__name__,
                self._pause,
            )
            return
        self.sent += len(batch)
        self.batches += 1

    def _give_up(self, ids: list[int]) -> None:
        self.failed += len(ids)
        DISPATCH_FAILED.labels(self._what).inc(len(ids))


def _one_by_one(send: Callable[[int], None], ids: list[int]) -> None:
    for notification_id in ids:
        send(notification_id)
