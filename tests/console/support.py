"""Data the console tests look at: a payment, a forged callback, a hostile one, an anomaly;
inbox rows in bulk, and an installation with a second shop."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from ipn.anomalies import open_anomaly
from ipn.config import CubePaySettings, Settings
from ipn.processing import process_notification
from ipn.services import Services
from models import AnomalyKind, Notification, NotificationKind, NotificationStatus, Payment, utcnow

from helpers import CUBEPAY_IPN, FORM, JSON, make_payment

SCRIPT = "<script>window.__x=1</script>"
IMG = '"><img src=x onerror="window.__y=1">'
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
EUR_SHOP = "eur-shop"


@dataclass
class Seeded:
    payment: Payment
    forged_id: int
    hostile_id: int
    anomaly_id: int


def with_shops(settings: Settings) -> Settings:
    """An operator with a second CubePay shop beside the environment's `default` account."""
    eur_shop = replace(
        CubePaySettings(client_id="eur-client", client_secret="eur-secret"), account=EUR_SHOP
    )
    return settings.with_changes(accounts={"cubepay": {EUR_SHOP: eur_shop}})


def post_callback(client: FlaskClient, app: Flask, path: str, body: bytes, headers: dict) -> int:
    response = client.post(path, data=body, headers=headers)
    assert (response.status_code, response.get_data()) == (200, b"success")
    notification_id: int = app.extensions["ipn.dispatcher"].submitted[-1]
    return notification_id


def seed(app: Flask, services: Services) -> Seeded:
    """A CubePay payment; the example IPN with one byte changed (rejected as forged once
    processed); a callback whose body and a header carry markup; an open anomaly."""
    client = app.test_client()
    payment = make_payment(
        services.db,
        provider_payment_id="C1536678153791231775",
        callback_token="tok_5f2b9c",
        pay_amount=Decimal("0.01"),
        pay_currency="BTC",
    )
    forged = CUBEPAY_IPN.replace(b"source_amount=500", b"source_amount=501")
    forged_id = post_callback(client, app, "/ipn/cubepay", forged, FORM)
    process_notification(services, forged_id)
    hostile = json.dumps({"order_id": SCRIPT, "note": IMG}).encode()
    hostile_id = post_callback(
        client, app, "/ipn/cryptoprocessing", hostile, {**JSON, "X-Note": IMG + SCRIPT}
    )
    with services.db.transaction() as session:
        anomaly_id = open_anomaly(
            session,
            AnomalyKind.AMOUNT_MISMATCH,
            f"mismatch:{payment.id}",
            {"detail": f"paid 0.009 BTC of 0.01 {SCRIPT}", "expected": "0.01", "paid": "0.009"},
            payment_id=payment.id,
        )
    assert anomaly_id is not None
    return Seeded(payment, forged_id, hostile_id, anomaly_id)


def csrf_token(client: FlaskClient, path: str = "/console/login") -> str:
    match = CSRF.search(client.get(path).get_data(as_text=True))
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def sign_in(client: FlaskClient, token: str = "test-token") -> None:
    response = client.post(
        "/console/login", data={"csrf_token": csrf_token(client), "token": token}
    )
    assert response.status_code == 303, response.get_data(as_text=True)


def notification_row(services: Services, notification_id: int) -> Notification:
    with services.db.sessions() as session:
        row = session.get(Notification, notification_id)
        assert row is not None
        return row


def add_rows(services: Services, count: int, **fields: Any) -> list[int]:
    now = utcnow()
    with services.db.transaction() as session:
        rows = [
            Notification(
                provider=fields.get("provider", "cubepay"),
                kind=NotificationKind.IPN,
                received_at=now - timedelta(minutes=count - i),
                headers={"Content-Type": "text/plain"},
                body=f"row {i}".encode(),
                body_sha256=f"{i:064x}",
                status=fields.get("status", NotificationStatus.PROCESSED),
                payment_id=fields.get("payment_id"),
                account=fields.get("account", "default"),
                verified_by=fields.get("verified_by"),
            )
            for i in range(count)
        ]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def ids_on(page: str) -> list[int]:
    marker = 'href="/console/notifications/'
    found = []
    for part in page.split(marker)[1:]:
        ref = part.split('"', 1)[0]
        if ref.isdigit():
            found.append(int(ref))
    return list(dict.fromkeys(found))
