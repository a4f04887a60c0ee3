"""The pass fanned out: the beat claims due payments and enqueues batches, real workers check
them, each batch's questions concurrent, the call budget taken for a batch in one statement,
and a lease that ran out or a worker that died neither applies an answer nor loses a payment."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import pytest
import responses
import time_machine
from flask import Flask
from sqlalchemy import event, func, select

from ipn import create_app, rate_limit
from ipn.reconcile import _release, check_claimed, claim_due, enqueue_due, reconcile_due
from ipn.services import Services
from models import Payment, PaymentEvent, PaymentStatus, ProviderCalls

from conftest import Backend, Worker, clean, wait_for
from faults_support import forget_queue, unique_queue
from helpers import CUBEPAY_QUERY, START, cubepay_query_answer, load_payment, make_payment


class CubePayStub:
    """CubePay's payment/query on loopback: answers `unpaid` after `delay` seconds, and counts
    the questions per payment and the most in flight at once."""

    def __init__(self, delay: float = 0.0) -> None:
        self.asked: Counter[str] = Counter()
        self.in_flight = 0
        self.most_in_flight = 0
        lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                payment_id = dict(parse_qsl(self.rfile.read(length).decode())).get("id", "")
                with lock:
                    stub.asked[payment_id] += 1
                    stub.in_flight += 1
                    stub.most_in_flight = max(stub.most_in_flight, stub.in_flight)
                time.sleep(delay)
                with lock:
                    stub.in_flight -= 1
                body = cubepay_query_answer(
                    0, paid="0", payment_id=payment_id, order_id=f"fan-{int(payment_id[1:])}"
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def stub() -> Iterator[CubePayStub]:
    fake = CubePayStub(delay=0.02)
    yield fake
    fake.server.shutdown()


@pytest.fixture
def slow_stub() -> Iterator[CubePayStub]:
    fake = CubePayStub(delay=0.3)
    yield fake
    fake.server.shutdown()


def seed(backend: Backend, count: int, *, now: datetime | None = None) -> list[str]:
    clean(backend.db)
    now = now or datetime.now(UTC)
    return [
        make_payment(
            backend.db,
            provider="cubepay",
            order_id=f"fan-{n}",
            provider_payment_id=f"C{n:019d}",
            amount=Decimal("500"),
            currency="TWD",
            pay_amount=Decimal("0.01"),
            created_at=now,
            updated_at=now,
            expires_at=now + timedelta(hours=6),
            next_check_at=now - timedelta(minutes=1),
        ).id
        for n in range(count)
    ]


def checks(backend: Backend) -> dict[str, int]:
    with backend.db.sessions() as session:
        return {
            payment_id: count
            for payment_id, count in session.execute(select(Payment.id, Payment.checks))
        }


def leased(backend: Backend) -> int:
    with backend.db.sessions() as session:
        query = select(func.count()).select_from(Payment).where(Payment.lease_token.is_not(None))
        return int(session.scalar(query) or 0)


@pytest.fixture
def queue_env(backend: Backend) -> Iterator[dict[str, str]]:
    env = {"IPN_QUEUE": unique_queue(backend.env["IPN_QUEUE"])}
    yield env
    forget_queue(backend.env.get("REDIS_URL"), env["IPN_QUEUE"])


@pytest.fixture
def live_app(backend: Backend, queue_env: dict[str, str], stub: CubePayStub) -> Iterator[Flask]:
    app = create_app(backend.settings(**queue_env, CUBEPAY_API_URL=stub.url))
    yield app
    app.extensions["ipn"].db.engine.dispose()


def test_the_beat_enqueues_batches_that_two_workers_check_once_each(
    backend: Backend,
    stub: CubePayStub,
    queue_env: dict[str, str],
    live_app: Flask,
    start_worker: Any,
) -> None:
    ids = seed(backend, 90)
    env = {**queue_env, "CUBEPAY_API_URL": stub.url, "IPN_RECONCILE_BATCH": "10"}
    for _ in range(2):
        start_worker(env)
    # What the beat's schedule sends: the worker that takes it only claims and enqueues.
    live_app.extensions["celery"].send_task("ipn.reconcile_due", retry=False)
    wait_for(lambda: set(checks(backend).values()) == {1}, timeout=90, message="every check")
    assert len(stub.asked) == 90 and set(stub.asked.values()) == {1}
    assert leased(backend) == 0
    assert set(checks(backend)) == set(ids)


def due_in_order(backend: Backend, count: int) -> list[str]:
    """`count` payments due a minute apart, the longest overdue first, and two of them due at
    the same moment (their ids break the tie)."""
    ids = seed(backend, count)
    now = datetime.now(UTC)
    with backend.db.transaction() as session:
        for n, payment_id in enumerate(ids):
            payment = session.get(Payment, payment_id)
            assert payment is not None
            payment.next_check_at = now - timedelta(minutes=count - min(n, count - 2))
    tied = sorted(ids[-2:])
    return ids[:-2] + tied


def test_a_claim_after_a_payment_starts_past_it_in_due_order(
    services: Services, backend: Backend
) -> None:
    order = due_in_order(backend, 6)
    first = claim_due(services, datetime.now(UTC), after=None)
    assert [claimed.payment_id for claimed in first] == order
    _release(services, order, first[0].lease)
    cursor = (first[2].due_at, first[2].payment_id)
    # The three before the cursor are due and free, and still not taken.
    past = claim_due(services, datetime.now(UTC), after=cursor)
    assert [claimed.payment_id for claimed in past] == order[3:]
    _release(services, order, past[0].lease)
    # Past the first of the two due at the same moment: the other one only.
    tie = (first[4].due_at, first[4].payment_id)
    assert [c.payment_id for c in claim_due(services, datetime.now(UTC), after=tie)] == order[5:]


def test_the_beat_sends_each_due_payment_once_and_one_given_back_again(
    backend: Backend, services: Services
) -> None:
    order = due_in_order(backend, 25)
    tens = Services(
        services.settings.with_changes(reconcile_batch=10), services.db, services.providers
    )
    batches: list[list[str]] = []

    def send(ids: list[str], lease: str) -> None:
        batches.append(ids)
        if len(batches) == 1:
            # A worker gives the first payment back while the beat is still claiming.
            _release(tens, ids[:1], lease)

    assert enqueue_due(tens, send) == 26
    sent = [payment_id for batch in batches for payment_id in batch]
    assert [len(batch) for batch in batches] == [10, 10, 5, 1]
    # In due order, each once, and the one given back once more at the end.
    assert sent == order + order[:1]


def test_a_batch_asks_concurrently_within_its_bound(
    services: Services, backend: Backend, stub: CubePayStub
) -> None:
    seed(backend, 24)
    settings = backend.settings(CUBEPAY_API_URL=stub.url, IPN_RECONCILE_CONCURRENCY="4")
    four = Services.from_settings(settings)
    batch = claim_due(four, datetime.now(UTC))
    assert len(batch) == 24
    report = check_claimed(four, [claimed.payment_id for claimed in batch], batch[0].lease)
    assert report.checked == 24 and set(stub.asked.values()) == {1}
    assert stub.most_in_flight == 4
    assert leased(backend) == 0
    four.db.engine.dispose()


def test_a_batch_takes_its_call_budget_in_one_statement(
    services: Services, backend: Backend, provider_api: responses.RequestsMock
) -> None:
    seed(backend, 12)
    provider_api.post(CUBEPAY_QUERY, body=cubepay_query_answer(0, paid="0"))
    limited = Services(
        services.settings.with_changes(poll_limits={"cubepay": (8, "minute")}),
        services.db,
        services.providers,
    )
    budget_statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "provider_calls" in statement and "INSERT" in statement:
            budget_statements.append(statement)

    event.listen(services.db.engine, "before_cursor_execute", count)
    try:
        batch = claim_due(limited, datetime.now(UTC))
        report = check_claimed(limited, [claimed.payment_id for claimed in batch], batch[0].lease)
    finally:
        event.remove(services.db.engine, "before_cursor_execute", count)
    assert len(budget_statements) == 1
    assert (report.checked, report.skipped, report.skipped_budget) == (8, 4, 4)
    assert len(provider_api.calls) == 8
    # The four left over were released at once and wait for the next period.
    assert leased(backend) == 0
    assert sorted(checks(backend).values()) == [0] * 4 + [1] * 8


def test_racing_takers_never_get_more_than_the_budget(services: Services) -> None:
    now = datetime.now(UTC)
    granted: list[int] = []
    lock = threading.Lock()
    go = threading.Barrier(8)

    def take() -> None:
        go.wait()
        got = rate_limit.take_many(services.db, "cubepay", 30, "minute", now, 7, account="shop")
        with lock:
            granted.append(got)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 30, granted
    assert sorted(granted)[-4:] == [7, 7, 7, 7]
    assert rate_limit.take_many(services.db, "cubepay", 30, "minute", now, 1, account="shop") == 0
    # Another account's budget is its own.
    assert rate_limit.take_many(services.db, "cubepay", 30, "minute", now, 7) == 7
    with services.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(ProviderCalls)) == 2


def test_the_owner_of_a_lease_that_ran_out_cannot_write(
    services: Services, backend: Backend, provider_api: responses.RequestsMock
) -> None:
    with time_machine.travel(START, tick=False) as clock:
        (payment_id,) = seed(backend, 1, now=START)

        def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
            # The answer is late: the lease runs out while it is on its way, and nobody else
            # has claimed the payment, so only the lease's expiry stands in the way.
            clock.shift(timedelta(minutes=10))
            return 200, {}, cubepay_query_answer(2, payment_id="C" + "0" * 19, order_id="fan-0")

        provider_api.add_callback(responses.POST, CUBEPAY_QUERY, callback=answer)
        batch = claim_due(services, START)
        seen: list[Any] = []
        report = check_claimed(
            services, [batch[0].payment_id], batch[0].lease, on_check=seen.append
        )
    assert [check.outcome for check in seen] == ["busy"] and report.checked == 0
    after = load_payment(services.db, payment_id)
    assert after.checks == 0 and after.status.value == "pending"
    assert after.lease_token is None  # released: due again at once
    assert after.next_check_at is not None and after.next_check_at < START


def test_a_worker_killed_mid_batch_loses_nothing(
    backend: Backend,
    slow_stub: CubePayStub,
    queue_env: dict[str, str],
    start_worker: Any,
) -> None:
    ids = seed(backend, 30)
    env = {**queue_env, "CUBEPAY_API_URL": slow_stub.url, "IPN_RECONCILE_CONCURRENCY": "2"}
    app = create_app(backend.settings(**env))
    worker: Worker = start_worker(env, concurrency=1)
    services: Services = app.extensions["ipn"]
    batch = claim_due(services, datetime.now(UTC))
    app.extensions["celery"].send_task(
        "ipn.reconcile_batch", args=[[c.payment_id for c in batch], batch[0].lease], retry=False
    )
    wait_for(lambda: sum(slow_stub.asked.values()) >= 4, timeout=60, message="questions")
    worker.kill()
    done = {pid for pid, count in checks(backend).items() if count}
    assert len(done) < 30
    # Those the worker did not finish are still leased: nobody asks until the lease runs out...
    assert reconcile_due(services).checked == 0
    # ...and then they are due again, and every payment ends with one check applied.
    later = datetime.now(UTC) + timedelta(minutes=6)
    with time_machine.travel(later, tick=False):
        report = reconcile_due(services, now=later)
    after = checks(backend)
    assert report.checked >= 30 - len(done)
    assert all(after[payment_id] == 1 for payment_id in set(ids) - done), after
    assert all(after[payment_id] >= 1 for payment_id in done)
    assert leased(backend) == 0
    app.extensions["ipn"].db.engine.dispose()


def test_a_batch_records_an_answer_with_nothing_new_and_applies_the_others(
    services: Services, backend: Backend, provider_api: responses.RequestsMock
) -> None:
    with time_machine.travel(START, tick=False):
        ids = seed(backend, 3, now=START)
        with backend.db.transaction() as session:
            for payment in session.scalars(select(Payment)):
                # As the last answer left them: `unpaid`, nothing received.
                payment.provider_status = "0"
                payment.paid_amount = Decimal("0")
        versions = {payment_id: load_payment(services.db, payment_id).version for payment_id in ids}

        def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
            provider_id = dict(parse_qsl(request.body))["id"]
            # The last payment is being paid now; the others are as they were.
            status = 1 if provider_id == f"C{2:019d}" else 0
            body = cubepay_query_answer(
                status, paid="0", payment_id=provider_id, order_id=f"fan-{int(provider_id[1:])}"
            )
            return 200, {}, body

        provider_api.add_callback(responses.POST, CUBEPAY_QUERY, callback=answer)
        batch = claim_due(services, START)
        seen: list[Any] = []
        check_claimed(
            services,
            [claimed.payment_id for claimed in batch],
            batch[0].lease,
            on_check=seen.append,
        )
    outcomes = {check.payment_id: check.outcome for check in seen}
    assert outcomes == {ids[0]: "unchanged", ids[1]: "unchanged", ids[2]: "changed"}
    for payment_id in ids:
        after = load_payment(services.db, payment_id)
        assert after.checks == 1 and after.last_checked_at == START
        assert after.lease_token is None and after.leased_until is None
        assert after.next_check_at is not None and after.next_check_at > START
        # A new version, so that a callback's write of the payment as read fails and retries.
        assert after.version > versions[payment_id]
    assert [load_payment(services.db, payment_id).status.value for payment_id in ids] == [
        "pending",
        "pending",
        "confirming",
    ]
    with backend.db.sessions() as session:
        timeline = session.scalars(select(PaymentEvent.payment_id)).all()
    assert ids[0] not in timeline and ids[1] not in timeline and ids[2] in timeline


def test_an_answer_for_a_payment_moved_since_the_batch_read_it_is_applied_to_it_as_it_is(
    services: Services, backend: Backend, provider_api: responses.RequestsMock
) -> None:
    with time_machine.travel(START, tick=False):
        (payment_id,) = seed(backend, 1, now=START)
        with backend.db.transaction() as session:
            payment = session.get(Payment, payment_id)
            assert payment is not None
            payment.provider_status = "0"
            payment.paid_amount = Decimal("0")

        def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
            # A callback lands while the question is on its way: the payment is confirming.
            with backend.db.transaction() as session:
                moved = session.get(Payment, payment_id)
                assert moved is not None
                moved.status = PaymentStatus.CONFIRMING
                moved.provider_status = "1"
            return (
                200,
                {},
                cubepay_query_answer(0, paid="0", payment_id="C" + "0" * 19, order_id="fan-0"),
            )

        provider_api.add_callback(responses.POST, CUBEPAY_QUERY, callback=answer)
        batch = claim_due(services, START)
        seen: list[Any] = []
        check_claimed(services, [batch[0].payment_id], batch[0].lease, on_check=seen.append)
    # The stale `unpaid` would move it backwards: not recorded as nothing new, and not applied.
    assert [check.outcome for check in seen] == ["unchanged"]
    assert "backwards" in seen[0].message
    after = load_payment(services.db, payment_id)
    assert after.status is PaymentStatus.CONFIRMING and after.provider_status == "1"
    assert after.checks == 1 and after.lease_token is None
