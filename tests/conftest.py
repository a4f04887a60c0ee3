"""Fixtures: both run modes (PostgreSQL + Redis, SQLite + embedded broker), a fresh database per
test session, clean tables per test, and real Celery workers where a test is about the queue.

PostgreSQL and Redis tests are skipped when the servers are unreachable, unless
IPN_TEST_REQUIRE_SERVICES=1 (CI sets it), which turns a missing server into a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Each test run counts into a directory of its own (ipn.metric_files picks one otherwise).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="ipn-test-metrics-"))

import psycopg
import pytest
import redis
import responses
import time_machine
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, text

from ipn import create_app, migrate
from ipn.config import Settings
from ipn.db import Database
from ipn.services import Services
from models import Base, Notification, NotificationStatus

from helpers import START, provider_mock

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "IPN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
# Not database 0, which a developer's own `ipn run` on the same Redis may be using.
REDIS_URL = os.environ.get("IPN_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
REQUIRE_SERVICES = os.environ.get("IPN_TEST_REQUIRE_SERVICES") == "1"
PROVIDER_URL = "http://provider.test"

# Credentials of the test vectors in ../shared/providers, where the files give them.
PROVIDER_ENV = {
    "CUBEPAY_CLIENT_ID": "exampleclientid",
    "CUBEPAY_CLIENT_SECRET": "exampleclientsecret",
    "CUBEPAY_API_URL": f"{PROVIDER_URL}/cubepay",
    "BITCOINPAYGATE_API_KEY_NAME": "keyname",
    "BITCOINPAYGATE_API_KEY_SECRET": "keysecret",
    "BITCOINPAYGATE_HMAC_KEY": "examplehmackey",
    "BITCOINPAYGATE_API_URL": f"{PROVIDER_URL}/bitcoinpaygate",
    "COINBARPAY_SERVICE_CLIENT_ID": "2cb63353-2541-4c4e-90d4-7bf1d4b42c5c",
    "COINBARPAY_SECRET_KEY": "your_secret_key",
    "COINBARPAY_API_URL": f"{PROVIDER_URL}/coinbarpay",
    "COINBARPAY_TOKEN_API_KEY": "0123456789abcdef0123456789abcdef",
    "COINBARPAY_TOKEN_SECRET": "fedcba9876543210",
    "CRYPTOPROCESSING_API_KEY": "cp-api-key",
    "CRYPTOPROCESSING_SECRET": "AbCdEfG123456",
    "CRYPTOPROCESSING_API_URL": f"{PROVIDER_URL}/cryptoprocessing",
}
FAST_ENV = {
    "IPN_API_TOKEN": "test-token",
    "IPN_SECRET_KEY": "test-secret-key-for-console-sessions",
    "IPN_HTTP_ATTEMPTS": "2",
    "IPN_HTTP_BACKOFF_MAX": "0.01",
    "IPN_HTTP_READ_TIMEOUT": "2",
    "IPN_HTTP_CONNECT_TIMEOUT": "1",
    "IPN_TASK_MAX_RETRIES": "3",
    "IPN_TASK_RETRY_BACKOFF_MAX": "1",
    "IPN_VISIBILITY_TIMEOUT": "30",
}


def unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} unreachable: {exc}"
    if REQUIRE_SERVICES:
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Backend:
    """One run mode: where the data lives and which broker carries the tasks."""

    name: str
    env: dict[str, str]
    db: Database
    tmp: Path
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def settings(self, **overrides: str) -> Settings:
        return Settings.from_env({**self.env, **overrides})


def _postgres_database(tmp: Path) -> tuple[str, Callable[[], None]]:
    name = f"ipn_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable("PostgreSQL", exc)
    admin.execute(f'CREATE DATABASE "{name}"')
    admin.close()

    def drop() -> None:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}", drop


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    tmp = tmp_path_factory.mktemp(request.param)
    env = {
        **PROVIDER_ENV,
        **FAST_ENV,
        "IPN_DATA_DIR": str(tmp),
        "IPN_QUEUE": f"ipn-test-{uuid.uuid4().hex[:8]}",
    }
    cleanups: list[Callable[[], None]] = []
    if request.param == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{tmp / 'ipn.sqlite'}"
    else:
        url, drop = _postgres_database(tmp)
        cleanups.append(drop)
        env["DATABASE_URL"] = url
        try:
            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        except redis.RedisError as exc:
            unavailable("Redis", exc)
        env["REDIS_URL"] = REDIS_URL
        cleanups.append(lambda: _drop_redis_keys(REDIS_URL, env["IPN_QUEUE"]))
    db = Database(env["DATABASE_URL"])
    migrate.upgrade(db)
    backend = Backend(request.param, env, db, tmp, cleanups)
    yield backend
    db.engine.dispose()
    for cleanup in cleanups:
        cleanup()


def _drop_redis_keys(url: str, queue: str) -> None:
    """The session's queues and kombu's bindings for them: every key naming its queue (the
    queues of the tests that make their own start with it)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"*{queue}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def clean(db: Database) -> None:
    tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
    with db.engine.begin() as connection:
        if db.is_postgresql:
            connection.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for table in tables:
                connection.execute(text(f"DELETE FROM {table}"))


@pytest.fixture
def settings(backend: Backend) -> Settings:
    clean(backend.db)
    return backend.settings()


class RecordingDispatcher:
    """Stands in for the broker in tests that run the worker's functions in-process."""

    def __init__(self) -> None:
        self.submitted: list[int] = []

    def submit(self, notification_id: int) -> None:
        self.submitted.append(notification_id)


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    app.config["TESTING"] = True
    app.extensions["ipn.dispatcher"] = RecordingDispatcher()
    app.extensions["ipn.event_dispatcher"] = RecordingDispatcher()
    yield app
    app.extensions["ipn"].db.engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def services(app: Flask) -> Services:
    value: Services = app.extensions["ipn"]
    return value


@pytest.fixture
def api_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {FAST_ENV['IPN_API_TOKEN']}"}


def count_notifications(db: Database, status: NotificationStatus | None = None) -> int:
    query = select(func.count()).select_from(Notification)
    if status is not None:
        query = query.where(Notification.status == status)
    with db.sessions() as session:
        return int(session.scalar(query) or 0)


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.1,
    message: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


class Worker:
    """A real `celery worker` process on the backend's broker and database."""

    def __init__(
        self, env: dict[str, str], log_path: Path, concurrency: int = 2, pool: str = "prefork"
    ) -> None:
        self.log_path = log_path
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.main",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                str(concurrency),
                "--pool",
                pool,
                "--queues",
                env["IPN_QUEUE"],
                "--without-heartbeat",
                "--without-gossip",
                "--without-mingle",
            ],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(
            lambda: b"ready." in log_path.read_bytes() or self.process.poll() is not None,
            timeout=60,
            message="the worker to start",
        )
        if self.process.poll() is not None:
            raise RuntimeError(f"worker exited: {log_path.read_text()[-2000:]}")

    def children(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [int(pid) for pid in out.split()]

    def kill(self) -> None:
        """SIGKILL the worker and its pool: no chance to acknowledge or clean up anything."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """A warm shutdown, as a process manager asks for one: SIGTERM to the main process, which
        stops its pool processes itself (so they exit normally and coverage data is saved)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture
def start_worker(backend: Backend, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(env: dict[str, str] | None = None, **kwargs: Any) -> Worker:
        worker = Worker(
            {**backend.env, **(env or {})}, tmp_path / f"worker-{len(workers)}.log", **kwargs
        )
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def provider_api() -> Iterator[responses.RequestsMock]:
    """Provider APIs answer only what a test registers; any other call fails the test."""
    with provider_mock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def clock() -> Iterator[Any]:
    """Time stands at helpers.START until a test moves it."""
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller
