"""No secret, token or raw body reaches the logs, whatever the path: genuine and forged
callbacks, status queries, creates and the API, with every logger at DEBUG."""

from __future__ import annotations

import logging

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from ipn.processing import run
from ipn.services import Services

from conftest import FAST_ENV, PROVIDER_ENV
from helpers import (
    CUBEPAY_IPN,
    FORM,
    PROVIDER_URL,
    bpg_snapshot,
    cubepay_query_answer,
    make_payment,
)

SECRETS = [
    value
    for name, value in PROVIDER_ENV.items()
    if name.endswith(("SECRET", "SECRET_KEY", "HMAC_KEY", "TOKEN_API_KEY", "API_KEY"))
]
SECRETS += [FAST_ENV["IPN_API_TOKEN"], "tok_5f2b9c"]


def test_no_secret_is_logged(
    client: FlaskClient,
    app: Flask,
    services: Services,
    provider_api: responses.RequestsMock,
    api_headers: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert len(SECRETS) >= 7
    caplog.set_level(logging.DEBUG)
    make_payment(
        services.db, provider_payment_id="C1536678153791231775", callback_token="tok_5f2b9c"
    )
    provider_api.post(f"{PROVIDER_URL}/cubepay/payment/query", body=cubepay_query_answer(2))
    client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM)
    forged = bpg_snapshot("CONFIRMED")
    client.post(
        "/ipn/bitcoinpaygate/notification",
        data=forged,
        headers={"Content-Type": "application/json", "X-BPG-Signature": "00" * 20},
    )
    for notification_id in app.extensions["ipn.dispatcher"].submitted:
        run(services, notification_id, 0)
    provider_api.post(
        f"{PROVIDER_URL}/cryptoprocessing/api/payments/v1/requests",
        status=500,
        body="internal error",
    )
    client.post(
        "/api/payments",
        headers=api_headers,
        json={
            "provider": "cryptoprocessing",
            "order_id": "s-1",
            "amount": "1.00",
            "currency": "EUR",
        },
    )
    client.get("/api/notifications/1", headers=api_headers)
    client.get("/api/payments", headers={"Authorization": "Bearer wrong-token"})
    logged = caplog.text
    assert "cubepay" in logged  # the logs did record these paths
    for secret in SECRETS:
        assert secret not in logged, f"a secret reached the logs: {secret[:3]}..."
    assert CUBEPAY_IPN.decode() not in logged
