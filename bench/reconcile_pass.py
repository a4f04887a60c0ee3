"""How one reconciliation pass scales with the number of payments that are due.

`ipn.reconcile.reconcile_due(services, now=...)` runs over N open CubePay payments, all due,
against the provider sandbox served in-process over real loopback HTTP (werkzeug, threaded).
For each size the script prints the wall time of the pass, the time per payment, the peak of
Python memory allocated during the pass (tracemalloc, so the seeded payments already in memory
do not count) and its growth over the smallest size; then, from the same run, the time per
payment and the memory peak of each size relative to the smallest one. A pass that streams its
payments in batches keeps both ratios near 1.

The sandbox shares the process: its work answering the queries is in the wall time (one GIL)
and its allocations during the pass are in the peak. tracemalloc slows the pass down about 2.5
times; the ratios compare sizes under the same overhead. An untimed pass over WARMUP payments
runs first, so that first-use imports and caches are not charged to the first size.

Each size gets a fresh database (SQLite file, or a throwaway PostgreSQL database
`ipn_bench_<random>` dropped afterwards), built by the migrations, and an empty sandbox. The N
payments are seeded, untimed, straight into the sandbox's memory and, with bulk Core inserts,
into the database as open `pending` payments whose check is overdue. The sandbox answers status 1
`paying` for each (`--answer paying`, every payment moves pending -> confirming) or status 0
`unpaid` (`--answer unpaid`, the payment stays pending and only its next check moves). The pass
report must count every payment checked, and changed when the answer is `paying`, else the
script fails instead of printing a figure.

    .venv/bin/python bench/reconcile_pass.py --sizes 1000,10000
    .venv/bin/python bench/reconcile_pass.py \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import gc
import io
import logging
import secrets
import sys
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from time import perf_counter
from typing import Any, cast

from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from ipn import migrate
from ipn.config import Settings
from ipn.db import Database
from ipn.reconcile import PassReport, count_due, reconcile_due
from ipn.sandbox import create_app, market, sandbox_environment
from ipn.sandbox import cubepay as fake_cubepay
from ipn.sandbox.control import Sandbox
from ipn.sandbox.state import FakePayment
from ipn.services import Services
from models import Payment, PaymentEvent, PaymentStatus, new_id, utcnow

DEFAULT_SIZES = (1_000, 10_000, 100_000)
SEED_CHUNK = 5_000
# A small pass run first and thrown away.
WARMUP = 100
# Budgets no pass of these sizes can spend: the figures are the pass's own cost, not throttling.
POLL_LIMITS = "cubepay=100000000/minute,bitcoinpaygate=100000000/minute,coinbarpay=100000000/day"
MIB = 1024 * 1024
# The largest read the sandbox's server makes from a request stream (see _CappedReader).
DRAIN_CAP = 64 * 1024

# Every payment asks 25.00 USD in BTC, as `POST /api/payments` would have created it.
AMOUNT = Decimal("25.00")
CURRENCY = "USD"
PAY_CURRENCY = "BTC"
# How the sandbox answers, and what the receiver must make of it.
ANSWERS: dict[str, tuple[int, PaymentStatus, bool]] = {
    # answer: (CubePay status, our status after the pass, whether the pass counts it changed)
    "paying": (fake_cubepay.PAYING, PaymentStatus.CONFIRMING, True),
    "unpaid": (fake_cubepay.INIT, PaymentStatus.PENDING, False),
}
_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


@dataclass(frozen=True)
class Result:
    size: int
    seed_seconds: float
    seconds: float
    peak_bytes: int
    report: PassReport

    @property
    def ms_per_payment(self) -> float:
        return self.seconds * 1000 / self.size

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB


# -- the sandbox ------------------------------------------------------------------------------


class _CappedReader:
    """A request stream whose reads take at most DRAIN_CAP bytes at a time.

    After each response werkzeug's dev server drains the socket with `rfile.read(10_000_000)`,
    and a buffered read allocates its whole size up front: 9.5 MiB per request, freed at once,
    that tracemalloc would report as the pass's peak whatever the receiver does. Request bodies
    here are far smaller than the cap, and the drain loop takes short reads.
    """

    def __init__(self, stream: io.BufferedIOBase) -> None:
        self._stream = stream

    def read(self, size: int | None = -1) -> bytes:
        return self._stream.read(DRAIN_CAP if size is not None and size > DRAIN_CAP else size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _SandboxHandler(WSGIRequestHandler):
    """No access log line per request (it would be timed with the pass), no 10 MB drain reads."""

    def setup(self) -> None:
        super().setup()
        self.rfile = cast(io.BufferedIOBase, _CappedReader(self.rfile))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


@contextmanager
def running_sandbox(data_dir: Path) -> Iterator[tuple[Sandbox, str]]:
    """The sandbox app on a free loopback port, served by a daemon thread; its root URL."""
    # The sandbox only needs credentials from its settings: the sandbox's own well-known keys,
    # the same ones the receiver gets from sandbox_environment() below.
    settings = Settings.from_env(
        {**sandbox_environment("http://127.0.0.1"), "IPN_DATA_DIR": str(data_dir)}
    )
    # Nothing in a pass makes the sandbox post a callback; no receiver listens here.
    app = create_app(settings, receiver_url="http://127.0.0.1:9")
    server: BaseWSGIServer = make_server(
        "127.0.0.1", 0, app, threaded=True, request_handler=_SandboxHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="sandbox", daemon=True)
    thread.start()
    try:
        yield app.extensions["ipn_sandbox"], f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


# -- databases --------------------------------------------------------------------------------


class Databases:
    """A fresh, migrated database per size: a SQLite file, or a throwaway PostgreSQL database."""

    def __init__(self, url: str | None, tmp: Path) -> None:
        self.tmp = tmp
        self.url: URL | None = None
        if url is not None:
            for prefix in ("postgres://", "postgresql://"):
                if url.startswith(prefix):
                    url = "postgresql+psycopg://" + url[len(prefix) :]
            self.url = make_url(url)
            backend = self.url.get_backend_name()
            if backend not in ("sqlite", "postgresql"):
                raise SystemExit(f"--database-url: sqlite or postgresql, not {backend}")
            if backend == "sqlite" and self.url.database in (None, "", ":memory:"):
                raise SystemExit("--database-url: a SQLite URL must name a file")

    def describe(self) -> str:
        if self.url is None:
            return f"SQLite, a fresh file per size in {self.tmp}"
        if self.url.get_backend_name() == "sqlite":
            return f"SQLite, a fresh file per size beside {self.url.database}"
        server = self.url.render_as_string(hide_password=True)
        return f"PostgreSQL through {server}, a throwaway database ipn_bench_<random> per size"

    @contextmanager
    def fresh(self, label: str) -> Iterator[str]:
        """A new database for one pass; `label` (the size) names SQLite files."""
        if self.url is None:
            path = self.tmp / f"ipn-bench-{label}.sqlite"
            try:
                yield f"sqlite:///{path}"
            finally:
                for leftover in self.tmp.glob(f"{path.name}*"):
                    leftover.unlink()
        elif self.url.get_backend_name() == "sqlite":
            given = Path(self.url.database or "")
            path = given.with_name(f"{given.stem}-{label}{given.suffix or '.sqlite'}")
            if path.exists():
                raise SystemExit(f"{path} exists: the benchmark only writes to new files")
            # Kept afterwards: whoever named the file may want to look at it.
            yield f"sqlite:///{path.resolve()}"
        else:
            with self._postgres(self.url) as url:
                yield url

    @staticmethod
    @contextmanager
    def _postgres(server: URL) -> Iterator[str]:
        name = f"ipn_bench_{secrets.token_hex(6)}"
        admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                yield server.set(database=name).render_as_string(hide_password=False)
            finally:
                with admin.connect() as connection:
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()


# -- seeding ----------------------------------------------------------------------------------


def _address(index: int) -> str:
    """A distinct testnet-shaped BTC address per payment (random ones cost seconds at 100k)."""
    digits = []
    for _ in range(38):
        index, digit = divmod(index, 32)
        digits.append(_BECH32[digit])
    return "tb1q" + "".join(reversed(digits))


def seed(
    sandbox: Sandbox, sandbox_url: str, db: Database, size: int, now: datetime, answer: str
) -> None:
    """N CubePay payments, in the sandbox's memory and in our database, all due before `now`.

    As created 40 minutes ago (CubePay's 6 h lifetime still running, provider status 0), each
    due at its own moment during the last 30 minutes, the longest overdue first.
    """
    status = ANSWERS[answer][0]
    pay_amount = market.convert(AMOUNT, CURRENCY, PAY_CURRENCY)
    created = now - timedelta(minutes=40)
    expires = created + fake_cubepay.LIFETIME
    first_due = now - timedelta(minutes=30)
    step = timedelta(minutes=29) / size
    stamp = int(created.timestamp() * 1000)
    # What payment/coin received; only item_name is echoed back by payment/query. Shared:
    # the sandbox only reads it.
    request = {"item_name": "Benchmark order", "coin_id": "2", "source_coin_id": "447"}
    sandbox.reset()
    statement = insert(Payment)
    for start in range(0, size, SEED_CHUNK):
        rows: list[dict[str, Any]] = []
        for index in range(start, min(start + SEED_CHUNK, size)):
            payment_id = f"C{stamp:013d}{index:06d}"
            order_id = f"bench-{index:07d}"
            address = _address(index)
            sandbox.ledger.add(
                FakePayment(
                    provider="cubepay",
                    payment_id=payment_id,
                    order_id=order_id,
                    created_at=created,
                    expires_at=expires,
                    status=status,
                    amount=AMOUNT,
                    currency=CURRENCY,
                    pay_amount=pay_amount,
                    pay_currency=PAY_CURRENCY,
                    address=address,
                    base_url=f"{sandbox_url}/",
                    request=request,
                    updated_at=created,
                )
            )
            rows.append(
                {
                    "id": new_id("pay_"),
                    "provider": "cubepay",
                    "order_id": order_id,
                    "provider_payment_id": payment_id,
                    "status": PaymentStatus.PENDING,
                    "provider_status": str(fake_cubepay.INIT),
                    "amount": AMOUNT,
                    "currency": CURRENCY,
                    "pay_amount": pay_amount,
                    "pay_currency": PAY_CURRENCY,
                    "pay_address": address,
                    "pay_url": f"{sandbox_url}/sandbox/payments/cubepay/{payment_id}",
                    "payment_uri": market.payment_uri(PAY_CURRENCY, address, pay_amount),
                    "description": "Benchmark order",
                    "expires_at": expires,
                    "next_check_at": first_due + step * index,
                    "checks": 0,
                    "poll_failures": 0,
                    "callback_token": secrets.token_hex(16),
                    "version": 1,
                    "created_at": created,
                    "updated_at": created,
                }
            )
        with db.engine.begin() as connection:
            connection.execute(statement, rows)
    if db.is_postgresql:
        with db.engine.begin() as connection:
            connection.execute(text("ANALYZE"))


# -- one size ---------------------------------------------------------------------------------


def measure(
    size: int,
    *,
    sandbox: Sandbox,
    sandbox_url: str,
    databases: Databases,
    data_dir: Path,
    answer: str,
    label: str | None = None,
) -> Result:
    with databases.fresh(label or str(size)) as url:
        settings = Settings.from_env(
            {
                **sandbox_environment(sandbox_url),
                "DATABASE_URL": url,
                "IPN_DATA_DIR": str(data_dir),
                "IPN_POLL_LIMITS": POLL_LIMITS,
                "IPN_CONSOLE": "0",  # no operator signs in here
            }
        )
        services = Services.from_settings(settings)
        try:
            migrate.upgrade(services.db)
            now = utcnow()
            started = perf_counter()
            seed(sandbox, sandbox_url, services.db, size, now, answer)
            seed_seconds = perf_counter() - started
            assert count_due(services, now) == size

            gc.collect()
            tracemalloc.start()
            try:
                started = perf_counter()
                report = reconcile_due(services, now=now)
                seconds = perf_counter() - started
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

            check(services, report, size, now, answer)
            return Result(size, seed_seconds, seconds, peak, report)
        finally:
            for session in {id(p.session): p.session for p in services.providers.values()}.values():
                session.close()
            services.db.engine.dispose()
            sandbox.reset()


def check(services: Services, report: PassReport, size: int, now: datetime, answer: str) -> None:
    """Fail loudly unless the pass did all of its work: no figure for a broken pass."""
    _, status, changes = ANSWERS[answer]
    assert report.checked == size, f"checked {report.checked} of {size}: {report}"
    assert report.changed == (size if changes else 0), f"changed: {report}"
    assert report.skipped == 0 and not report.failures, f"{report}; {report.failures[:3]}"
    assert count_due(services, now) == 0, "payments still due after the pass"
    with services.db.sessions() as session:
        moved = session.scalar(
            select(func.count()).select_from(Payment).where(Payment.status == status)
        )
        checked = session.scalar(
            select(func.count()).select_from(Payment).where(Payment.checks == 1)
        )
        events = session.scalar(select(func.count()).select_from(PaymentEvent))
    assert moved == size, f"{moved} of {size} payments are {status.value}"
    assert checked == size, f"{checked} of {size} payments were asked once"
    assert events == (size if changes else 0), f"{events} timeline events for {size} payments"


# -- output -----------------------------------------------------------------------------------

HEADER = (
    f"{'size':>8} {'seed s':>8} {'pass s':>9} {'ms/payment':>11} {'peak MiB':>9} "
    f"{'growth MiB':>11}  pass report"
)


def row(result: Result, smallest: Result) -> str:
    growth = (result.peak_bytes - smallest.peak_bytes) / MIB
    return (
        f"{result.size:>8} {result.seed_seconds:>8.1f} {result.seconds:>9.2f} "
        f"{result.ms_per_payment:>11.3f} {result.peak_mib:>9.2f} {growth:>+11.2f}  "
        f"{result.report}"
    )


def ratios(results: list[Result]) -> list[str]:
    base, others = results[0], results[1:]
    if not others:
        return []
    lines = [f"side by side in this run, relative to {base.size}:"]
    time_ratios = "   ".join(
        f"{r.size}: {r.ms_per_payment / base.ms_per_payment:.2f}x" for r in others
    )
    memory_ratios = "   ".join(f"{r.size}: {r.peak_bytes / base.peak_bytes:.2f}x" for r in others)
    lines.append(f"  time per payment   {time_ratios}")
    lines.append(f"  memory peak        {memory_ratios}")
    return lines


def parse_sizes(raw: str) -> list[int]:
    try:
        sizes = sorted({int(part.replace("_", "")) for part in raw.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are whole numbers, not {raw!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("sizes are whole numbers from 1")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and memory of one reconciliation pass over N due payments.",
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=list(DEFAULT_SIZES),
        help="comma-separated numbers of due payments (default: 1000,10000,100000)",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help=(
            "default: a fresh SQLite file per size in a temp dir; a sqlite:/// URL names new "
            "files (<name>-<size>.sqlite, kept); a PostgreSQL URL names a server and a database "
            "to connect to, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test, on which a "
            "throwaway database ipn_bench_<random> is created and dropped per size"
        ),
    )
    parser.add_argument(
        "--answer",
        choices=tuple(ANSWERS),
        default="paying",
        help=(
            "the sandbox's status for every payment: paying (1; each moves pending -> "
            "confirming, default) or unpaid (0; each stays pending, only rescheduled)"
        ),
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes: list[int] = args.sizes
    # The sandbox's werkzeug server would log each request; the receiver logs at INFO.
    logging.basicConfig(level=logging.WARNING)
    status, moves_to, _ = ANSWERS[args.answer]
    with tempfile.TemporaryDirectory(prefix="ipn-bench-") as tmp:
        data_dir = Path(tmp)
        databases = Databases(args.database_url, data_dir)
        with running_sandbox(data_dir) as (sandbox, sandbox_url):
            print(
                f"reconcile_due over N due CubePay payments; sandbox at {sandbox_url} answers "
                f"status {status} ({args.answer}) -> {moves_to.value}"
            )
            print(f"database: {databases.describe()}")
            print(
                f"python {sys.version.split()[0]}; peak = tracemalloc peak during the pass; "
                f"after an untimed warm-up pass over {WARMUP}"
            )
            print()
            run = partial(
                measure,
                sandbox=sandbox,
                sandbox_url=sandbox_url,
                databases=databases,
                data_dir=data_dir,
                answer=args.answer,
            )
            # Untimed: first-use imports and caches would otherwise land on the first size only.
            run(WARMUP, label="warmup")
            print(HEADER, flush=True)
            results: list[Result] = []
            for size in sizes:
                results.append(run(size))
                print(row(results[-1], results[0]), flush=True)
    print()
    for line in ratios(results):
        print(line)


if __name__ == "__main__":
    main()
