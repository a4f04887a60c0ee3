"""Times the console's notifications list and a payment page with many inbox rows in the database.

Seeds N notifications (default 100 000; a tenth `failed`, spread over the four providers, 200 of
them about one payment with a 200-line timeline), signs in with the test client and times each
page over a few runs: the first page, a deep keyset page, the status, provider and order-id
filters, and the payment's page. It prints the median per page and, on SQLite, the query plan of
the list query, to show which index it uses.

    .venv/bin/python bench/console_pages.py [--rows 100000] [--database-url URL] [--runs 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, text

from ipn import create_app, migrate
from ipn.config import Settings
from ipn.db import Database
from models import EventSource, Notification, Payment, PaymentEvent, PaymentStatus

PROVIDERS = ("cubepay", "bitcoinpaygate", "coinbarpay", "cryptoprocessing")
TOKEN = "bench-token"


def seed(db: Database, rows: int) -> str:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with db.transaction() as session:
        payment = Payment(
            provider="cubepay",
            order_id="bench-order",
            status=PaymentStatus.PENDING,
            created_at=start,
            updated_at=start,
        )
        session.add(payment)
        session.flush()
        payment_id = payment.id
        session.execute(
            insert(PaymentEvent),
            [
                {
                    "payment_id": payment_id,
                    "at": start + timedelta(minutes=i),
                    "source": EventSource.POLL,
                    "from_status": PaymentStatus.PENDING,
                    "to_status": PaymentStatus.PENDING,
                    "provider_status": "0",
                    "detail": "reconciliation status query",
                }
                for i in range(200)
            ],
        )
    batch = 10_000
    for first in range(0, rows, batch):
        values = [
            {
                "provider": PROVIDERS[i % 4],
                "kind": "ipn",
                "received_at": start + timedelta(seconds=i),
                "headers": {"Content-Type": "application/json"},
                "body": b'{"status":"paid"}',
                "body_sha256": f"{i:064x}",
                "status": "failed" if i % 10 == 0 else "processed",
                "attempts": 1,
                "payment_id": payment_id if i % (rows // 200 or 1) == 0 else None,
            }
            for i in range(first, min(first + batch, rows))
        ]
        with db.transaction() as session:
            session.execute(insert(Notification), values)
    return payment_id


def timed(client, path: str, runs: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        response = client.get(path)
        times.append(time.perf_counter() - began)
        assert response.status_code == 200, (path, response.status_code)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ipn-bench-console-"))
    url = args.database_url or f"sqlite:///{tmp / 'ipn.sqlite'}"
    settings = Settings.from_env(
        {
            "DATABASE_URL": url,
            "IPN_DATA_DIR": str(tmp),
            "IPN_API_TOKEN": TOKEN,
            "IPN_SECRET_KEY": "bench-secret-key-not-for-production",
        }
    )
    db = Database(settings.database_url)
    migrate.upgrade(db)
    began = time.perf_counter()
    payment_id = seed(db, args.rows)
    print(f"seeded {args.rows} notifications in {time.perf_counter() - began:.1f}s")

    app = create_app(settings)
    client = app.test_client()
    page = client.get("/console/login").get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match
    signed = client.post("/console/login", data={"csrf_token": match.group(1), "token": TOKEN})
    assert signed.status_code == 303

    deep = args.rows // 2
    pages = {
        "notifications, first page": "/console/notifications",
        f"notifications, page before id {deep}": f"/console/notifications?before={deep}",
        "notifications, status=failed": "/console/notifications?status=failed",
        "notifications, provider=coinbarpay": "/console/notifications?provider=coinbarpay",
        "notifications, order id": "/console/notifications?q=bench-order",
        "notifications, since 1h (none)": "/console/notifications?since=1h",
        "payment page (200 events)": f"/console/payments/{payment_id}",
        "overview": "/console/",
    }
    print(f"{'page':<42} {'median ms':>10}  ({args.runs} runs)")
    for name, path in pages.items():
        print(f"{name:<42} {timed(client, path, args.runs):>10.1f}")

    if db.engine.dialect.name == "sqlite":
        with db.engine.connect() as connection:
            for label, where in (
                ("first page", ""),
                ("status filter", "WHERE status = 'failed'"),
                ("order id", "WHERE payment_id IN (SELECT id FROM payments WHERE order_id = 'x')"),
            ):
                plan = connection.execute(
                    text(
                        f"EXPLAIN QUERY PLAN SELECT * FROM notifications {where} "
                        "ORDER BY id DESC LIMIT 51"
                    )
                ).all()
                print(f"plan, {label}: " + " | ".join(str(row[-1]) for row in plan))
    db.engine.dispose()


if __name__ == "__main__":
    main()
