"""Support for the worker and fault tests: servers of their own (a fake BitcoinPaygate status API,
a merchant's shop, the app on a real HTTP port, a throwaway Redis, a throwaway PostgreSQL cluster)
and signed callbacks. Every server here is started and stopped by the test that owns it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import redis
from flask import Flask
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from werkzeug.serving import make_server

from ipn.dispatch import sender
from models import PaymentEvent

from helpers import bpg_signature, bpg_snapshot, cryptoprocessing_callback, cryptoprocessing_headers

PG_BIN = Path("/usr/lib/postgresql/15/bin")
# The payment request id in helpers.cryptoprocessing_callback; replaced to tell payments apart.
CP_REQUEST_ID = "019c0ebf-81e5-751d-aa57-fb9e2cba23c2"
BPG_PAYMENT_ID = "95bf1d853cf2e040f0ce219221f9b17206525941"
BPG_ORDER_ID = "2015-03-10/123/1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique_queue(base: str) -> str:
    """A queue of the test's own: a message left behind by a killed worker cannot reach
    another test's rows (ids restart with every clean database)."""
    return f"{base}-{uuid.uuid4().hex[:8]}"


def forget_queue(redis_url: str | None, queue: str) -> None:
    """Delete what kombu keeps in Redis for a test's own queue (its list and bindings)."""
    if not redis_url:
        return
    try:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=2)
        keys = list(client.scan_iter(match=f"*{queue}*"))
        if keys:
            client.delete(*keys)
    except redis.RedisError:  # a throwaway server already gone: nothing to forget
        pass


def celery_send(app: Flask) -> Callable[[int], None]:
    """Enqueue a notification id the way the app itself does (the sweeper's and replay's send)."""
    return sender(app.extensions["celery"])


# Callbacks -------------------------------------------------------------------------------------


def cp_paid_callback(order_id: str = "order_12345", request_id: str | None = None) -> bytes:
    """A CryptoProcessing `paid` callback for 0.3 ETH; its own payment request id if given."""
    body = cryptoprocessing_callback("paid", foreign_id=order_id, amount="0.3")
    if request_id is not None:
        body = body.replace(CP_REQUEST_ID.encode(), request_id.encode())
    return body


def cp_headers(body: bytes) -> dict[str, str]:
    return cryptoprocessing_headers(body)


def bpg_notification(status: str = "CONFIRMED") -> tuple[bytes, dict[str, str]]:
    body = bpg_snapshot(status)
    return body, {"Content-Type": "application/json", "X-BPG-Signature": bpg_signature(body)}


# Timeline --------------------------------------------------------------------------------------


def state_changes(events: list[PaymentEvent]) -> list[PaymentEvent]:
    return [event for event in events if event.from_status != event.to_status]


# A fake BitcoinPaygate status API ---------------------------------------------------------------


class FakeBitcoinPaygate:
    """Answers `GET /v2/payments/<id>` with helpers.bpg_snapshot, and can be told to hold every
    query (`hold()` / `release()`), to answer late (`mode = "slow"`), or to answer a truncated
    body (`mode = "garbage"`)."""

    def __init__(self, status: str = "CONFIRMED", slow_seconds: float = 3.0) -> None:
        self.status = status
        self.mode = "ok"
        self.slow_seconds = slow_seconds
        self.paths: list[str] = []
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()
        self._stopping = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with fake._lock:
                    fake.paths.append(self.path)
                fake._gate.wait(timeout=120)
                if fake._stopping.is_set():
                    return
                mode = fake.mode
                if mode == "slow":
                    fake._stopping.wait(fake.slow_seconds)
                if not self.path.startswith("/v2/payments/"):
                    body, code = b'[{"message":"no such path"}]', 404
                elif mode == "garbage":
                    body, code = b'{"trunc', 200
                else:
                    body, code = bpg_snapshot(fake.status), 200
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the asker was killed meanwhile
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def queries(self) -> int:
        with self._lock:
            return len(self.paths)

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def stop(self) -> None:
        self._stopping.set()
        self._gate.set()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def fake_bitcoinpaygate(**kwargs: Any) -> Iterator[FakeBitcoinPaygate]:
    fake = FakeBitcoinPaygate(**kwargs)
    try:
        yield fake
    finally:
        fake.stop()


# A merchant's shop --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """One verified event as the shop received it, and how the shop was answering then."""

    webhook_id: str
    type: str
    payment_id: str | None
    sequence: int | None
    mode: str
    at: float


class MerchantShop:
    """A merchant's endpoint on a real port. It verifies every request with the `standardwebhooks`
    library (never with our own signing code) and records each verified one in arrival order,
    then answers by `mode`: "ok" (200), "error" (500), "slow" (200 after `slow_seconds`, beyond
    the sender's patience), "hold" (200 once `release()` is called). `stop()` closes the port, so
    connections are refused, and `start()` opens the same port again."""

    MODES = ("ok", "error", "slow", "hold")

    def __init__(self, slow_seconds: float = 4.0) -> None:
        self.secret = ""
        self.mode = "ok"
        self.slow_seconds = slow_seconds
        self.arrivals: list[Arrival] = []
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._stopping = threading.Event()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/events"
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        shop = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    Webhook(shop.secret).verify(body, dict(self.headers.items()))
                except WebhookVerificationError as exc:
                    with shop._lock:
                        shop.rejected.append(str(exc))
                    self._answer(401)
                    return
                event = json.loads(body)
                data = event.get("data") or {}
                mode = shop.mode
                with shop._lock:
                    shop.arrivals.append(
                        Arrival(
                            self.headers["webhook-id"],
                            event["type"],
                            data.get("id") if event["type"].startswith("payment.") else None,
                            data.get("sequence"),
                            mode,
                            time.time(),
                        )
                    )
                if mode == "hold":
                    shop._gate.wait(timeout=120)
                elif mode == "slow":
                    shop._stopping.wait(shop.slow_seconds)
                self._answer(500 if mode == "error" else 200)

            def _answer(self, code: int) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the sender gave up or was killed meanwhile
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def start(self, mode: str | None = None) -> None:
        """Listen (again) on the shop's port."""
        assert self.server is None
        if mode is not None:
            self.mode = mode
        self._stopping.clear()
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.server = server

    def stop(self) -> None:
        """Close the port: from now on a connection is refused."""
        if self.server is None:
            return
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def release(self) -> None:
        self._gate.set()

    def received(self, mode: str | None = None) -> list[Arrival]:
        with self._lock:
            return [a for a in self.arrivals if mode is None or a.mode == mode]

    @property
    def ids(self) -> list[str]:
        return [arrival.webhook_id for arrival in self.received()]


@contextmanager
def merchant_shop(**kwargs: Any) -> Iterator[MerchantShop]:
    shop = MerchantShop(**kwargs)
    try:
        yield shop
    finally:
        shop.release()
        shop.stop()


# The app on a real port -----------------------------------------------------------------------


@contextmanager
def serving(app: Flask) -> Iterator[str]:
    """The app under werkzeug's threaded server on a free port: yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


# A throwaway Redis ------------------------------------------------------------------------------


class ThrowawayRedis:
    """A redis-server of the test's own on a free port, which it may stop and start again.
    Never the shared one at 6379."""

    def __init__(self, log_dir: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_dir / f"redis-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while True:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {self.log_path.read_text()}")
            time.sleep(0.05)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def unacked_ages(self) -> list[float]:
        """Seconds since each message still unacknowledged was delivered (kombu's index)."""
        now = time.time()
        entries: Any = self.client().zrange("unacked_index", 0, -1, withscores=True)
        return [now - float(score) for _, score in entries]


@contextmanager
def throwaway_redis(log_dir: Path) -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis(log_dir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


# A throwaway PostgreSQL cluster ----------------------------------------------------------------


@dataclass
class ThrowawayPostgres:
    """A PostgreSQL cluster of the test's own (initdb + pg_ctl), owned by the `postgres` user
    because initdb refuses to run as root."""

    data: Path
    port: int

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/ipn"

    def _run(self, *args: str) -> None:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}\n{result.stderr}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data / "db"), "-U", "postgres", "-A", "trust", "-N")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data / "db"),
            "-o",
            options,
            "-l",
            str(self.data / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data / "db"), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "db" / "postmaster.pid").exists()

    def create_database(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("CREATE DATABASE ipn")


@contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError(f"no initdb in {PG_BIN}")
    data = Path(tempfile.mkdtemp(prefix="ipn-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
        cluster = ThrowawayPostgres(data, free_port())
        cluster.init()
        cluster.start()
        try:
            cluster.create_database()
            yield cluster
        finally:
            if cluster.running():
                try:
                    cluster.stop()
                except RuntimeError:  # stopped meanwhile: nothing left to stop
                    pass
    finally:
        shutil.rmtree(data, ignore_errors=True)
