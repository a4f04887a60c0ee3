"""The delivery log over the API and the CLI: events by filter, one event with its attempts,
redelivery of one or of a filter's events (a dry run changes nothing), and bad input refused."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient

from events.shop import Shop
from events.test_delivery import _deliveries, attempts, event_ids_in_order
from events.test_outbox import add_endpoint, move
from ipn.events import delivery
from ipn.services import Services
from models import DeliveryStatus, PaymentStatus

from helpers import START, make_payment

P = PaymentStatus
D = DeliveryStatus


@pytest.fixture
def told(services: Services) -> tuple[str, list[str]]:
    """A payment that went confirming then paid; the first event delivered after a 500."""
    add_endpoint(services)
    payment = make_payment(services.db)
    move(services, payment.id, P.CONFIRMING)
    move(services, payment.id, P.PAID)
    shop = Shop()
    shop.answers = [500]
    first = _deliveries(services)[0].id
    delivery.deliver(services, first, now=START, post=shop)
    delivery.deliver(services, first, now=START + timedelta(seconds=5), post=shop)
    return payment.id, event_ids_in_order(services)


def test_events_are_listed_by_filter(
    client: FlaskClient, api_headers: dict[str, str], told: tuple[str, list[str]]
) -> None:
    payment_id, (confirming, paid) = told
    answer = client.get("/api/events", headers=api_headers).get_json()
    assert [e["id"] for e in answer["items"]] == [confirming, paid]
    assert answer["next"] is None
    assert answer["items"][0] == {
        "id": confirming,
        "type": "payment.confirming",
        "payment_id": payment_id,
        "anomaly_id": None,
        "sequence": 1,
        "status": "delivered",
        "created_at": "2026-11-21T09:00:00Z",
    }

    def ids(query: str) -> list[str]:
        response = client.get(f"/api/events?{query}", headers=api_headers)
        assert response.status_code == 200, response.get_json()
        return [e["id"] for e in response.get_json()["items"]]

    assert ids("status=pending") == [paid]
    assert ids("type=payment.paid") == [paid]
    assert ids(f"payment_id={payment_id}&status=delivered") == [confirming]
    assert ids("payment_id=pay_none") == []
    assert ids("limit=1") == [confirming]
    assert ids(f"cursor={confirming}") == [paid]


def test_an_event_shows_its_body_deliveries_and_attempts(
    client: FlaskClient, api_headers: dict[str, str], told: tuple[str, list[str]]
) -> None:
    _, (confirming, _) = told
    detail = client.get(f"/api/events/{confirming}", headers=api_headers).get_json()
    assert detail["body"]["type"] == "payment.confirming"
    assert detail["body"]["data"]["sequence"] == 1
    [to] = detail["deliveries"]
    assert (to["status"], to["attempts"], to["next_attempt_at"]) == ("delivered", 2, None)
    assert [(a["status_code"], a["error"]) for a in detail["attempts"]] == [
        (500, "answered 500"),
        (200, None),
    ]
    assert {"at", "endpoint_id", "status_code", "duration_ms", "error"} <= set(
        detail["attempts"][0]
    )


def test_the_payment_timeline_shows_its_events(
    client: FlaskClient, api_headers: dict[str, str], told: tuple[str, list[str]]
) -> None:
    payment_id, (confirming, paid) = told
    detail = client.get(f"/api/payments/{payment_id}", headers=api_headers).get_json()
    assert [(e["id"], e["type"], e["status"]) for e in detail["events"]] == [
        (confirming, "payment.confirming", "delivered"),
        (paid, "payment.paid", "pending"),
    ]
    assert detail["events"][1]["deliveries"][0]["next_attempt_at"] == "2026-11-21T09:00:00Z"


def test_redelivery_of_one_event(
    app: Flask,
    client: FlaskClient,
    api_headers: dict[str, str],
    services: Services,
    told: tuple[str, list[str]],
) -> None:
    _, (confirming, _) = told
    woken = app.extensions["ipn.event_dispatcher"].submitted
    before = len(woken)
    response = client.post(f"/api/events/{confirming}/redeliver", headers=api_headers)
    assert response.status_code == 202
    assert response.get_json() == {"count": 1, "ids": [confirming]}
    first = _deliveries(services)[0]
    assert (first.status, first.attempts) == (D.PENDING, 0)
    assert woken[before:] == [first.id]


def test_bulk_redelivery_with_a_dry_run_first(
    client: FlaskClient,
    api_headers: dict[str, str],
    services: Services,
    told: tuple[str, list[str]],
) -> None:
    _, (confirming, _) = told
    preview = client.post(
        "/api/events/redeliver",
        json={"status": "delivered", "dry_run": True},
        headers=api_headers,
    ).get_json()
    assert preview == {"count": 1, "ids": [confirming], "dry_run": True}
    assert _deliveries(services)[0].status is D.DELIVERED  # nothing changed

    done = client.post(
        "/api/events/redeliver", json={"type": "payment.confirming"}, headers=api_headers
    ).get_json()
    assert done == {"count": 1, "ids": [confirming], "dry_run": False}
    assert _deliveries(services)[0].status is D.PENDING


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("get", "/api/events?type=payment.lost", None, 400, "type must be one of"),
        ("get", "/api/events?status=sent", None, 400, "status must be one of"),
        ("get", "/api/events?since=yesterday", None, 400, "since"),
        ("get", "/api/events?limit=0", None, 400, "limit"),
        ("get", "/api/events/evt_nope", None, 404, "not an event id"),
        ("get", "/api/events/evt_01m8t6bxmgmvvgpmvrsz9frj91", None, 404, "no event"),
        ("post", "/api/events/evt_01m8t6bxmgmvvgpmvrsz9frj91/redeliver", None, 404, "no event"),
        ("post", "/api/events/redeliver", {}, 400, "at least one of"),
        ("post", "/api/events/redeliver", {"status": "failed", "dry_run": "yes"}, 400, "dry_run"),
        ("post", "/api/events/redeliver", [1], 400, "JSON object"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    client: FlaskClient,
    api_headers: dict[str, str],
    services: Services,
    told: tuple[str, list[str]],
    method: str,
    path: str,
    body: object,
    status: int,
    words: str,
) -> None:
    before = [(d.status, d.attempts) for d in _deliveries(services)]
    response = getattr(client, method)(path, json=body, headers=api_headers)
    assert response.status_code == status
    assert words in response.get_json()["error"]
    assert [(d.status, d.attempts) for d in _deliveries(services)] == before


def test_the_delivery_log_needs_the_token(client: FlaskClient) -> None:
    assert client.get("/api/events").status_code == 401
    assert client.post("/api/events/redeliver", json={"status": "failed"}).status_code == 401


def test_cli_lists_shows_and_redelivers(
    app: Flask, services: Services, told: tuple[str, list[str]]
) -> None:
    _, (confirming, paid) = told
    runner = app.test_cli_runner()

    listed = runner.invoke(args=["events", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["id"] for line in listed.output.splitlines()] == [confirming, paid]
    table = runner.invoke(args=["events", "list", "--status", "pending"])
    assert paid in table.output and confirming not in table.output
    assert "(1 shown)" in table.output

    shown = runner.invoke(args=["events", "show", confirming])
    assert shown.exit_code == 0, shown.output
    assert "delivered after 2 attempts" in shown.output
    paid_line = runner.invoke(args=["events", "show", paid]).output
    assert "pending after 0 attempts, next attempt 2026-11-21T09:00:00Z" in paid_line
    assert "500" in shown.output and "answered 500" in shown.output
    as_json = json.loads(runner.invoke(args=["events", "show", confirming, "--json"]).output)
    assert len(as_json["attempts"]) == 2

    dry = runner.invoke(args=["events", "redeliver", "--status", "delivered", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"would redeliver {confirming}" in dry.output
    assert only_status(services, 0) is D.DELIVERED
    done = runner.invoke(args=["events", "redeliver", confirming])
    assert done.exit_code == 0, done.output
    assert "redelivered 1 event" in done.output
    assert only_status(services, 0) is D.PENDING
    assert len(attempts(services)) == 2  # queued again, not yet attempted


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["events", "redeliver"], "at least one of"),
        (["events", "redeliver", "evt_x", "--status", "failed"], "not both"),
        (["events", "redeliver", "evt_missing"], "no event evt_missing"),
        (["events", "show", "evt_missing"], "no event evt_missing"),
        (["events", "list", "--type", "payment.lost"], "payment.lost"),
        (["events", "list", "--since", "yesterday"], "not a time"),
    ],
)
def test_cli_bad_arguments(
    app: Flask, services: Services, told: tuple[str, list[str]], args: list[str], words: str
) -> None:
    before = [(d.status, d.attempts) for d in _deliveries(services)]
    result = app.test_cli_runner().invoke(args=args)
    assert result.exit_code != 0
    assert words in result.output
    assert [(d.status, d.attempts) for d in _deliveries(services)] == before


def only_status(services: Services, index: int) -> DeliveryStatus:
    return _deliveries(services)[index].status
