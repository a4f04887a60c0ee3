"""A payment's own notify_url: checked like any endpoint before anything is sent to the provider,
told of that payment's events only, and signed with IPN_MERCHANT_WEBHOOK_SECRET."""

from __future__ import annotations

from typing import Any

import pytest
import responses
from flask.testing import FlaskClient
from sqlalchemy import select
from standardwebhooks import Webhook
from test_payments import CUBEPAY_ANSWER, CUBEPAY_CREATE, CUBEPAY_QUERY

from events.shop import Shop
from events.test_outbox import move
from ipn.config import Settings
from ipn.events import delivery, signing
from ipn.services import Services
from models import Delivery, Endpoint, EndpointOrigin, MerchantEvent, Payment, PaymentStatus

from conftest import Backend, clean
from helpers import count, make_payment

SECRET = signing.new_secret()


@pytest.fixture
def settings(backend: Backend) -> Settings:
    clean(backend.db)
    return backend.settings(IPN_MERCHANT_WEBHOOK_SECRET=SECRET)


def create(client: FlaskClient, headers: dict[str, str], **fields: Any) -> Any:
    body = {
        "provider": "cubepay",
        "order_id": "order-7",
        "amount": "10.50",
        "currency": "USD",
        "pay_currency": "BTC",
        **fields,
    }
    return client.post("/api/payments", headers=headers, json=body)


def test_a_payment_created_with_a_notify_url_tells_it_its_events(
    client: FlaskClient,
    services: Services,
    api_headers: dict[str, str],
    provider_api: responses.RequestsMock,
) -> None:
    provider_api.post(CUBEPAY_QUERY, json={"status": 404, "data": "not found"})
    provider_api.post(CUBEPAY_CREATE, json=CUBEPAY_ANSWER)
    # The resolver is not asked here: 93.184.215.14 is a public address.
    response = create(client, api_headers, notify_url="https://93.184.215.14/orders/7/paid")
    assert response.status_code == 201, response.get_json()
    payment_id = response.get_json()["id"]
    other = make_payment(services.db, order_id="someone-else")

    with services.db.sessions() as session:
        [endpoint] = session.scalars(select(Endpoint))
    assert (endpoint.origin, endpoint.payment_id, endpoint.secret) == (
        EndpointOrigin.PAYMENT,
        payment_id,
        None,
    )
    move(services, payment_id, PaymentStatus.PAID)
    move(services, other.id, PaymentStatus.PAID)

    with services.db.sessions() as session:
        deliveries = list(session.scalars(select(Delivery).order_by(Delivery.sequence)))
        heard = [
            session.get(MerchantEvent, d.event_id).type.value  # type: ignore[union-attr]
            for d in deliveries
        ]
    assert heard == ["payment.created", "payment.paid"]
    assert {d.payment_id for d in deliveries} == {payment_id}
    shop = Shop(SECRET)
    for row in deliveries:
        delivery.deliver(services, row.id, post=shop)
    assert shop.types == ["payment.created", "payment.paid"]
    # The shop holds IPN_MERCHANT_WEBHOOK_SECRET, and only that verifies.
    Webhook(SECRET).verify(_body(services, shop.ids[0]), shop.headers[0])
    with pytest.raises(Exception, match="signature"):
        Webhook(signing.new_secret()).verify(_body(services, shop.ids[0]), shop.headers[0])


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://shop.example/hook", "https"),
        ("https://127.0.0.1/hook", "127.0.0.1"),
        ("https://10.0.0.1/hook", "10.0.0.1"),
        ("https://", "malformed"),
        (7, "must be a string"),
    ],
)
def test_a_bad_notify_url_is_refused_before_the_provider_is_asked(
    client: FlaskClient,
    services: Services,
    api_headers: dict[str, str],
    provider_api: responses.RequestsMock,
    url: object,
    words: str,
) -> None:
    response = create(client, api_headers, notify_url=url)
    assert response.status_code in (400, 422)
    answer = response.get_json()
    assert answer["field"] == "notify_url"
    assert words in answer["error"]
    assert len(provider_api.calls) == 0
    assert count(services.db, Payment) == 0
    assert count(services.db, Endpoint) == 0


def test_a_notify_url_needs_the_merchant_secret(
    backend: Backend, provider_api: responses.RequestsMock, api_headers: dict[str, str]
) -> None:
    from ipn import create_app

    clean(backend.db)
    app = create_app(backend.settings())
    response = create(app.test_client(), api_headers, notify_url="https://93.184.215.14/hook")
    assert response.status_code == 422
    assert response.get_json()["field"] == "notify_url"
    assert "IPN_MERCHANT_WEBHOOK_SECRET" in response.get_json()["error"]
    assert len(provider_api.calls) == 0
    app.extensions["ipn"].db.engine.dispose()


def _body(services: Services, event_id: str) -> str:
    with services.db.sessions() as session:
        event = session.get(MerchantEvent, event_id)
        assert event is not None
        return event.body
