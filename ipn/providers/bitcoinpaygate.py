"""BitcoinPaygate v2: reads its HMAC-signed callbacks, asks, creates and resends, maps statuses."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import quote

from ipn.config import BitcoinPaygateSettings
from ipn.errors import (
    ForgedCallback,
    InvalidPaymentRequest,
    MalformedCallback,
    PaymentNotFound,
    ProviderRejected,
    ProviderUnavailable,
    UnstorableValue,
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
    checked_ref,
    checked_snapshot,
    constant_time_equal,
    header,
    loads_json_object,
    parse_time,
    to_decimal,
)
from ipn.providers.http import call_json
from models import AnomalyKind, PaymentStatus

SIGNATURE_HEADER = "X-BPG-Signature"

STATES: Mapping[str, PaymentStatus] = {
    "NEW": PaymentStatus.PENDING,
    "UNDERPAID": PaymentStatus.UNDERPAID,
    "UNCONFIRMED": PaymentStatus.CONFIRMING,
    "CONFIRMED": PaymentStatus.PAID,
    # The older client's enum and API v1.
    "COMPLETED": PaymentStatus.PAID,
    "PAID": PaymentStatus.CONFIRMING,
    "EXPIRED": PaymentStatus.EXPIRED,
    "INVALID": PaymentStatus.FAILED,
}


def anomaly_key(fields: Mapping[str, Any], body: bytes) -> str:
    """One key per unexpected transaction however often it is reported: the payment and the
    first transaction id when the anomaly names both, else the hash of the raw body."""
    payment_id = _text(fields.get("paymentId"))
    transactions = fields.get("btcTransactions")
    first = transactions[0] if isinstance(transactions, list) and transactions else None
    tx_id = _text(first.get("btcTxId")) if isinstance(first, dict) else None
    if payment_id and tx_id:
        return f"bitcoinpaygate:{payment_id}:{tx_id}"
    return f"bitcoinpaygate:sha256:{hashlib.sha256(body).hexdigest()}"


def signature(body: bytes, key: str) -> str:
    """`X-BPG-Signature`: lower-case hex HMAC-SHA1 of the raw body."""
    return hmac.new(key.encode(), body, "sha1").hexdigest()


class BitcoinPaygate(Provider):
    name: ClassVar[str] = "bitcoinpaygate"
    kinds: ClassVar[tuple[str, ...]] = ("notification", "anomaly")
    has_status_api: ClassVar[bool] = True

    settings: BitcoinPaygateSettings
    settings_type = BitcoinPaygateSettings

    # Callbacks ---------------------------------------------------------------------------------

    def _read_callback(self, kind: str, body: bytes, headers: Mapping[str, str]) -> Callback:
        # The signature covers the raw bytes, so it is checked before anything is parsed.
        authenticity = self._check_signature(body, headers)
        fields = loads_json_object(body)
        if kind == "anomaly":
            ref = PaymentRef(
                order_id=_text(fields.get("merchantTransactionId")),
                provider_payment_id=_text(fields.get("paymentId")),
            )
            if not ref:
                raise MalformedCallback("the anomaly names no paymentId or merchantTransactionId")
            return Callback(
                kind=kind, authenticity=authenticity, ref=checked_ref(ref), fields=fields
            )
        snapshot = _snapshot(fields)
        if not snapshot.provider_payment_id:
            raise MalformedCallback("the notification has no paymentId")
        return Callback(
            kind=kind, authenticity=authenticity, ref=snapshot.ref, fields=fields, snapshot=snapshot
        )

    def _check_signature(self, body: bytes, headers: Mapping[str, str]) -> Authenticity:
        key = self.settings.hmac_key
        if not key:
            return Authenticity.UNSIGNED
        given = header(headers, SIGNATURE_HEADER)
        if given is None:
            raise ForgedCallback(f"bitcoinpaygate: no {SIGNATURE_HEADER} while an HMAC key is set")
        if not constant_time_equal(given.strip().lower(), signature(body, key)):
            raise ForgedCallback(f"bitcoinpaygate: {SIGNATURE_HEADER} does not verify")
        return Authenticity.VERIFIED

    # Server to server --------------------------------------------------------------------------

    def fetch_status(self, payment: PaymentRef) -> Snapshot:
        if not payment.provider_payment_id:
            raise PaymentNotFound(
                "bitcoinpaygate: the status API needs the paymentId; "
                f"order {payment.order_id!r} has none"
            )
        answer = self._call("GET", f"v2/payments/{_segment(payment.provider_payment_id)}")
        if not isinstance(answer, dict):
            raise ProviderUnavailable("bitcoinpaygate: the status answer is not a JSON object")
        try:
            snapshot = _snapshot(answer)
        except UnstorableValue as exc:
            # Asking again gives the same answer: permanent, not a provider hiccup.
            raise ProviderRejected(
                f"bitcoinpaygate: the status answer holds what we cannot keep: {exc}"
            ) from None
        except MalformedCallback as exc:
            raise ProviderUnavailable(
                f"bitcoinpaygate: the status answer cannot be read: {exc}"
            ) from None
        if snapshot.provider_payment_id is None:
            return replace(snapshot, provider_payment_id=payment.provider_payment_id)
        return snapshot

    def request_resend(self, payment_id: str) -> bool:
        """Ask for the status notification again: True when scheduled, False when the payment
        is not CONFIRMED yet (the provider's 402)."""
        answer = self._call("GET", f"v2/payments/notify/{_segment(payment_id)}")
        value = answer.get("value") if isinstance(answer, dict) else None
        if value == 200:
            return True
        if value == 402:
            return False
        raise ProviderUnavailable(f"bitcoinpaygate: unexpected answer to a resend: {value!r}")

    def check_request(self, request: PaymentRequest) -> None:
        if not request.amount.is_finite() or request.amount <= 0:
            raise InvalidPaymentRequest("amount", "BitcoinPaygate takes only a positive amount")
        if not request.currency:
            raise InvalidPaymentRequest("currency", "BitcoinPaygate needs an ISO 4217 currency")
        if request.pay_currency and request.pay_currency.upper() != "BTC":
            raise InvalidPaymentRequest("pay_currency", "BitcoinPaygate takes only BTC")
        if not request.order_id:
            raise InvalidPaymentRequest("order_id", "BitcoinPaygate needs a merchant id")

    def create_payment(self, request: PaymentRequest) -> Snapshot:
        self.check_request(request)
        payload = {
            # A string keeps every digit; the API takes a number or a string.
            "amount": format(request.amount, "f"),
            "currency": request.currency,
            "notificationUrl": request.notification_url,
            "message": request.description or f"Order {request.order_id}",
            "merchantTransactionId": request.order_id,
        }
        if request.anomaly_url:
            payload["anomalyNotificationUrl"] = request.anomaly_url
        answer = self._call("POST", "v2/payments/new", attempts=1, operation="create", json=payload)
        if not isinstance(answer, dict) or not _text(answer.get("paymentId")):
            raise ProviderUnavailable("bitcoinpaygate: the create answer has no paymentId")
        try:
            return Snapshot(
                # The create answer has no status: a new payment waits for funds.
                provider_status="NEW",
                order_id=_text(answer.get("merchantTransactionId")) or request.order_id,
                provider_payment_id=_text(answer.get("paymentId")),
                amount=request.amount,
                currency=request.currency,
                pay_amount=to_decimal(answer.get("amount"), "amount"),
                pay_currency="BTC",
                pay_address=_text(answer.get("address")),
                pay_url=_text(answer.get("paymentPageUrl")),
                payment_uri=_text(answer.get("paymentAddress")),
                expires_at=parse_time(answer.get("expirationTime"), "expirationTime"),
            )
        except MalformedCallback as exc:
            raise ProviderUnavailable(
                f"bitcoinpaygate: the create answer cannot be read: {exc}"
            ) from None

    def _call(self, method: str, path: str, *, attempts: int | None = None, **kwargs: Any) -> Any:
        name, secret = self.settings.api_key_name, self.settings.api_key_secret
        if not name or not secret:
            raise ProviderRejected("bitcoinpaygate: the API key name and secret are not configured")
        return call_json(
            self.session,
            method,
            f"{self.settings.api_url.rstrip('/')}/{path}",
            http=self.http,
            provider=self.name,
            attempts=attempts,
            auth=(name, secret),
            **kwargs,
        )

    # Status ------------------------------------------------------------------------------------

    def decide(self, snapshot: Snapshot, payment: PaymentFacts | None, now: datetime) -> Decision:
        status = snapshot.provider_status.strip().upper()
        state = STATES.get(status)
        if state is None:
            return Decision(
                None, note=f"unknown BitcoinPaygate status {snapshot.provider_status!r}"
            )
        if status == "INVALID":
            evidence = {
                "detail": "BitcoinPaygate declared the payment INVALID (an invalid transaction, "
                "the remainder never came, or overpaid in one transaction): failed, for review",
                "status": snapshot.provider_status,
                "paymentId": snapshot.provider_payment_id,
                "merchantTransactionId": snapshot.order_id,
                "paidBtc": _plain(snapshot.paid_amount),
                "amountBtc": _plain(snapshot.pay_amount),
            }
            return Decision(
                state,
                note="BitcoinPaygate declared the payment INVALID",
                anomalies=((AnomalyKind.PROVIDER_FAILURE.value, evidence),),
            )
        return Decision(state)


def _snapshot(data: Mapping[str, Any]) -> Snapshot:
    """A status notification or a status answer: the same full snapshot of one payment."""
    status = data.get("status")
    if not isinstance(status, str) or not status:
        raise MalformedCallback("the payment has no status")
    snapshot = Snapshot(
        provider_status=status,
        order_id=_text(data.get("merchantTransactionId")),
        provider_payment_id=_text(data.get("paymentId")),
        amount=to_decimal(data.get("amount"), "amount"),
        currency=_text(data.get("currency")),
        pay_amount=to_decimal(data.get("amountBtc"), "amountBtc"),
        pay_currency="BTC",
        paid_amount=to_decimal(data.get("paidBtc"), "paidBtc"),
        expires_at=parse_time(data.get("expirationTime"), "expirationTime"),
        as_of=parse_time(data.get("currentTime"), "currentTime"),
    )
    return checked_snapshot(snapshot)


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | str) and str(value):
        return str(value)
    return None


def _plain(value: Any) -> str | None:
    # Evidence is stored as JSON: amounts as exact strings, never floats.
    return None if value is None else str(value)


def _segment(value: str) -> str:
    # An id goes into the path as one segment whatever it holds.
    return quote(value, safe="")
