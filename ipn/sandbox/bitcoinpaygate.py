"""Fake BitcoinPaygate v2: Basic-auth JSON API, status snapshots, signed notifications."""

from __future__ import annotations

import base64
import binascii
import secrets
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from typing import Any
from urllib.parse import quote

from ipn.sandbox import market, wire
from ipn.sandbox.fake import (
    ActionRefused,
    Answer,
    FakeProvider,
    Incoming,
    Refused,
    Route,
    decimal_field,
)
from ipn.sandbox.signing import bitcoinpaygate_signature, same
from ipn.sandbox.state import FakePayment, OutgoingCallback, Transaction

NEW, UNDERPAID, UNCONFIRMED, CONFIRMED = "NEW", "UNDERPAID", "UNCONFIRMED", "CONFIRMED"
EXPIRED, INVALID = "EXPIRED", "INVALID"
OPEN = (NEW, UNDERPAID, UNCONFIRMED)
FIAT_PLACES = Decimal("0.01")
LABEL = "BitcoinPaygate sandbox"


class BitcoinPaygate(FakeProvider):
    name = "bitcoinpaygate"
    reports_late_funds = True

    def routes(self) -> list[Route]:
        # The docs name the paths `/v2/...`; the official client puts them under `.../api/v2/`.
        routes = []
        for prefix, suffix in (("", ""), ("/api", "_api")):
            routes += [
                Route(
                    f"{prefix}/v2/payments/new",
                    ("POST",),
                    f"bitcoinpaygate_create{suffix}",
                    self.create,
                ),
                Route(
                    f"{prefix}/v2/payments/notify/<payment_id>",
                    ("GET",),
                    f"bitcoinpaygate_resend{suffix}",
                    self.resend,
                ),
                Route(
                    f"{prefix}/v2/payments/<payment_id>",
                    ("GET",),
                    f"bitcoinpaygate_status{suffix}",
                    self.status,
                ),
            ]
        return routes

    def error(self, status: int, *messages: str) -> Answer:
        headers = (("WWW-Authenticate", 'Basic realm="bitcoinpaygate"'),) if status == 401 else ()
        return Answer.json(status, [{"message": message} for message in messages], *headers)

    # -- API ----------------------------------------------------------------------------------

    def create(self, call: Incoming) -> Answer:
        self._authenticate(call)
        try:
            body = wire.loads(call.body)
        except ValueError:
            raise self.refuse(400, "Malformed JSON") from None
        if not isinstance(body, dict):
            raise self.refuse(400, "Expected a JSON object")
        problems = []
        amount = decimal_field(body.get("amount"))
        if amount is None or amount <= 0:
            problems.append("amount must be a number greater than 0")
        currency = body.get("currency")
        if not isinstance(currency, str) or not market.is_fiat(currency):
            problems.append(f"currency {currency!r} is not a supported ISO 4217 currency")
        for name in ("notificationUrl", "message", "merchantTransactionId"):
            if not isinstance(body.get(name), str) or not body[name]:
                problems.append(f"{name} is required")
        anomaly_url = body.get("anomalyNotificationUrl")
        if anomaly_url is not None and not isinstance(anomaly_url, str):
            problems.append("anomalyNotificationUrl must be a URL")
        if problems or amount is None or not isinstance(currency, str):
            raise Refused(self.error(400, *problems))
        now = self.clock()
        amount = amount.quantize(FIAT_PLACES)
        payment = FakePayment(
            provider=self.name,
            payment_id=secrets.token_hex(20),
            order_id=body["merchantTransactionId"],
            created_at=now,
            expires_at=now + self.timings.bitcoinpaygate_expiry,
            status=NEW,
            amount=amount,
            currency=currency,
            pay_amount=market.convert(amount, currency, "BTC"),
            pay_currency="BTC",
            address=market.fake_address("BTC"),
            base_url=call.base_url,
            request=body,
            updated_at=now,
        )
        with self.ledger.lock:
            self.ledger.add(payment)
            payment.move(NEW, now, "create")
        uri = (
            f"{market.payment_uri('BTC', payment.address, payment.pay_amount)}"
            f"&label={quote(LABEL)}&message={quote(body['message'])}"
        )
        return Answer.json(
            200,
            {
                "paymentId": payment.payment_id,
                "amount": payment.pay_amount,
                "address": payment.address,
                "label": LABEL,
                "message": body["message"],
                "paymentAddress": uri,
                "expirationTime": wire.iso(payment.expires_at),
                "exchangeRate": market.rate("BTC", currency),
                "merchantTransactionId": payment.order_id,
                "paymentPageUrl": (
                    f"{call.base_url}sandbox/payments/bitcoinpaygate/{payment.payment_id}"
                ),
            },
        )

    def status(self, call: Incoming) -> Answer:
        self._authenticate(call)
        with self.ledger.lock:
            payment = self._payment(call.args["payment_id"])
            return Answer.json(200, self.wire_view(payment, self.clock()))

    def resend(self, call: Incoming) -> Answer:
        """Schedule the notification again; only a CONFIRMED payment gets one (else 402)."""
        self._authenticate(call)
        with self.ledger.lock:
            payment = self._payment(call.args["payment_id"])
            if payment.status != CONFIRMED:
                return Answer.json(200, {"value": 402})
            callback = self.build_callback(payment, self.clock())
        if callback is not None:
            self.courier.send_later(payment, callback)
        return Answer.json(200, {"value": 200})

    def _payment(self, payment_id: str) -> FakePayment:
        payment = self.ledger.get(self.name, payment_id)
        if payment is None:
            raise self.refuse(404, f"Payment {payment_id} not found")
        self.refresh(payment, self.clock())
        return payment

    def _authenticate(self, call: Incoming) -> None:
        given = call.basic_auth or _basic_auth(call.header("Authorization"))
        if given is None:
            raise self.refuse(401, "Authentication required")
        name, secret = given
        if not (same(name, self.keys.key_id) & same(secret, self.keys.secret)):
            raise self.refuse(401, "Invalid API key")

    # -- life ---------------------------------------------------------------------------------

    def is_open(self, payment: FakePayment) -> bool:
        return payment.status in OPEN

    def settle_funds(self, payment: FakePayment, action: str) -> None:
        if action == "overpay":
            # "INVALID: ... or overpaid in one transaction."
            payment.status = INVALID
        elif payment.paid_amount < payment.pay_amount:
            payment.status = UNDERPAID
        elif payment.has_unconfirmed:
            payment.status = UNCONFIRMED
        else:
            payment.status = CONFIRMED

    def expire(self, payment: FakePayment) -> None:
        if payment.status == NEW:
            payment.status = EXPIRED
        elif payment.status == UNDERPAID:
            # "INVALID: ... remainder never came."
            payment.status = INVALID
        else:
            raise ActionRefused("the right amount arrived and waits for confirmations")

    def sends_callback(self, payment: FakePayment, before: int | str, action: str) -> bool:
        return payment.status != before  # on every status change

    def build_callback(self, payment: FakePayment, now: datetime) -> OutgoingCallback | None:
        return self._signed(
            "notification", payment.request.get("notificationUrl"), self.wire_view(payment, now)
        )

    def late_callback(
        self, payment: FakePayment, funds: Transaction, now: datetime
    ) -> OutgoingCallback | None:
        """The anomaly notification: the payment stays as it was, the funds are reported."""
        return self._signed(
            "anomaly",
            payment.request.get("anomalyNotificationUrl"),
            {
                "paymentId": payment.payment_id,
                "merchantTransactionId": payment.order_id,
                "currency": payment.currency,
                "fiatAmount": payment.amount,
                "paidBtc": funds.amount,
                "paidAmount": self._fiat(payment, funds.amount),
                "btcTransactions": [self._transaction(funds)],
                "currentTime": wire.iso(now, millis=True),
                "notificationType": "ANOMALY",
            },
        )

    def _signed(self, kind: str, url: Any, value: Any) -> OutgoingCallback | None:
        if not isinstance(url, str) or not url:
            return None
        body = wire.dump_bytes(value)
        headers = [("Content-Type", "application/json")]
        if self.keys.hmac_key:
            headers.append(("X-BPG-Signature", bitcoinpaygate_signature(body, self.keys.hmac_key)))
        return OutgoingCallback(kind, url, body, tuple(headers))

    def wire_view(self, payment: FakePayment, now: datetime) -> dict[str, Any]:
        paid_btc = payment.paid_amount
        paid = self._fiat(payment, paid_btc)
        return {
            "paymentId": payment.payment_id,
            "amount": payment.amount,
            "amountBtc": payment.pay_amount,
            "currency": payment.currency,
            "status": payment.status,
            "remainingToPayBtc": max(payment.pay_amount - paid_btc, Decimal(0)),
            "remainingToPay": max(payment.amount - paid, Decimal(0)),
            "paid": paid,
            "paidBtc": paid_btc,
            "paymentTime": wire.iso(payment.paid_at) if payment.paid_at else None,
            "expirationTime": wire.iso(payment.expires_at),
            # Milliseconds, so that two snapshots taken in one second still order.
            "currentTime": wire.iso(now, millis=True),
            "merchantTransactionId": payment.order_id,
            "notificationUrl": payment.request.get("notificationUrl"),
            "message": payment.request.get("message"),
            "btcTransactions": [
                self._transaction(funds) for funds in payment.transactions if not funds.late
            ],
            "notificationType": "REGULAR",
        }

    @staticmethod
    def _fiat(payment: FakePayment, btc: Decimal) -> Decimal:
        """The fiat value of `btc`; the exact price when exactly the asked BTC was paid."""
        if btc == payment.pay_amount:
            return payment.amount
        value = btc * market.rate("BTC", payment.currency)
        return value.quantize(FIAT_PLACES, rounding=ROUND_DOWN)

    @staticmethod
    def _transaction(funds: Transaction) -> dict[str, Any]:
        return {
            "btcTxId": funds.txid,
            "btcAmount": funds.amount,
            "time": wire.iso(funds.at, millis=True),
        }


def _basic_auth(value: str | None) -> tuple[str, str] | None:
    if not value or not value.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(value[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, colon, secret = decoded.partition(":")
    return (name, secret) if colon else None
