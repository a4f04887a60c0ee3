"""The sandbox's shop: it takes only events signed with its secret, each webhook-id once, and shows
what it took and refused; on demand it fails or stalls."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from flask.testing import FlaskClient
from standardwebhooks import Webhook
from werkzeug.test import TestResponse

from ipn.config import Settings
from ipn.events.signing import headers, new_secret
from ipn.sandbox import create_app
from ipn.sandbox.profile import SANDBOX_MERCHANT_WEBHOOK_SECRET, merchant_environment

SECRET = SANDBOX_MERCHANT_WEBHOOK_SECRET
EVENTS = "/sandbox/shop/events"


def payment_event(
    kind: str = "payment.paid",
    sequence: int = 3,
    payment_id: str = "pay_1",
    order_id: str = "A1",
    status: str = "paid",
) -> str:
    return json.dumps(
        {
            "type": kind,
            "timestamp": "2026-12-01T12:00:00.000Z",
            "data": {
                "id": payment_id,
                "provider": "cubepay",
                "order_id": order_id,
                "status": status,
                "amount": "10.00",
                "currency": "EUR",
                "sequence": sequence,
            },
        }
    )


def now() -> int:
    return int(time.time())


@pytest.fixture
def client() -> FlaskClient:
    return create_app(Settings.from_env({"DATABASE_URL": "sqlite://"})).test_client()


def post(
    client: FlaskClient,
    body: str,
    webhook_id: str = "msg_1",
    *,
    secrets: tuple[str, ...] = (SECRET,),
    timestamp: int | None = None,
) -> TestResponse:
    signed = headers(secrets, webhook_id, now() if timestamp is None else timestamp, body)
    return client.post(EVENTS, data=body, headers=signed)


def seen(client: FlaskClient) -> dict[str, Any]:
    answer = client.get("/sandbox/shop?format=json")
    assert answer.status_code == 200
    assert answer.content_type == "application/json"
    view: dict[str, Any] = answer.get_json()
    return view


def test_a_signed_event_is_taken_and_shown_on_the_page_and_as_json(client: FlaskClient) -> None:
    answer = post(client, payment_event(), "msg_paid")
    assert answer.status_code == 200
    assert answer.get_json() == {"received": "msg_paid", "repeat": False}

    view = seen(client)
    assert view["events"] == 1 and view["refused"] == []
    [event] = view["received"]
    assert {k: event[k] for k in ("webhook_id", "type", "payment_id", "order_id", "status")} == {
        "webhook_id": "msg_paid",
        "type": "payment.paid",
        "payment_id": "pay_1",
        "order_id": "A1",
        "status": "paid",
    }
    assert event["sequence"] == 3
    assert event["verdict"] == "verified" and not event["repeat"] and not event["out_of_order"]
    assert datetime.fromisoformat(event["received_at"]).tzinfo is not None

    # The same by content negotiation.
    negotiated = client.get("/sandbox/shop", headers={"Accept": "application/json"})
    assert negotiated.get_json()["received"] == view["received"]

    page = client.get("/sandbox/shop")
    assert page.status_code == 200 and page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    for shown in ("payment.paid", "pay_1", "A1", "msg_paid", "verified", event["received_at"]):
        assert shown in text
    assert "<script" not in text and "http" not in text.split("<body>")[0]  # nothing fetched


def test_the_standardwebhooks_librarys_own_signature_is_accepted(client: FlaskClient) -> None:
    body = payment_event()
    moment = datetime.now(UTC)
    signed = {
        "webhook-id": "msg_lib",
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": Webhook(SECRET).sign("msg_lib", moment, body),
    }
    assert client.post(EVENTS, data=body, headers=signed).status_code == 200
    assert [e["webhook_id"] for e in seen(client)["received"]] == ["msg_lib"]


def unverifiable(case: str) -> tuple[dict[str, str], str]:
    """Headers and body that must not pass, signed when the test runs (timestamps expire)."""
    body = payment_event()
    signed = headers([SECRET], "msg_bad", now(), body)
    if case == "wrong secret":
        signed = headers([new_secret()], "msg_bad", now(), body)
    elif case.startswith("no "):
        del signed[f"webhook-{case.removeprefix('no ')}"]
    elif case == "stale":
        signed = headers([SECRET], "msg_bad", now() - 6 * 60, body)
    elif case == "from the future":
        signed = headers([SECRET], "msg_bad", now() + 6 * 60, body)
    elif case == "body changed":
        body = payment_event(sequence=9)
    elif case == "malformed signature":
        signed["webhook-signature"] = "x"
    elif case == "not v1":
        signed["webhook-signature"] = signed["webhook-signature"].replace("v1,", "v2,")
    return signed, body


@pytest.mark.parametrize(
    "case",
    [
        "wrong secret",
        "no signature",
        "no id",
        "no timestamp",
        "stale",
        "from the future",
        "body changed",
        "malformed signature",
        "not v1",
    ],
)
def test_an_unverified_request_is_refused_and_not_taken(client: FlaskClient, case: str) -> None:
    signed, body = unverifiable(case)
    answer = client.post(EVENTS, data=body, headers=signed)
    assert answer.status_code == 400, case
    reason = answer.get_json()["error"]
    assert reason and len(reason) < 80
    view = seen(client)
    assert view["received"] == [] and view["events"] == 0
    [refusal] = view["refused"]
    assert refusal["reason"] == reason and refusal["verdict"] == "refused"
    assert refusal["webhook_id"] == (None if case == "no id" else "msg_bad")
    assert reason in client.get("/sandbox/shop").get_data(as_text=True)
    # The same request, signed as it should be, passes: each case fails only for its own fault.
    assert post(client, payment_event(), "msg_good").status_code == 200


def test_a_stale_timestamp_is_refused_even_when_correctly_signed(client: FlaskClient) -> None:
    answer = post(client, payment_event(), timestamp=now() - 6 * 60)
    assert answer.status_code == 400
    assert "too old" in answer.get_json()["error"]
    # Just inside the five minutes still passes.
    assert post(client, payment_event(), timestamp=now() - 4 * 60).status_code == 200


def test_a_repeated_webhook_id_is_answered_200_and_counted_once(client: FlaskClient) -> None:
    body = payment_event()
    assert post(client, body, "msg_twice").status_code == 200
    again = post(client, body, "msg_twice")
    assert again.status_code == 200 and again.get_json()["repeat"] is True
    assert post(client, payment_event(sequence=4), "msg_other").status_code == 200

    view = seen(client)
    assert view["events"] == 2
    assert [(e["webhook_id"], e["verdict"]) for e in view["received"]] == [
        ("msg_other", "verified"),
        ("msg_twice", "repeat"),
        ("msg_twice", "verified"),
    ]


def test_during_a_rotation_one_valid_signature_among_several_is_enough(
    client: FlaskClient,
) -> None:
    retired = new_secret()
    assert post(client, payment_event(), "msg_rot", secrets=(retired, SECRET)).status_code == 200
    assert post(client, payment_event(), "msg_new", secrets=(SECRET, retired)).status_code == 200
    refused = post(client, payment_event(), "msg_none", secrets=(retired, new_secret()))
    assert refused.status_code == 400
    view = seen(client)
    assert [e["webhook_id"] for e in view["received"]] == ["msg_new", "msg_rot"]
    assert [r["webhook_id"] for r in view["refused"]] == ["msg_none"]


def test_an_event_older_than_the_newest_of_its_payment_is_flagged(client: FlaskClient) -> None:
    post(client, payment_event("payment.paid", 5, status="paid"), "msg_5")
    post(client, payment_event("payment.confirming", 4, status="confirming"), "msg_4")
    post(client, payment_event("payment.created", 1, payment_id="pay_2"), "msg_other_payment")
    anomaly = json.dumps(
        {
            "type": "anomaly.opened",
            "timestamp": "2026-12-01T12:00:00.000Z",
            "data": {
                "id": 77,
                "payment_id": "pay_1",
                "kind": "late",
                "status": "open",
                "sequence": 6,
            },
        }
    )
    post(client, anomaly, "msg_anomaly")
    post(client, payment_event("payment.refunded", 5, status="refunded"), "msg_5_again")

    flags = {e["webhook_id"]: e["out_of_order"] for e in seen(client)["received"]}
    assert flags == {
        "msg_5": False,
        "msg_4": True,
        "msg_other_payment": False,
        "msg_anomaly": False,
        # Behind the anomaly's 6, of the same payment.
        "msg_5_again": True,
    }
    [opened] = [e for e in seen(client)["received"] if e["type"] == "anomaly.opened"]
    assert opened["payment_id"] == "pay_1" and opened["status"] == "open"
    assert "(out of order)" in client.get("/sandbox/shop").get_data(as_text=True)


def test_the_fail_mode_answers_500_n_times_then_takes_the_retry(client: FlaskClient) -> None:
    mode = client.post("/sandbox/shop/mode", json={"mode": "fail", "count": 2})
    assert mode.status_code == 200 and mode.get_json()["mode"]["remaining"] == 2
    body = payment_event()
    # A refused request uses up no failure: only events the shop believes do.
    assert post(client, body, "msg_retry", secrets=(new_secret(),)).status_code == 400
    assert [post(client, body, "msg_retry").status_code for _ in range(3)] == [500, 500, 200]
    assert post(client, body, "msg_retry").get_json()["repeat"] is True

    view = seen(client)
    assert view["events"] == 1 and view["mode"]["mode"] == "ok"
    assert [e["verdict"] for e in view["received"]] == [
        "repeat",
        "verified",
        "failed (500)",
        "failed (500)",
    ]


def test_the_slow_mode_holds_its_answers_then_the_shop_is_quick_again(
    client: FlaskClient,
) -> None:
    mode = client.post("/sandbox/shop/mode", json={"mode": "slow", "count": 1, "seconds": 0.5})
    assert mode.get_json()["mode"] == {"mode": "slow", "remaining": 1, "seconds": "0.5"}
    started = time.monotonic()
    assert post(client, payment_event(), "msg_slow").status_code == 200
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    assert post(client, payment_event(sequence=4), "msg_quick").status_code == 200
    assert time.monotonic() - started < 0.5
    assert seen(client)["events"] == 2


def test_the_mode_ok_ends_a_misbehaviour_and_a_bad_mode_is_refused(client: FlaskClient) -> None:
    client.post("/sandbox/shop/mode", json={"mode": "fail", "count": 5})
    assert client.post("/sandbox/shop/mode", json={"mode": "ok"}).status_code == 200
    assert post(client, payment_event()).status_code == 200
    for bad in ({"mode": "explode"}, {"mode": "fail", "count": 0}, {"mode": "slow", "seconds": -1}):
        answer = client.post("/sandbox/shop/mode", json=bad)
        assert answer.status_code == 400 and answer.get_json()["error"]
    assert client.post("/sandbox/shop/mode", data="{").status_code == 400
    # By default a slow answer comes after the receiver has given up on it.
    slow = client.post("/sandbox/shop/mode", json={"mode": "slow"}).get_json()["mode"]
    assert (
        float(slow["seconds"])
        > Settings.from_env({"DATABASE_URL": "sqlite://"}).events.total_timeout
    )


def test_delete_forgets_everything_and_ends_the_misbehaviour(client: FlaskClient) -> None:
    post(client, payment_event(), "msg_kept")
    post(client, payment_event(), "msg_bad", secrets=(new_secret(),))
    client.post("/sandbox/shop/mode", json={"mode": "fail", "count": 3})
    cleared = client.delete("/sandbox/shop")
    assert cleared.status_code == 200
    view = cleared.get_json()
    assert view["received"] == [] and view["refused"] == [] and view["events"] == 0
    assert view["mode"]["mode"] == "ok"
    # Forgotten: the same webhook-id is a new event again.
    assert post(client, payment_event(), "msg_kept").get_json()["repeat"] is False


def test_the_page_escapes_what_the_events_carry(client: FlaskClient) -> None:
    post(client, payment_event(order_id="<script>alert(1)</script>"))
    text = client.get("/sandbox/shop").get_data(as_text=True)
    assert "<script>alert(1)" not in text and "&lt;script&gt;" in text


def test_the_shop_checks_the_secret_the_receiver_signs_with() -> None:
    mine = new_secret()
    env = {
        "DATABASE_URL": "sqlite://",
        **merchant_environment("http://127.0.0.1:8001"),
        "IPN_MERCHANT_WEBHOOK_SECRET": mine,
    }
    client = create_app(Settings.from_env(env)).test_client()
    assert post(client, payment_event(), "msg_sandbox").status_code == 400
    assert post(client, payment_event(), "msg_mine", secrets=(mine,)).status_code == 200


def test_the_sandbox_settings_send_events_to_the_shop_with_a_valid_secret() -> None:
    env = merchant_environment("http://127.0.0.1:8001/")
    assert env["IPN_MERCHANT_WEBHOOK_URL"] == "http://127.0.0.1:8001/sandbox/shop/events"
    events = Settings.from_env({"DATABASE_URL": "sqlite://", **env}).events
    assert events.webhook_secret == SECRET and events.allow_private
