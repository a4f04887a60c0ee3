"""Two `ipn reconcile` processes at once, as two crons or two hosts would run them: each due
payment is asked about exactly once, and the two reports add up to the whole."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

import pytest

from conftest import ROOT, Backend, clean
from helpers import cubepay_query_answer, make_payment

PAYMENTS = 120


class Server(ThreadingHTTPServer):
    # Sixteen queries in flight at once: the default backlog of 5 drops connections under load,
    # and a query that never reaches the fake was never asked.
    request_queue_size = 64
    daemon_threads = True


class CountingCubePay:
    """CubePay's payment/query on loopback: answers `unpaid` and counts questions per payment."""

    def __init__(self) -> None:
        self.asked: Counter[str] = Counter()
        lock = threading.Lock()
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                fields = dict(parse_qsl(self.rfile.read(length).decode()))
                payment_id = fields.get("id", "")
                with lock:
                    counter.asked[payment_id] += 1
                # Slow enough that the two processes' passes overlap for seconds.
                time.sleep(0.025)
                body = cubepay_query_answer(
                    0, paid="0", payment_id=payment_id, order_id=f"proc-{int(payment_id[1:])}"
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def cubepay() -> Iterator[CountingCubePay]:
    fake = CountingCubePay()
    yield fake
    fake.server.shutdown()


def test_two_reconcile_processes_ask_about_each_due_payment_once(
    backend: Backend, cubepay: CountingCubePay
) -> None:
    clean(backend.db)
    now = datetime.now(UTC)
    for n in range(PAYMENTS):
        make_payment(
            backend.db,
            provider="cubepay",
            order_id=f"proc-{n}",
            provider_payment_id=f"C{n:019d}",
            amount=Decimal("500"),
            currency="TWD",
            pay_amount=Decimal("0.01"),
            created_at=now,
            updated_at=now,
            expires_at=now + timedelta(hours=6),
            next_check_at=now - timedelta(minutes=1),
        )
    env = {
        **os.environ,
        **backend.env,
        "CUBEPAY_API_URL": cubepay.url,
        "IPN_RECONCILE_BATCH": "7",
        # A loaded machine must not turn into an unreachable provider: every payment is asked.
        "IPN_HTTP_CONNECT_TIMEOUT": "10",
        "IPN_HTTP_READ_TIMEOUT": "10",
    }
    command = [sys.executable, "-m", "ipn.cli", "reconcile"]
    runs = [
        subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    checked = [int(re.search(r"checked (\d+)", out).group(1)) for out in outputs]  # type: ignore[union-attr]
    assert sum(checked) == PAYMENTS, outputs
    print(f"checked per process: {checked}")
    assert len(cubepay.asked) == PAYMENTS
    assert set(cubepay.asked.values()) == {1}
