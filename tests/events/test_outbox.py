"""The outbox: an event for every committed change of a payment and every anomaly opened or
resolved, written in the change's own transaction, and none for what changes nothing."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from ipn.anomalies import resolve_anomaly
from ipn.events import outbox, signing
from ipn.services import Services
from ipn.transitions import Change, Evidence, Finding, Verdict, can_move, write
from models import (
    AnomalyKind,
    Delivery,
    DeliveryStatus,
    Endpoint,
    EndpointOrigin,
    EndpointStatus,
    EventSource,
    EventType,
    MerchantEvent,
    Payment,
    PaymentStatus,
    utcnow,
)

from helpers import START, count, make_payment

P = PaymentStatus

# The event each state a payment reaches is announced by, written out rather than derived.
EVENT_OF_STATE = {
    P.CONFIRMING: "payment.confirming",
    P.UNDERPAID: "payment.underpaid",
    P.PAID: "payment.paid",
    P.EXPIRED: "payment.expired",
    P.FAILED: "payment.failed",
    P.CANCELLED: "payment.cancelled",
    P.REFUNDED: "payment.refunded",
}
EVIDENCE = Evidence(EventSource.POLL, "poll")


def add_endpoint(services: Services, **fields: Any) -> Endpoint:
    values: dict[str, Any] = {
        "url": "https://shop.example/events",
        "secret": signing.new_secret(),
        "events": [],
        "created_at": utcnow(),
        "updated_at": utcnow(),
        **fields,
    }
    endpoint = Endpoint(**values)
    with services.db.transaction() as session:
        session.add(endpoint)
    return endpoint


def merchant_events(services: Services, payment_id: str | None = None) -> list[MerchantEvent]:
    query = select(MerchantEvent).order_by(MerchantEvent.created_at, MerchantEvent.id)
    if payment_id:
        query = query.where(MerchantEvent.payment_id == payment_id)
    with services.db.sessions() as session:
        return list(session.scalars(query))


def deliveries(services: Services) -> list[Delivery]:
    with services.db.sessions() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def move(services: Services, payment_id: str, after: PaymentStatus, **change: Any) -> None:
    with services.db.transaction() as session:
        payment = session.get(Payment, payment_id)
        assert payment is not None
        verdict = Verdict.MOVE if after is not payment.status else Verdict.NOTE
        write(
            session,
            payment,
            Change(verdict, payment.status, after, "test", **change),
            EVIDENCE,
            START,
        )


@pytest.mark.parametrize("after", sorted(EVENT_OF_STATE, key=str))
def test_each_state_reached_is_announced_by_its_own_event(
    services: Services, after: PaymentStatus
) -> None:
    add_endpoint(services)
    payment = make_payment(services.db)
    assert can_move(P.PENDING, after, expiry_inferred=False)

    move(services, payment.id, after)

    [event] = merchant_events(services)
    assert event.type.value == EVENT_OF_STATE[after]
    body = json.loads(event.body)
    assert body["type"] == EVENT_OF_STATE[after]
    assert body["timestamp"] == "2026-11-21T09:00:00Z"
    assert body["data"]["id"] == payment.id
    assert body["data"]["status"] == after.value
    assert (body["data"]["amount"], body["data"]["currency"]) == ("500.00", "TWD")
    assert body["data"]["sequence"] == event.sequence == 1
    [delivery] = deliveries(services)
    assert (delivery.event_id, delivery.status, delivery.sequence) == (
        event.id,
        DeliveryStatus.PENDING,
        1,
    )


def test_a_note_in_the_same_state_makes_no_event(services: Services) -> None:
    payment = make_payment(services.db, status=P.UNDERPAID)
    move(services, payment.id, P.UNDERPAID)
    assert merchant_events(services) == []


def test_sequence_grows_with_each_change_of_one_payment(services: Services) -> None:
    payment = make_payment(services.db)
    other = make_payment(services.db, order_id="other")
    for state in (P.CONFIRMING, P.UNDERPAID, P.PAID, P.REFUNDED):
        move(services, payment.id, state)
    move(services, other.id, P.EXPIRED)

    mine = merchant_events(services, payment.id)
    assert [e.type.value for e in mine] == [
        "payment.confirming",
        "payment.underpaid",
        "payment.paid",
        "payment.refunded",
    ]
    assert [e.sequence for e in mine] == [1, 2, 3, 4]
    assert [json.loads(e.body)["data"]["sequence"] for e in mine] == [1, 2, 3, 4]
    assert [e.sequence for e in merchant_events(services, other.id)] == [1]


def test_a_change_that_rolls_back_takes_its_event_with_it(services: Services) -> None:
    add_endpoint(services)
    payment = make_payment(services.db)
    woken: list[list[int]] = []
    services.wake_deliveries = woken.append

    with pytest.raises(RuntimeError), services.db.transaction() as session:
        held = session.get(Payment, payment.id)
        assert held is not None
        write(session, held, Change(Verdict.MOVE, P.PENDING, P.PAID, "paid"), EVIDENCE, START)
        raise RuntimeError("the transaction fails after the write")

    assert merchant_events(services) == []
    assert deliveries(services) == []
    assert woken == []


def test_a_lost_compare_and_set_writes_no_event(services: Services) -> None:
    payment = make_payment(services.db)
    with services.db.sessions() as racer:
        theirs = racer.get(Payment, payment.id)  # read, then the other worker moves first
        racer.commit()
        move(services, payment.id, P.PAID)
        assert theirs is not None
        # The compare-and-set on the payment, or the unique (payment, sequence) of its events.
        with pytest.raises((StaleDataError, IntegrityError)), racer.begin():
            write(
                racer,
                theirs,
                Change(Verdict.MOVE, P.PENDING, P.EXPIRED, "expired"),
                EVIDENCE,
                START,
            )
    assert [e.type.value for e in merchant_events(services)] == ["payment.paid"]


def test_deliveries_go_to_the_endpoints_that_hear_the_event(services: Services) -> None:
    payment = make_payment(services.db)
    other = make_payment(services.db, order_id="other")
    everything = add_endpoint(services)
    paid_only = add_endpoint(services, events=["payment.paid"])
    add_endpoint(services, events=["payment.expired"])
    add_endpoint(services, status=EndpointStatus.DISABLED)
    add_endpoint(services, deleted_at=utcnow(), status=EndpointStatus.DISABLED)
    own = add_endpoint(services, origin=EndpointOrigin.PAYMENT, payment_id=payment.id)
    add_endpoint(services, origin=EndpointOrigin.PAYMENT, payment_id=other.id)
    woken: list[list[int]] = []
    services.wake_deliveries = woken.append

    move(services, payment.id, P.PAID)

    sent = deliveries(services)
    assert sorted(d.endpoint_id for d in sent) == sorted([everything.id, paid_only.id, own.id])
    assert woken == [[d.id for d in sent]]


def test_an_event_nobody_hears_is_not_left_pending(services: Services) -> None:
    add_endpoint(services, events=["payment.expired"])
    payment = make_payment(services.db)
    move(services, payment.id, P.PAID)
    [event] = merchant_events(services)
    assert event.status is DeliveryStatus.DELIVERED
    assert deliveries(services) == []


def test_the_environment_endpoint_follows_the_environment(services: Services) -> None:
    events = services.settings.events
    payment = make_payment(services.db)

    def configure(url: str | None) -> None:
        outbox.install(services.db.sessions, events.__class__(webhook_url=url))

    configure("https://shop.example/hooks")
    move(services, payment.id, P.CONFIRMING)
    configure("https://shop.example/moved")
    move(services, payment.id, P.UNDERPAID)
    configure(None)
    move(services, payment.id, P.PAID)
    move(services, payment.id, P.PAID)  # a note, and the endpoint stays off while unset
    configure("https://shop.example/moved")
    move(services, payment.id, P.REFUNDED)

    with services.db.sessions() as session:
        endpoint = session.get(Endpoint, outbox.ENVIRONMENT_ENDPOINT)
    assert endpoint is not None
    assert (endpoint.url, endpoint.origin, endpoint.secret) == (
        "https://shop.example/moved",
        EndpointOrigin.ENVIRONMENT,
        None,
    )
    assert endpoint.status is EndpointStatus.ENABLED
    by_event = {d.event_id: d for d in deliveries(services)}
    heard = [e.type.value for e in merchant_events(services) if e.id in by_event]
    assert heard == ["payment.confirming", "payment.underpaid", "payment.refunded"]


def test_anomalies_opened_and_resolved_are_events_in_the_payment_sequence(
    services: Services,
) -> None:
    payment = make_payment(services.db, status=P.EXPIRED)
    finding = Finding(AnomalyKind.LATE_PAYMENT, f"late:{payment.id}", "paid after expiry")
    with services.db.transaction() as session:
        held = session.get(Payment, payment.id)
        assert held is not None
        applied = write(
            session,
            held,
            Change(Verdict.REFUSE, P.EXPIRED, P.EXPIRED, "late", (finding,)),
            EVIDENCE,
            START,
        )
    [anomaly_id] = applied.anomaly_ids
    # The same fact again opens nothing, so it tells nothing.
    with services.db.transaction() as session:
        held = session.get(Payment, payment.id)
        assert held is not None
        write(
            session,
            held,
            Change(Verdict.REFUSE, P.EXPIRED, P.EXPIRED, "late", (finding,)),
            EVIDENCE,
            START + timedelta(minutes=1),
        )
    with services.db.transaction() as session:
        resolve_anomaly(session, anomaly_id, "refunded by hand", by="test")

    opened, resolved = merchant_events(services, payment.id)
    assert (opened.type.value, resolved.type.value) == ("anomaly.opened", "anomaly.resolved")
    assert (opened.sequence, resolved.sequence) == (1, 2)
    assert opened.anomaly_id == resolved.anomaly_id == anomaly_id
    opened_data = json.loads(opened.body)["data"]
    assert (opened_data["id"], opened_data["kind"], opened_data["status"]) == (
        anomaly_id,
        "late_payment",
        "open",
    )
    assert opened_data["payment_id"] == payment.id
    resolved_data = json.loads(resolved.body)["data"]
    assert (resolved_data["status"], resolved_data["resolution"]) == (
        "resolved",
        "refunded by hand",
    )
    assert count(services.db, MerchantEvent) == 2


def test_whatever_a_sender_put_in_the_evidence_makes_an_ascii_body(services: Services) -> None:
    payment = make_payment(services.db, status=P.EXPIRED)
    finding = Finding(
        AnomalyKind.UNEXPECTED_FUNDS,
        f"odd:{payment.id}",
        "odd",
        {"report": {"note": "caf\u00e9 \ud800 \x00", "amount": Decimal("1e-20")}},
    )
    with services.db.transaction() as session:
        held = session.get(Payment, payment.id)
        assert held is not None
        write(
            session,
            held,
            Change(Verdict.REFUSE, P.EXPIRED, P.EXPIRED, "odd", (finding,)),
            EVIDENCE,
            START,
        )
    [event] = merchant_events(services)
    assert event.body.isascii()
    assert json.loads(event.body)["data"]["evidence"]["report"]["note"] == "caf\u00e9 \ud800 \x00"


def test_an_anomaly_without_a_payment_is_an_event_outside_any_sequence(
    services: Services,
) -> None:
    from ipn.anomalies import open_anomaly
    from models import Anomaly

    add_endpoint(services)
    with services.db.transaction() as session:
        anomaly_id = open_anomaly(session, AnomalyKind.UNEXPECTED_FUNDS, "stray", {"detail": "x"})
        assert anomaly_id is not None
        anomaly = session.get(Anomaly, anomaly_id)
        assert anomaly is not None
        outbox.anomaly_event(session, EventType.ANOMALY_OPENED, anomaly, None, START)
    [event] = merchant_events(services)
    assert (event.payment_id, event.sequence) == (None, None)
    assert "sequence" not in json.loads(event.body)["data"]
    [row] = deliveries(services)
    assert (row.payment_id, row.sequence) == (None, None)
