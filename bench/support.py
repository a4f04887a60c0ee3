"""What the throughput benchmarks share: a throwaway PostgreSQL database built by the
migrations, a throwaway redis-server, free ports, and round trips counted from libpq's
protocol trace."""

from __future__ import annotations

if __name__ == "__main__":  # the open-loop client of `open_loop_apart`, in a process of its own
    from gevent import monkey

    monkey.patch_all()

import os
import pickle
import secrets
import shutil
import socket
import subprocess
import sys
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


# BitcoinPaygate, as the benches use it --------------------------------------------------------

HMAC_KEY = "bench-hmac-key"


def provider_env(stub_url: str) -> dict[str, str]:
    return {
        "BITCOINPAYGATE_API_KEY_NAME": "bench",
        "BITCOINPAYGATE_API_KEY_SECRET": "bench-secret",
        "BITCOINPAYGATE_HMAC_KEY": HMAC_KEY,
        "BITCOINPAYGATE_API_URL": stub_url,
        "IPN_CONSOLE": "0",
    }


def payment_id(n: int) -> str:
    return f"bench{n:035d}"


def order_id(n: int) -> str:
    return f"bench-order-{n}"


def snapshot(n: int, status: str = "CONFIRMED") -> bytes:
    import json

    answer = {
        "paymentId": payment_id(n),
        "amount": 10.00,
        "amountBtc": 1.00,
        "currency": "USD",
        "status": status,
        "remainingToPayBtc": 0,
        "remainingToPay": 0,
        "paid": 10.00,
        "paidBtc": 1.00,
        "paymentTime": "2026-01-12T12:06:20Z",
        "expirationTime": "2036-01-12T12:21:20Z",
        "currentTime": "2026-01-12T15:16:32Z",
        "merchantTransactionId": order_id(n),
        "notificationUrl": "https://example.com/notify",
        "message": "bench",
        "btcTransactions": [],
        "notificationType": "REGULAR",
    }
    return json.dumps(answer, separators=(",", ":")).encode()


def signed_callback(n: int) -> tuple[bytes, dict[str, str]]:
    """A signed BitcoinPaygate notification that payment `n` is paid."""
    import hashlib
    import hmac

    body = snapshot(n)
    signature = hmac.new(HMAC_KEY.encode(), body, hashlib.sha1).hexdigest()
    return body, {"Content-Type": "application/json", "X-BPG-Signature": signature}


def seed_payments(url: str, count: int) -> None:
    """`count` pending BitcoinPaygate payments, inserted in bulk (untimed)."""
    from datetime import UTC, datetime
    from decimal import Decimal

    from sqlalchemy import insert

    from ipn.db import Database
    from models import Payment, PaymentStatus

    db = Database(url)
    now = datetime.now(UTC)
    rows = [
        {
            "id": f"pay_bench_{n:08d}",
            "provider": "bitcoinpaygate",
            "order_id": order_id(n),
            "provider_payment_id": payment_id(n),
            "status": PaymentStatus.PENDING,
            "amount": Decimal("10.00"),
            "currency": "USD",
            "created_at": now,
            "updated_at": now,
        }
        for n in range(count)
    ]
    with db.transaction() as session:
        for start in range(0, len(rows), 1000):
            session.execute(insert(Payment), rows[start : start + 1000])
    db.engine.dispose()


STATUS_STUB = r'''
"""BitcoinPaygate's status API: CONFIRMED for any payment, at once, on keep-alive connections,
each answer in one write with Nagle off (so no delayed-ACK stall)."""
import re, socket, sys
from gevent.server import StreamServer
sys.path.insert(0, sys.argv[2])
from support import snapshot
PATH = re.compile(rb"^GET /v2/payments/bench(\d+) ")

def handle(sock, _address):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffered = b""
    while True:
        while b"\r\n\r\n" not in buffered:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buffered += chunk
        head, _, buffered = buffered.partition(b"\r\n\r\n")
        match = PATH.match(head)
        body = snapshot(int(match.group(1))) if match else b"{}"
        status = b"200 OK" if match else b"404 Not Found"
        sock.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

StreamServer(("127.0.0.1", int(sys.argv[1])), handle).serve_forever()
'''


@contextmanager
def status_stub() -> Iterator[str]:
    """The status API in a process of its own; yields its base URL."""
    import sys

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", STATUS_STUB, str(port), str(Path(__file__).parent)]
    )
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


# Processes as the Procfile starts them ---------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def procfile_line(name: str) -> list[str]:
    """The Procfile's command for `name`, its ${VAR:-default}s and $PORT left to the env."""
    import shlex

    for line in (ROOT / "Procfile").read_text().splitlines():
        key, _, command = line.partition(":")
        if key.strip() == name:
            return shlex.split(command.strip())
    raise KeyError(name)


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    import re

    def one(word: str) -> str:
        word = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), word)
        return re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), word)

    return [one(word) for word in words]


def bin_path(name: str) -> str:
    import sys

    return str(Path(sys.executable).parent / name)


class Process:
    """One Procfile process (or a floor of ours), started in its own process group."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = open(log, "ab")
        self.process = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def web(env: dict[str, str], port: int, log: Path) -> Process:
    """The Procfile's `web` line, on `port`."""
    argv = expand(procfile_line("web"), {**env, "PORT": str(port)})
    argv[0] = bin_path(argv[0])
    argv = [a.replace("0.0.0.0:", "127.0.0.1:") for a in argv]
    process = Process(argv, env, log)
    wait_port(port, 60)
    return process


def floor_web(env: dict[str, str], port: int, log: Path) -> Process:
    """The floor receiver under the same gunicorn settings as the project's `web`."""
    argv = [
        bin_path("gunicorn"),
        "floor:app",
        "--config",
        "python:ipn.gunicorn_config",
        "--pythonpath",
        str(Path(__file__).parent),
        "--bind",
        f"127.0.0.1:{port}",
    ]
    process = Process(argv, env, log)
    wait_port(port, 60)
    return process


def ready(port: int, path: str, timeout: float = 60.0) -> None:
    """Wait until a POST to `path` is answered at all (the app is loaded)."""
    import http.client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            connection.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} does not answer")


# Load ----------------------------------------------------------------------------------------


def post(port: int, path: str, body: bytes, headers: dict[str, str], connection: Any = None) -> int:
    """POST on `connection` (keep-alive) or on a new one; the status code (599: no answer)."""
    import http.client

    own = connection is None
    try:
        if own:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return int(response.status)
    except (OSError, http.client.HTTPException):
        return 599
    finally:
        if own:
            connection.close()


def closed_loop(
    port: int,
    path: str,
    requests: Iterator[tuple[bytes, dict[str, str]]],
    clients: int,
    seconds: float,
) -> tuple[int, int]:
    """`clients` greenlets, each on a keep-alive connection, POST as fast as answered for
    `seconds`; (answered 200, other answers)."""
    import http.client

    import gevent

    ok = [0, 0]
    stop_at = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop_at:
            body, headers = next(requests)
            status = post(port, path, body, headers, connection)
            ok[0 if status == 200 else 1] += 1
            if status == 599:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.close()

    gevent.joinall([gevent.spawn(client) for _ in range(clients)])
    return ok[0], ok[1]


def open_loop(
    port: int,
    path: str,
    requests: list[tuple[bytes, dict[str, str]]],
    rate: float,
) -> tuple[list[float], list[int], list[float]]:
    """One request every 1/rate s on its own connection, sent on schedule whether or not the
    earlier ones were answered: each latency counts from its scheduled time (no coordinated
    omission). (latencies in s, status codes, scheduled times as epoch seconds)."""
    import gevent

    latencies = [0.0] * len(requests)
    codes = [0] * len(requests)
    start = time.monotonic() + 0.2
    epoch = time.time() + 0.2
    scheduled = [epoch + i / rate for i in range(len(requests))]

    def one(i: int) -> None:
        due = start + i / rate
        # gevent's timers count from the loop's cached clock, and may fire a little early.
        early = due - time.monotonic()
        if early > 0:
            gevent.sleep(early)
        codes[i] = post(port, path, *requests[i])
        latencies[i] = time.monotonic() - due

    greenlets = [gevent.spawn_later(0.2 + i / rate, one, i) for i in range(len(requests))]
    gevent.joinall(greenlets)
    return latencies, codes, scheduled


def open_loop_apart(
    port: int,
    path: str,
    requests: list[tuple[bytes, dict[str, str]]],
    rate: float,
) -> tuple[list[float], list[int], list[float]]:
    """`open_loop` run by a fresh process of its own. The bench's process starts and kills
    servers between phases, and its own event loop came out of that slower: the phases after
    a `kill` measured a few milliseconds more at the client while the server's own timing of
    its answers (its /metrics) did not change."""
    client = subprocess.run(
        [sys.executable, __file__],
        input=pickle.dumps((port, path, requests, rate)),
        capture_output=True,
        check=True,
    )
    found: tuple[list[float], list[int], list[float]] = pickle.loads(client.stdout)
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


if __name__ == "__main__":
    sys.stdout.buffer.write(pickle.dumps(open_loop(*pickle.loads(sys.stdin.buffer.read()))))
