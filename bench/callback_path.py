"""The callback path: the project under the Procfile's gunicorn on PostgreSQL + Redis, beside
a durable floor (one INSERT + commit per request, no ORM, no queue; bench/floor.py) under the
same gunicorn settings, in one run.

1. Accepts/s: C keep-alive clients POST distinct BitcoinPaygate callbacks as fast as they are
   answered, for S seconds to one server, then to the other, in R rounds whose order
   alternates; the figure is the median of the rounds' project / floor ratios.
2. Answer latency at a fixed open-loop rate (each request sent on schedule on its own
   connection, counted from its scheduled time), with Redis up and with it stopped, in T
   turns of each; the figures are over all the turns of each. The bench's Redis is a
   redis-server of its own on a free port, and the database a throwaway one (see
   support.py); no worker runs.

    .venv/bin/python bench/callback_path.py [--rounds 5] [--seconds 5] [--clients 32]
        [--rate 200] [--open-seconds 30] [--turns 3]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import psycopg  # noqa: E402
from floor import SCHEMA  # noqa: E402
from support import (  # noqa: E402
    RedisServer,
    closed_loop,
    floor_web,
    free_port,
    open_loop_apart,
    percentile,
    provider_env,
    ready,
    signed_callback,
    throwaway_database,
    web,
)

PATH = "/ipn/bitcoinpaygate/notification"


def callbacks() -> Iterator[tuple[bytes, dict[str, str]]]:
    for n in itertools.count():
        yield signed_callback(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--open-seconds", type=float, default=30.0)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory() as tmp,
        throwaway_database() as url,
        RedisServer() as redis_server,
    ):
        plain = url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain) as db:
            db.execute(SCHEMA)
        env = {
            **os.environ,
            **provider_env("http://127.0.0.1:9"),
            "DATABASE_URL": url,
            "REDIS_URL": redis_server.url,
            "IPN_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
            "IPN_DATA_DIR": tmp,
            "FLOOR_DATABASE_URL": url,
            "IPN_LOG_FORMAT": "text",
        }
        project_port, floor_port = free_port(), free_port()
        logs = Path(tmp)
        project = web(env, project_port, logs / "web.log")
        floor = floor_web(env, floor_port, logs / "floor.log")
        try:
            ready(project_port, PATH)
            ready(floor_port, PATH)
            load = callbacks()
            for port in (project_port, floor_port):  # warm-up: connections, caches
                closed_loop(port, PATH, load, args.clients, 2.0)

            rounds = []
            for r in range(args.rounds):
                order = [("project", project_port), ("floor", floor_port)]
                if r % 2:
                    order.reverse()
                rates = {}
                for name, port in order:
                    ok, other = closed_loop(port, PATH, load, args.clients, args.seconds)
                    if other:
                        raise SystemExit(f"{name}: {other} answers were not 200")
                    rates[name] = ok / args.seconds
                rounds.append(rates)
                print(
                    f"round {r + 1}: project {rates['project']:7.0f}/s  floor "
                    f"{rates['floor']:7.0f}/s  ratio {rates['project'] / rates['floor']:.2f}",
                    flush=True,
                )
            ratio = statistics.median(x["project"] / x["floor"] for x in rounds)

            # The closed loop left about a hundred thousand new rows: autovacuum, its analyze
            # and a checkpoint would otherwise run during the first open-loop phase.
            with psycopg.connect(plain, autocommit=True) as db:
                db.execute("VACUUM ANALYZE notifications")
                db.execute("CHECKPOINT")
            time.sleep(2)
            # Redis up and stopped in turns, so that whatever drifts on this machine during
            # the phases (autovacuum, the client's own loop, another job) falls on both alike.
            count = int(args.rate * args.open_seconds / args.turns)
            latencies: dict[str, list[float]] = {"redis up": [], "redis stopped": []}
            for turn in range(args.turns):
                for phase in ("redis up", "redis stopped"):
                    if phase == "redis stopped":
                        redis_server.stop()
                    elif turn:
                        redis_server.start()
                    requests = [next(load) for _ in range(count)]
                    seconds, codes, _ = open_loop_apart(project_port, PATH, requests, args.rate)
                    bad = sum(1 for c in codes if c != 200)
                    if bad:
                        raise SystemExit(f"{phase}: {bad} of {count} answers were not 200")
                    latencies[phase] += seconds
                    print(
                        f"turn {turn + 1}, {phase:13}: {count} callbacks at {args.rate:.0f}/s"
                        f"  p50 {percentile(seconds, 50) * 1000:6.1f} ms  p99 "
                        f"{percentile(seconds, 99) * 1000:6.1f} ms  max "
                        f"{max(seconds) * 1000:6.1f} ms",
                        flush=True,
                    )
        finally:
            project.stop()
            floor.stop()

    up = percentile(latencies["redis up"], 99)
    down = percentile(latencies["redis stopped"], 99)
    for phase, seconds in latencies.items():
        print(
            f"{phase:13}, all turns: p50 {percentile(seconds, 50) * 1000:6.1f} ms  p99 "
            f"{percentile(seconds, 99) * 1000:6.1f} ms"
        )
    print()
    print(
        f"accepts/s, project / durable floor (median of {args.rounds} rounds): {ratio:.2f}"
        "  (target >= 0.9)"
    )
    print(
        f"answer p99 at {args.rate:.0f}/s, Redis stopped / Redis up: {down / up:.2f}"
        "  (target <= 1.5)"
    )


if __name__ == "__main__":
    main()
