"""Reconciliation with time moved forward, never slept: expiries settle at the deadline and not
before, late answers keep their truth, lost callbacks are found, providers that fail change
nothing and are asked again later, and concurrent passes ask about each payment once."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import requests
import responses
import time_machine
from flask import Flask

from ipn.processing import process_notification
from ipn.reconcile import check_payment, reconcile_due
from ipn.services import Services
from models import AnomalyKind, EventSource, PaymentStatus

from helpers import (
    PROVIDER_URL,
    anomalies,
    bpg_snapshot,
    coinbarpay_status,
    cryptoprocessing_callback,
    cryptoprocessing_headers,
    cubepay_query_answer,
    events,
    load_payment,
    make_payment,
)

START = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
CUBEPAY_QUERY = f"{PROVIDER_URL}/cubepay/payment/query"
BPG_ID = "95bf1d853cf2e040f0ce219221f9b17206525941"
BPG_STATUS = f"{PROVIDER_URL}/bitcoinpaygate/v2/payments/{BPG_ID}"
COINBAR_STATUS = f"{PROVIDER_URL}/coinbarpay/coinbar/api/v2/pay/gateway/payment/order-1001/status"


@pytest.fixture
def provider_api() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def clock() -> Iterator[Any]:
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


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
    payment = make_payment(
        services.db,
        provider="bitcoinpaygate",
        order_id="2015-03-10/123/1",
        provider_payment_id=BPG_ID,
        amount=Decimal("10.00"),
        currency="USD",
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

    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        if "C0000000000000000009" in request.body:
            return 500, {}, b"down"
        return 200, {}, cubepay_query_answer(2)

    provider_api.add_callback(responses.POST, CUBEPAY_QUERY, callback=answer)
    clock.move_to(START + timedelta(minutes=2))
    runner = app.test_cli_runner()
    result = runner.invoke(args=["reconcile"])
    assert result.exit_code == 0, result.output
    assert f"{other.id}: provider error" in result.output
    assert "checked 2, changed 1" in result.output
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    single = runner.invoke(args=["reconcile", "--payment", "broken"])
    assert single.exit_code == 0 and "failed" in single.output
    assert runner.invoke(args=["reconcile", "--provider", "nope"]).exit_code != 0
    assert runner.invoke(args=["reconcile", "--payment", "nope"]).exit_code != 0
    assert (
        json.loads(runner.invoke(args=["payments", "show", payment.id, "--json"]).output)["status"]
        == "paid"
    )
