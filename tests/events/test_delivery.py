"""Delivering events: signed so that the `standardwebhooks` library verifies them, retried on the
schedule until a 2xx, in each payment's order, attempted by one worker at a time, and every
attempt on record."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook

from events.shop import Shop
from events.test_outbox import add_endpoint, move
from ipn.events import delivery, endpoints, signing, urls
from ipn.services import Services
from models import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Endpoint,
    EndpointStatus,
    MerchantEvent,
    PaymentStatus,
)

from helpers import START, make_payment

P = PaymentStatus
D = DeliveryStatus
# The schedule the merchant-events issue asks for, written out: seconds after each failure.
SCHEDULE = [5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 10 * 3600]


def only_delivery(services: Services) -> Delivery:
    with services.db.sessions() as session:
        [row] = session.scalars(select(Delivery))
        return row


def load(services: Services, model: Any, key: Any) -> Any:
    with services.db.sessions() as session:
        return session.get(model, key)


def attempts(services: Services) -> list[DeliveryAttempt]:
    with services.db.sessions() as session:
        return list(session.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id)))


def event_ids_in_order(services: Services) -> list[str]:
    with services.db.sessions() as session:
        return list(session.scalars(select(MerchantEvent.id).order_by(MerchantEvent.sequence)))


def test_an_event_verifies_with_the_standardwebhooks_library(services: Services) -> None:
    endpoint = add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)
    shop = Shop(endpoint.secret or "")

    outcome = delivery.deliver(services, only_delivery(services).id, now=START, post=shop)

    assert "delivered" in outcome.summary
    [(webhook_id, body)] = shop.received
    [event_id] = event_ids_in_order(services)
    assert webhook_id == event_id
    assert body["type"] == "payment.paid"
    assert body["data"]["id"] == payment.id
    # And a shop holding another secret refuses it.
    with pytest.raises(Exception, match="signature"):
        Webhook(signing.new_secret()).verify(
            load(services, MerchantEvent, event_id).body, shop.headers[0]
        )
    row = only_delivery(services)
    assert (row.status, row.attempts, row.delivered_at) == (D.DELIVERED, 1, START)
    assert load(services, MerchantEvent, event_id).status is D.DELIVERED
    [attempt] = attempts(services)
    assert (attempt.status_code, attempt.error, attempt.response) == (200, None, "ok")


def test_during_a_rotation_both_secrets_sign_until_the_overlap_ends(services: Services) -> None:
    old, new = signing.new_secret(), signing.new_secret()
    add_endpoint(
        services,
        secret=new,
        previous_secret=old,
        previous_secret_until=START + timedelta(hours=1),
    )
    payment = make_payment(services.db)
    move(services, payment.id, P.CONFIRMING)
    move(services, payment.id, P.PAID)
    first, second = (d.id for d in _deliveries(services))
    both = Shop(old, new)  # verifies with each secret on its own

    delivery.deliver(services, first, now=START + timedelta(minutes=59), post=both)
    assert len(both.received) == 1
    assert len(both.headers[0]["webhook-signature"].split(" ")) == 2

    after = Shop(new)
    delivery.deliver(services, second, now=START + timedelta(hours=1), post=after)
    assert len(after.headers[0]["webhook-signature"].split(" ")) == 1
    with pytest.raises(Exception, match="signature"):
        Webhook(old).verify(
            load(services, MerchantEvent, event_ids_in_order(services)[1]).body,
            after.headers[0],
        )


def test_failures_are_retried_on_the_schedule_then_the_delivery_fails(
    services: Services,
) -> None:
    assert services.settings.events.retry_schedule == tuple(SCHEDULE)
    add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)
    delivery_id = only_delivery(services).id
    shop = Shop()
    shop.answers = [500, urls.DeliveryError("timed out after 10.0 s")] * 4
    now = START
    waits = []
    for _ in range(len(SCHEDULE) + 1):
        outcome = delivery.deliver(services, delivery_id, now=now, post=shop)
        row = only_delivery(services)
        if row.status is D.FAILED:
            break
        waits.append((row.next_attempt_at - now).total_seconds())
        assert outcome.retry_in == waits[-1]
        # Not before it is due.
        early = delivery.deliver(
            services, delivery_id, now=row.next_attempt_at - timedelta(seconds=1), post=shop
        )
        assert "not due" in early.summary
        now = row.next_attempt_at

    assert waits == SCHEDULE
    row = only_delivery(services)
    assert (row.status, row.attempts) == (D.FAILED, len(SCHEDULE) + 1)
    assert load(services, MerchantEvent, row.event_id).status is D.FAILED
    log = attempts(services)
    assert len(log) == len(SCHEDULE) + 1
    assert [a.status_code for a in log[:2]] == [500, None]
    assert [a.error for a in log[:2]] == ["answered 500", "timed out after 10.0 s"]
    # The first 2 KiB of the answer are kept, no more.
    assert log[0].response == "x" * 2048
    assert len(shop.received) == 4  # the four 500s reached the shop; the timeouts did not


def test_a_later_event_waits_while_an_earlier_one_is_retried(services: Services) -> None:
    add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.CONFIRMING)
    move(services, payment.id, P.PAID)
    first, second = (d.id for d in _deliveries(services))
    shop = Shop()
    shop.answers = [503]
    sent: list[int] = []

    delivery.deliver(services, first, now=START, post=shop)
    waiting = delivery.deliver(services, second, now=START, post=shop)
    assert "waits for sequence 1" in waiting.summary
    assert delivery.deliver_due(services, sent.append, now=START + timedelta(seconds=4)) == 0
    assert delivery.deliver_due(services, sent.append, now=START + timedelta(seconds=5)) == 1
    assert sent == [first]

    outcome = delivery.deliver(services, first, now=START + timedelta(seconds=5), post=shop)
    assert outcome.wake == [second]
    delivery.deliver(services, second, now=START + timedelta(seconds=5), post=shop)

    assert shop.types == ["payment.confirming", "payment.confirming", "payment.paid"]
    assert [body["data"]["sequence"] for _, body in shop.received] == [1, 1, 2]
    # The retried event kept its webhook-id.
    assert shop.ids[0] == shop.ids[1] != shop.ids[2]


def test_other_payments_and_endpoints_do_not_wait(services: Services) -> None:
    add_endpoint(services)
    add_endpoint(services)
    one, two = make_payment(services.db), make_payment(services.db, order_id="two")
    move(services, one.id, P.CONFIRMING)
    move(services, one.id, P.PAID)
    move(services, two.id, P.PAID)
    sent: list[int] = []
    assert delivery.deliver_due(services, sent.append, now=START) == 4  # 2 endpoints x 2 heads
    heads = {
        (d.endpoint_id, d.payment_id, d.sequence) for d in _deliveries(services) if d.id in sent
    }
    assert {sequence for _, _, sequence in heads} == {1}


def test_one_attempt_at_a_time_and_a_lost_lease_is_taken_over(services: Services) -> None:
    add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)
    delivery_id = only_delivery(services).id
    lease = services.settings.events.lease
    shop = Shop()
    inside: list[str] = []

    def hangs_then_answers(*args: Any, **kwargs: Any) -> urls.Answer:
        # While this attempt is out, another worker tries, then the lease runs out and a third
        # takes the delivery over; the first answer comes back last.
        inside.append(delivery.deliver(services, delivery_id, now=START, post=shop).summary)
        inside.append(
            delivery.deliver(
                services, delivery_id, now=START + lease + timedelta(seconds=1), post=shop
            ).summary
        )
        return urls.Answer(200, b"late", 1)

    late = delivery.deliver(services, delivery_id, now=START, post=hangs_then_answers)

    assert "is being attempted" in inside[0]
    assert "delivered" in inside[1]
    assert "lease lost" in late.summary
    assert len(shop.received) == 1
    row = only_delivery(services)
    assert (row.status, row.attempts) == (D.DELIVERED, 1)
    assert len(attempts(services)) == 2  # both attempts are on record


def test_an_endpoint_failing_for_five_days_is_disabled(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    assert services.settings.events.disable_after == timedelta(days=5)
    endpoint = add_endpoint(services)
    shop = Shop()
    shop.answers = [500] * 20
    first = make_payment(services.db)
    move(services, first.id, P.CONFIRMING)
    delivery.deliver(services, only_delivery(services).id, now=START, post=shop)
    # A new event every day, each failing: the endpoint never delivers for five days.
    for day in range(1, 6):
        now = START + timedelta(days=day)
        payment = make_payment(services.db, order_id=f"day-{day}")
        move_at(services, payment.id, P.PAID, now)
        [due] = [d for d in _deliveries(services) if d.payment_id == payment.id]
        with caplog.at_level(logging.WARNING, logger="ipn.events"):
            delivery.deliver(services, due.id, now=now, post=shop)
        expected = EndpointStatus.DISABLED if day == 5 else EndpointStatus.ENABLED
        assert load(services, Endpoint, endpoint.id).status is expected

    stored = load(services, Endpoint, endpoint.id)
    assert stored.status is EndpointStatus.DISABLED
    assert "every attempt failed since 2026-11-21" in (stored.disabled_reason or "")
    assert any(
        "disabled" in r.getMessage() and endpoint.id in r.getMessage() for r in caplog.records
    )
    assert endpoint.secret and endpoint.secret not in caplog.text
    # What was on its way waits, untried, until an operator enables the endpoint again.
    waiting = [d for d in _deliveries(services) if d.status is D.PENDING]
    assert len(waiting) == 6
    later = START + timedelta(days=6)
    assert delivery.deliver_due(services, [].append, now=later) == 0
    tried = len(attempts(services))
    with services.db.transaction() as session:
        endpoints.enable(session, endpoint.id, later)
    sent: list[int] = []
    shop.answers = []  # the shop is fixed
    assert delivery.deliver_due(services, sent.append, now=later) == 6
    for delivery_id in sent:
        delivery.deliver(services, delivery_id, now=later, post=shop)
    assert len(attempts(services)) == tried + 6
    assert {d.status for d in _deliveries(services)} == {D.DELIVERED}


def test_one_delivery_resets_the_failing_clock(services: Services) -> None:
    endpoint = add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.CONFIRMING)
    shop = Shop()
    shop.answers = [500]
    delivery.deliver(services, only_delivery(services).id, now=START, post=shop)
    assert load(services, Endpoint, endpoint.id).failing_since == START
    delivery.deliver(
        services, only_delivery(services).id, now=START + timedelta(seconds=5), post=shop
    )
    assert load(services, Endpoint, endpoint.id).failing_since is None


def test_redelivery_sends_the_same_event_again_to_who_hears_it_now(services: Services) -> None:
    first = add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)
    shop = Shop()
    delivery.deliver(services, only_delivery(services).id, now=START, post=shop)
    second = add_endpoint(services)
    [event_id] = event_ids_in_order(services)

    with services.db.transaction() as session:
        assert delivery.redeliver(session, [event_id], START + timedelta(hours=1)) == [event_id]

    due = _deliveries(services)
    assert {(d.endpoint_id, d.status, d.attempts) for d in due} == {
        (first.id, D.PENDING, 0),
        (second.id, D.PENDING, 0),
    }
    for row in due:
        delivery.deliver(services, row.id, now=START + timedelta(hours=1), post=shop)
    assert shop.ids == [event_id] * 3
    assert load(services, MerchantEvent, event_id).status is D.DELIVERED


def test_a_disabled_endpoint_gets_nothing_until_enabled(services: Services) -> None:
    endpoint = add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)
    with services.db.transaction() as session:
        endpoints.disable(session, endpoint.id, "shop down for maintenance", START)
    shop = Shop()
    outcome = delivery.deliver(services, only_delivery(services).id, now=START, post=shop)
    assert "waits: endpoint" in outcome.summary
    assert delivery.deliver_due(services, [].append, now=START) == 0
    assert shop.received == []
    assert only_delivery(services).status is D.PENDING

    with services.db.transaction() as session:
        endpoints.enable(session, endpoint.id, START)
    delivery.deliver(services, only_delivery(services).id, now=START, post=shop)
    assert only_delivery(services).status is D.DELIVERED


def test_deleting_an_endpoint_fails_what_waited_for_it(services: Services) -> None:
    endpoint = add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)
    with services.db.transaction() as session:
        endpoints.delete(session, endpoint.id, START)
    row = only_delivery(services)
    assert (row.status, row.last_error) == (D.FAILED, "endpoint deleted")
    assert load(services, MerchantEvent, row.event_id).status is D.FAILED


def test_an_unsafe_address_at_delivery_is_a_failed_attempt(services: Services) -> None:
    add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)

    def rebinds(*args: Any, **kwargs: Any) -> urls.Answer:
        raise urls.UnsafeURL("url resolves to a private address (10.0.0.1)")

    delivery.deliver(services, only_delivery(services).id, now=START, post=rebinds)
    [attempt] = attempts(services)
    assert attempt.error == "url resolves to a private address (10.0.0.1)"
    assert only_delivery(services).status is D.PENDING


def _deliveries(services: Services) -> list[Delivery]:
    with services.db.sessions() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.sequence, Delivery.id)))


def move_at(services: Services, payment_id: str, after: PaymentStatus, now: datetime) -> None:
    from ipn.transitions import Change, Evidence, Verdict, write
    from models import EventSource, Payment

    with services.db.transaction() as session:
        payment = session.get(Payment, payment_id)
        assert payment is not None
        write(
            session,
            payment,
            Change(Verdict.MOVE, payment.status, after, "test"),
            Evidence(EventSource.POLL, "poll"),
            now,
        )


def test_only_a_2xx_is_delivered(services: Services) -> None:
    add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)
    delivery_id = only_delivery(services).id
    shop = Shop()
    shop.answers = [300, 199, 204]
    now = START
    for _ in range(3):
        delivery.deliver(services, delivery_id, now=now, post=shop)
        now = only_delivery(services).next_attempt_at or now
    row = only_delivery(services)
    assert (row.status, row.attempts) == (D.DELIVERED, 3)
    # The last error stays on record beside the delivery that came after it.
    assert row.last_error == "answered 199"
    assert [a.status_code for a in attempts(services)] == [300, 199, 204]


def test_an_attempt_that_gets_no_answer_is_timed_too(services: Services) -> None:
    add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)

    def refused(*args: Any, **kwargs: Any) -> urls.Answer:
        raise urls.DeliveryError("connection refused")

    delivery.deliver(services, only_delivery(services).id, now=START, post=refused)
    [attempt] = attempts(services)
    assert 0 <= attempt.duration_ms < 5000
    assert (attempt.status_code, attempt.response) == (None, None)


def test_an_attempt_overtaken_by_another_still_in_flight_writes_no_outcome(
    services: Services,
) -> None:
    add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)
    delivery_id = only_delivery(services).id

    def overtaken(*args: Any, **kwargs: Any) -> urls.Answer:
        # Meanwhile our lease ran out and another worker holds the delivery, mid-attempt.
        with services.db.transaction() as session:
            row = session.get(Delivery, delivery_id)
            assert row is not None
            row.lease_token = "another-worker"
        return urls.Answer(200, b"ok", 1)

    outcome = delivery.deliver(services, delivery_id, now=START, post=overtaken)
    assert "lease lost" in outcome.summary
    row = only_delivery(services)
    assert (row.status, row.attempts, row.lease_token) == (D.PENDING, 0, "another-worker")
    assert len(attempts(services)) == 1


def test_the_lease_holds_to_its_last_instant(services: Services) -> None:
    add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)
    delivery_id = only_delivery(services).id
    lease = services.settings.events.lease
    shop = Shop()

    def killed(*args: Any, **kwargs: Any) -> urls.Answer:
        raise SystemExit("the worker dies mid-attempt")

    with pytest.raises(SystemExit):
        delivery.deliver(services, delivery_id, now=START, post=killed)
    held = delivery.deliver(services, delivery_id, now=START + lease, post=shop)
    assert "is being attempted" in held.summary
    assert delivery.deliver_due(services, [].append, now=START + lease) == 0
    after = START + lease + timedelta(microseconds=1)
    assert delivery.deliver_due(services, [].append, now=after) == 1
    taken = delivery.deliver(services, delivery_id, now=after, post=shop)
    assert "delivered" in taken.summary
    assert len(shop.received) == 1


def test_calls_that_find_nothing_to_do_say_so(services: Services) -> None:
    add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)
    shop = Shop()
    missing = delivery.deliver(services, 10**9, now=START, post=shop)
    assert (missing.summary, missing.wake, missing.retry_in) == ("no delivery 1000000000", [], None)
    delivery_id = only_delivery(services).id
    delivery.deliver(services, delivery_id, now=START, post=shop)
    again = delivery.deliver(services, delivery_id, now=START, post=shop)
    assert (again.summary, again.wake) == (f"delivery {delivery_id} already delivered", [])
    assert len(shop.received) == 1


def test_an_endpoint_with_no_secret_to_sign_with_gets_nothing(services: Services) -> None:
    add_endpoint(services, secret=None)  # the merchant secret, which is not set here
    assert services.settings.events.webhook_secret is None
    payment = make_payment(services.db)
    move(services, payment.id, P.CONFIRMING)
    move(services, payment.id, P.PAID)
    first, second = (d.id for d in _deliveries(services))
    shop = Shop()
    outcome = delivery.deliver(services, first, now=START, post=shop)
    assert outcome.wake == [second]
    assert shop.received == []
    row = _deliveries(services)[0]
    assert (row.status, row.last_error) == (D.FAILED, "not sent: no secret to sign with")
