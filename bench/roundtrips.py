"""Round trips to PostgreSQL per operation, counted from libpq's protocol trace.

Stores BitcoinPaygate callbacks with `ipn.inbox.store_callback` and processes them with
`ipn.processing.process_notification` (status query to a local stub), in a throwaway
database, and prints the round trips and commits of each operation in the steady state (after
a few warm-up operations, once psycopg has prepared its statements). With `--show` it prints
the client messages of one processed notification.

    .venv/bin/python bench/roundtrips.py [--count 20] [--show]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from support import (
    RoundTrips,
    provider_env,
    seed_payments,
    signed_callback,
    status_stub,
    throwaway_database,
)

from ipn.config import Settings
from ipn.inbox import store_callback
from ipn.processing import process_notification
from ipn.services import Services
from models import NotificationStatus

WARM_UP = 10


def count_operations(url: str, stub: str, count: int, show: bool) -> dict[str, list[int]]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings.from_env(
            {"DATABASE_URL": url, "IPN_DATA_DIR": data_dir, **provider_env(stub)}
        )
        services = Services.from_settings(settings)
        trace = RoundTrips(services.db.engine)
        commits: list[int] = []
        from sqlalchemy import event

        @event.listens_for(services.db.engine, "commit")
        def committed(_connection: object) -> None:
            commits.append(1)

        seed_payments(url, WARM_UP + count)
        found: dict[str, list[int]] = {"store": [], "process": [], "process commits": []}
        for n in range(WARM_UP + count):
            body, headers = signed_callback(n)
            trace.mark()
            notification_id = store_callback(
                services.db, "bitcoinpaygate", "notification", body, headers, "127.0.0.1"
            )
            stored, _ = trace.since_mark()
            trace.mark()
            commits.clear()
            outcome = process_notification(services, notification_id)
            processed, messages = trace.since_mark()
            if outcome.status is not NotificationStatus.PROCESSED:
                raise SystemExit(f"notification {notification_id}: {outcome}")
            if n >= WARM_UP:
                found["store"].append(stored)
                found["process"].append(processed)
                found["process commits"].append(len(commits))
            if show and n == WARM_UP + count - 1:
                print("client messages of the last processed notification:")
                for line in messages:
                    print("   ", line)
        trace.close()
        services.db.engine.dispose()
        return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--show", action="store_true")
    args = parser.parse_args()
    with status_stub() as stub, throwaway_database() as url:
        found = count_operations(url, stub, args.count, args.show)
    print(f"round trips per operation (libpq trace, {args.count} operations after warm-up):")
    for name, counts in found.items():
        print(
            f"  {name:17} median {statistics.median(counts):g}  max {max(counts)}"
            f"  (target: {'1' if name == 'store' else '<= 5' if name == 'process' else '1'})"
        )


if __name__ == "__main__":
    main()
