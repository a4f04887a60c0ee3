"""Fake CryptoProcessing: signed payment-request creation and `payment_request` callbacks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ipn.sandbox import market, wire
from ipn.sandbox.fake import Answer, FakeProvider, Incoming, Refused, Route, decimal_field
from ipn.sandbox.signing import cryptoprocessing_signature, same
from ipn.sandbox.state import FakePayment, OutgoingCallback, Transaction

CREATED, PROCESSING, PAID, FAILED, EXPIRED = "created", "processing", "paid", "failed", "expired"
# [D] Without `payment_currency` the customer would choose; the sandbox picks this for them.
DEFAULT_PAY_CURRENCY = "BTC"
ERROR_CODES = {
    400: "bad_request",
    403: "bad_header_signature",
    404: "not_found",
    429: "too_many_requests",
    500: "internal_error",
}


class CryptoProcessing(FakeProvider):
    name = "cryptoprocessing"
    reports_late_funds = True
    auth_status = 403

    def routes(self) -> list[Route]:
        return [
            Route("/api/payments/v1/requests", ("POST",), "cryptoprocessing_create", self.create)
        ]

    def error(self, status: int, message: str) -> Answer:
        return Answer.json(status, {"error": message, "code": ERROR_CODES.get(status, "error")})

    def unauthorized(self) -> Answer:
        return Answer.json(403, {"error": "Bad key header", "code": "bad_header_key"})

    def callback_url(self) -> str:
        # One callback URL per merchant account.
        return f"{self.receiver_url}/ipn/cryptoprocessing"

    # -- API ----------------------------------------------------------------------------------

    def create(self, call: Incoming) -> Answer:
        if not same(call.header("X-Processing-Key"), self.keys.key_id):
            raise Refused(self.unauthorized())
        expected = cryptoprocessing_signature(call.body, self.keys.secret)
        if not same(call.header("X-Processing-Signature"), expected):
            raise Refused(
                Answer.json(403, {"error": "Bad signature header", "code": "bad_header_signature"})
            )
        try:
            body = wire.loads(call.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise Refused(
                Answer.json(400, {"error": "Bad content format", "code": "bad_content_format"})
            )
        amount = decimal_field(body.get("amount"))
        if amount is None or amount <= 0:
            raise self.refuse(400, "amount must be a positive decimal string")
        currency = self._currency(body.get("currency"), "currency")
        pay_currency = (
            self._currency(body["payment_currency"], "payment_currency")
            if body.get("payment_currency") is not None
            else None
        )
        pay_iso = pay_currency["iso"] if pay_currency else None
        if pay_iso is None:
            pay_iso = currency["iso"] if market.is_coin(currency["iso"]) else DEFAULT_PAY_CURRENCY
        if not market.is_coin(pay_iso):
            raise self.refuse(400, "payment_currency must be a cryptocurrency")
        foreign_id = body.get("foreign_id")
        if not isinstance(foreign_id, str) or not foreign_id:
            raise self.refuse(400, "foreign_id is required")
        now = self.clock()
        expires_at = self._deadline(body, now)
        payment = FakePayment(
            provider=self.name,
            payment_id=market.uuid7(now),
            order_id=foreign_id,
            created_at=now,
            expires_at=expires_at,
            status=CREATED,
            amount=amount,
            currency=currency["iso"],
            pay_amount=market.convert(amount, currency["iso"], pay_iso),
            pay_currency=pay_iso,
            address=market.fake_address(pay_iso),
            base_url=call.base_url,
            request=body,
            extra={
                "currency": currency,
                "pay_currency": {
                    "iso": pay_iso,
                    "network_name": (pay_currency or {}).get("network_name")
                    or market.NETWORKS.get(pay_iso, pay_iso.lower()),
                },
                "address_id": market.uuid7(now),
            },
            updated_at=now,
        )
        with self.ledger.lock:
            if self.ledger.by_order(self.name, foreign_id) is not None:
                raise self.refuse(400, f"foreign_id {foreign_id} is already used")
            self.ledger.add(payment)
            payment.move(CREATED, now, "create")
        data: dict[str, Any] = {
            "id": payment.payment_id,
            "amount": body["amount"] if isinstance(body["amount"], str) else wire.number(amount),
            "currency": currency,
            "status": CREATED,
            "life_time": wire.epoch(expires_at),
        }
        for name in ("end_user_email", "end_user_reference", "description"):
            if name in body:
                data[name] = body[name]
        data["payment_link"] = (
            f"{call.base_url}sandbox/payments/cryptoprocessing/{payment.payment_id}"
        )
        data["foreign_id"] = foreign_id
        for name in ("url_store", "url_success", "url_failed"):
            if name in body:
                data[name] = body[name]
        if pay_currency is not None:
            data["payment_currency"] = pay_currency
        data["address"] = payment.address
        return Answer.json(200, {"data": data})

    def _currency(self, value: Any, what: str) -> dict[str, str]:
        if not isinstance(value, dict) or not isinstance(value.get("iso"), str):
            raise self.refuse(400, f"{what} must be an object with iso")
        if not market.known(value["iso"]):
            raise self.refuse(400, f"{what} {value['iso']} is not supported")
        network = value.get("network_name")
        if network is not None and not isinstance(network, str):
            raise self.refuse(400, f"{what}.network_name must be a string")
        return {key: item for key, item in value.items() if key in ("iso", "network_name")}

    def _deadline(self, body: dict[str, Any], now: datetime) -> datetime:
        duration = body.get("life_time_duration")
        moment = body.get("life_time_date_time", body.get("life_time_datetime"))
        if isinstance(duration, int) and not isinstance(duration, bool) and duration > 0:
            return now + timedelta(seconds=duration)
        if isinstance(moment, int) and not isinstance(moment, bool):
            deadline = datetime.fromtimestamp(moment, UTC)
            if deadline > now:
                return deadline
        raise self.refuse(400, "life_time_duration or a future life_time_date_time is required")

    # -- life ---------------------------------------------------------------------------------

    def is_open(self, payment: FakePayment) -> bool:
        return payment.status in (CREATED, PROCESSING)

    def settle_funds(self, payment: FakePayment, action: str) -> None:
        # Overpayment also ends as paid; the excess is refunded.
        full = payment.confirmed_amount >= payment.pay_amount
        payment.status = PAID if full and not payment.has_unconfirmed else PROCESSING

    def expire(self, payment: FakePayment) -> None:
        # Nothing sent: expired. Too little or unconfirmed: failed (and refunded).
        payment.status = FAILED if payment.paid_amount > 0 else EXPIRED

    def sends_callback(self, payment: FakePayment, before: int | str, action: str) -> bool:
        # On every status change, and as more funds are seen while processing.
        return payment.status != before or action in ("underpay", "overpay", "pay", "confirm")

    def build_callback(self, payment: FakePayment, now: datetime) -> OutgoingCallback | None:
        return self._signed(self._callback_body(payment, payment.paid_amount))

    def late_callback(
        self, payment: FakePayment, funds: Transaction, now: datetime
    ) -> OutgoingCallback | None:
        """[D] The status stays; `received_amount` shows the money that came after the end."""
        return self._signed(self._callback_body(payment, payment.paid_amount + funds.amount))

    def _signed(self, value: Any) -> OutgoingCallback:
        body = wire.dump_bytes(value)
        return OutgoingCallback(
            kind="callback",
            url=self.callback_url(),
            body=body,
            headers=(
                ("Content-Type", "application/json"),
                ("X-Processing-Key", self.keys.key_id),
                ("X-Processing-Signature", cryptoprocessing_signature(body, self.keys.secret)),
            ),
        )

    def _callback_body(self, payment: FakePayment, received: Decimal) -> dict[str, Any]:
        pay_currency = payment.extra["pay_currency"]
        expires = wire.epoch(payment.expires_at)
        return {
            "payment_request_id": payment.payment_id,
            "foreign_id": payment.order_id,
            "type": "payment_request",
            "status": payment.status,
            "end_user_email": payment.request.get("end_user_email"),
            "payment_request_address": {
                "id": payment.extra["address_id"],
                "currency": pay_currency,
                "convert_to": payment.extra["currency"],
                "address": payment.address,
            },
            "payment_request_amount": {
                "currency": payment.extra["currency"],
                "amount": wire.number(payment.amount),
            },
            "currency_sent": {
                "currency": pay_currency,
                "expected_amount": wire.number(payment.pay_amount),
                "received_amount": wire.number(received),
                "remaining_amount": wire.number(max(payment.pay_amount - received, Decimal(0))),
            },
            "fixed_at": wire.epoch(payment.created_at),
            "expires_at": expires,
            "valid_until": expires,
        }

    def wire_view(self, payment: FakePayment, now: datetime) -> dict[str, Any]:
        """No status endpoint exists: the control API shows what the next callback would say."""
        return self._callback_body(payment, payment.paid_amount)
