"""The operator's tools: the `ipn` commands and the API list, show, replay and resolve, refuse bad
input with a clear message, and a dry run changes nothing."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from ipn.processing import process_notification
from ipn.services import Services
from models import AnomalyStatus, EventSource, NotificationStatus, PaymentStatus

from helpers import (
    cryptoprocessing_callback,
    cryptoprocessing_headers,
    events,
    load_payment,
    make_payment,
    notification,
)


def paid_through_callback(client: FlaskClient, app: Flask, services: Services) -> tuple[Any, int]:
    payment = make_payment(
        services.db,
        provider="cryptoprocessing",
        order_id="order_12345",
        amount=Decimal("0.3"),
        currency="ETH",
    )
    body = cryptoprocessing_callback("paid", received="0.0094")
    client.post("/ipn/cryptoprocessing", data=body, headers=cryptoprocessing_headers(body))
    notification_id = app.extensions["ipn.dispatcher"].submitted[-1]
    process_notification(services, notification_id)
    return payment, notification_id


def forged(client: FlaskClient, app: Flask, services: Services) -> int:
    body = cryptoprocessing_callback("paid", received="0.0094")
    headers = cryptoprocessing_headers(body, secret="wrong")
    client.post("/ipn/cryptoprocessing", data=body, headers=headers)
    notification_id = app.extensions["ipn.dispatcher"].submitted[-1]
    process_notification(services, notification_id)
    return notification_id


def ipn(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=list(args))


# --- CLI ------------------------------------------------------------------------------------


def test_notifications_list_prints_every_match_and_json(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    _, good = paid_through_callback(client, app, services)
    bad = forged(client, app, services)
    result = ipn(app, "notifications", "list")
    assert result.exit_code == 0
    assert f"\n{good} " in result.output and f"\n{bad} " in result.output
    assert "(2 shown)" in result.output
    result = ipn(app, "notifications", "list", "--status", "rejected", "--json")
    assert result.exit_code == 0
    [line] = result.output.splitlines()
    item = json.loads(line)
    assert (item["id"], item["status"], item["provider"]) == (bad, "rejected", "cryptoprocessing")
    assert "forged" in item["last_error"]


@pytest.mark.parametrize(
    "args",
    [
        ["notifications", "list", "--status", "bogus"],
        ["notifications", "list", "--provider", "paypal"],
        ["notifications", "list", "--since", "yesterday-ish"],
        ["replay"],
        ["replay", "1", "--provider", "cubepay"],
        ["replay", "not-a-number"],
        ["replay", "999999"],
        ["payments", "show", "no-such-payment"],
        ["anomalies", "resolve", "999999", "--resolution", "done"],
        ["anomalies", "resolve", "1"],
    ],
)
def test_bad_arguments_exit_non_zero_with_one_clear_line(
    app: Flask, services: Services, args: list[str]
) -> None:
    result = ipn(app, *args)
    assert result.exit_code != 0
    assert "Error" in result.output
    assert "Traceback" not in result.output


def test_payments_show_tells_the_whole_timeline(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    payment, notification_id = paid_through_callback(client, app, services)
    result = ipn(app, "payments", "show", "order_12345")
    assert result.exit_code == 0, result.output
    assert "status: paid" in result.output
    assert f"callback #{notification_id}" in result.output
    assert "pending -> paid" in result.output
    detail = json.loads(ipn(app, "payments", "show", payment.id, "--json").output)
    assert detail["status"] == "paid" and detail["amount"] == "0.3"
    [event] = detail["timeline"]
    assert (event["from_status"], event["to_status"], event["source"]) == (
        "pending",
        "paid",
        "callback",
    )
    assert event["notification_id"] == notification_id


def test_order_id_used_at_two_providers_is_an_error_naming_both(
    app: Flask, services: Services
) -> None:
    make_payment(services.db, provider="cubepay", order_id="shared-1")
    make_payment(services.db, provider="coinbarpay", order_id="shared-1")
    result = ipn(app, "payments", "show", "shared-1")
    assert result.exit_code != 0
    assert "cubepay" in result.output and "coinbarpay" in result.output


def test_replay_dry_run_lists_and_changes_nothing(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    _, good = paid_through_callback(client, app, services)
    bad = forged(client, app, services)
    before = notification(services.db, bad)
    result = ipn(app, "replay", "--status", "rejected", "--dry-run")
    assert result.exit_code == 0
    assert f"would replay {bad}" in result.output and f"{good}" not in result.output.split(
        "would replay 1"
    )[0].replace(f"would replay {bad}", "")
    after = notification(services.db, bad)
    assert (after.status, after.attempts, after.replay_mode) == (
        before.status,
        before.attempts,
        None,
    )


def test_replay_of_an_applied_notification_changes_nothing_but_is_recorded(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    payment, notification_id = paid_through_callback(client, app, services)
    result = ipn(app, "replay", str(notification_id))
    assert result.exit_code == 0, result.output
    row = notification(services.db, notification_id)
    assert row.status is NotificationStatus.RECEIVED and row.replay_mode is not None
    process_notification(services, notification_id)
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    _first, replayed = events(services.db, payment.id)
    assert replayed.source is EventSource.REPLAY
    assert replayed.from_status == replayed.to_status == PaymentStatus.PAID
    shown = json.loads(ipn(app, "notifications", "show", str(notification_id), "--json").output)
    assert [r["previous_status"] for r in shown["replays"]] == ["processed"]
    assert shown["headers"]["X-Processing-Key"] == "***"


def test_anomalies_list_and_resolve(client: FlaskClient, app: Flask, services: Services) -> None:
    make_payment(
        services.db,
        provider="cryptoprocessing",
        order_id="order_12345",
        amount=Decimal("0.3"),
        currency="ETH",
    )
    body = cryptoprocessing_callback("restricted")
    client.post("/ipn/cryptoprocessing", data=body, headers=cryptoprocessing_headers(body))
    process_notification(services, app.extensions["ipn.dispatcher"].submitted[-1])
    [line] = ipn(app, "anomalies", "list", "--json").output.splitlines()
    anomaly = json.loads(line)
    assert anomaly["kind"] == "unknown_status" and anomaly["status"] == "open"
    assert (
        ipn(
            app,
            "anomalies",
            "resolve",
            str(anomaly["id"]),
            "--resolution",
            "asked the provider: compliance hold, released",
        ).exit_code
        == 0
    )
    assert ipn(app, "anomalies", "list", "--json").output == ""
    again = ipn(app, "anomalies", "resolve", str(anomaly["id"]), "--resolution", "twice")
    assert again.exit_code != 0 and "already resolved" in again.output


# --- API ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-token"}]
)
def test_api_refuses_without_the_token(client: FlaskClient, headers: dict[str, str]) -> None:
    for path in ("/api/payments", "/api/notifications", "/api/anomalies"):
        assert client.get(path, headers=headers).status_code == 401


def test_api_is_closed_when_no_token_is_configured(settings: Any) -> None:
    from ipn import create_app

    app = create_app(settings.with_changes(api_token=None))
    response = app.test_client().get("/api/payments", headers={"Authorization": "Bearer "})
    assert response.status_code == 401
    app.extensions["ipn"].db.engine.dispose()


def test_api_lists_shows_and_pages(
    client: FlaskClient, app: Flask, services: Services, api_headers: dict[str, str]
) -> None:
    payment, notification_id = paid_through_callback(client, app, services)
    for n in range(3):
        make_payment(services.db, provider="cubepay", order_id=f"extra-{n}")
    page = client.get("/api/payments?limit=2", headers=api_headers).get_json()
    assert len(page["items"]) == 2 and page["next"]
    rest = client.get(
        f"/api/payments?limit=2&cursor={page['next']}", headers=api_headers
    ).get_json()
    assert len(rest["items"]) == 2 and rest["next"] is None
    ids = [p["id"] for p in page["items"] + rest["items"]]
    assert len(set(ids)) == 4
    detail = client.get(f"/api/payments/{payment.id}", headers=api_headers).get_json()
    assert detail["status"] == "paid" and len(detail["timeline"]) == 1
    assert (
        client.get("/api/payments?status=paid", headers=api_headers).get_json()["items"][0]["id"]
        == payment.id
    )
    shown = client.get(f"/api/notifications/{notification_id}", headers=api_headers).get_json()
    assert shown["body"].startswith('{"payment_request_id"')
    assert client.get("/api/payments/nope", headers=api_headers).status_code == 404
    assert client.get("/api/payments?status=bogus", headers=api_headers).status_code == 400
    assert client.get("/api/payments?limit=0", headers=api_headers).status_code == 400


def test_api_bulk_replay_dry_run_and_real(
    client: FlaskClient, app: Flask, services: Services, api_headers: dict[str, str]
) -> None:
    bad = forged(client, app, services)
    sent_before = list(app.extensions["ipn.dispatcher"].submitted)
    response = client.post(
        "/api/notifications/replay",
        headers=api_headers,
        json={"status": "rejected", "dry_run": True},
    )
    assert response.get_json() == {"count": 1, "ids": [bad], "mode": "stored", "dry_run": True}
    assert notification(services.db, bad).status is NotificationStatus.REJECTED
    assert (
        client.post(
            "/api/notifications/replay", headers=api_headers, json={"dry_run": True}
        ).status_code
        == 400
    )
    assert (
        client.post(
            "/api/notifications/replay", headers=api_headers, json={"status": "nope"}
        ).status_code
        == 400
    )
    assert (
        client.post("/api/notifications/replay", headers=api_headers, data="not json").status_code
        == 400
    )
    response = client.post(
        f"/api/notifications/{bad}/replay", headers=api_headers, json={"mode": "refetch"}
    )
    assert response.status_code == 202
    assert notification(services.db, bad).replay_mode is not None
    assert app.extensions["ipn.dispatcher"].submitted == sent_before  # API sends via Celery
    assert client.post("/api/notifications/424242/replay", headers=api_headers).status_code == 404


def test_api_resolves_anomalies(
    client: FlaskClient, app: Flask, services: Services, api_headers: dict[str, str]
) -> None:
    make_payment(
        services.db,
        provider="cryptoprocessing",
        order_id="order_12345",
        amount=Decimal("0.3"),
        currency="ETH",
    )
    body = cryptoprocessing_callback("restricted")
    client.post("/ipn/cryptoprocessing", data=body, headers=cryptoprocessing_headers(body))
    process_notification(services, app.extensions["ipn.dispatcher"].submitted[-1])
    [anomaly] = client.get("/api/anomalies?status=open", headers=api_headers).get_json()["items"]
    assert (
        client.post(
            f"/api/anomalies/{anomaly['id']}/resolve", headers=api_headers, json={"resolution": ""}
        ).status_code
        == 422
    )
    resolved = client.post(
        f"/api/anomalies/{anomaly['id']}/resolve",
        headers=api_headers,
        json={"resolution": "refunded by hand"},
    ).get_json()
    assert resolved["status"] == AnomalyStatus.RESOLVED.value
    assert resolved["resolution"] == "refunded by hand"
    # The payment's timeline says who resolved what, and changes nothing.
    timeline = client.get(f"/api/payments/{anomaly['payment_id']}", headers=api_headers).get_json()[
        "timeline"
    ]
    last = timeline[-1]
    assert (last["source"], last["from_status"], last["to_status"]) == (
        "operator",
        "pending",
        "pending",
    )
    assert last["detail"] == (
        f"anomaly #{anomaly['id']} ({anomaly['kind']}) resolved by api: refunded by hand"
    )


def test_health_and_metrics_need_no_token(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    paid_through_callback(client, app, services)
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.get_json()["checks"]["database"] == "ok"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'ipn_notifications{provider="cryptoprocessing",status="processed"} 1.0' in metrics
    assert 'ipn_payments{provider="cryptoprocessing",status="paid"} 1.0' in metrics


@pytest.mark.parametrize(
    ("header", "masked"),
    [
        ("Authorization", True),
        ("Proxy-Authorization", True),
        ("X-Auth-Token", True),
        ("X-Hub-Signature-256", True),
        ("X-Password", True),
        ("X-Apikey", True),
        ("X-Api-Key", True),
        ("Webhook-Auth", True),
        ("X-Processing-Key", True),
        ("X-Processing-Signature", True),
        ("X-BPG-Signature", True),
        ("X-Client-Secret", True),
        ("X-Access-Token", True),
        ("Content-Type", False),
        ("User-Agent", False),
        ("X-Forwarded-For", False),
        ("Content-Length", False),
    ],
)
def test_header_mask_covers_every_secret_name(
    client: FlaskClient,
    app: Flask,
    services: Services,
    api_headers: dict[str, str],
    header: str,
    masked: bool,
) -> None:
    client.post("/ipn/cubepay", data=b"x=1", headers={header: "s3cr3t-value"})
    [notification_id] = app.extensions["ipn.dispatcher"].submitted
    shown = client.get(f"/api/notifications/{notification_id}", headers=api_headers).get_json()
    [value] = [v for name, v in shown["headers"].items() if name.lower() == header.lower()]
    if header == "Content-Length":
        assert value == "3"
    else:
        assert (value == "***") is masked, value
    # The row keeps the value whole, for replays.
    stored = {
        name.lower(): v for name, v in notification(services.db, notification_id).headers.items()
    }
    assert stored[header.lower()] in ("s3cr3t-value", "3")


def test_metrics_content_type_names_its_charset_once(client: FlaskClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].lower().count("charset") == 1
    assert response.mimetype == "text/plain"
