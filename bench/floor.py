"""The floors the throughput benchmarks compare the project with, in a few lines each.

- `app`: a WSGI receiver that stores each callback with one INSERT and a commit (psycopg, no
  ORM, no queue) and answers `success`; with FLOOR_REDIS_URL it also LPUSHes the row's id.
  Run under gunicorn with the project's own settings file, so only the application differs.
- `work`: a worker for that queue: BRPOP an id, GET the payment's status from the provider
  (one keep-alive session per thread), UPDATE the payment and the row in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

SCHEMA = """
CREATE TABLE IF NOT EXISTS floor_inbox (
    id bigserial PRIMARY KEY, provider text NOT NULL, kind text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(), remote_addr text, headers jsonb NOT NULL,
    body bytea NOT NULL, body_sha256 text NOT NULL, status text NOT NULL DEFAULT 'received',
    processed_at timestamptz);
CREATE TABLE IF NOT EXISTS floor_payments (
    provider_payment_id text PRIMARY KEY, status text NOT NULL DEFAULT 'pending');
"""
INSERT = (
    "INSERT INTO floor_inbox (provider, kind, remote_addr, headers, body, body_sha256)"
    " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id"
)


def conninfo() -> str:
    return os.environ["FLOOR_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")


class Pool:
    """A handful of connections per process, handed out one at a time."""

    def __init__(self, size: int = 10) -> None:
        self._free: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        self._size = size
        self._made = 0
        self._lock = threading.Lock()

    def take(self) -> psycopg.Connection[Any]:
        with self._lock:
            if self._free.empty() and self._made < self._size:
                self._made += 1
                return psycopg.connect(conninfo())
        return self._free.get()

    def give(self, connection: psycopg.Connection[Any]) -> None:
        self._free.put(connection)


_pool: Pool | None = None
_redis: Any = None


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    global _pool, _redis
    if _pool is None:
        _pool = Pool()
        if os.environ.get("FLOOR_REDIS_URL"):
            import redis

            _redis = redis.Redis.from_url(os.environ["FLOOR_REDIS_URL"])
    if environ["REQUEST_METHOD"] != "POST":  # a readiness probe
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    headers = {k[5:]: v for k, v in environ.items() if k.startswith("HTTP_")}
    connection = _pool.take()
    try:
        row = connection.execute(
            INSERT,
            (
                "bitcoinpaygate",
                "notification",
                environ.get("REMOTE_ADDR"),
                json.dumps(headers),
                body,
                hashlib.sha256(body).hexdigest(),
            ),
        ).fetchone()
        connection.commit()
    except psycopg.Error:
        connection.rollback()
        _pool.give(connection)
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"unavailable\n"]
    _pool.give(connection)
    if _redis is not None and row is not None:
        try:
            _redis.lpush("floor", row[0])
        except Exception:
            pass
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "7")])
    return [b"success"]


def work(threads: int) -> None:
    """The floor's worker: `threads` threads, each BRPOP -> GET status -> one transaction."""
    import redis
    import requests

    stub = os.environ["FLOOR_STATUS_URL"]

    def loop() -> None:
        broker = redis.Redis.from_url(os.environ["FLOOR_REDIS_URL"])
        session = requests.Session()
        with psycopg.connect(conninfo()) as connection:
            while True:
                _, raw = broker.brpop(["floor"])
                notification_id = int(raw)
                body = connection.execute(
                    "SELECT body FROM floor_inbox WHERE id = %s", (notification_id,)
                ).fetchone()[0]
                payment = json.loads(body)["paymentId"]
                answer = session.get(f"{stub}/v2/payments/{payment}", timeout=10).json()
                connection.execute(
                    "UPDATE floor_payments SET status = %s WHERE provider_payment_id = %s",
                    ("paid" if answer["status"] == "CONFIRMED" else "pending", payment),
                )
                connection.execute(
                    "UPDATE floor_inbox SET status = 'processed', processed_at = now()"
                    " WHERE id = %s",
                    (notification_id,),
                )
                connection.commit()

    for _ in range(threads):
        threading.Thread(target=loop, daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    work(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
