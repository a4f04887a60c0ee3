"""The API under malformed input: every bad parameter is a 400 that names it (never a 500 or a
silently empty answer), errors under /api/ are JSON, and payments are found by order id too."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from ipn.services import Services

from helpers import make_payment

TOO_BIG = str(2**63)


@pytest.mark.parametrize(
    ("path", "parameter"),
    [
        ("/api/notifications?since=999999d", "since"),
        ("/api/notifications?until=99999999999999999999d", "until"),
        ("/api/notifications?since=0001-01-01T00:00:00%2B05:00", "since"),
        ("/api/notifications?until=9999-12-31T23:59:59-05:00", "until"),
        ("/api/payments?order_id=M1%00x", "order_id"),
        ("/api/payments?cursor=pay_%00", "cursor"),
        ("/api/payments?cursor=not-a-payment-id", "cursor"),
        ("/api/notifications?cursor=abc", "cursor"),
        ("/api/notifications?cursor=%00", "cursor"),
        (f"/api/notifications?cursor={TOO_BIG}", "cursor"),
        ("/api/notifications?cursor=-1", "cursor"),
        ("/api/anomalies?cursor=1.5", "cursor"),
        (f"/api/anomalies?cursor={TOO_BIG}", "cursor"),
        ("/api/anomalies?payment_id=pay_%00", "payment_id"),
        ("/api/payments?limit=%C2%B2", "limit"),
        (f"/api/payments?limit={TOO_BIG}", "limit"),
        ("/api/payments/pay_%00", "payment"),
        ("/api/payments/M1%00x/reconcile", "payment"),
        (f"/api/notifications/{TOO_BIG}", "notification id"),
        ("/api/notifications/%00", "notification id"),
        ("/api/notifications/12%0034", "notification id"),
    ],
)
def test_malformed_parameters_are_400_naming_the_parameter(
    client: FlaskClient, api_headers: dict[str, str], path: str, parameter: str
) -> None:
    method = client.post if path.endswith("/reconcile") else client.get
    response = method(path, headers=api_headers)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.is_json
    assert parameter in response.get_json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "parameter"),
    [
        (f"/api/notifications/{TOO_BIG}/replay", None, "notification id"),
        (f"/api/anomalies/{TOO_BIG}/resolve", {"resolution": "done"}, "anomaly id"),
        ("/api/notifications/replay", {"since": "999999d", "dry_run": True}, "since"),
        ("/api/notifications/replay", {"provider": ["cubepay"], "dry_run": True}, "provider"),
        (
            "/api/notifications/replay",
            {"until": "0001-01-01T00:00:00+05:00", "dry_run": True},
            "until",
        ),
    ],
)
def test_malformed_post_parameters_are_400_naming_the_parameter(
    client: FlaskClient,
    api_headers: dict[str, str],
    path: str,
    body: dict[str, Any] | None,
    parameter: str,
) -> None:
    response = client.post(path, headers=api_headers, json=body)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert parameter in response.get_json()["error"]


def test_a_good_cursor_still_pages(
    client: FlaskClient, services: Services, api_headers: dict[str, str]
) -> None:
    first = make_payment(services.db, order_id="a")
    second = make_payment(services.db, order_id="b")
    response = client.get(f"/api/payments?cursor={first.id}", headers=api_headers)
    assert response.status_code == 200
    assert [item["id"] for item in response.get_json()["items"]] == [second.id]
    assert client.get("/api/notifications?cursor=0", headers=api_headers).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/nothing-here"),
        ("get", "/api/notifications/1/nothing"),
        ("put", "/api/payments"),
    ],
)
def test_errors_under_api_are_json(
    client: FlaskClient, api_headers: dict[str, str], method: str, path: str
) -> None:
    response = getattr(client, method)(path, headers=api_headers)
    assert response.status_code in (404, 405)
    assert response.is_json
    assert response.get_json()["error"]


def test_errors_outside_api_stay_plain_text(client: FlaskClient) -> None:
    response = client.get("/nothing-here")
    assert response.status_code == 404
    assert response.mimetype == "text/plain"


def test_a_payment_is_found_by_its_order_id(
    client: FlaskClient, services: Services, api_headers: dict[str, str]
) -> None:
    payment = make_payment(services.db, provider="cubepay", order_id="shop-42")
    response = client.get("/api/payments/shop-42", headers=api_headers)
    assert response.status_code == 200
    assert response.get_json()["id"] == payment.id
    assert "timeline" in response.get_json()
    assert client.get(f"/api/payments/{payment.id}", headers=api_headers).status_code == 200
    missing = client.get("/api/payments/shop-43", headers=api_headers)
    assert missing.status_code == 404 and "shop-43" in missing.get_json()["error"]


def test_an_order_id_with_slashes_names_its_payment(
    client: FlaskClient, services: Services, api_headers: dict[str, str]
) -> None:
    # BitcoinPaygate's own example reference; a slash in it must not change the route.
    payment = make_payment(services.db, provider="bitcoinpaygate", order_id="2015-03-10/123/1")
    response = client.get("/api/payments/2015-03-10%2F123%2F1", headers=api_headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["id"] == payment.id
    # An order id that ends like the reconcile path is still an order id when asked with GET.
    odd = client.get("/api/payments/a%2Freconcile", headers=api_headers)
    assert odd.status_code == 404 and odd.is_json


def test_an_order_id_used_at_two_providers_is_an_error_naming_both(
    client: FlaskClient, services: Services, api_headers: dict[str, str]
) -> None:
    at_cubepay = make_payment(services.db, provider="cubepay", order_id="shop-42")
    at_cp = make_payment(services.db, provider="cryptoprocessing", order_id="shop-42")
    response = client.get("/api/payments/shop-42", headers=api_headers)
    assert response.status_code == 409
    error = response.get_json()["error"]
    for payment in (at_cubepay, at_cp):
        assert payment.provider in error and payment.id in error


def test_a_401_says_when_the_token_is_not_configured(settings: Any) -> None:
    from ipn import create_app

    app = create_app(settings.with_changes(api_token=None))
    try:
        response = app.test_client().get(
            "/api/payments", headers={"Authorization": "Bearer anything"}
        )
        assert response.status_code == 401
        assert "IPN_API_TOKEN" in response.get_json()["error"]
    finally:
        app.extensions["ipn"].db.engine.dispose()


def test_a_401_with_a_wrong_token_does_not_mention_the_setting(client: FlaskClient) -> None:
    response = client.get("/api/payments", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    assert "IPN_API_TOKEN" not in response.get_json()["error"]
