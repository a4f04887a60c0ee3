"""`/api/endpoints`: registration refuses unsafe URLs storing nothing, the secret is shown once,
changes are checked before any is applied, deleting hides the endpoint and fails what waits for
it, and configured or per-payment endpoints cannot be changed here."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from ipn import create_app
from ipn.config import Settings
from ipn.db import Database
from ipn.serialize import parse_time
from ipn.services import Services
from models import utcnow
from models.event import (
    Delivery,
    DeliveryStatus,
    Endpoint,
    EndpointOrigin,
    EndpointStatus,
    EventType,
    MerchantEvent,
)

from conftest import Backend
from helpers import make_payment

PUBLIC = "93.184.215.14"
REAL_GETADDRINFO = socket.getaddrinfo


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """shop.example is public, internal.example private; other names as the system says."""
    fake = {"shop.example": PUBLIC, "internal.example": "10.20.30.40"}

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in fake:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (fake[host], port))]
        return REAL_GETADDRINFO(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def count(db: Database) -> int:
    with db.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Endpoint)) or 0)


def register(client: FlaskClient, headers: dict[str, str], **body: Any) -> Any:
    response = client.post("/api/endpoints", json=body, headers=headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://shop.example/hook", "https://"),
        ("https://127.0.0.1/x", "private address (127.0.0.1"),
        ("https://10.0.0.1/x", "private address (10.0.0.1)"),
        ("https://[::ffff:10.0.0.1]/", "10.0.0.1"),
        ("https://169.254.169.254/", "169.254.169.254"),
        ("https://internal.example/hook", "10.20.30.40"),
        ("https://localhost/", "loopback"),
        ("https://", "malformed"),
        ("not a url", "malformed"),
        ("https://exa mple.com", "malformed"),
        ("https://user:password@shop.example/", "user name or password"),
        (42, "url must be a string"),
        (None, "url must be a string"),
    ],
)
def test_an_unsafe_url_is_refused_naming_url_and_nothing_is_stored(
    client: FlaskClient, api_headers: dict[str, str], services: Services, url: Any, problem: str
) -> None:
    response = client.post("/api/endpoints", json={"url": url}, headers=api_headers)
    assert response.status_code == 422
    answer = response.get_json()
    assert answer["field"] == "url"
    assert problem in answer["error"]
    assert count(services.db) == 0


def test_registration_answers_the_endpoint_and_its_secret_once(
    client: FlaskClient,
    api_headers: dict[str, str],
    services: Services,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    created = register(
        client,
        api_headers,
        url="https://shop.example/hook?token=shop-side-token",
        events=["payment.paid", "payment.refunded", "payment.paid"],
        description="the shop",
    )
    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert created["id"].startswith("ep_")
    assert created["events"] == ["payment.paid", "payment.refunded"]
    assert (created["status"], created["origin"], created["description"]) == (
        "enabled",
        "api",
        "the shop",
    )
    assert created["created_at"].endswith("Z")
    with services.db.sessions() as session:
        stored = session.get(Endpoint, created["id"])
        assert stored is not None and stored.secret == secret

    shown = client.get(f"/api/endpoints/{created['id']}", headers=api_headers)
    listed = client.get("/api/endpoints", headers=api_headers)
    assert shown.status_code == listed.status_code == 200
    assert "secret" not in shown.get_json()
    assert [item["id"] for item in listed.get_json()["items"]] == [created["id"]]
    for answer in (shown, listed):
        assert secret not in answer.get_data(as_text=True)
    assert secret not in caplog.text
    assert "shop-side-token" not in caplog.text
    assert created["id"] in caplog.text


def test_empty_or_absent_events_mean_all_and_unknown_ones_are_named(
    client: FlaskClient, api_headers: dict[str, str], services: Services
) -> None:
    assert register(client, api_headers, url="https://shop.example/a")["events"] == []
    assert register(client, api_headers, url="https://shop.example/b", events=[])["events"] == []
    for events, named in [
        (["payment.paid", "payment.bogus"], "payment.bogus"),
        ("payment.paid", "list"),
        ([1], "list"),
    ]:
        response = client.post(
            "/api/endpoints",
            json={"url": "https://shop.example/c", "events": events},
            headers=api_headers,
        )
        assert response.status_code == 422
        assert response.get_json()["field"] == "events"
        assert named in response.get_json()["error"]
    bad = client.post(
        "/api/endpoints",
        json={"url": "https://shop.example/c", "description": "x" * 1001},
        headers=api_headers,
    )
    assert (bad.status_code, bad.get_json()["field"]) == (422, "description")
    assert count(services.db) == 2


def test_bodies_that_are_not_a_json_object_and_missing_tokens(
    client: FlaskClient, api_headers: dict[str, str], services: Services
) -> None:
    for raw in (b"not json", b"[1, 2]", b""):
        response = client.post("/api/endpoints", data=raw, headers=api_headers)
        assert response.status_code == 400
        assert response.get_json() == {"error": "the body must be a JSON object"}
    assert client.get("/api/endpoints").status_code == 401
    assert client.post("/api/endpoints", json={"url": "https://shop.example/"}).status_code == 401
    assert count(services.db) == 0


@pytest.fixture
def private_client(settings: Settings, backend: Backend) -> Iterator[FlaskClient]:
    app: Flask = create_app(backend.settings(IPN_MERCHANT_ALLOW_PRIVATE="1"))
    yield app.test_client()
    app.extensions["ipn"].db.engine.dispose()


def test_allow_private_accepts_a_local_plain_http_endpoint(
    private_client: FlaskClient, api_headers: dict[str, str]
) -> None:
    created = register(private_client, api_headers, url="http://127.0.0.1:8123/hook")
    assert created["url"] == "http://127.0.0.1:8123/hook"
    refused = private_client.post(
        "/api/endpoints", json={"url": "ftp://127.0.0.1/"}, headers=api_headers
    )
    assert (refused.status_code, refused.get_json()["field"]) == (422, "url")


def test_patch_checks_every_change_before_applying_any(
    client: FlaskClient, api_headers: dict[str, str]
) -> None:
    created = register(client, api_headers, url="https://shop.example/a", description="before")
    path = f"/api/endpoints/{created['id']}"
    for changes, field in [
        ({"description": "after", "url": "http://shop.example/"}, "url"),
        ({"description": "after", "events": ["nope"]}, "events"),
        ({"description": "after", "status": "paused"}, "status"),
        ({"description": "after", "secret": "whsec_AAAA"}, "secret"),
        ({"description": 7}, "description"),
    ]:
        response = client.patch(path, json=changes, headers=api_headers)
        assert response.status_code == 422, changes
        assert response.get_json()["field"] == field
    assert client.get(path, headers=api_headers).get_json()["description"] == "before"
    assert client.patch(path, data=b"[]", headers=api_headers).status_code == 400

    changed = client.patch(
        path,
        json={"url": "https://shop.example/b", "events": ["anomaly.opened"], "status": "disabled"},
        headers=api_headers,
    )
    assert changed.status_code == 200
    answer = changed.get_json()
    assert (answer["url"], answer["events"], answer["status"]) == (
        "https://shop.example/b",
        ["anomaly.opened"],
        "disabled",
    )
    assert "secret" not in answer


def test_enabling_clears_the_failing_state(
    client: FlaskClient, api_headers: dict[str, str], services: Services
) -> None:
    created = register(client, api_headers, url="https://shop.example/a")
    with services.db.transaction() as session:
        endpoint = session.get(Endpoint, created["id"])
        assert endpoint is not None
        endpoint.status = EndpointStatus.DISABLED
        endpoint.failing_since = utcnow() - timedelta(days=6)
        endpoint.disabled_reason = "failing for 5 days"
    path = f"/api/endpoints/{created['id']}"
    before = client.get(path, headers=api_headers).get_json()
    assert before["failing_since"] is not None
    assert before["disabled_reason"] == "failing for 5 days"
    enabled = client.patch(path, json={"status": "enabled"}, headers=api_headers).get_json()
    assert (enabled["status"], enabled["failing_since"], enabled["disabled_reason"]) == (
        "enabled",
        None,
        None,
    )


def _event_with_deliveries(db: Database, endpoint_id: str) -> tuple[int, int]:
    with db.transaction() as session:
        waiting = MerchantEvent(type=EventType.PAYMENT_PAID, body="{}")
        done = MerchantEvent(type=EventType.PAYMENT_CREATED, body="{}")
        session.add_all([waiting, done])
        session.flush()
        pending = Delivery(event_id=waiting.id, endpoint_id=endpoint_id)
        delivered = Delivery(
            event_id=done.id, endpoint_id=endpoint_id, status=DeliveryStatus.DELIVERED
        )
        session.add_all([pending, delivered])
        session.flush()
        return pending.id, delivered.id


def test_delete_hides_the_endpoint_and_fails_its_pending_deliveries(
    client: FlaskClient, api_headers: dict[str, str], services: Services
) -> None:
    kept = register(client, api_headers, url="https://shop.example/kept")
    gone = register(client, api_headers, url="https://shop.example/gone")
    pending_id, delivered_id = _event_with_deliveries(services.db, gone["id"])
    other_pending, _ = _event_with_deliveries(services.db, kept["id"])
    path = f"/api/endpoints/{gone['id']}"

    response = client.delete(path, headers=api_headers)
    assert (response.status_code, response.get_data()) == (204, b"")

    assert client.get(path, headers=api_headers).status_code == 404
    assert client.patch(path, json={}, headers=api_headers).status_code == 404
    assert client.delete(path, headers=api_headers).status_code == 404
    assert client.post(f"{path}/rotate-secret", headers=api_headers).status_code == 404
    listed = client.get("/api/endpoints", headers=api_headers).get_json()["items"]
    assert [item["id"] for item in listed] == [kept["id"]]
    with services.db.sessions() as session:
        pending = session.get(Delivery, pending_id)
        delivered = session.get(Delivery, delivered_id)
        untouched = session.get(Delivery, other_pending)
        endpoint = session.get(Endpoint, gone["id"])
        assert pending is not None and delivered is not None and untouched is not None
        assert (pending.status, pending.last_error) == (DeliveryStatus.FAILED, "endpoint deleted")
        assert delivered.status is DeliveryStatus.DELIVERED
        assert untouched.status is DeliveryStatus.PENDING
        assert endpoint is not None and endpoint.deleted_at is not None
        assert endpoint.status is EndpointStatus.DISABLED


def test_rotate_secret_shows_the_new_one_once_and_keeps_the_old_one_a_while(
    client: FlaskClient,
    api_headers: dict[str, str],
    services: Services,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    created = register(client, api_headers, url="https://shop.example/a")
    before = utcnow()
    response = client.post(f"/api/endpoints/{created['id']}/rotate-secret", headers=api_headers)
    assert response.status_code == 200
    answer = response.get_json()
    assert set(answer) == {"id", "secret", "previous_secret_valid_until"}
    assert answer["id"] == created["id"]
    assert answer["secret"].startswith("whsec_") and answer["secret"] != created["secret"]
    until = parse_time(answer["previous_secret_valid_until"])
    overlap = services.settings.events.secret_overlap
    assert before + overlap - timedelta(seconds=5) <= until <= utcnow() + overlap
    with services.db.sessions() as session:
        endpoint = session.get(Endpoint, created["id"])
        assert endpoint is not None
        assert (endpoint.secret, endpoint.previous_secret) == (answer["secret"], created["secret"])
    for text in (
        client.get(f"/api/endpoints/{created['id']}", headers=api_headers).get_data(as_text=True),
        client.get("/api/endpoints", headers=api_headers).get_data(as_text=True),
        caplog.text,
    ):
        assert answer["secret"] not in text
        assert created["secret"] not in text


@pytest.mark.parametrize("origin", [EndpointOrigin.ENVIRONMENT, EndpointOrigin.PAYMENT])
def test_configured_and_payment_endpoints_cannot_be_changed_here(
    client: FlaskClient, api_headers: dict[str, str], services: Services, origin: EndpointOrigin
) -> None:
    payment_id = make_payment(services.db).id if origin is EndpointOrigin.PAYMENT else None
    with services.db.transaction() as session:
        endpoint = Endpoint(url="https://shop.example/", origin=origin, payment_id=payment_id)
        session.add(endpoint)
        session.flush()
        endpoint_id = endpoint.id
    path = f"/api/endpoints/{endpoint_id}"
    shown = client.get(path, headers=api_headers)
    assert (shown.status_code, shown.get_json()["origin"]) == (200, origin.value)
    for response in (
        client.patch(path, json={"description": "mine now"}, headers=api_headers),
        client.patch(path, json={"status": "disabled", "events": []}, headers=api_headers),
        client.post(f"{path}/rotate-secret", headers=api_headers),
        client.delete(path, headers=api_headers),
    ):
        assert response.status_code == 409
        assert "error" in response.get_json()
    with services.db.sessions() as session:
        stored = session.get(Endpoint, endpoint_id)
        assert stored is not None
        assert (stored.description, stored.status, stored.deleted_at) == (
            "",
            EndpointStatus.ENABLED,
            None,
        )
    # Switching it off and on is an operator's call, whatever configured it.
    off = client.patch(path, json={"status": "disabled"}, headers=api_headers)
    assert (off.status_code, off.get_json()["status"]) == (200, "disabled")
    on = client.patch(path, json={"status": "enabled"}, headers=api_headers)
    assert (on.status_code, on.get_json()["status"]) == (200, "enabled")


def test_an_unknown_endpoint_is_404(client: FlaskClient, api_headers: dict[str, str]) -> None:
    for response in (
        client.get("/api/endpoints/ep_nope", headers=api_headers),
        client.patch("/api/endpoints/ep_nope", json={}, headers=api_headers),
        client.delete("/api/endpoints/ep_nope", headers=api_headers),
    ):
        assert response.status_code == 404
        assert response.get_json() == {"error": "no endpoint ep_nope"}
