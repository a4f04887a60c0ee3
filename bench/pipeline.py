"""End to end: distinct BitcoinPaygate callbacks at a fixed open-loop rate into the Procfile's
`web`, processed by one Procfile `worker` (its pool and concurrency as the Procfile sets them),
each asking a local status stub (keep-alive, answers at once) before the payment is `paid`;
beside the floor pipeline of bench/floor.py (an INSERT and an LPUSH per callback; BRPOP, a
status GET and one UPDATE transaction per id) in the same run.

Prints the backlog (rows still `received`) every second while the load runs and after it,
receipt -> processed latency (the row's `processed_at - received_at`, both written by the
database's clients on this machine) over every callback, and the CPU the worker spent per
callback (user and system, its whole process group, from /proc). Every payment must end `paid`
with exactly one change on its timeline, or the bench fails.

    .venv/bin/python bench/pipeline.py [--rate 200] [--seconds 20]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import gevent  # noqa: E402
import psycopg  # noqa: E402
from floor import SCHEMA  # noqa: E402
from support import (  # noqa: E402
    Process,
    RedisServer,
    bin_path,
    expand,
    floor_web,
    free_port,
    open_loop,
    payment_id,
    percentile,
    procfile_line,
    provider_env,
    ready,
    seed_payments,
    signed_callback,
    status_stub,
    throwaway_database,
    web,
)

PATH = "/ipn/bitcoinpaygate/notification"
DRAIN_TIMEOUT = 120.0

BACKLOG = {
    "project": "SELECT count(*) FROM notifications WHERE status = 'received'",
    "floor": "SELECT count(*) FROM floor_inbox WHERE status = 'received'",
}
LATENCY = {
    "project": "SELECT extract(epoch FROM processed_at - received_at) FROM notifications",
    "floor": "SELECT extract(epoch FROM processed_at - received_at) FROM floor_inbox",
}


def run(name: str, db: Any, port: int, rate: float, seconds: float) -> dict[str, Any]:
    count = int(rate * seconds)
    requests = [signed_callback(n) for n in range(count)]
    backlog: list[tuple[float, int]] = []
    started = time.monotonic()
    loader = gevent.spawn(open_loop, port, PATH, requests, rate)
    while not loader.ready() or backlog[-1][1] > 0:
        gevent.sleep(1.0)
        waiting = db.execute(BACKLOG[name]).fetchone()[0]
        done = db.execute(BACKLOG[name].replace("= 'received'", "<> 'received'")).fetchone()[0]
        backlog.append((time.monotonic() - started, waiting))
        print(
            f"  {name} t={backlog[-1][0]:5.1f}s  stored+processed {done:5}  backlog {waiting}",
            flush=True,
        )
        if time.monotonic() - started > seconds + DRAIN_TIMEOUT:
            raise SystemExit(f"{name}: backlog of {waiting} not drained")
    latencies, codes, _ = loader.value
    bad = sum(1 for c in codes if c != 200)
    if bad:
        raise SystemExit(f"{name}: {bad} of {count} answers were not 200")
    delays = [float(row[0]) for row in db.execute(LATENCY[name])]
    if len(delays) != count:
        raise SystemExit(f"{name}: {len(delays)} rows for {count} callbacks")
    during = [b for t, b in backlog if t <= seconds + 0.5]
    return {
        "delays": delays,
        "answers": latencies,
        "max_backlog": max(during) if during else 0,
        "backlog_at_end_of_load": during[-1] if during else 0,
        "drained_after": backlog[-1][0] - seconds,
    }


def cpu_seconds(group: int) -> float:
    """User and system CPU of every process in a process group (Linux), so far."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == group:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def check_project(db: Any, count: int) -> None:
    paid = db.execute("SELECT count(*) FROM payments WHERE status = 'paid'").fetchone()[0]
    changes = db.execute(
        "SELECT count(*) FROM payment_events WHERE from_status <> to_status"
    ).fetchone()[0]
    if (paid, changes) != (count, count):
        raise SystemExit(f"project: {paid} paid, {changes} changes, for {count} payments")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    count = int(args.rate * args.seconds)
    results = {}
    worker_line = procfile_line("worker")
    with (
        tempfile.TemporaryDirectory() as tmp,
        status_stub() as stub,
        throwaway_database() as url,
        RedisServer() as redis_server,
    ):
        seed_payments(url, count)
        plain = url.replace("postgresql+psycopg://", "postgresql://")
        db = psycopg.connect(plain, autocommit=True)
        db.execute(SCHEMA)
        with db.transaction():
            with db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO floor_payments (provider_payment_id) VALUES (%s)",
                    [(payment_id(n),) for n in range(count)],
                )
        env = {
            **os.environ,
            **provider_env(stub),
            "DATABASE_URL": url,
            "REDIS_URL": redis_server.url,
            "IPN_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
            "IPN_DATA_DIR": tmp,
            "FLOOR_DATABASE_URL": url,
            "FLOOR_REDIS_URL": redis_server.url,
            "FLOOR_STATUS_URL": stub,
        }
        logs = Path(tmp)

        port = free_port()
        argv = expand(worker_line, env)
        argv[0] = bin_path(argv[0])
        print("worker:", " ".join(argv[1:]), flush=True)
        processes = [web(env, port, logs / "web.log"), Process(argv, env, logs / "worker.log")]
        try:
            ready(port, PATH)
            time.sleep(5)  # the worker connects to its broker
            worker = processes[1].process.pid
            cpu_before = cpu_seconds(worker)
            results["project"] = run("project", db, port, args.rate, args.seconds)
            results["project"]["cpu"] = (cpu_seconds(worker) - cpu_before) / count
            check_project(db, count)
        finally:
            for process in processes:
                process.stop()

        port = free_port()
        processes = [
            floor_web(env, port, logs / "floor.log"),
            Process(
                [sys.executable, str(Path(__file__).parent / "floor.py"), "8"],
                env,
                logs / "floor-worker.log",
            ),
        ]
        try:
            ready(port, PATH)
            time.sleep(1)
            floor_worker = processes[1].process.pid
            cpu_before = cpu_seconds(floor_worker)
            results["floor"] = run("floor", db, port, args.rate, args.seconds)
            results["floor"]["cpu"] = (cpu_seconds(floor_worker) - cpu_before) / count
        finally:
            for process in processes:
                process.stop()
        db.close()

    print()
    print(f"{count} distinct callbacks at {args.rate:.0f}/s for {args.seconds:.0f}s, one worker")
    print(
        f"{'':8} {'receipt->processed p50':>22} {'p99':>9} {'max':>9} "
        f"{'answer p99':>11} {'max backlog':>12} {'drained after load':>19} "
        f"{'worker CPU each':>16}"
    )
    for name, r in results.items():
        print(
            f"{name:8} {percentile(r['delays'], 50) * 1000:19.0f} ms "
            f"{percentile(r['delays'], 99) * 1000:6.0f} ms {max(r['delays']) * 1000:6.0f} ms "
            f"{percentile(r['answers'], 99) * 1000:8.1f} ms {r['max_backlog']:12} "
            f"{r['drained_after']:17.1f} s {r['cpu'] * 1000:13.2f} ms"
        )
    project, floor = results["project"], results["floor"]
    print(
        f"receipt -> paid p99, project / floor: "
        f"{percentile(project['delays'], 99) / percentile(floor['delays'], 99):.1f}"
        f"  (target: project p99 <= 250 ms)"
    )


if __name__ == "__main__":
    main()
