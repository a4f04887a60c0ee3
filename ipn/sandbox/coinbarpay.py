"""Fake CoinbarPay: HMAC-signed JSON calls, the status answer, and the signed backend callback."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from ipn.sandbox import market, wire
from ipn.sandbox.fake import ActionRefused, Answer, FakeProvider, Incoming, Route, decimal_field
from ipn.sandbox.signing import coinbarpay_signature, same
from ipn.sandbox.state import FakePayment, OutgoingCallback

CREATED, PENDING, SUCCESS, FAILED, CANCELED = "CREATED", "PENDING", "SUCCESS", "FAILED", "CANCELED"
TIMEOUT = "Timeout"
# [D] The provider's wording for a reversal is unknown; FAILED after SUCCESS is what counts.
REFUNDED = "Refunded"
# CoinbarPay's amounts run to 18 decimals (more than a double holds).
PLACES = 18
PREFIX = "/coinbar/api/v2/pay/gateway"


class CoinbarPay(FakeProvider):
    name = "coinbarpay"
    rate_limit_message = "Api RATE exceeded"

    def routes(self) -> list[Route]:
        return [
            Route(f"{PREFIX}/initiate", ("POST",), "coinbarpay_initiate", self.initiate),
            Route(
                f"{PREFIX}/payment/<path:payment_request_id>/status",
                ("GET",),
                "coinbarpay_status",
                self.status,
            ),
        ]

    def error(self, status: int, message: str) -> Answer:
        return Answer.json(status, {"result": False, "error": message})

    def callback_url(self) -> str:
        # BE_URL_CALLBACK: one per merchant account, set in the dashboard.
        return f"{self.receiver_url}/ipn/coinbarpay"

    # -- API ----------------------------------------------------------------------------------

    def initiate(self, call: Incoming) -> Answer:
        self._authenticate(call, call.body)
        try:
            body = wire.loads(call.body)
        except ValueError:
            raise self.refuse(400, "Malformed JSON body") from None
        if not isinstance(body, dict):
            raise self.refuse(400, "Expected a JSON object")
        if body.get("service_client_id") != self.keys.key_id:
            raise self.refuse(401, "service_client_id does not match CBPAY-API-KEY")
        for name in ("payment_request_id", "input_coin", "email", "destination_coin"):
            if not isinstance(body.get(name), str) or not body[name]:
                raise self.refuse(400, f"{name} is required")
        input_coin, coin = body["input_coin"], body["destination_coin"]
        if not market.is_fiat(input_coin):
            raise self.refuse(400, f"input_coin {input_coin} is not supported")
        if not market.is_coin(coin):
            raise self.refuse(400, f"destination_coin {coin} is not supported")
        total = self._total(body.get("products"))
        order_id = body["payment_request_id"]
        now = self.clock()
        change = market.rate(coin, input_coin)
        amount = market.divide_up(total, change, PLACES)
        payment = FakePayment(
            provider=self.name,
            payment_id=str(uuid.uuid4()),
            order_id=order_id,
            created_at=now,
            expires_at=now + self.timings.coinbarpay_timeout,
            status=CREATED,
            amount=total,
            currency=input_coin,
            pay_amount=amount,
            pay_currency=coin,
            address=market.fake_address(coin),
            places=PLACES,
            base_url=call.base_url,
            request=body,
            extra={"request_token": secrets.token_urlsafe(24), "coin_change": change},
            updated_at=now,
        )
        with self.ledger.lock:
            if self.ledger.by_order(self.name, order_id) is not None:
                raise self.refuse(400, f"payment_request_id {order_id} already exists")
            self.ledger.add(payment)
            payment.move(CREATED, now, "create")
        return Answer.json(
            200,
            {
                "result": "success",
                "request_token": payment.extra["request_token"],
                "payment_id_coinbar": payment.payment_id,
                "payment_total_price": total,
                "trade_pair": f"{coin}/{input_coin}",
                "payment_string": market.payment_uri(coin, payment.address, amount),
                "destination_coin_change": change,
                "destination_amount": amount,
                "destination_address": payment.address,
                "destination_memo": None,
            },
        )

    def status(self, call: Incoming) -> Answer:
        # A GET has no body; the signature covers `{}` ([D]), or the empty string.
        if not self._signed_by_us(call, b"{}"):
            self._authenticate(call, b"")
        with self.ledger.lock:
            payment = self.ledger.by_order(self.name, call.args["payment_request_id"])
            if payment is None:
                raise self.refuse(404, "Payment not found")
            now = self.clock()
            self.refresh(payment, now)
            return Answer.json(200, self.wire_view(payment, now))

    def _signed_by_us(self, call: Incoming, signed: bytes) -> bool:
        return same(call.header("CBPAY-API-KEY"), self.keys.key_id) and same(
            call.header("SIGNATURE"), coinbarpay_signature(signed, self.keys.secret)
        )

    def _authenticate(self, call: Incoming, signed: bytes) -> None:
        if not same(call.header("CBPAY-API-KEY"), self.keys.key_id):
            raise self.refuse(401, "Invalid CBPAY-API-KEY")
        if not same(call.header("SIGNATURE"), coinbarpay_signature(signed, self.keys.secret)):
            raise self.refuse(401, "Invalid SIGNATURE")

    def _total(self, products: Any) -> Decimal:
        if not isinstance(products, list) or not products:
            raise self.refuse(400, "products must be a non-empty list")
        total = Decimal(0)
        for product in products:
            if not isinstance(product, dict):
                raise self.refuse(400, "each product is an object")
            price = decimal_field(product.get("product_price"))
            count = product.get("product_amount")
            if price is None or price <= 0:
                raise self.refuse(400, "product_price must be a number greater than 0")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise self.refuse(400, "product_amount must be a whole number from 1")
            if not isinstance(product.get("product_name"), str):
                raise self.refuse(400, "product_name is required")
            total += price * count
        return total

    # -- life ---------------------------------------------------------------------------------

    def is_open(self, payment: FakePayment) -> bool:
        return payment.status in (CREATED, PENDING)

    def settle_funds(self, payment: FakePayment, action: str) -> None:
        full = payment.confirmed_amount >= payment.pay_amount
        payment.status = SUCCESS if full and not payment.has_unconfirmed else PENDING

    def expire(self, payment: FakePayment) -> None:
        # A partial payment is refunded automatically; the request ends as a timeout.
        payment.status, payment.status_descr = FAILED, TIMEOUT

    def cancel(self, payment: FakePayment) -> None:
        if not self.is_open(payment):
            raise ActionRefused(f"a {payment.status} payment cannot be cancelled")
        payment.status = CANCELED

    def refund(self, payment: FakePayment) -> None:
        if payment.status != SUCCESS:
            raise ActionRefused(f"a {payment.status} payment has nothing to refund")
        payment.status, payment.status_descr = FAILED, REFUNDED

    def sends_callback(self, payment: FakePayment, before: int | str, action: str) -> bool:
        # "Once the payment is executed, canceled, or times out"; a refund is not among them.
        if payment.status == before:
            return False
        return payment.status in (SUCCESS, CANCELED) or (
            payment.status == FAILED and payment.status_descr == TIMEOUT
        )

    def build_callback(self, payment: FakePayment, now: datetime) -> OutgoingCallback | None:
        """The current form: JSON like the status answer, plus the plugin payload's extras."""
        view = self.wire_view(payment, now)
        detail = dict(view["payment_detail"])
        if payment.status == SUCCESS:
            detail["transaction_id"] = str(uuid.uuid4()).upper()
            detail["timestamp"] = wire.iso(payment.updated_at or now, millis=True)
        sent = payment.request
        body: dict[str, Any] = {
            "result": "success",
            "payment_id_coinbar": view["payment_id_coinbar"],
            "payment_request_id_client": view["payment_request_id_client"],
            "service_client_id": view["service_client_id"],
            "customer": {"email": sent.get("email")},
            "products": sent.get("products", []),
            "input_coin": view["input_coin"],
            "status": view["status"],
        }
        if "status_descr" in view:
            body["status_descr"] = view["status_descr"]
        body["payment_detail"] = detail
        body["creation_time"] = view["creation_time"]
        body["update_time"] = view["update_time"]
        raw = wire.dump_bytes(body)
        return OutgoingCallback(
            kind="callback",
            url=self.callback_url(),
            body=raw,
            headers=(
                ("Content-Type", "application/json"),
                ("CBPAY-API-KEY", self.keys.key_id),
                ("SIGNATURE", coinbarpay_signature(raw, self.keys.secret)),
            ),
        )

    def wire_view(self, payment: FakePayment, now: datetime) -> dict[str, Any]:
        view: dict[str, Any] = {
            "payment_id_coinbar": payment.payment_id,
            "payment_request_id_client": payment.order_id,
            "service_client_id": self.keys.key_id,
            "status": payment.status,
            "payment_detail": {
                "destination_coin": payment.pay_currency,
                "trade_pair": f"{payment.pay_currency}/{payment.currency}",
                "destination_amount": payment.pay_amount,
                "coin_change": payment.extra["coin_change"],
                "total_price": payment.amount,
            },
            "input_coin": payment.currency,
            "creation_time": wire.iso(payment.created_at, millis=True),
            "update_time": wire.iso(payment.updated_at or payment.created_at, millis=True),
        }
        if payment.status_descr:
            view["status_descr"] = payment.status_descr
        return view
