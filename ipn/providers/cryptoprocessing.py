"""CryptoProcessing: authenticates its payment-request callbacks and creates payment requests."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

from ipn.config import CryptoProcessingSettings
from ipn.errors import (
    ConfigurationError,
    ForgedCallback,
    InvalidPaymentRequest,
    MalformedCallback,
    ProviderUnavailable,
)
from ipn.providers.base import (
    Authenticity,
    Callback,
    Decision,
    PaymentFacts,
    PaymentRef,
    PaymentRequest,
    Provider,
    Snapshot,
    checked_snapshot,
    constant_time_equal,
    header,
    loads_json_object,
    parse_time,
    to_decimal,
)
from ipn.providers.http import call_json
from models import PaymentStatus

CREATE_PATH = "/api/payments/v1/requests"

HANDLED_TYPE = "payment_request"

STATES = {
    "created": PaymentStatus.PENDING,
    "processing": PaymentStatus.CONFIRMING,
    "paid": PaymentStatus.PAID,
    "failed": PaymentStatus.FAILED,
    "expired": PaymentStatus.EXPIRED,
}


def signature(body: bytes, secret: str) -> str:
    """CryptoProcessing's `X-Processing-Signature`: lowercase hex HMAC-SHA512 of the body bytes."""
    return hmac.new(secret.encode(), body, hashlib.sha512).hexdigest()


class CryptoProcessing(Provider):
    """CryptoProcessing by CoinsPaid: see ../shared/providers/cryptoprocessing.md.

    It has no status API for payment requests: a verified callback is the only evidence.
    """

    name: ClassVar[str] = "cryptoprocessing"
    has_status_api: ClassVar[bool] = False
    kinds: ClassVar[tuple[str, ...]] = ("callback",)

    settings: CryptoProcessingSettings
    settings_type = CryptoProcessingSettings

    def _read_callback(self, kind: str, body: bytes, headers: Mapping[str, str]) -> Callback:
        api_key, secret = self.settings.api_key, self.settings.secret
        if not api_key or not secret:
            # Not the sender's fault: the row stays rejected and can be replayed once configured.
            raise MalformedCallback(
                f"{self.name} is not configured: set CRYPTOPROCESSING_API_KEY and "
                "CRYPTOPROCESSING_SECRET, then replay"
            )
        # Both headers are always sent, so a missing one is as good as a wrong one.
        given_key = header(headers, "X-Processing-Key")
        if given_key is None:
            raise ForgedCallback("no X-Processing-Key header")
        if not constant_time_equal(given_key, api_key):
            raise ForgedCallback("X-Processing-Key is not ours")
        given = header(headers, "X-Processing-Signature")
        if given is None:
            raise ForgedCallback("no X-Processing-Signature header")
        if not constant_time_equal(given.strip().lower(), signature(body, secret)):
            raise ForgedCallback("X-Processing-Signature does not match the body")
        data = loads_json_object(body)
        kind_of = data.get("type")
        if kind_of != HANDLED_TYPE:
            # Deposits, withdrawals, exchanges and invoices share the URL; their ids are not
            # payment-request ids, so they name no payment of ours.
            return Callback(
                kind,
                Authenticity.VERIFIED,
                PaymentRef(),
                fields=data,
                handled=False,
                reason=f"callbacks of type {kind_of!r} are not handled",
            )
        snapshot = _snapshot(data)
        if not snapshot.ref:
            raise MalformedCallback("names no payment: no foreign_id or payment_request_id")
        return Callback(kind, Authenticity.VERIFIED, snapshot.ref, fields=data, snapshot=snapshot)

    def create_payment(self, request: PaymentRequest) -> Snapshot:
        api_key, secret = self.settings.api_key, self.settings.secret
        if not api_key or not secret:
            raise ConfigurationError(
                f"{self.name} is not configured: set CRYPTOPROCESSING_API_KEY and "
                "CRYPTOPROCESSING_SECRET"
            )
        payload = self._create_body(request)
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Processing-Key": api_key,
            "X-Processing-Signature": signature(body, secret),
        }
        answer = call_json(
            self.session,
            "POST",
            self.settings.api_url + CREATE_PATH,
            http=self.http,
            provider=self.name,
            operation="create",
            attempts=1,
            headers=headers,
            data=body,
        )
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"{self.name}: create answer has no `data` object")
        try:
            return _created(data, request)
        except MalformedCallback as exc:
            raise ProviderUnavailable(f"{self.name}: create answer not understood: {exc}") from None

    def _create_body(self, request: PaymentRequest) -> dict[str, Any]:
        """The request body, refusing what CryptoProcessing cannot take before anything is sent."""
        if not request.order_id:
            raise InvalidPaymentRequest("order_id", "is empty")
        amount = request.amount
        if not isinstance(amount, Decimal) or not amount.is_finite() or amount <= 0:
            raise InvalidPaymentRequest("amount", "must be a positive Decimal")
        if not request.currency:
            raise InvalidPaymentRequest("currency", "is empty")
        life_time = int(self.settings.life_time.total_seconds())
        if life_time <= 0:
            raise ConfigurationError("CRYPTOPROCESSING_LIFE_TIME_SECONDS must be positive")
        payload: dict[str, Any] = {
            "amount": format(amount, "f"),
            "currency": {"iso": request.currency},
            "life_time_duration": life_time,
        }
        if request.pay_currency:
            payload["payment_currency"] = {"iso": request.pay_currency}
        if request.customer_email:
            payload["end_user_email"] = request.customer_email
        if request.description:
            payload["description"] = request.description
        payload["foreign_id"] = request.order_id
        return payload

    def decide(self, snapshot: Snapshot, payment: PaymentFacts | None, now: datetime) -> Decision:
        status = snapshot.provider_status.lower()
        state = STATES.get(status)
        if state is None:
            return Decision(None, f"unknown {self.name} status {snapshot.provider_status!r}")
        received, expected = snapshot.paid_amount, snapshot.pay_amount
        if state in (PaymentStatus.FAILED, PaymentStatus.EXPIRED) and payment is not None:
            older = _before_full_money(received, payment)
            if older:
                return Decision(state, older=older)
        if state is PaymentStatus.EXPIRED and received is not None and received > 0:
            # `expired` means nothing arrived in time: money on it now arrived after the end.
            evidence = {
                "detail": f"{received} {snapshot.pay_currency or ''} received on a payment request "
                "the provider reports expired: late payment, for review",
                "received_amount": str(received),
                "pay_currency": snapshot.pay_currency,
            }
            return Decision(
                state, f"{received} received after expiry", (("late_payment", evidence),)
            )
        if state is PaymentStatus.CONFIRMING:
            if received is not None and expected is not None and 0 < received < expected:
                return Decision(
                    PaymentStatus.UNDERPAID, f"received {received} of {expected} expected"
                )
        return Decision(state)


def _before_full_money(received: Decimal | None, payment: PaymentFacts) -> str:
    """Callbacks carry no time to order them by. `failed` and `expired` mean too little arrived
    in time, so one showing less than the full amount already seen on the payment (a `paid`,
    even one refused for its currency) was sent before that money: it arrives late."""
    held, full = payment.paid_amount, payment.pay_amount
    if held is None or full is None or held < full or (received or 0) >= held:
        return ""
    shown, seen = (format(value.normalize(), "f") for value in (received or Decimal(0), held))
    return f"older callback: it shows {shown} received, the full {seen} was already seen"


def _snapshot(data: Mapping[str, Any]) -> Snapshot:
    """A payment-request callback in our vocabulary."""
    status = data.get("status")
    if not isinstance(status, str) or not status:
        raise MalformedCallback(f"status is missing or not text: {status!r}")
    asked = _object(data, "payment_request_amount")
    sent = _object(data, "currency_sent")
    address = _object(data, "payment_request_address")
    snapshot = Snapshot(
        provider_status=status,
        order_id=_text(data.get("foreign_id"), "foreign_id"),
        provider_payment_id=_text(data.get("payment_request_id"), "payment_request_id"),
        amount=to_decimal(asked.get("amount"), "payment_request_amount.amount"),
        currency=_iso(asked.get("currency"), "payment_request_amount.currency"),
        pay_amount=to_decimal(sent.get("expected_amount"), "currency_sent.expected_amount"),
        pay_currency=_iso(sent.get("currency"), "currency_sent.currency"),
        paid_amount=to_decimal(sent.get("received_amount"), "currency_sent.received_amount"),
        pay_address=_text(address.get("address"), "payment_request_address.address"),
        expires_at=_epoch(data.get("expires_at"), "expires_at"),
    )
    return checked_snapshot(snapshot)


def _created(data: Mapping[str, Any], request: PaymentRequest) -> Snapshot:
    """The create answer's `data`, with the request filling what the answer leaves out."""
    provider_payment_id = _text(data.get("id"), "id")
    if provider_payment_id is None:
        raise MalformedCallback("id is missing")
    status = data.get("status") or "created"
    if not isinstance(status, str):
        raise MalformedCallback(f"status is not text: {status!r}")
    # The documented answer has none of these; later API versions may fill them in.
    sent = _object(data, "currency_sent")
    address = _object(data, "payment_request_address")
    return Snapshot(
        provider_status=status,
        order_id=_text(data.get("foreign_id"), "foreign_id") or request.order_id,
        provider_payment_id=provider_payment_id,
        amount=_either(to_decimal(data.get("amount"), "amount"), request.amount),
        currency=_iso(data.get("currency"), "currency") or request.currency,
        pay_amount=to_decimal(sent.get("expected_amount"), "currency_sent.expected_amount"),
        pay_currency=_iso(sent.get("currency"), "currency_sent.currency") or request.pay_currency,
        pay_address=_text(address.get("address"), "payment_request_address.address"),
        pay_url=_text(data.get("payment_link"), "payment_link"),
        expires_at=_epoch(data.get("life_time"), "life_time"),
    )


def _either(value: Decimal | None, fallback: Decimal) -> Decimal:
    return fallback if value is None else value


def _object(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MalformedCallback(f"{key} is not an object")
    return value


def _text(value: Any, what: str) -> str | None:
    """An id or code from the wire as text; numbers are accepted as their digits."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise MalformedCallback(f"{what} is not text: {value!r}")


def _iso(value: Any, what: str) -> str | None:
    """A currency as CryptoProcessing writes it: `{"iso": "BTC", ...}` (or a bare code)."""
    if isinstance(value, Mapping):
        return _text(value.get("iso"), f"{what}.iso")
    return _text(value, what)


def _epoch(value: Any, what: str) -> datetime | None:
    """Epoch seconds, as a number or as digits in a string."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    return parse_time(value, what)
