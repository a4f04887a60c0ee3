"""The console of an operator with several shops: the inbox, the payment list and bulk replay
narrowed to one merchant account; each row and detail page says whose it is, and a
notification which of the account's secrets verified it."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from console.support import EUR_SHOP, add_rows, csrf_token, ids_on, sign_in, with_shops
from ipn.config import Settings
from ipn.console import queries
from ipn.services import Services
from models import NotificationReplay, NotificationStatus

from helpers import make_payment


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return with_shops(settings)


def test_the_inbox_narrows_to_one_account_and_pages_within_it(
    client: FlaskClient, services: Services
) -> None:
    shop = add_rows(services, queries.PAGE_SIZE + 2, account=EUR_SHOP)
    default = add_rows(services, 3)
    sign_in(client)

    everything = client.get("/console/notifications").get_data(as_text=True)
    assert '<select name="account">' in everything and "<th>account</th>" in everything
    assert f'<option value="{EUR_SHOP}">' in everything

    first = client.get(f"/console/notifications?account={EUR_SHOP}").get_data(as_text=True)
    assert ids_on(first) == shop[::-1][: queries.PAGE_SIZE]
    assert f'<option value="{EUR_SHOP}" selected>' in first
    # The older page and the bulk replay form keep the account.
    assert f'<input type="hidden" name="account" value="{EUR_SHOP}">' in first
    cursor = ids_on(first)[-1]
    assert f"before={cursor}" in first and f"account={EUR_SHOP}" in first.split('rel="next"')[1]
    second = client.get(f"/console/notifications?account={EUR_SHOP}&before={cursor}")
    assert ids_on(second.get_data(as_text=True)) == shop[1::-1]

    mine = client.get("/console/notifications?account=default&provider=cubepay")
    assert ids_on(mine.get_data(as_text=True)) == default[::-1]


def test_an_unknown_account_is_refused(client: FlaskClient) -> None:
    sign_in(client)
    for path in (
        "/console/notifications?account=usd-shop",
        "/console/payments?account=usd-shop",
        "/console/notifications/bulk-replay?account=usd-shop",
    ):
        response = client.get(path)
        assert response.status_code == 400, path
        assert "Unknown account &#39;usd-shop&#39;" in response.get_data(as_text=True), path


def test_the_payment_list_narrows_to_one_account(client: FlaskClient, services: Services) -> None:
    # The same order id in both shops: the account is what tells them apart.
    shop = make_payment(services.db, order_id="order-5", account=EUR_SHOP)
    default = make_payment(services.db, order_id="order-5")
    sign_in(client)

    both = client.get("/console/payments").get_data(as_text=True)
    assert shop.id in both and default.id in both and "<th>account</th>" in both
    page = client.get(f"/console/payments?account={EUR_SHOP}").get_data(as_text=True)
    assert shop.id in page and default.id not in page
    found = client.get("/console/payments?account=default&q=order-5").get_data(as_text=True)
    assert default.id in found and shop.id not in found
    none = client.get(f"/console/payments?account={EUR_SHOP}&q=order-6").get_data(as_text=True)
    assert f"No payment of account {EUR_SHOP} has" in none


def test_bulk_replay_by_account_replays_only_that_accounts_rows(
    client: FlaskClient, services: Services
) -> None:
    shop = add_rows(services, 2, status=NotificationStatus.FAILED, account=EUR_SHOP)
    add_rows(services, 3, status=NotificationStatus.FAILED)
    sign_in(client)

    preview = client.get(f"/console/notifications/bulk-replay?account={EUR_SHOP}")
    assert preview.status_code == 200
    text = preview.get_data(as_text=True)
    assert 'id="preview-count">2<' in text
    assert f'<input type="hidden" name="account" value="{EUR_SHOP}">' in text
    done = client.post(
        "/console/notifications/bulk-replay",
        data={"csrf_token": csrf_token(client, "/console/notifications"), "account": EUR_SHOP},
    )
    assert done.status_code == 200
    assert ids_on(done.get_data(as_text=True)) == shop
    with services.db.sessions() as session:
        replayed = session.scalars(select(NotificationReplay.notification_id)).all()
    assert sorted(replayed) == shop


def test_detail_pages_show_the_account_and_the_secret_that_verified(
    client: FlaskClient, services: Services
) -> None:
    payment = make_payment(services.db, account=EUR_SHOP)
    [previous] = add_rows(
        services,
        1,
        account=EUR_SHOP,
        payment_id=payment.id,
        verified_by="previous until 2027-01-31T00:00:00Z",
    )
    [current] = add_rows(services, 1, verified_by="current")
    [unverified] = add_rows(services, 1, status=NotificationStatus.RECEIVED)
    sign_in(client)

    def field(path: str, name: str) -> str:
        page = client.get(path).get_data(as_text=True)
        return page.split(f"<dt>{name}</dt><dd", 1)[1].split("</dd>", 1)[0]

    assert field(f"/console/payments/{payment.id}", "account") == f">{EUR_SHOP}"
    assert field(f"/console/notifications/{previous}", "account") == f">{EUR_SHOP}"
    assert field(f"/console/notifications/{previous}", "signature").endswith(
        ">verified by a previous secret, valid until 2027-01-31 00:00:00 UTC"
    )
    assert field(f"/console/notifications/{current}", "account") == ">default"
    assert field(f"/console/notifications/{current}", "signature").endswith(
        ">verified by the current secret"
    )
    assert "not verified" in field(f"/console/notifications/{unverified}", "signature")
