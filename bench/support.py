"""What the throughput benchmarks share: a throwaway PostgreSQL database built by the
migrations, a throwaway redis-server, free ports, and round trips counted from libpq's
protocol trace."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text

SERVER = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


@contextmanager
def throwaway_database(server: str = SERVER) -> Iterator[str]:
    """A new database on `server`, migrated, dropped afterwards; yields its URL."""
    from ipn import migrate
    from ipn.db import Database

    name = f"ipn_bench_{secrets.token_hex(6)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = server.rsplit("/", 1)[0] + f"/{name}"
    try:
        db = Database(url)
        migrate.upgrade(db)
        db.engine.dispose()
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class RedisServer:
    """A redis-server of our own on a free port, which the bench may stop and start."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RoundTrips:
    """Counts the client's round trips on every connection of an engine, from libpq's own
    protocol trace: each simple Query and each Sync of the extended protocol waits for the
    server once."""

    def __init__(self, engine: Engine) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="bench-trace-"))
        self._files: list[Any] = []
        self._offsets: dict[int, int] = {}

        @event.listens_for(engine, "connect")
        def trace(dbapi_connection: Any, _record: Any) -> None:
            from psycopg.pq import Trace

            handle = open(self._dir / f"{len(self._files)}.trace", "w+b", buffering=0)
            self._files.append(handle)
            dbapi_connection.pgconn.trace(handle.fileno())
            dbapi_connection.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)

    def mark(self) -> None:
        """Start counting from here."""
        for handle in self._files:
            self._offsets[id(handle)] = os.fstat(handle.fileno()).st_size

    def since_mark(self) -> tuple[int, list[str]]:
        """Round trips since `mark`, and the client's messages that made them."""
        count, messages = 0, []
        for handle in self._files:
            handle.seek(self._offsets.get(id(handle), 0))
            for raw in handle.read().decode("utf-8", "replace").splitlines():
                parts = raw.split("\t")
                if len(parts) < 3 or parts[0] != "F":
                    continue
                kind = parts[2]
                if kind in ("Query", "Sync"):
                    count += 1
                if kind in ("Query", "Parse", "Bind", "Sync"):
                    messages.append(" ".join(parts[2:])[:140])
        return count, messages

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        shutil.rmtree(self._dir, ignore_errors=True)
