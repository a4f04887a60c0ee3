"""Fake CubePay: signed form calls, the `currency`, `payment`, `payment/coin` and `payment/query`
answers, the success IPN."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from ipn.sandbox import market
from ipn.sandbox.fake import (
    ActionRefused,
    Answer,
    FakeProvider,
    Incoming,
    Refused,
    Route,
    decimal_field,
)
from ipn.sandbox.signing import cubepay_sign, same
from ipn.sandbox.state import FakePayment, OutgoingCallback

CANCELED, INIT, PAYING, PAID, COIN_SENT, COMPLETED, REFUNDING, REFUNDED = -1, 0, 1, 2, 3, 4, 5, 6
STATUS_MESSAGES = {
    CANCELED: "canceled",
    INIT: "unpaid",
    PAYING: "paying",
    PAID: "paid",
    COIN_SENT: "coin sended",
    COMPLETED: "completed",
    REFUNDING: "refunding",
    REFUNDED: "refunded",
}
# "The payment will expire after 6 hours."
LIFETIME = timedelta(hours=6)
# The IPN's fields in the latest doc, in its order; absent ones are sent empty.
IPN_FIELDS = (
    "client_id",
    "source_coin_id",
    "source_amount",
    "item_name",
    "merchant_transaction_id",
    "other",
    "send_coin_id",
    "send_amount",
    "receive_address",
)
SEND_FIELDS = ("send_coin_id", "receive_address", "send_amount")
FIRST_FIAT_ID = 300


class CubePay(FakeProvider):
    name = "cubepay"

    def __init__(self, *args: Any, currency_ids: Mapping[str, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.symbols = {number: code for code, number in currency_ids.items()}

    def routes(self) -> list[Route]:
        return [
            Route("/currency/coin", ("POST",), "cubepay_coins", self.coins),
            Route("/currency/fiat", ("POST",), "cubepay_fiats", self.fiats),
            Route("/payment", ("POST",), "cubepay_payment_page", self.payment_page),
            Route("/payment/coin", ("POST",), "cubepay_create", self.create),
            Route("/payment/query", ("POST",), "cubepay_query", self.query),
        ]

    def error(self, status: int, message: str) -> Answer:
        # [D] The HTTP status repeats the body's code, so a client reading either sees the error.
        return Answer.json(status, {"status": status, "data": message})

    # -- API ----------------------------------------------------------------------------------

    def coins(self, call: Incoming) -> Answer:
        """The coins a payment can be made in (the SDK's `get_coin`)."""
        self._authenticated(call)
        return Answer.json(200, {"status": 200, "data": self._currency_list(coins=True)})

    def fiats(self, call: Incoming) -> Answer:
        """The fiat currencies a list price can be in (the SDK's `get_fiat`)."""
        self._authenticated(call)
        return Answer.json(200, {"status": 200, "data": self._currency_list(coins=False)})

    def payment_page(self, call: Incoming) -> Answer:
        """The hosted page (the SDK's `do_payment`): `data` is its URL. [D] The sandbox's page has
        already chosen the first coin it offers, so the payment exists at once and the control
        API moves it as any other."""
        fields = self._authenticated(call)
        if fields.get("coin_id"):
            raise self.refuse(400, "coin_id is not a field of payment; use payment/coin")
        coins = self._currency_list(coins=True)
        if not coins:
            raise self.refuse(400, "no coin is available")
        created = self._create(call, {**fields, "coin_id": str(coins[0]["id"])})
        return Answer.json(200, {"status": 200, "data": created["pay_url"]})

    def create(self, call: Incoming) -> Answer:
        created = self._create(call, self._authenticated(call))
        return Answer.json(200, {"status": 200, "data": created})

    def _create(self, call: Incoming, fields: dict[str, str]) -> dict[str, Any]:
        """Create the payment and answer its wire view."""
        for name in (
            "coin_id",
            "source_coin_id",
            "source_amount",
            "item_name",
            "merchant_transaction_id",
        ):
            if not fields.get(name):
                raise self.refuse(400, f"{name} is required")
        coin = self._currency(fields["coin_id"], "coin_id", coins_only=True)
        source = self._currency(fields["source_coin_id"], "source_coin_id", coins_only=False)
        source_amount = decimal_field(fields["source_amount"])
        if source_amount is None or source_amount <= 0:
            raise self.refuse(400, "source_amount must be a number greater than 0")
        sending = [name for name in SEND_FIELDS if fields.get(name)]
        if sending and len(sending) != len(SEND_FIELDS):
            raise self.refuse(400, "send_coin_id, receive_address and send_amount go together")
        now = self.clock()
        payment_id = f"C{int(now.timestamp() * 1000):013d}{secrets.randbelow(10**6):06d}"
        payment = FakePayment(
            provider=self.name,
            payment_id=payment_id,
            order_id=fields["merchant_transaction_id"],
            created_at=now,
            expires_at=now + LIFETIME,
            status=INIT,
            amount=source_amount,
            currency=source,
            pay_amount=market.convert(source_amount, source, coin),
            pay_currency=coin,
            address=market.fake_address(coin),
            base_url=call.base_url,
            request=dict(fields),
            updated_at=now,
        )
        with self.ledger.lock:
            self.ledger.add(payment)
            payment.move(INIT, now, "create")
            return self.wire_view(payment, now)

    def query(self, call: Incoming) -> Answer:
        fields = self._authenticated(call)
        payment_id, order_id = fields.get("id"), fields.get("merchant_transaction_id")
        with self.ledger.lock:
            if payment_id:
                payment = self.ledger.get(self.name, payment_id)
            elif order_id:
                payment = self.ledger.by_order(self.name, order_id)
            else:
                raise self.refuse(400, "id or merchant_transaction_id is required")
            if payment is None:
                raise self.refuse(404, "payment not found")
            now = self.clock()
            self.refresh(payment, now)
            return Answer.json(200, {"status": 200, "data": [self.wire_view(payment, now)]})

    def _authenticated(self, call: Incoming) -> dict[str, str]:
        fields = dict(call.form)
        if not same(fields.get("client_id"), self.keys.key_id):
            raise self.refuse(401, "client_id is not valid")
        expected = cubepay_sign(call.form, self.keys.secret)
        if not same(fields.get("sign"), expected, ignore_case=True):
            raise self.refuse(401, "sign is not valid")
        return fields

    def _currency_list(self, *, coins: bool) -> list[dict[str, Any]]:
        listed = []
        for number, code in sorted(self.symbols.items()):
            if not market.known(code) or (number < FIRST_FIAT_ID) != coins:
                continue
            if coins != market.is_coin(code):
                continue
            listed.append({"id": number, "name": market.display_name(code), "symbol": code})
        return listed

    def _currency(self, raw: str, what: str, *, coins_only: bool) -> str:
        code = self.symbols.get(int(raw)) if raw.isdigit() else None
        if code is None or not market.known(code):
            raise Refused(self.error(400, f"{what} {raw} is not a supported currency"))
        if coins_only and (int(raw) >= FIRST_FIAT_ID or not market.is_coin(code)):
            raise Refused(self.error(400, f"{what} {raw} is not a coin"))
        return code

    # -- life ---------------------------------------------------------------------------------

    def is_open(self, payment: FakePayment) -> bool:
        return payment.status in (INIT, PAYING)

    def settle_funds(self, payment: FakePayment, action: str) -> None:
        full = payment.confirmed_amount >= payment.pay_amount
        payment.status = PAID if full and not payment.has_unconfirmed else PAYING

    def expire(self, payment: FakePayment) -> None:
        payment.status = CANCELED

    def cancel(self, payment: FakePayment) -> None:
        if not self.is_open(payment):
            raise ActionRefused(f"status {payment.status} cannot be cancelled")
        payment.status = CANCELED

    def refund(self, payment: FakePayment) -> None:
        if payment.status not in (PAID, COIN_SENT, COMPLETED):
            raise ActionRefused(f"status {payment.status} is not paid")
        # The refund passes through "refunding" on its way, as the provider's own list has it.
        payment.move(REFUNDING, self.clock(), "refund", "refund started")
        payment.status = REFUNDED

    def sends_callback(self, payment: FakePayment, before: int | str, action: str) -> bool:
        # "Only when a payment finishes successfully": no IPN for expiry, cancel, partial, refund.
        return payment.status == PAID and before != PAID

    def build_callback(self, payment: FakePayment, now: datetime) -> OutgoingCallback | None:
        url = payment.request.get("ipn_url")
        if not url:
            return None
        sent = payment.request
        fields = [(name, sent.get(name, "")) for name in IPN_FIELDS]
        fields[0] = ("client_id", self.keys.key_id)
        fields.append(("sign", cubepay_sign(fields, self.keys.secret)))
        return OutgoingCallback(
            kind="ipn",
            url=url,
            body=urlencode(fields).encode("ascii"),
            headers=(("Content-Type", "application/x-www-form-urlencoded"),),
        )

    def wire_view(self, payment: FakePayment, now: datetime) -> dict[str, Any]:
        """The later shape: `pay_info.fee` and a top-level `send_info`."""
        coin = self._coin_view(payment.pay_currency, named=True)
        status = int(payment.status)
        sent = payment.request
        send_info = None
        if sent.get("send_coin_id"):
            send_info = {
                "coin": self._coin_view(self.symbols[int(sent["send_coin_id"])], named=True),
                "address": sent.get("receive_address"),
                "amount": decimal_field(sent.get("send_amount")),
                "txid": None,
            }
        pay_url = f"{payment.base_url}sandbox/payments/cubepay/{payment.payment_id}"
        return {
            "id": payment.payment_id,
            "status": status,
            "status_message": STATUS_MESSAGES.get(status, "unknown"),
            "pay_url": pay_url,
            "pay_info": {
                "coin": coin,
                "address": payment.address,
                "qrcode": market.payment_uri(
                    payment.pay_currency, payment.address, payment.pay_amount
                ),
                "amount": payment.pay_amount,
                "paid_amount": payment.paid_amount,
                "merchant_transaction_id": payment.order_id,
                "item_name": sent.get("item_name", ""),
                "source_coin": self._coin_view(payment.currency, named=False),
                "source_amount": payment.amount,
                "rate": market.rate(payment.pay_currency, payment.currency),
                "fee": {"amount": Decimal(0), "coin": coin},
            },
            "send_info": send_info,
        }

    def _coin_view(self, code: str, *, named: bool) -> dict[str, Any]:
        number = next(n for n, c in self.symbols.items() if c == code)
        view: dict[str, Any] = {"id": number, "symbol": code}
        if named:
            view["name"] = market.display_name(code)
        return view
