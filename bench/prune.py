"""Retention on a big inbox: `ipn.retention.prune` over N notification rows on PostgreSQL while
a client keeps posting callbacks to the app under gunicorn.

For each size a throwaway database gets N notifications, bulk-inserted, each tagged (in
`remote_addr`) with what it is:

- due: processed 120 days ago, of a paid payment or none (80%), or failed 400 days ago (4%);
- young: processed 10 days ago (6%);
- rejected: rejected 120 days ago, kept for a year (4%);
- open: processed 120 days ago, of a payment still open (2%);
- anomaly: processed 120 days ago, with an open anomaly on it (2%);
- event: processed 120 days ago, of a paid payment with an undelivered merchant event (2%).

On the largest size the app runs under gunicorn as the Procfile's `web` line runs it, and a
separate process posts signed CryptoProcessing callbacks from a few threads, a new connection
each, for a few seconds before the prune, during it, and a second after. The script reports the
callbacks answered (and any that were not 200), their latency before and during the prune, the
rows pruned per second, and the tracemalloc peak of the prune for each size. Then it checks:
every due row pruned, every other row's body and headers byte for byte as seeded, the timeline
untouched, every answered callback stored. Any check failing fails the script.

    .venv/bin/python bench/prune.py                                 # 10000,100000
    .venv/bin/python bench/prune.py --sizes 2000,10000 --seconds 2  # a smoke run
"""

from __future__ import annotations

import argparse
import http.client
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from time import perf_counter
from typing import Any

from merchant_events import CP_CALLBACK, cp_headers, gunicorn, services_for
from reconcile_pass import Databases
from sqlalchemy import func, insert, select

from ipn import retention
from ipn.services import Services
from models import (
    Anomaly,
    AnomalyKind,
    AnomalyStatus,
    DeliveryStatus,
    EventSource,
    EventType,
    MerchantEvent,
    Notification,
    NotificationKind,
    NotificationStatus,
    Payment,
    PaymentEvent,
    PaymentStatus,
    new_id,
    utcnow,
)

CHUNK = 5000
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# (tag, share, status, age in days, what it belongs to)
MIX = [
    ("due", 80, NotificationStatus.PROCESSED, 120, "paid"),
    ("due-failed", 4, NotificationStatus.FAILED, 400, None),
    ("young", 6, NotificationStatus.PROCESSED, 10, "paid"),
    ("rejected", 4, NotificationStatus.REJECTED, 120, None),
    ("open", 2, NotificationStatus.PROCESSED, 120, "open"),
    ("anomaly", 2, NotificationStatus.PROCESSED, 120, None),
    ("event", 2, NotificationStatus.PROCESSED, 120, "event"),
]
DUE = {"due", "due-failed"}
# A callback body as big as the providers' (CryptoProcessing's is about 900 bytes).
BODY = (CP_CALLBACK % "seeded").encode()
HEADERS = {
    "Content-Type": "application/json",
    "User-Agent": "CryptoProcessing/1.0",
    "X-Processing-Key": "cp-api-key",
    "X-Processing-Signature": "0" * 128,
}


@dataclass
class Seeded:
    rows: int
    payments: dict[str, list[str]]
    timeline: int


def _payments(services: Services, kind: str, count: int) -> list[str]:
    now = utcnow()
    status = PaymentStatus.PENDING if kind == "open" else PaymentStatus.PAID
    rows = [
        {
            "id": new_id("pay_"),
            "provider": "cryptoprocessing",
            "order_id": f"{kind}-{index:07d}",
            "status": status,
            "amount": Decimal("0.3"),
            "currency": "ETH",
            # Final for 200 days: below the year after which descriptions go.
            "description": "Benchmark order",
            "created_at": now - timedelta(days=200),
            "updated_at": now - timedelta(days=200),
        }
        for index in range(count)
    ]
    with services.db.transaction() as session:
        session.execute(insert(Payment), rows)
        if kind == "event":
            session.execute(
                insert(MerchantEvent),
                [
                    {
                        "id": new_id("evt_"),
                        "type": EventType.PAYMENT_PAID,
                        "payment_id": row["id"],
                        "sequence": 1,
                        "body": "{}",
                        "status": DeliveryStatus.PENDING,
                        "created_at": now,
                    }
                    for row in rows
                ],
            )
    return [row["id"] for row in rows]


def seed(services: Services, size: int) -> Seeded:
    now = utcnow()
    payment_count = max(10, size // 100)
    payments = {
        kind: _payments(services, kind, payment_count) for kind in ("paid", "open", "event")
    }
    plan: list[tuple[str, NotificationStatus, int, str | None]] = []
    for tag, share, status, days, belongs in MIX:
        plan.extend([(tag, status, days, belongs)] * (size * share // 100))
    plan.extend([plan[0]] * (size - len(plan)))
    statement = insert(Notification)
    for start in range(0, size, CHUNK):
        rows: list[dict[str, Any]] = []
        for index in range(start, min(start + CHUNK, size)):
            tag, status, days, belongs = plan[(index * 7919) % size]  # spread the kinds out
            owners = payments.get(belongs or "", [])
            rows.append(
                {
                    "provider": "cryptoprocessing",
                    "kind": NotificationKind.CALLBACK,
                    "received_at": now - timedelta(days=days, seconds=index),
                    "remote_addr": tag,
                    "headers": HEADERS,
                    "body": BODY,
                    "body_sha256": "0" * 64,
                    "status": status,
                    "attempts": 1,
                    "outcome": "benchmark",
                    "payment_id": owners[index % len(owners)] if owners else None,
                }
            )
        with services.db.transaction() as session:
            session.execute(statement, rows)
    with services.db.transaction() as session:
        anomalies = session.scalars(
            select(Notification.id).where(Notification.remote_addr == "anomaly")
        ).all()
        session.execute(
            insert(Anomaly),
            [
                {
                    "notification_id": notification_id,
                    "kind": AnomalyKind.UNKNOWN_STATUS,
                    "dedupe_key": f"bench-{notification_id}",
                    "evidence": {},
                    "status": AnomalyStatus.OPEN,
                    "created_at": now,
                }
                for notification_id in anomalies
            ],
        )
        session.execute(
            insert(PaymentEvent),
            [
                {
                    "payment_id": payment_id,
                    "at": now - timedelta(days=200),
                    "source": EventSource.CALLBACK,
                    "to_status": PaymentStatus.PAID,
                    "detail": "benchmark",
                }
                for payment_id in payments["paid"]
            ],
        )
    return Seeded(size, payments, len(payments["paid"]))


def verify(services: Services, seeded: Seeded, pruned: int) -> dict[str, tuple[int, int]]:
    """Per tag: (rows, rows pruned); fails unless exactly the due rows went, and no other row
    lost a byte."""
    with services.db.sessions() as session:
        tags = {
            tag: (int(rows), int(gone))
            for tag, rows, gone in session.execute(
                select(
                    Notification.remote_addr,
                    func.count(),
                    func.count(Notification.pruned_at),
                )
                .where(Notification.remote_addr.is_not(None))
                .where(Notification.outcome == "benchmark")
                .group_by(Notification.remote_addr)
            )
        }
        intact = session.scalar(
            select(func.count()).where(
                Notification.outcome == "benchmark",
                Notification.pruned_at.is_(None),
                Notification.body == BODY,
            )
        )
        emptied = session.scalar(
            select(func.count()).where(
                Notification.pruned_at.is_not(None),
                func.length(Notification.body) == 0,
            )
        )
        timeline = session.scalar(select(func.count()).select_from(PaymentEvent))
        described = session.scalar(
            select(func.count()).where(Payment.description == "Benchmark order")
        )
    due = sum(rows for tag, (rows, _) in tags.items() if tag in DUE)
    assert sum(rows for rows, _ in tags.values()) == seeded.rows, tags
    for tag, (rows, gone) in tags.items():
        assert gone == (rows if tag in DUE else 0), f"{tag}: {gone} of {rows} pruned"
    assert pruned == due == emptied, (pruned, due, emptied)
    assert intact == seeded.rows - due, (intact, seeded.rows - due)
    assert timeline == seeded.timeline, (timeline, seeded.timeline)
    assert described == sum(len(ids) for ids in seeded.payments.values()), described
    return tags


# -- the load: a process of its own, so that its threads share no GIL with the prune ---------


def post_callbacks(port: int, clients: int, stop: Any, out: Connection) -> None:
    """(monotonic time sent, seconds to the answer, status) of every callback until `stop`."""
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        sent = 0
        while not stop.is_set():
            body = (CP_CALLBACK % f"load-{index}-{sent}").encode()
            headers = cp_headers(body)
            started = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                connection.request("POST", "/ipn/cryptoprocessing", body, headers)
                response = connection.getresponse()
                response.read()
                status = response.status
            except OSError:
                status = 0
            finally:
                connection.close()
            with lock:
                results.append((started, time.monotonic() - started, status))
            sent += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.send(results)
    out.close()


@dataclass
class PruneRun:
    size: int
    seconds: float
    peak: int
    report: retention.PruneReport
    tags: dict[str, tuple[int, int]]


def traced_prune(services: Services, seeded: Seeded) -> PruneRun:
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = perf_counter()
    report = retention.prune(services)
    seconds = perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tags = verify(services, seeded, report.notifications.rows)
    return PruneRun(seeded.rows, seconds, peak, report, tags)


@dataclass
class Load:
    before: list[float]
    during: list[float]
    answered: int
    not_ok: dict[int, int]


def under_load(
    services: Services, seeded: Seeded, port: int, clients: int, seconds: float
) -> tuple[PruneRun, Load, float, float]:
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    ours, theirs = context.Pipe(duplex=False)
    loader = context.Process(target=post_callbacks, args=(port, clients, stop, theirs))
    loader.start()
    time.sleep(seconds)
    begun = time.monotonic()
    run = traced_prune(services, seeded)
    ended = time.monotonic()
    time.sleep(1)
    stop.set()
    results: list[tuple[float, float, int]] = ours.recv()
    loader.join(30)
    # The first second warms gunicorn's workers up: left out of "before".
    start = min(sent for sent, _, _ in results) + 1
    not_ok: dict[int, int] = {}
    for _, _, status in results:
        if status != 200:
            not_ok[status] = not_ok.get(status, 0) + 1
    load = Load(
        before=[took for sent, took, _ in results if start <= sent < begun],
        during=[took for sent, took, _ in results if begun <= sent < ended],
        answered=sum(1 for _, _, status in results if status == 200),
        not_ok=not_ok,
    )
    return run, load, begun, ended


def stored_callbacks(services: Services) -> int:
    with services.db.sessions() as session:
        return int(
            session.scalar(
                select(func.count()).where(Notification.status == NotificationStatus.RECEIVED)
            )
            or 0
        )


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated row counts")
    parser.add_argument("--clients", type=int, default=4, help="callback threads")
    parser.add_argument("--seconds", type=float, default=5, help="load before the prune")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("IPN_BENCH_DATABASE_URL", DEFAULT_URL),
        help=f"a PostgreSQL server and database to connect to (default {DEFAULT_URL})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = sorted(int(size) for size in args.sizes.split(","))
    logging.basicConfig(level=logging.WARNING)
    runs: list[PruneRun] = []
    with tempfile.TemporaryDirectory(prefix="ipn-bench-") as name, ExitStack() as stack:
        tmp = Path(name)
        databases = Databases(args.database_url, tmp)
        print(f"prune; {databases.describe()}")
        print(f"python {sys.version.split()[0]}; sizes {sizes}; {args.clients} callback clients")
        for size in sizes[:-1]:
            with databases.fresh(str(size)) as url:
                services = services_for(url, tmp / str(size))
                seeded = seed(services, size)
                print(f"{size}: seeded; pruning ...", flush=True)
                runs.append(traced_prune(services, seeded))
                services.db.engine.dispose()
        size = sizes[-1]
        url = stack.enter_context(databases.fresh(str(size)))
        services = services_for(url, tmp / str(size))
        started = perf_counter()
        seeded = seed(services, size)
        print(f"{size}: seeded in {perf_counter() - started:.1f} s; pruning under load ...")
        log_path = tmp / "gunicorn.log"
        with log_path.open("wb") as log:
            try:
                with gunicorn("prune", url, tmp / "web", {}, log) as server:
                    run, load, _, _ = under_load(
                        services, seeded, server.port, args.clients, args.seconds
                    )
            except BaseException:
                sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
                raise
        runs.append(run)
        stored = stored_callbacks(services)
        services.db.engine.dispose()
    assert not load.not_ok, f"callbacks not answered 200: {load.not_ok}"
    assert stored == load.answered, f"{stored} stored of {load.answered} answered"
    assert load.during, "no callback was sent during the prune: raise --sizes"
    for line in report(runs, load):
        print(line)


def report(runs: list[PruneRun], load: Load) -> list[str]:
    small, big = runs[0], runs[-1]
    before = statistics.median(load.before)
    during = statistics.median(load.during)
    lines = ["ratios:"]
    lines.append(
        f"  {'callback latency, during / before':<44} median {during / before:5.2f}x"
        f"   p99 {quantile(load.during, 0.99) / quantile(load.before, 0.99):5.2f}x"
    )
    lines.append(
        f"  {f'prune peak memory, {big.size} / {small.size} rows':<44} "
        f"{big.peak / small.peak:5.2f}x"
    )
    lines.append(
        f"  {f'prune rows/s, {big.size} / {small.size} rows':<44} "
        f"{(big.size / big.seconds) / (small.size / small.seconds):5.2f}x"
    )
    lines.append("")
    lines.append("figures:")
    for run in runs:
        pruned = run.report.notifications
        lines.append(
            f"  {run.size:>7} rows: pruned {pruned.rows} ({pruned.bytes / 2**20:.1f} MiB) in"
            f" {run.seconds:.1f} s = {pruned.rows / run.seconds:,.0f} rows/s;"
            f" tracemalloc peak {run.peak / 2**20:.2f} MiB"
        )
    lines.append(
        f"  callbacks answered {load.answered}, not 200: {sum(load.not_ok.values())};"
        f" {len(load.before)} before the prune, {len(load.during)} during it"
    )
    lines.append(
        f"  latency before: median {before * 1000:.1f} ms, p99"
        f" {quantile(load.before, 0.99) * 1000:.1f} ms; during: median {during * 1000:.1f} ms,"
        f" p99 {quantile(load.during, 0.99) * 1000:.1f} ms"
    )
    kept = {tag: rows for tag, (rows, gone) in runs[-1].tags.items() if not gone}
    lines.append(f"  kept, body and headers intact (verified): {kept}")
    return lines


if __name__ == "__main__":
    main()
