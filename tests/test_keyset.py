"""Listings walk the database a page at a time: every row once, in key order, whatever the page
size, whether the query selects the key itself or whole rows."""

from __future__ import annotations

from sqlalchemy import select

from ipn.services import Services
from models import Payment

from helpers import make_payment


def test_every_row_once_in_key_order_across_pages(services: Services) -> None:
    by_order = {f"order-{n}": make_payment(services.db, order_id=f"order-{n}").id for n in range(5)}
    made = sorted(by_order.values())
    for page in (1, 2, 5, 6):
        ids = list(services.db.keyset(select(Payment.id), Payment.id, page))
        rows = [p.id for p in services.db.keyset(select(Payment), Payment.id, page)]
        assert ids == rows == made, page
    only = select(Payment.id).where(Payment.order_id.in_(["order-1", "order-3"]))
    assert list(services.db.keyset(only, Payment.id, 1)) == sorted(
        [by_order["order-1"], by_order["order-3"]]
    )
