"""Reconciliation with time moved forward, never slept: expiries settle at the deadline and not
before, late answers keep their truth, lost callbacks are found, providers that fail change
nothing and are asked again later, and concurrent passes ask about each payment once."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from sqlalchemy import or_, select, update
from sqlalchemy.exc import OperationalError

from ipn import reconcile
from ipn.processing import process_notification
from ipn.providers import build_providers
from ipn.reconcile import check_payment, reconcile_due
from ipn.services import Services
from models import AnomalyKind, EventSource, Payment, PaymentStatus

from conftest import Backend
from helpers import (
    BPG_ID,
    BPG_STATUS,
    COINBAR_STATUS,
    CUBEPAY_QUERY,
    START,
    anomalies,
    bitcoinpaygate_payment,
    bpg_snapshot,
    coinbarpay_status,
    cryptoprocessing_callback,
    cryptoprocessing_headers,
    cubepay_query_answer,
    events,
    load_payment,
    make_payment,
)


def cubepay(services: Services, order_id: str = "M12345678", **fields: Any) -> Any:
    return make_payment(
        services.db,
        provider="cubepay",
        order_id=order_id,
        amount=Decimal("500"),
        currency="TWD",
        pay_amount=Decimal("0.01"),
        pay_currency="BTC",
        provider_payment_id=fields.pop("provider_payment_id", "C1536678153791231775"),
        created_at=START,
        updated_at=START,
        expires_at=START + timedelta(hours=6),
        next_check_at=START + timedelta(minutes=1),
        **fields,
    )


def test_cubepay_unpaid_expires_just_after_six_hours_and_not_before(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    payment = cubepay(services)
    provider_api.post(CUBEPAY_QUERY, body=cubepay_query_answer(0, paid="0"))
    grace = services.settings.expiry_grace
    for at in (
        timedelta(minutes=5),
        timedelta(hours=5, minutes=59),
        timedelta(hours=6) + grace - timedelta(seconds=1),
    ):
        clock.move_to(START + at)
        check_payment(services, payment.id, force=True)
        assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING, at
    clock.move_to(START + timedelta(hours=6) + grace + timedelta(seconds=1))
    report = reconcile_due(services)
    assert (report.checked, report.expired) == (1, 1)
    expired = load_payment(services.db, payment.id)
    assert expired.status is PaymentStatus.EXPIRED and expired.expiry_inferred
    event = events(services.db, payment.id)[-1]
    assert event.source is EventSource.EXPIRY and "our clock" in event.detail
    # One last query was made before settling: the provider still said unpaid.
    assert b"id=C1536678153791231775" in provider_api.calls[-1].request.body.encode()


def test_cubepay_paid_at_5h59_but_reported_late_stays_paid(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    payment = cubepay(services)
    clock.move_to(START + timedelta(hours=7))
    provider_api.post(CUBEPAY_QUERY, body=cubepay_query_answer(2))
    reconcile_due(services)
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    # The IPN arrives later still: a duplicate, nothing moves.
    assert anomalies(services.db) == []


def test_our_inferred_expiry_is_overturned_by_the_providers_paid(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    payment = cubepay(services)
    provider_api.post(CUBEPAY_QUERY, body=cubepay_query_answer(0, paid="0"))
    clock.move_to(START + timedelta(hours=7))
    reconcile_due(services)
    assert load_payment(services.db, payment.id).status is PaymentStatus.EXPIRED
    provider_api.replace(responses.POST, CUBEPAY_QUERY, body=cubepay_query_answer(2))
    clock.move_to(START + timedelta(hours=8))
    reconcile_due(services)
    paid = load_payment(services.db, payment.id)
    assert paid.status is PaymentStatus.PAID and not paid.expiry_inferred
    assert "overturns" in events(services.db, payment.id)[-1].detail


def test_bitcoinpaygate_paid_after_expired_opens_an_anomaly_and_stays_expired(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    payment = bitcoinpaygate_payment(
        services.db,
        created_at=START,
        updated_at=START,
        expires_at=START + timedelta(minutes=15),
        next_check_at=START + timedelta(minutes=1),
    )
    provider_api.get(BPG_STATUS, body=bpg_snapshot("EXPIRED", current_time="2026-11-21T09:20:00Z"))
    clock.move_to(START + timedelta(minutes=20))
    reconcile_due(services)
    expired = load_payment(services.db, payment.id)
    assert expired.status is PaymentStatus.EXPIRED and not expired.expiry_inferred
    assert expired.next_check_at is not None  # watched for late funds
    provider_api.replace(
        responses.GET,
        BPG_STATUS,
        body=bpg_snapshot("CONFIRMED", current_time="2026-11-21T11:00:00Z"),
    )
    clock.move_to(START + timedelta(hours=2))
    reconcile_due(services)
    assert load_payment(services.db, payment.id).status is PaymentStatus.EXPIRED
    assert [a.kind for a in anomalies(services.db)] == [AnomalyKind.LATE_PAYMENT]


def test_coinbarpay_success_later_failed_becomes_refunded(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    payment = make_payment(
        services.db,
        provider="coinbarpay",
        order_id="order-1001",
        amount=Decimal("8.99"),
        currency="EUR",
        created_at=START,
        updated_at=START,
        next_check_at=START + timedelta(minutes=1),
    )
    provider_api.get(COINBAR_STATUS, body=coinbarpay_status("SUCCESS"))
    clock.move_to(START + timedelta(minutes=2))
    reconcile_due(services)
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    provider_api.replace(responses.GET, COINBAR_STATUS, body=coinbarpay_status("FAILED"))
    clock.move_to(START + timedelta(days=2))
    reconcile_due(services)
    refunded = load_payment(services.db, payment.id)
    assert refunded.status is PaymentStatus.REFUNDED
    assert [(e.from_status, e.to_status) for e in events(services.db, payment.id)] == [
        (PaymentStatus.PENDING, PaymentStatus.PAID),
        (PaymentStatus.PAID, PaymentStatus.REFUNDED),
    ]


def test_a_lost_callback_still_ends_right_after_one_pass(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    payments = [
        cubepay(services, order_id=f"lost-{n}", provider_payment_id=f"C{n:019d}") for n in range(3)
    ]

    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        payment_id = dict(p.split("=", 1) for p in request.body.split("&"))["id"]
        order_id = f"lost-{int(payment_id[1:])}"
        return 200, {}, cubepay_query_answer(2, payment_id=payment_id, order_id=order_id)

    provider_api.add_callback(responses.POST, CUBEPAY_QUERY, callback=answer)
    clock.move_to(START + timedelta(minutes=2))
    report = reconcile_due(services)
    assert (report.checked, report.changed) == (3, 3)
    assert all(load_payment(services.db, p.id).status is PaymentStatus.PAID for p in payments)


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 429, "body": "slow down"},
        {"status": 500, "body": "oops"},
        {"body": requests.ReadTimeout("slow")},
        {"status": 200, "body": '{"status": 200, "data": [{"id": "C15'},
    ],
)
def test_a_failing_provider_changes_nothing_and_is_asked_again_with_backoff(
    services: Services,
    provider_api: responses.RequestsMock,
    clock: Any,
    failure: dict[str, Any],
) -> None:
    payment = cubepay(services)
    provider_api.post(CUBEPAY_QUERY, **failure)
    waits = []
    for n in range(3):
        now = START + timedelta(hours=n + 1)
        clock.move_to(now)
        report = reconcile_due(services)
        assert report.checked == 1 and len(report.failures) == 1
        after = load_payment(services.db, payment.id)
        assert after.status is PaymentStatus.PENDING and after.poll_failures == n + 1
        assert after.next_check_at is not None
        waits.append(after.next_check_at - now)
    assert waits[0] < waits[1] < waits[2]  # backoff grows
    assert events(services.db, payment.id) == []
    provider_api.replace(responses.POST, CUBEPAY_QUERY, body=cubepay_query_answer(2))
    clock.move_to(START + timedelta(hours=5))
    reconcile_due(services)
    healed = load_payment(services.db, payment.id)
    assert healed.status is PaymentStatus.PAID and healed.poll_failures == 0


def test_concurrent_passes_check_each_due_payment_once(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    ids = [
        cubepay(services, order_id=f"many-{n}", provider_payment_id=f"C{n:019d}").id
        for n in range(40)
    ]
    asked: Counter[str] = Counter()
    lock = threading.Lock()

    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        payment_id = dict(p.split("=", 1) for p in request.body.split("&"))["id"]
        with lock:
            asked[payment_id] += 1
        return (
            200,
            {},
            cubepay_query_answer(
                0, paid="0", payment_id=payment_id, order_id=f"many-{int(payment_id[1:])}"
            ),
        )

    provider_api.add_callback(responses.POST, CUBEPAY_QUERY, callback=answer)
    clock.move_to(START + timedelta(minutes=2))
    small = services.settings.with_changes(reconcile_batch=5)
    reports = []
    passes = [
        threading.Thread(
            target=lambda: reports.append(
                reconcile_due(Services(small, services.db, services.providers))
            )
        )
        for _ in range(3)
    ]
    for thread in passes:
        thread.start()
    for thread in passes:
        thread.join()
    assert sum(report.checked for report in reports) == 40
    assert len(asked) == 40 and set(asked.values()) == {1}
    assert len(ids) == 40


def test_call_budget_is_shared_and_the_rest_waits(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    ids = [
        cubepay(services, order_id=f"budget-{n}", provider_payment_id=f"C{n:019d}").id
        for n in range(5)
    ]
    provider_api.post(CUBEPAY_QUERY, body=cubepay_query_answer(0, paid="0"))
    limited = Services(
        services.settings.with_changes(poll_limits={"cubepay": (3, "minute")}),
        services.db,
        services.providers,
    )
    clock.move_to(START + timedelta(minutes=2))
    report = reconcile_due(limited)
    assert (report.checked, report.skipped) == (3, 2)
    assert len(provider_api.calls) == 3
    # A new minute, a new budget of three: the two that waited are asked first (id order).
    clock.move_to(START + timedelta(minutes=4))
    assert reconcile_due(limited).checked == 3
    assert all(load_payment(services.db, i).checks >= 1 for i in ids)


def test_callback_only_provider_expires_by_our_clock_and_a_late_paid_overturns_it(
    app: Flask, services: Services, clock: Any
) -> None:
    payment = make_payment(
        services.db,
        provider="cryptoprocessing",
        order_id="order_12345",
        amount=Decimal("0.3"),
        currency="ETH",
        created_at=START,
        updated_at=START,
        expires_at=START + timedelta(hours=1),
        next_check_at=START + timedelta(hours=25, minutes=10),
    )
    clock.move_to(START + timedelta(hours=25))
    assert reconcile_due(services).checked == 0  # not due: life_time + 24 h + grace
    clock.move_to(START + timedelta(hours=25, minutes=11))
    report = reconcile_due(services)
    assert report.expired == 1
    assert load_payment(services.db, payment.id).status is PaymentStatus.EXPIRED
    assert [a.kind for a in anomalies(services.db)] == [AnomalyKind.INFERRED_EXPIRY]
    body = cryptoprocessing_callback("paid", received="0.0094")
    client = app.test_client()
    client.post("/ipn/cryptoprocessing", data=body, headers=cryptoprocessing_headers(body))
    process_notification(services, app.extensions["ipn.dispatcher"].submitted[-1])
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID


def test_reconcile_command(
    app: Flask, services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    payment = cubepay(services)
    other = cubepay(services, order_id="broken", provider_payment_id="C0000000000000000009")
    odd = cubepay(services, order_id="odd", provider_payment_id="C0000000000000000008")
    quiet = cubepay(services, order_id="quiet", provider_payment_id="C0000000000000000007")

    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        if "C0000000000000000009" in request.body:
            return 500, {}, b"down"
        if "C0000000000000000008" in request.body:
            return 200, {}, odd_answer("C0000000000000000008", "odd")
        if "C0000000000000000007" in request.body:
            return 200, {}, unpaid_answer("C0000000000000000007", "quiet")
        return 200, {}, cubepay_query_answer(2)

    provider_api.add_callback(responses.POST, CUBEPAY_QUERY, callback=answer)
    clock.move_to(START + timedelta(minutes=2))
    runner = app.test_cli_runner()
    result = runner.invoke(args=["reconcile"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # One line for each payment that changed or failed, then the totals; nothing for the rest.
    assert sorted(lines[:-1]) == sorted(
        [
            f"{payment.id}: changed: pending -> paid",
            f"{other.id}: failed: cubepay: POST /cubepay/payment/query answered 500: down",
            f"{odd.id}: failed: {load_payment(services.db, odd.id).last_check_error}",
        ]
    ), result.output
    assert quiet.id not in result.output
    assert lines[-1] == (
        "reconciliation: checked 4, changed 1 (expired 0), skipped 0, provider errors 2"
    )
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    single = runner.invoke(args=["reconcile", "--payment", "broken"])
    assert single.exit_code == 0 and "failed" in single.output
    assert runner.invoke(args=["reconcile", "--provider", "nope"]).exit_code != 0
    assert runner.invoke(args=["reconcile", "--payment", "nope"]).exit_code != 0
    assert (
        json.loads(runner.invoke(args=["payments", "show", payment.id, "--json"]).output)["status"]
        == "paid"
    )


def test_reconcile_command_fails_in_one_line_only_when_the_pass_cannot_run(
    app: Flask, services: Services, monkeypatch: pytest.MonkeyPatch, clock: Any
) -> None:
    cubepay(services)

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(reconcile, "claim_due", unreachable)
    clock.move_to(START + timedelta(minutes=2))
    result = app.test_cli_runner().invoke(args=["reconcile"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        "Error: the reconciliation pass could not run: ConnectionRefusedError: connection refused"
    ]


# A CubePay answer with 28 decimals in an amount: the money column keeps 24.
def odd_answer(payment_id: str, order_id: str) -> bytes:
    return cubepay_query_answer(
        2, paid="0.0100000000000000000000000001", payment_id=payment_id, order_id=order_id
    )


def unpaid_answer(payment_id: str, order_id: str) -> bytes:
    return cubepay_query_answer(0, paid="0", payment_id=payment_id, order_id=order_id)


def asked_id(request: Any) -> str:
    return str(dict(p.split("=", 1) for p in request.body.split("&"))["id"])


def old_cubepay(services: Services, n: int, **fields: Any) -> Any:
    """Created long ago and without a deadline: the schedule asks about it hourly."""
    values: dict[str, Any] = {
        "created_at": START - timedelta(hours=7),
        "updated_at": START - timedelta(hours=7),
        "expires_at": None,
        "next_check_at": START - timedelta(minutes=1),
        **fields,
    }
    return make_payment(
        services.db,
        provider="cubepay",
        order_id=f"old-{n}",
        amount=Decimal("500"),
        currency="TWD",
        pay_amount=Decimal("0.01"),
        pay_currency="BTC",
        provider_payment_id=f"C{n:019d}",
        **values,
    )


def leased(services: Services) -> list[str]:
    with services.db.sessions() as session:
        return list(
            session.scalars(
                select(Payment.id).where(
                    or_(Payment.lease_token.is_not(None), Payment.leased_until.is_not(None))
                )
            )
        )


def one_at_a_time(services: Services) -> Services:
    """The same services asking one payment at a time: for tests whose answers move the one
    clock every check shares, so concurrent questions would see each other's time pass."""
    return Services(
        services.settings.with_changes(reconcile_concurrency=1),
        services.db,
        services.providers,
        services.accounts,
    )


@pytest.mark.parametrize("bad", ["28 decimals", "86-character status"])
def test_one_bad_answer_is_recorded_on_its_payment_and_the_pass_goes_on(
    backend: Backend,
    services: Services,
    provider_api: responses.RequestsMock,
    clock: Any,
    bad: str,
) -> None:
    first = old_cubepay(services, 1, next_check_at=START - timedelta(minutes=3))
    last = old_cubepay(services, 3, next_check_at=START - timedelta(minutes=1))
    if bad == "28 decimals":
        broken = old_cubepay(services, 2, next_check_at=START - timedelta(minutes=2))
    else:
        if backend.name == "sqlite":
            pytest.skip("SQLite does not hold strings to their declared length")
        broken = bitcoinpaygate_payment(
            services.db,
            created_at=START - timedelta(hours=7),
            updated_at=START - timedelta(hours=7),
            next_check_at=START - timedelta(minutes=2),
        )
        provider_api.get(
            BPG_STATUS, body=bpg_snapshot("X" * 86, current_time="2026-11-21T09:00:00Z")
        )

    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        payment_id = asked_id(request)
        order_id = f"old-{int(payment_id[1:])}"
        if payment_id == "C0000000000000000002":
            return 200, {}, odd_answer(payment_id, order_id)
        return 200, {}, cubepay_query_answer(2, payment_id=payment_id, order_id=order_id)

    provider_api.add_callback(responses.POST, CUBEPAY_QUERY, callback=answer)
    report = reconcile_due(services)
    assert (report.checked, report.changed, report.failed) == (3, 2, 1)
    assert [check.payment_id for check in report.failures] == [broken.id]
    assert load_payment(services.db, first.id).status is PaymentStatus.PAID
    assert load_payment(services.db, last.id).status is PaymentStatus.PAID
    after = load_payment(services.db, broken.id)
    assert after.status is PaymentStatus.PENDING and events(services.db, broken.id) == []
    assert after.poll_failures == 1 and after.checks == 1 and after.last_checked_at == START
    assert after.last_check_error and after.last_check_error in report.failures[0].message
    assert "INSERT" not in after.last_check_error and "UPDATE" not in after.last_check_error
    assert after.next_check_at is not None and after.next_check_at > START
    assert leased(services) == []
    # The next good answer clears the error.
    clock.move_to(after.next_check_at)
    if bad == "28 decimals":
        provider_api.replace(
            responses.POST,
            CUBEPAY_QUERY,
            body=cubepay_query_answer(
                0, paid="0", payment_id="C0000000000000000002", order_id="old-2"
            ),
        )
    else:
        provider_api.replace(
            responses.GET, BPG_STATUS, body=bpg_snapshot("NEW", current_time="2026-11-21T10:00:00Z")
        )
    assert reconcile_due(services).failed == 0
    healed = load_payment(services.db, broken.id)
    assert healed.poll_failures == 0 and healed.last_check_error is None


def test_provider_errors_counts_every_failure_not_the_kept_few(
    services: Services,
    provider_api: responses.RequestsMock,
    clock: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconcile, "FAILURES_KEPT", 2)
    for n in range(5):
        old_cubepay(services, n)
    provider_api.post(CUBEPAY_QUERY, status=500, body="down")
    report = reconcile_due(services)
    assert (report.checked, report.failed, len(report.failures)) == (5, 5, 2)
    assert str(report).endswith("provider errors 5")


def test_a_slow_provider_and_a_second_pass_never_ask_a_payment_twice(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    services = one_at_a_time(services)
    ids = [old_cubepay(services, n).id for n in range(40)]
    asked: Counter[str] = Counter()
    reports: list[Any] = []

    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        payment_id = asked_id(request)
        asked[payment_id] += 1
        # Each answer takes 20 s (within a call's deadline): the first pass's lease of five
        # minutes runs out halfway through its batch, when a second pass starts.
        clock.shift(timedelta(seconds=20))
        if sum(asked.values()) == 20:
            reports.append(reconcile_due(services))
        return 200, {}, unpaid_answer(payment_id, f"old-{int(payment_id[1:])}")

    provider_api.add_callback(responses.POST, CUBEPAY_QUERY, callback=answer)
    reports.append(reconcile_due(services))
    assert len(asked) == 40 and set(asked.values()) == {1}, asked
    assert sum(report.checked for report in reports) == 40
    assert all(load_payment(services.db, i).checks == 1 for i in ids)
    assert leased(services) == []


def test_an_answer_is_applied_only_while_the_lease_is_the_checks_own(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    payment = old_cubepay(services, 1)

    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        # Meanwhile the lease ran out and another pass claimed the payment.
        with services.db.transaction() as session:
            session.execute(
                update(Payment)
                .where(Payment.id == payment.id)
                .values(lease_token="another", leased_until=START + timedelta(minutes=5))
            )
        return 200, {}, cubepay_query_answer(2, payment_id=asked_id(request), order_id="old-1")

    provider_api.add_callback(responses.POST, CUBEPAY_QUERY, callback=answer)
    seen: list[Any] = []
    report = reconcile_due(services, on_check=seen.append)
    assert [check.outcome for check in seen] == ["busy"] and report.checked == 0
    after = load_payment(services.db, payment.id)
    assert after.status is PaymentStatus.PENDING and after.checks == 0
    assert events(services.db, payment.id) == []
    assert after.lease_token == "another"  # the other check's lease is left alone


def test_the_time_budget_is_looked_at_before_every_payment(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    services = one_at_a_time(services)
    for n in range(10):
        old_cubepay(services, n)

    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        time.sleep(0.1)
        payment_id = asked_id(request)
        return 200, {}, unpaid_answer(payment_id, f"old-{int(payment_id[1:])}")

    provider_api.add_callback(responses.POST, CUBEPAY_QUERY, callback=answer)
    first = reconcile_due(services, time_budget=0.25)
    assert 1 <= first.checked <= 4, first
    # What the pass did not reach is neither leased nor moved: the next pass takes it at once.
    assert leased(services) == []
    assert reconcile_due(services).checked == 10 - first.checked
    assert len(provider_api.calls) == 10


def test_each_check_records_and_schedules_from_its_own_time(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    services = one_at_a_time(services)
    for n in range(3):
        old_cubepay(services, n)
    order: list[str] = []

    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        # Within a call's deadline: an answer that comes after its lease ran out is not applied.
        clock.shift(timedelta(seconds=20))
        payment_id = asked_id(request)
        order.append(f"old-{int(payment_id[1:])}")
        return 200, {}, unpaid_answer(payment_id, order[-1])

    provider_api.add_callback(responses.POST, CUBEPAY_QUERY, callback=answer)
    assert reconcile_due(services).checked == 3
    with services.db.sessions() as session:
        by_order = {p.order_id: p for p in session.scalars(select(Payment))}
    for n, order_id in enumerate(order):
        asked_at = START + timedelta(seconds=20 * n)
        assert by_order[order_id].last_checked_at == asked_at, order_id
        assert by_order[order_id].next_check_at == asked_at + timedelta(hours=1), order_id


def test_force_asks_whatever_the_schedule_but_never_about_a_final_or_held_payment(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    later = old_cubepay(services, 1, next_check_at=START + timedelta(minutes=30))
    final = make_payment(
        services.db,
        provider="bitcoinpaygate",
        order_id="2015-03-10/123/1",
        provider_payment_id=BPG_ID,
        status=PaymentStatus.PAID,
        created_at=START - timedelta(days=3),
        updated_at=START - timedelta(days=3),
        next_check_at=None,
    )
    held = old_cubepay(
        services,
        2,
        lease_token="a-pass",
        leased_until=START + timedelta(minutes=5),
    )
    provider_api.post(
        CUBEPAY_QUERY,
        body=cubepay_query_answer(2, payment_id="C0000000000000000001", order_id="old-1"),
    )
    provider_api.get(BPG_STATUS, body=bpg_snapshot("CONFIRMED"))

    not_due = check_payment(services, later.id)
    assert not_due.outcome == "skipped" and "not due" in not_due.message
    assert len(provider_api.calls) == 0
    assert check_payment(services, later.id, force=True).outcome == "changed"
    assert load_payment(services.db, later.id).status is PaymentStatus.PAID
    assert check_payment(services, final.id, force=True).outcome == "final"
    assert check_payment(services, held.id, force=True).outcome == "busy"
    assert len(provider_api.calls) == 1
    assert load_payment(services.db, held.id).lease_token == "a-pass"
    assert leased(services) == [held.id]


class DrippingCubePay:
    """An answer that never stops arriving: a byte every 0.2 s, well inside any read timeout."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                try:
                    for _ in range(1000):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_provider_call_ends_by_its_deadline_however_the_answer_trickles(
    backend: Backend, services: Services
) -> None:
    dripping = DrippingCubePay()
    try:
        settings = backend.settings(CUBEPAY_API_URL=dripping.url, IPN_HTTP_TOTAL_TIMEOUT="1")
        slow = Services(settings, services.db, build_providers(settings))
        payment = old_cubepay(slow, 1, next_check_at=datetime.now(UTC))
        checks: list[Any] = []
        started = time.monotonic()
        worker = threading.Thread(target=lambda: checks.append(check_payment(slow, payment.id)))
        worker.start()
        worker.join(timeout=10)
        took = time.monotonic() - started
        assert checks and checks[0].outcome == "failed", f"still asking after {took:.1f} s"
        assert "no answer within 1 s" in checks[0].message
        assert took < 1 + settings.http.read_timeout
        assert load_payment(services.db, payment.id).poll_failures == 1
    finally:
        dripping.server.shutdown()
