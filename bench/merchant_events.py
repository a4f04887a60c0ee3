"""What merchant events cost: deliveries per second against a floor, callback acceptance with
events on and off, and the time events add to each payment change.

Three figures, each a ratio measured side by side in one run, rounds interleaved (the order
inside a round alternates), the median of the per-round ratios reported:

1. write: N payment changes (pending -> confirming) through `ipn.transitions.write`, one
   transaction each, in three databases that differ only in their endpoints (0, 1 and 3, all
   hearing every event). Per-change time with 1 and 3 endpoints over the time with none.
2. deliver: the 1-endpoint database's N events delivered by `ipn.events.delivery.deliver` from
   K threads pulling delivery ids from a queue (as K Celery worker processes would), to a
   receiver in a subprocess that answers 200 at once. Beside it the floor: as many POSTs of the
   same bodies, signed with `ipn.events.signing.headers`, over a new connection each (as
   `ipn.events.urls.post` makes), with the same K threads and no database. Events per second
   of each and deliver / floor. Between rounds the deliveries are put back to pending.
3. accept: the app under gunicorn as the Procfile runs it (gevent workers,
   `ipn.gunicorn_config`), twice: one database with no endpoint and no IPN_MERCHANT_WEBHOOK_URL,
   one with a registered endpoint and IPN_MERCHANT_WEBHOOK_URL set; no worker runs. C client
   threads POST signed CryptoProcessing callbacks, a new connection each, for D seconds to one
   server, then to the other; before the next run both dispatchers have put every accepted id
   in their broker. Callbacks accepted per second, on / off.

Each database is fresh (SQLite files in a temp dir, or throwaway PostgreSQL databases
`ipn_bench_<random>` dropped afterwards, as in reconcile_pass.py), built by the migrations. The
servers use the embedded SQLite broker in both modes. Every figure is checked (every delivery
delivered, every POST received, every callback answered 200 and stored) or the script fails.

    .venv/bin/python bench/merchant_events.py
    .venv/bin/python bench/merchant_events.py --quick
    .venv/bin/python bench/merchant_events.py \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import logging
import os
import queue
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from time import perf_counter
from typing import IO, TypeVar

from psycopg.errors import DeadlockDetected
from reconcile_pass import Databases
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import OperationalError

from ipn import migrate
from ipn.config import Settings
from ipn.events import delivery, endpoints, signing
from ipn.services import Services
from ipn.transitions import Change, Evidence, Verdict, write
from models import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    EventSource,
    MerchantEvent,
    Notification,
    Payment,
    PaymentStatus,
    new_id,
    utcnow,
)

ROOT = Path(__file__).resolve().parent.parent
P = PaymentStatus
T = TypeVar("T")

# CryptoProcessing credentials the servers are given, and that sign the callbacks.
CP_KEY = "cp-api-key"
CP_SECRET = "AbCdEfG123456"
CP_ENV = {
    "CRYPTOPROCESSING_API_KEY": CP_KEY,
    "CRYPTOPROCESSING_SECRET": CP_SECRET,
    "CRYPTOPROCESSING_API_URL": "http://127.0.0.1:9/cryptoprocessing",
    # No operator signs in here.
    "IPN_CONSOLE": "0",
}
# A `paid` callback shaped as the provider sends it; only foreign_id differs between posts.
CP_CALLBACK = (
    '{"payment_request_id":"019c0ebf-81e5-751d-aa57-fb9e2cba23c2","foreign_id":"%s",'
    '"type":"payment_request","status":"paid","end_user_email":"test@test.com",'
    '"payment_request_address":{"id":"019c0ebf-84a1-7bdc-a09c-8b62294cc75d",'
    '"currency":{"iso":"BTC","network_name":"bitcoin"},'
    '"convert_to":{"iso":"ETH","network_name":"ethereum"},'
    '"address":"tb1qj0d4rsczat6dx3yy065g98rrz5hewkrdcrz7je"},'
    '"payment_request_amount":{"currency":{"iso":"ETH","network_name":"ethereum"},'
    '"amount":"0.3"},'
    '"currency_sent":{"currency":{"iso":"BTC","network_name":"bitcoin"},'
    '"expected_amount":"0.0094","received_amount":"0","remaining_amount":"0"},'
    '"fixed_at":1769773958,"expires_at":1769774157,"valid_until":1769774157}'
)

# The receiver: answers every POST 200 "ok" at once, a GET with how many POSTs it has had.
# A subprocess, so its CPU is not under the benchmark's GIL.
RECEIVER = r"""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

count = 0
lock = threading.Lock()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global count
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with lock:
            count += 1
        self.answer(b"ok")

    def do_GET(self):
        self.answer(str(count).encode())

    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

server = Server(("127.0.0.1", 0), Handler)
print(server.server_port, flush=True)
server.serve_forever()
"""


@dataclass(frozen=True)
class Plan:
    changes: int  # N: payment changes per endpoint count, and so events delivered
    chunk: int  # changes per timed chunk of the write figure
    rounds: int  # rounds of deliver/floor per K
    concurrency: tuple[int, ...]  # K
    accept_seconds: float  # D
    accept_rounds: int
    clients: int  # C
    pg_concurrent_sample: int  # events per run when several threads deliver on PostgreSQL


FULL = Plan(1000, 100, 3, (1, 8), 5.0, 6, 8, 60)
QUICK = Plan(200, 50, 2, (1, 8), 1.5, 2, 8, 12)


def median_ratio(pairs: Sequence[tuple[float, float]]) -> float:
    return statistics.median(a / b for a, b in pairs)


def rotated(items: Sequence[T], round_: int) -> list[T]:
    """The round's order: each round starts one further along, so no side always goes first."""
    shift = round_ % len(items)
    return [*items[shift:], *items[:shift]]


def in_threads(workers: int, items: Sequence[T], work: Callable[[T], None]) -> float:
    """Run `work` on every item from `workers` threads pulling from one queue; the wall time."""
    todo: queue.Queue[T] = queue.Queue()
    for item in items:
        todo.put(item)
    failures: list[BaseException] = []

    def loop() -> None:
        while True:
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                work(item)
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=loop) for _ in range(workers)]
    started = perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = perf_counter() - started
    if failures:
        raise failures[0]
    return seconds


# -- the receiver -----------------------------------------------------------------------------


class Receiver:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.port = port

    def url(self, path: str = "/events") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def received(self) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", "/")
            return int(connection.getresponse().read())
        finally:
            connection.close()


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    process = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield Receiver(process, int(process.stdout.readline()))
    finally:
        process.terminate()
        process.wait(10)


# -- 1. write: what events add to a payment change ---------------------------------------------


def services_for(url: str, data_dir: Path) -> Services:
    settings = Settings.from_env(
        {
            **CP_ENV,
            "DATABASE_URL": url,
            "IPN_DATA_DIR": str(data_dir),
            "IPN_MERCHANT_ALLOW_PRIVATE": "1",
        }
    )
    services = Services.from_settings(settings)
    migrate.upgrade(services.db)
    return services


def add_endpoints(services: Services, urls: Sequence[str]) -> list[str]:
    """Endpoints hearing every event; their secrets."""
    found = []
    with services.db.transaction() as session:
        for url in urls:
            _, secret = endpoints.register(
                session, url, [], "benchmark", settings=services.settings, now=utcnow()
            )
            found.append(secret)
    return found


def seed_payments(services: Services, count: int) -> list[str]:
    now = utcnow()
    payments = [
        Payment(
            provider="cubepay",
            order_id=f"bench-{index:06d}",
            status=P.PENDING,
            amount=Decimal("25.00"),
            currency="USD",
            created_at=now,
            updated_at=now,
        )
        for index in range(count)
    ]
    with services.db.transaction() as session:
        session.add_all(payments)
    return [payment.id for payment in payments]


EVIDENCE = Evidence(EventSource.POLL, "benchmark")


def move(services: Services, payment_id: str) -> None:
    """One change in its own transaction, as a processed callback or a reconciliation check."""
    with services.db.transaction() as session:
        payment = session.get(Payment, payment_id)
        assert payment is not None and payment.status is P.PENDING
        change = Change(Verdict.MOVE, P.PENDING, P.CONFIRMING, "benchmark")
        write(session, payment, change, EVIDENCE, utcnow())


@dataclass
class WriteResult:
    seconds: dict[int, float]  # endpoints -> total seconds of N changes
    per_round: list[dict[int, float]]


def measure_writes(plan: Plan, worlds: dict[int, tuple[Services, list[str]]]) -> WriteResult:
    # An untimed change in each database first: first-use caches are not charged to a chunk.
    for services, ids in worlds.values():
        move(services, ids[0])
    totals = dict.fromkeys(worlds, 0.0)
    per_round: list[dict[int, float]] = []
    for round_, start in enumerate(range(1, plan.changes, plan.chunk)):
        timed: dict[int, float] = {}
        for count in rotated(list(worlds), round_):
            services, ids = worlds[count]
            chunk = ids[start : start + plan.chunk]
            started = perf_counter()
            for payment_id in chunk:
                move(services, payment_id)
            timed[count] = (perf_counter() - started) / len(chunk)
            totals[count] += perf_counter() - started
        per_round.append(timed)
    for count, (services, _) in worlds.items():
        with services.db.sessions() as session:
            events = session.scalar(select(func.count()).select_from(MerchantEvent))
            deliveries = session.scalar(select(func.count()).select_from(Delivery))
        assert events == plan.changes, f"{events} events of {plan.changes} changes"
        assert deliveries == plan.changes * count, f"{deliveries} deliveries, {count} endpoints"
    return WriteResult(totals, per_round)


# -- 2. deliver: events per second against a floor ---------------------------------------------


def reset_deliveries(services: Services) -> list[int]:
    """Every delivery pending and due again, its attempts forgotten; their ids."""
    past = utcnow() - timedelta(seconds=1)
    with services.db.transaction() as session:
        session.execute(delete(DeliveryAttempt))
        session.execute(
            update(Delivery).values(
                status=DeliveryStatus.PENDING,
                attempts=0,
                next_attempt_at=past,
                lease_token=None,
                leased_until=None,
                delivered_at=None,
                last_error=None,
            )
        )
        session.execute(update(MerchantEvent).values(status=DeliveryStatus.PENDING))
        return list(session.scalars(select(Delivery.id).order_by(Delivery.id)))


def deliver_all(
    services: Services, workers: int, limit: int | None = None
) -> tuple[float, int, int]:
    """Every delivery once from `workers` threads: the seconds, how many were delivered and how
    many were lost to a deadlock (their POST was made, its outcome rolled back; a Celery task
    would fail the same way, and the delivery go again once its lease ends)."""
    ids = reset_deliveries(services)[:limit]
    deadlocks = 0
    lock = threading.Lock()

    def one(delivery_id: int) -> None:
        nonlocal deadlocks
        try:
            outcome = delivery.deliver(services, delivery_id)
        except OperationalError as exc:
            if not isinstance(exc.orig, DeadlockDetected):
                raise
            with lock:
                deadlocks += 1
            return
        assert " delivered (200)" in outcome.summary, outcome.summary

    seconds = in_threads(workers, ids, one)
    with services.db.sessions() as session:
        delivered = session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.status == DeliveryStatus.DELIVERED)
        )
    assert delivered == len(ids) - deadlocks, f"{delivered} of {len(ids)} delivered"
    return seconds, delivered, deadlocks


def post_all(receiver: Receiver, bodies: Sequence[str], secret: str, workers: int) -> float:
    """The floor: what deliver does to the network, and nothing else."""

    def one(body: str) -> None:
        headers = signing.headers([secret], new_id("msg_"), int(time.time()), body)
        connection = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=10)
        try:
            connection.request("POST", "/events", body.encode(), headers)
            response = connection.getresponse()
            response.read()
            assert response.status == 200, response.status
        finally:
            connection.close()

    return in_threads(workers, bodies, one)


@dataclass
class DeliverResult:
    workers: int
    events: int  # per run
    deliver: list[float]  # events delivered per second, per round
    floor: list[float]
    deadlocks: list[int]

    @property
    def ratio(self) -> float:
        return median_ratio(list(zip(self.deliver, self.floor, strict=True)))


def measure_deliveries(
    plan: Plan, services: Services, secret: str, receiver: Receiver
) -> list[DeliverResult]:
    with services.db.sessions() as session:
        bodies = list(session.scalars(select(MerchantEvent.body).order_by(MerchantEvent.id)))
    # Untimed: first-use imports, connection pools and caches.
    deliver_all(services, 1, limit=50)
    post_all(receiver, bodies[:50], secret, 1)
    results = {k: DeliverResult(k, sample(plan, services, k), [], [], []) for k in plan.concurrency}
    for round_ in range(plan.rounds):
        for k, result in results.items():
            before = receiver.received()
            for side in rotated(["deliver", "floor"], round_):
                if side == "deliver":
                    seconds, count, deadlocks = deliver_all(services, k, limit=result.events)
                    result.deliver.append(count / seconds)
                    result.deadlocks.append(deadlocks)
                else:
                    some = bodies[: result.events]
                    result.floor.append(len(some) / post_all(receiver, some, secret, k))
            received = receiver.received() - before
            assert received == 2 * result.events, f"receiver had {received} POSTs"
    return list(results.values())


def sample(plan: Plan, services: Services, workers: int) -> int:
    """How many events a run delivers: all of them, except with concurrent deliveries on
    PostgreSQL, where nearly every attempt deadlocks (see deliver_all) and PostgreSQL breaks one
    deadlock per deadlock_timeout (1 s): all N would take N seconds per run."""
    if services.db.is_postgresql and workers > 1:
        return min(plan.changes, plan.pg_concurrent_sample)
    return plan.changes


# -- 3. accept: callbacks with events on and off ------------------------------------------------


@dataclass
class Server:
    label: str
    port: int
    process: subprocess.Popen[bytes]
    services: Services
    broker: Path

    def accepted(self) -> int:
        with self.services.db.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Notification)) or 0)

    def queued(self) -> int:
        """Messages the dispatcher has put in the embedded broker (no worker takes them)."""
        with closing(sqlite3.connect(self.broker, timeout=30)) as connection:
            try:
                return int(connection.execute("SELECT count(*) FROM kombu_message").fetchone()[0])
            except sqlite3.OperationalError:  # no message yet, no table yet
                return 0


def settle(servers: Sequence[Server]) -> None:
    """Wait until the dispatchers have caught up (every accepted id in its broker, or the
    brokers' counts still for a second: an id whose enqueue failed is left to the sweeper),
    so that no dispatcher is still at work while the other server is timed."""
    deadline = time.monotonic() + 120
    last, still = None, 0
    while still < 5 and time.monotonic() < deadline:
        counts = [(server.queued(), server.accepted()) for server in servers]
        if all(queued >= accepted for queued, accepted in counts):
            return
        still = still + 1 if counts == last else 0
        last = counts
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def gunicorn(
    label: str, url: str, data_dir: Path, env: dict[str, str], log: IO[bytes]
) -> Iterator[Server]:
    """The app as the Procfile's `web` line runs it, on a free loopback port."""
    services = services_for(url, data_dir)
    port = free_port()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("gunicorn")),
            "wsgi:app",
            "--config",
            "python:ipn.gunicorn_config",
            "--bind",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            **CP_ENV,
            "DATABASE_URL": url,
            "IPN_DATA_DIR": str(data_dir),
            **env,
        },
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gunicorn ({label}) did not start; see {log.name}")
            time.sleep(0.2)
        yield Server(label, port, process, services, data_dir / "ipn-broker.sqlite")
    finally:
        process.terminate()
        process.wait(20)
        services.db.engine.dispose()


def cp_headers(body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Processing-Key": CP_KEY,
        "X-Processing-Signature": hmac.new(CP_SECRET.encode(), body, hashlib.sha512).hexdigest(),
    }


def hammer(server: Server, clients: int, seconds: float, tag: str) -> float:
    """Callbacks accepted per second from `clients` threads for `seconds`, a new connection per
    callback, as providers send them (and so spread over both gunicorn workers: a keep-alive
    connection stays with the worker that accepted it, and 8 of them landing unevenly on 2
    workers moved the figure by a third from one run to the next)."""
    counts = [0] * clients
    failures: list[str] = []
    before = server.accepted()

    def client(index: int) -> None:
        deadline = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < deadline:
            body = (CP_CALLBACK % f"{tag}-{index}-{sent}").encode()
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            try:
                connection.request("POST", "/ipn/cryptoprocessing", body, cp_headers(body))
                response = connection.getresponse()
                answer = response.read()
            finally:
                connection.close()
            if response.status != 200:
                failures.append(f"{response.status} {answer[:80]!r}")
                return
            sent += 1
        counts[index] = sent

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = perf_counter() - started
    assert not failures, failures[:3]
    stored = server.accepted() - before
    assert stored == sum(counts), f"{stored} stored of {sum(counts)} answered"
    return sum(counts) / elapsed


def measure_acceptance(
    plan: Plan, databases: Databases, tmp: Path, receiver: Receiver, log: IO[bytes]
) -> dict[str, list[float]]:
    secret = signing.new_secret()
    with ExitStack() as stack:
        off_url = stack.enter_context(databases.fresh("accept-off"))
        on_url = stack.enter_context(databases.fresh("accept-on"))
        (tmp / "off").mkdir()
        (tmp / "on").mkdir()
        off = stack.enter_context(gunicorn("off", off_url, tmp / "off", {}, log))
        on_env = {
            "IPN_MERCHANT_WEBHOOK_URL": receiver.url("/environment"),
            "IPN_MERCHANT_WEBHOOK_SECRET": secret,
            "IPN_MERCHANT_ALLOW_PRIVATE": "1",
        }
        on = stack.enter_context(gunicorn("on", on_url, tmp / "on", on_env, log))
        add_endpoints(on.services, [receiver.url()])
        rates: dict[str, list[float]] = {"off": [], "on": []}
        for server in (off, on):  # untimed warm-up
            hammer(server, plan.clients, 0.5, "warmup")
        settle([off, on])
        for round_ in range(plan.accept_rounds):
            for server in rotated([off, on], round_):
                rates[server.label].append(
                    hammer(server, plan.clients, plan.accept_seconds, f"r{round_}")
                )
                settle([off, on])
        with on.services.db.sessions() as session:
            events = session.scalar(select(func.count()).select_from(MerchantEvent))
        assert events == 0, "acceptance wrote events: something processed the callbacks"
    return rates


# -- output and main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("IPN_BENCH_DATABASE_URL"),
        help=(
            "default: fresh SQLite files in a temp dir (or $IPN_BENCH_DATABASE_URL); a "
            "PostgreSQL URL names a server and a database to connect to, e.g. "
            "postgresql+psycopg://postgres@127.0.0.1:5432/test, on which throwaway databases "
            "ipn_bench_<random> are created and dropped"
        ),
    )
    return parser.parse_args(argv)


def report(
    plan: Plan,
    writes: WriteResult,
    delivered: list[DeliverResult],
    rates: dict[str, list[float]],
) -> list[str]:
    """Ratios first, then the figures they come from."""
    ms = {c: s * 1000 / (plan.changes - 1) for c, s in writes.seconds.items()}
    accept = median_ratio(list(zip(rates["on"], rates["off"], strict=True)))
    lines = ["ratios, side by side in this run (median of the per-round ratios):"]
    for count in (1, 3):
        pairs = [(r[count], r[0]) for r in writes.per_round]
        lines.append(f"  {f'write, {count} endpoint(s) / none':<34} {median_ratio(pairs):6.2f}x")
    for result in delivered:
        lines.append(f"  {f'deliver / floor, K={result.workers}':<34} {result.ratio:7.4f}x")
    lines.append(f"  {'accept, events on / off':<34} {accept:6.2f}x")
    lines.append("")
    lines.append("figures (medians of the rounds):")
    for count, value in ms.items():
        lines.append(f"  {f'write, {count} endpoint(s)':<34} {value:8.3f} ms/change")
    for result in delivered:
        name = f"deliver, K={result.workers}, {result.events} events"
        deliver, floor = statistics.median(result.deliver), statistics.median(result.floor)
        line = f"  {name:<34} {deliver:8.1f} events/s   floor {floor:6.0f}/s"
        if any(result.deadlocks):
            line += f"   deadlocks {sum(result.deadlocks)} of {result.events * plan.rounds}"
        lines.append(line)
    for label in ("off", "on"):
        lines.append(
            f"  {f'accept, events {label}':<34} {statistics.median(rates[label]):8.0f} callbacks/s"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="ipn-bench-") as name, ExitStack() as stack:
        tmp = Path(name)
        databases = Databases(args.database_url, tmp)
        receiver = stack.enter_context(running_receiver())
        where = "SQLite files" if databases.url is None else databases.describe().split(",")[0]
        print(f"merchant events; {where}, a fresh database per figure and endpoint count")
        print(
            f"python {sys.version.split()[0]}; N={plan.changes} changes (chunks of {plan.chunk}); "
            f"K={'/'.join(map(str, plan.concurrency))} delivery threads x {plan.rounds} rounds; "
            f"{plan.clients} callback clients x {plan.accept_seconds:g} s x {plan.accept_rounds}"
        )
        print(flush=True)

        worlds: dict[int, tuple[Services, list[str]]] = {}
        secrets: dict[int, list[str]] = {}
        for count in (0, 1, 3):
            url = stack.enter_context(databases.fresh(f"write-{count}"))
            services = services_for(url, tmp)
            stack.callback(services.db.engine.dispose)
            secrets[count] = add_endpoints(
                services, [receiver.url(f"/events/{i}") for i in range(count)]
            )
            worlds[count] = (services, seed_payments(services, plan.changes))
        print("write ...", flush=True)
        writes = measure_writes(plan, worlds)

        print("deliver ...", flush=True)
        services, _ = worlds[1]
        delivered = measure_deliveries(plan, services, secrets[1][0], receiver)

        print("accept ...", flush=True)
        log_path = tmp / "gunicorn.log"
        with log_path.open("wb") as log:
            try:
                rates = measure_acceptance(plan, databases, tmp, receiver, log)
            except BaseException:
                sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
                raise
    print()
    for line in report(plan, writes, delivered, rates):
        print(line)


if __name__ == "__main__":
    main()
