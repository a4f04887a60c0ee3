"""The reconciliation pass fanned out over Celery workers, beside a sequential baseline.

N open CubePay payments, all due, on PostgreSQL; a fast CubePay payment/query stub (keep-alive
HTTP/1.1, a process of its own, answering `unpaid` in well under a millisecond) counts the
questions per payment. For each size, in one run:

- baseline: what a few dozen lines do: one keep-alive `requests` session, the due payments
  read once, then for each one status query and one UPDATE (autocommit), one after another;
- fanout: `ipn.reconcile_due` sent once, as the beat sends it, to one `celery worker
  --concurrency 2` (two worker processes): it claims the due payments and enqueues batches,
  which the two processes check (`ipn.reconcile_batch`). Timed from the send until no payment
  is left unchecked; the peak RSS of each pool process (VmHWM) is read at the end;
- twice at once: two workers of two processes each, and `ipn.reconcile_due` sent twice at the
  same moment (two beats): the stub must have been asked about each payment exactly once.

Between runs every payment is made due and unchecked again. Then, on a database of its own,
the round trips of both paths are counted from the libpq protocol trace of every connection
(`pgconn.trace()`): ReadyForQuery messages, one per request the client waited for, divided by
the payments checked (the fanout's count includes the beat's claims).

    .venv/bin/python bench/reconcile_fanout.py
    .venv/bin/python bench/reconcile_fanout.py --sizes 10000 --trace-size 2000
    .venv/bin/python bench/reconcile_fanout.py --sizes 10000 --trace-size 0   # no trace
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import psycopg
import requests
from reconcile_pass import Databases
from sqlalchemy import event, insert, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ipn import create_app, migrate  # noqa: E402
from ipn.db import Database  # noqa: E402
from ipn.reconcile import check_claimed, enqueue_due  # noqa: E402
from models import Payment, PaymentStatus, new_id  # noqa: E402

DEFAULT_SIZES = (10_000, 100_000)
SEED_CHUNK = 5_000
REDIS_URL = os.environ.get("IPN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
ENV = {
    "IPN_API_TOKEN": "bench-token",
    "IPN_SECRET_KEY": "bench-secret-key-for-console",
    "CUBEPAY_CLIENT_ID": "exampleclientid",
    "CUBEPAY_CLIENT_SECRET": "exampleclientsecret",
    "IPN_POLL_LIMITS": "cubepay=100000000/minute",
    "IPN_LOG_LEVEL": "WARNING",
}
# An answer CubePay gives for a payment not yet paid: 0.01 BTC asked for 500 TWD.
ANSWER = (
    '{"status":200,"data":[{"id":"%s","status":0,"status_message":"unpaid",'
    '"pay_url":"https://pay.example/%s","pay_info":{"coin":{"id":2,"symbol":"BTC",'
    '"name":"Bitcoin"},"address":"bc1qexampleaddress","amount":0.01,"paid_amount":0,'
    '"merchant_transaction_id":"%s","item_name":"Benchmark order","source_coin":'
    '{"id":443,"symbol":"TWD"},"source_amount":500}}]}'
)


# -- the stub ---------------------------------------------------------------------------------


def _serve(port: multiprocessing.Queue[int]) -> None:
    """An asyncio HTTP/1.1 responder on a bare `Protocol`: streams and http.server cost more
    CPU than the answer should take, and the stub shares this machine's two cores with the
    workers it answers. Each request's head and body are taken from the bytes received, and
    each answer is written in one send."""
    asked: Counter[str] = Counter()

    def answer_to(head: bytes, body: bytes) -> bytes:
        if head.startswith(b"GET"):
            counts = list(asked.values())
            if head.split(b" ", 2)[1] == b"/reset":
                asked.clear()
            answer = json.dumps(
                {"total": sum(counts), "distinct": len(counts), "most": max(counts, default=0)}
            ).encode()
        else:
            payment_id = dict(parse_qsl(body.decode())).get("id", "")
            asked[payment_id] += 1
            order_id = f"fan-{int(payment_id[1:])}"
            answer = (ANSWER % (payment_id, payment_id, order_id)).encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(answer)).encode()
            + b"\r\n\r\n"
            + answer
        )

    class Responder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.pending = b""

        def data_received(self, data: bytes) -> None:
            self.pending += data
            while True:
                end = self.pending.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.pending[:end]
                length = 0
                at = head.lower().find(b"content-length:")
                if at >= 0:
                    length = int(head[at + 15 :].split(b"\r\n", 1)[0])
                if len(self.pending) < end + 4 + length:
                    return
                body = self.pending[end + 4 : end + 4 + length]
                self.pending = self.pending[end + 4 + length :]
                self.transport.write(answer_to(head, body))

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Responder, "127.0.0.1", 0)
        port.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


class Stub:
    def __init__(self) -> None:
        ports: multiprocessing.Queue[int] = multiprocessing.Queue()
        self.process = multiprocessing.Process(target=_serve, args=(ports,), daemon=True)
        self.process.start()
        self.url = f"http://127.0.0.1:{ports.get(timeout=10)}"

    def counts(self, reset: bool = False) -> dict[str, int]:
        answer = requests.get(self.url + ("/reset" if reset else "/counts"), timeout=10)
        return dict(answer.json())

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(5)


# -- payments ---------------------------------------------------------------------------------


def seed(db: Database, size: int) -> None:
    now = datetime.now(UTC)
    with db.engine.begin() as connection:
        for start in range(0, size, SEED_CHUNK):
            connection.execute(
                insert(Payment),
                [
                    {
                        "id": new_id("pay_"),
                        "provider": "cubepay",
                        "order_id": f"fan-{n}",
                        "provider_payment_id": f"C{n:019d}",
                        "status": PaymentStatus.PENDING,
                        "provider_status": "0",
                        "amount": Decimal("500"),
                        "currency": "TWD",
                        "pay_amount": Decimal("0.01"),
                        "pay_currency": "BTC",
                        # As the first answer filled them in: later answers change nothing.
                        "pay_address": "bc1qexampleaddress",
                        "pay_url": f"https://pay.example/C{n:019d}",
                        "paid_amount": Decimal("0"),
                        "created_at": now,
                        "updated_at": now,
                        "expires_at": now + timedelta(hours=6),
                        "next_check_at": now - timedelta(minutes=1),
                    }
                    for n in range(start, min(start + SEED_CHUNK, size))
                ],
            )


def make_due(db: Database) -> None:
    """Every payment due and unchecked again, the table vacuumed for the next run."""
    with db.engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE payments SET checks = 0, last_checked_at = NULL, lease_token = NULL, "
                "leased_until = NULL, next_check_at = now() - interval '1 minute'"
            )
        )
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE payments"))


def unchecked(db: Database) -> int:
    with db.engine.connect() as connection:
        return int(connection.scalar(text("SELECT count(*) FROM payments WHERE checks = 0")) or 0)


# -- the two paths ----------------------------------------------------------------------------


def baseline(database_url: str, stub_url: str, on_trace: Callable[[Any], None] | None) -> int:
    """One keep-alive session, one UPDATE per payment, one payment after another."""
    conninfo = database_url.replace("postgresql+psycopg://", "postgresql://")
    http = requests.Session()
    with psycopg.connect(conninfo, autocommit=True) as connection:
        if on_trace:
            on_trace(connection)
        due = connection.execute(
            "SELECT id, provider_payment_id FROM payments WHERE next_check_at <= now() "
            "ORDER BY next_check_at, id"
        ).fetchall()
        for payment_id, provider_payment_id in due:
            answer = http.post(
                f"{stub_url}/payment/query", data={"id": provider_payment_id}, timeout=5
            )
            status = answer.json()["data"][0]["status"]
            connection.execute(
                "UPDATE payments SET checks = checks + 1, provider_status = %s, "
                "last_checked_at = now(), next_check_at = now() + interval '1 hour' "
                "WHERE id = %s",
                (str(status), payment_id),
            )
    return len(due)


class Worker:
    """A `celery worker` of `processes` pool processes on the bench's queue."""

    def __init__(self, env: dict[str, str], processes: int, log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.main",
                "worker",
                "--loglevel",
                "WARNING",
                "--concurrency",
                str(processes),
                "--queues",
                env["IPN_QUEUE"],
                "--without-heartbeat",
                "--without-gossip",
                "--without-mingle",
            ],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # At WARNING (INFO would log every status query) the worker does not say "ready.":
        # its pool processes up, and a moment for them to connect, stand in for it.
        deadline = time.monotonic() + 60
        while len(self.children()) < processes:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        time.sleep(3)

    def children(self) -> list[str]:
        return subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout.split()

    def peak_rss_mib(self) -> list[float]:
        peaks = []
        for pid in self.children():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
        return peaks

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def fanout(
    db: Database, env: dict[str, str], workers: int, beats: int, tmp: Path
) -> tuple[float, list[float]]:
    """Seconds from the beat's send until every payment is checked, and the pool's peak RSS."""
    queue = f"ipn-bench-{uuid.uuid4().hex[:8]}"
    env = {**env, "IPN_QUEUE": queue}
    started = [Worker(env, 2, tmp / f"worker-{queue}-{n}.log") for n in range(workers)]
    app = create_app(_settings(env))
    try:
        celery = app.extensions["celery"]
        began = time.perf_counter()
        for _ in range(beats):
            celery.send_task("ipn.reconcile_due", retry=False)
        while unchecked(db):
            time.sleep(0.1)
        seconds = time.perf_counter() - began
        return seconds, [peak for worker in started for peak in worker.peak_rss_mib()]
    finally:
        for worker in started:
            worker.stop()
        app.extensions["ipn"].db.engine.dispose()


def _settings(env: dict[str, str]) -> Any:
    from ipn.config import Settings

    return Settings.from_env({**os.environ, **env})


# -- round trips ------------------------------------------------------------------------------


class Trace:
    """The libpq protocol trace of every connection given to it, in one file."""

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / f"trace-{uuid.uuid4().hex[:8]}.txt"
        self.file = self.path.open("w")

    def attach(self, connection: Any) -> None:
        pgconn = connection.pgconn
        pgconn.trace(self.file.fileno())
        pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)

    def round_trips(self) -> int:
        self.file.flush()
        with self.path.open() as lines:
            return sum(1 for line in lines if "\tReadyForQuery\t" in line and line[0] == "B")


def round_trips(databases: Databases, size: int, stub: Stub, tmp: Path) -> tuple[float, float]:
    with databases.fresh(f"trace-{size}") as url:
        db = Database(url)
        migrate.upgrade(db)
        seed(db, size)
        traced = Trace(tmp)
        checked = baseline(url, stub.url, traced.attach)
        assert checked == size, checked
        base = traced.round_trips() / size
        db.engine.dispose()
        make_due(db)

        env = {**ENV, "DATABASE_URL": url, "CUBEPAY_API_URL": stub.url}
        app = create_app(_settings(env))
        services = app.extensions["ipn"]
        services.db.engine.dispose()
        traced = Trace(tmp)
        event.listen(services.db.engine, "connect", lambda dbapi, _record: traced.attach(dbapi))
        batches: list[tuple[list[str], str]] = []
        enqueue_due(services, lambda ids, lease: batches.append((ids, lease)))
        total = 0
        for ids, lease in batches:
            total += check_claimed(services, ids, lease).checked
        assert total == size, total
        ours = traced.round_trips() / size
        services.db.engine.dispose()
        db.engine.dispose()
    return base, ours


# -- the run ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--trace-size", type=int, default=2000)
    parser.add_argument(
        "--database-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="ipn-bench-fanout-"))
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(tmp / "metrics"))
    databases = Databases(args.database_url, tmp)
    stub = Stub()
    print(f"database: {databases.describe()}; stub {stub.url}; broker {REDIS_URL}")
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    rows = []
    try:
        for size in sizes:
            with databases.fresh(str(size)) as url:
                db = Database(url)
                migrate.upgrade(db)
                seed(db, size)
                env = {
                    **ENV,
                    "DATABASE_URL": url,
                    "REDIS_URL": REDIS_URL,
                    "CUBEPAY_API_URL": stub.url,
                    "IPN_DATA_DIR": str(tmp),
                }
                stub.counts(reset=True)
                began = time.perf_counter()
                assert baseline(url, stub.url, None) == size
                base_seconds = time.perf_counter() - began
                make_due(db)
                stub.counts(reset=True)
                seconds, peaks = fanout(db, env, workers=1, beats=1, tmp=tmp)
                asked = stub.counts(reset=True)
                make_due(db)
                twice_seconds, _ = fanout(db, env, workers=2, beats=2, tmp=tmp)
                twice = stub.counts(reset=True)
                db.engine.dispose()
            row = {
                "size": size,
                "baseline/s": size / base_seconds,
                "fanout/s": size / seconds,
                "ms/payment": seconds * 1000 / size,
                "peak MiB": max(peaks),
                "asked": asked,
                "twice/s": size / twice_seconds,
                "twice": twice,
            }
            rows.append(row)
            print(
                f"{size:>7} due: baseline {row['baseline/s']:,.0f}/s; fanout (1 worker, 2 "
                f"processes) {row['fanout/s']:,.0f}/s = {row['fanout/s'] / row['baseline/s']:.2f}"
                f"x baseline, {row['ms/payment']:.3f} ms/payment, pool peak RSS "
                f"{', '.join(f'{peak:.0f}' for peak in peaks)} MiB; stub asked {asked['total']} "
                f"times about {asked['distinct']} payments (at most {asked['most']} each)"
            )
            print(
                f"{'':>7}      two workers x 2 processes, two beats at once: "
                f"{row['twice/s']:,.0f}/s; stub asked {twice['total']} times about "
                f"{twice['distinct']} payments (at most {twice['most']} each)"
            )
            if twice["distinct"] != size or twice["most"] != 1 or asked["most"] != 1:
                raise SystemExit("a payment was asked about more than once, or not at all")
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            print(
                f"from {first['size']} to {last['size']}: time per payment x"
                f"{last['ms/payment'] / first['ms/payment']:.2f}, peak memory x"
                f"{last['peak MiB'] / first['peak MiB']:.2f}"
            )
        if args.trace_size:
            base_trips, our_trips = round_trips(databases, args.trace_size, stub, tmp)
            print(
                f"round trips per check ({args.trace_size} payments, libpq trace): baseline "
                f"{base_trips:.2f}, fanout {our_trips:.2f} (beat's claims included)"
            )
    finally:
        stub.stop()


if __name__ == "__main__":
    main()
