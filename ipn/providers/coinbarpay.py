"""CoinbarPay: authenticates its backend callbacks, asks its status API, creates payments there."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import quote

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ipn.config import CoinbarPaySettings
from ipn.errors import (
    ConfigurationError,
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
from ipn.providers.http import call_json, message_from
from models import PaymentStatus

STATUS_PATH = "/coinbar/api/v2/pay/gateway/payment/{order_id}/status"
CREATE_PATH = "/coinbar/api/v2/pay/gateway/initiate"

# Headers that may name the service client on a callback; underscore forms are dropped by proxies.
CLIENT_ID_HEADERS = ("CBPAY-API-KEY", "Service-Client-Id")

STATES = {
    "CREATED": PaymentStatus.PENDING,
    "PENDING": PaymentStatus.CONFIRMING,
    "SUCCESS": PaymentStatus.PAID,
    "CANCELED": PaymentStatus.CANCELLED,
    "CANCELLED": PaymentStatus.CANCELLED,
}

# JavaScript prints numbers in positional notation only inside this range; the provider signs
# `JSON.stringify(body)`, so a price outside it (or with more digits than a double keeps) would
# be re-printed differently on its side and fail the signature.
JS_POSITIONAL_MIN = Decimal("1e-6")
JS_POSITIONAL_MAX = Decimal("1e21")

ERROR_LIMIT = 300

_MISSING = object()


def signature(body: bytes, secret: str) -> str:
    """CoinbarPay's `SIGNATURE`: lowercase hex HMAC-SHA256 of the exact body bytes."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def compact_json(obj: Any) -> bytes:
    """`JSON.stringify(obj)` as UTF-8: no spaces, keys in insertion order, non-ASCII unescaped.

    Decimals are written as JSON numbers from their own digits (never through a float), in the
    form JavaScript prints the same value: `Decimal("8.99")` -> `8.99`, `Decimal("1.0")` -> `1`.
    Floats are refused: money is a Decimal from end to end.
    """
    return _compact(obj).encode()


def _compact(value: Any) -> str:
    if isinstance(value, Decimal):
        return _js_number(value)
    if isinstance(value, float):
        raise TypeError(f"compact_json refuses the float {value!r}: use a Decimal")
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"compact_json needs string keys, not {key!r}")
            items.append(json.dumps(key, ensure_ascii=False) + ":" + _compact(item))
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_compact(item) for item in value) + "]"
    # str, int, bool and None print the same in Python's json and in JavaScript.
    return json.dumps(value, ensure_ascii=False)


def _js_number(value: Decimal) -> str:
    if not value.is_finite():
        raise ValueError(f"JSON has no number {value}")
    if value.is_zero():
        return "0"  # JavaScript prints -0 and 0.00 as 0
    text = format(value, "f")  # positional, every digit, no rounding
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def js_number_survives(value: Decimal) -> bool:
    """Whether JavaScript would print `value` back with the same digits `compact_json` writes."""
    if not value.is_finite():
        return False
    magnitude = abs(value)
    if magnitude and not JS_POSITIONAL_MIN <= magnitude < JS_POSITIONAL_MAX:
        return False
    # repr(float) is the shortest string that reads back to the same double, as in JavaScript.
    return Decimal(repr(float(value))) == value


def encrypt_legacy_token(plaintext: bytes, api_key: str, secret: str) -> str:
    """A legacy `responseToken`: base64(base64(AES-256-CBC(plaintext))), PKCS#7 padded."""
    padder = padding.PKCS7(algorithms.AES.block_size).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = _legacy_cipher(api_key, secret).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return base64.b64encode(base64.b64encode(ciphertext)).decode("ascii")


def decrypt_legacy_token(token: str, api_key: str, secret: str) -> bytes:
    """The plaintext of a legacy `responseToken`; ValueError when it does not decode or unpad."""
    try:
        ciphertext = base64.b64decode(base64.b64decode(token, validate=True), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the token is not base64(base64(...))") from None
    if not ciphertext or len(ciphertext) % (algorithms.AES.block_size // 8):
        raise ValueError("the token is not whole AES blocks")
    decryptor = _legacy_cipher(api_key, secret).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(algorithms.AES.block_size).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise ValueError("the token does not decrypt with the configured keys") from None


def _legacy_cipher(api_key: str, secret: str) -> Cipher[modes.CBC]:
    key, iv = api_key.encode(), secret.encode()
    if len(key) != 32 or len(iv) != 16:
        raise ValueError("the legacy token key must be 32 bytes and its IV 16 bytes")
    return Cipher(algorithms.AES(key), modes.CBC(iv))


class CoinbarPay(Provider):
    """CoinbarPay's gateway API (docs.coinbar.io): see ../shared/providers/coinbarpay.md."""

    name: ClassVar[str] = "coinbarpay"
    has_status_api: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("callback",)

    settings: CoinbarPaySettings
    settings_type = CoinbarPaySettings

    # -- callbacks -------------------------------------------------------------------------

    def _read_callback(self, kind: str, body: bytes, headers: Mapping[str, str]) -> Callback:
        client_id, secret = self.settings.service_client_id, self.settings.secret_key
        if not client_id or not secret:
            # Not the sender's fault: the row stays rejected and can be replayed once configured.
            raise MalformedCallback(
                f"{self.name} is not configured: set COINBARPAY_SERVICE_CLIENT_ID and "
                "COINBARPAY_SECRET_KEY, then replay"
            )
        named = [(name, header(headers, name)) for name in CLIENT_ID_HEADERS]
        for name, value in named:
            if value is not None and not constant_time_equal(value, client_id):
                raise ForgedCallback(f"header {name} names another service client")
        given = header(headers, "SIGNATURE")
        if given is not None and not constant_time_equal(
            given.strip().lower(), signature(body, secret)
        ):
            raise ForgedCallback("SIGNATURE does not match the body")
        data = loads_json_object(body)
        if "responseToken" in data:
            names_client = any(value is not None for _, value in named)
            return self._read_legacy(kind, data, names_client)
        self._check_client_id(data, "service_client_id")
        ref = _ref(data)
        snapshot = _snapshot(data) if "status" in data else None
        authenticity = Authenticity.VERIFIED if given is not None else Authenticity.UNSIGNED
        return Callback(kind, authenticity, ref, fields=data, snapshot=snapshot)

    def _read_legacy(self, kind: str, data: dict[str, Any], names_client: bool) -> Callback:
        """The plugins' form: an AES token whose decryption with our keys is the proof."""
        if "serviceClientId" not in data and not names_client:
            raise ForgedCallback("legacy callback names no service client")
        self._check_client_id(data, "serviceClientId")
        api_key, iv = self.settings.token_api_key, self.settings.token_secret
        if not api_key or not iv:
            raise MalformedCallback(
                "legacy responseToken callback, but COINBARPAY_TOKEN_API_KEY and "
                "COINBARPAY_TOKEN_SECRET are not configured; set them, then replay"
            )
        if len(api_key.encode()) != 32 or len(iv.encode()) != 16:
            # Our settings are wrong, not the token: keep the row replayable.
            raise MalformedCallback(
                "COINBARPAY_TOKEN_API_KEY must be 32 bytes and COINBARPAY_TOKEN_SECRET 16 bytes"
            )
        token = data["responseToken"]
        if not isinstance(token, str):
            raise ForgedCallback("responseToken is not a string")
        try:
            payload = loads_json_object(decrypt_legacy_token(token, api_key, iv))
        except (ValueError, MalformedCallback) as exc:
            raise ForgedCallback(f"responseToken rejected: {exc}") from None
        self._check_client_id(payload, "service_client_id")
        ref = _ref(payload)
        snapshot = _snapshot(payload) if "status" in payload else None
        return Callback(kind, Authenticity.VERIFIED, ref, fields=payload, snapshot=snapshot)

    def _check_client_id(self, data: Mapping[str, Any], key: str) -> None:
        if key not in data:
            return
        value = data[key]
        ours = self.settings.service_client_id or ""
        if not isinstance(value, str) or not constant_time_equal(value, ours):
            raise ForgedCallback(f"{key} names another service client")

    # -- server to server ------------------------------------------------------------------

    def fetch_status(self, payment: PaymentRef) -> Snapshot:
        client_id, secret = self._credentials()
        if not payment.order_id:
            raise PaymentNotFound(
                f"{self.name} is asked by our payment_request_id, and this reference has "
                f"only the provider's id {payment.provider_payment_id!r}"
            )
        url = self.settings.api_url + STATUS_PATH.format(order_id=quote(payment.order_id, safe=""))
        headers = {
            "CBPAY-API-KEY": client_id,
            "Content-Type": "application/json",
            "SIGNATURE": signature(self.settings.empty_body_signs.encode(), secret),
        }
        answer = self._call("GET", url, headers=headers)
        self._check_result(answer, required=False)
        try:
            snapshot = _snapshot(answer)
        except UnstorableValue as exc:
            # Asking again gives the same answer: permanent, not a provider hiccup.
            raise ProviderRejected(f"{self.name}: status answer we cannot keep: {exc}") from None
        except MalformedCallback as exc:
            raise ProviderUnavailable(f"{self.name}: status answer not understood: {exc}") from None
        if snapshot.order_id is not None and snapshot.order_id != payment.order_id:
            raise ProviderRejected(
                f"{self.name}: asked about {payment.order_id!r}, answered about "
                f"{snapshot.order_id!r}"
            )
        return snapshot

    def check_request(self, request: PaymentRequest) -> None:
        _check_request(request)

    def create_payment(self, request: PaymentRequest) -> Snapshot:
        client_id, secret = self._credentials()
        email, pay_currency = _check_request(request)
        now = datetime.now(UTC)
        payload = {
            "service_client_id": client_id,
            "payment_request_id": request.order_id,
            "input_coin": request.currency,
            "products": [
                {
                    "product_name": request.description or f"Order #{request.order_id}",
                    "product_price": request.amount,
                    "product_amount": 1,
                    "product_id": request.order_id,
                    "product_type": "ecommerce",
                }
            ],
            "email": email,
            "timestamp": int(now.timestamp() * 1000),
            "destination_coin": pay_currency,
        }
        body = compact_json(payload)
        headers = {
            "CBPAY-API-KEY": client_id,
            "Content-Type": "application/json",
            "SIGNATURE": signature(body, secret),
            "source": "web",
        }
        url = self.settings.api_url + CREATE_PATH
        answer = self._call("POST", url, headers=headers, data=body, attempts=1, operation="create")
        self._check_result(answer, required=True)
        try:
            provider_payment_id = _text(answer.get("payment_id_coinbar"), "payment_id_coinbar")
            if provider_payment_id is None:
                raise MalformedCallback("payment_id_coinbar is missing")
            return Snapshot(
                provider_status="CREATED",
                order_id=request.order_id,
                provider_payment_id=provider_payment_id,
                amount=request.amount,
                currency=request.currency,
                pay_amount=to_decimal(answer.get("destination_amount"), "destination_amount"),
                pay_currency=_text(answer.get("destination_coin"), "destination_coin")
                or pay_currency,
                pay_address=_text(answer.get("destination_address"), "destination_address"),
                payment_uri=_text(answer.get("payment_string"), "payment_string"),
                expires_at=now + self.settings.payment_timeout,
            )
        except MalformedCallback as exc:
            raise ProviderUnavailable(f"{self.name}: create answer not understood: {exc}") from None

    def _credentials(self) -> tuple[str, str]:
        client_id, secret = self.settings.service_client_id, self.settings.secret_key
        if not client_id or not secret:
            raise ConfigurationError(
                f"{self.name} is not configured: set COINBARPAY_SERVICE_CLIENT_ID and "
                "COINBARPAY_SECRET_KEY"
            )
        return client_id, secret

    def _call(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            answer = call_json(
                self.session, method, url, http=self.http, provider=self.name, **kwargs
            )
        except ProviderRejected as exc:
            # call_json keeps only the provider's words of an error answer; the daily rate limit
            # comes with any HTTP status and must be retried later, not treated as final.
            if _rate_limited(str(exc)):
                raise ProviderUnavailable(f"{self.name}: rate limited: {exc}") from None
            raise
        if not isinstance(answer, dict):
            raise ProviderUnavailable(
                f"{self.name}: {method} answered JSON {type(answer).__name__}, not an object"
            )
        return answer

    def _check_result(self, answer: Mapping[str, Any], *, required: bool) -> None:
        """Refuse an answer whose `result` says it failed (or, where required, is missing)."""
        result = answer.get("result", _MISSING)
        if isinstance(result, str) and result == "success":
            return
        if not required and (result is _MISSING or result is True):
            return
        words = message_from(dict(answer))[:ERROR_LIMIT]
        if _rate_limited(words):
            raise ProviderUnavailable(f"{self.name}: rate limited: {words}")
        if "not found" in words.lower():
            raise PaymentNotFound(f"{self.name}: {words}")
        shown = "missing" if result is _MISSING else repr(result)
        raise ProviderRejected(f"{self.name}: result {shown}: {words}")

    # -- our states ------------------------------------------------------------------------

    def decide(self, snapshot: Snapshot, payment: PaymentFacts | None, now: datetime) -> Decision:
        status = snapshot.provider_status.upper()
        if status == "FAILED":
            if payment is not None and payment.status in (
                PaymentStatus.PAID,
                PaymentStatus.REFUNDED,
            ):
                return Decision(
                    PaymentStatus.REFUNDED, "FAILED after SUCCESS: reversed or refunded"
                )
            if snapshot.detail.strip().lower() == "timeout":
                return Decision(PaymentStatus.EXPIRED, "FAILED with Timeout: not paid in time")
            return Decision(PaymentStatus.FAILED, f"FAILED: {snapshot.detail or 'no reason given'}")
        state = STATES.get(status)
        if state is None:
            return Decision(None, f"unknown {self.name} status {snapshot.provider_status!r}")
        return Decision(state)


def _check_request(request: PaymentRequest) -> tuple[str, str]:
    """Refuse what CoinbarPay cannot take before anything is sent; the email and coin it needs."""
    if not request.order_id:
        raise InvalidPaymentRequest("order_id", "is empty")
    amount = request.amount
    if not isinstance(amount, Decimal) or not amount.is_finite() or amount <= 0:
        raise InvalidPaymentRequest("amount", "must be a positive Decimal")
    if not js_number_survives(amount):
        raise InvalidPaymentRequest(
            "amount", "has more digits or range than CoinbarPay's JavaScript numbers keep"
        )
    if not request.currency:
        raise InvalidPaymentRequest("currency", "is empty")
    if not request.customer_email:
        raise InvalidPaymentRequest("customer_email", "CoinbarPay requires the customer's email")
    if not request.pay_currency:
        raise InvalidPaymentRequest(
            "pay_currency", "CoinbarPay requires the coin the customer pays in (BTC, USDT, ...)"
        )
    return request.customer_email, request.pay_currency


def _rate_limited(words: str) -> bool:
    return "rate exceeded" in words.lower()


def _text(value: Any, what: str) -> str | None:
    """An id or code from the wire as text; numbers are accepted as their digits."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise MalformedCallback(f"{what} is not text: {value!r}")


def _ref(data: Mapping[str, Any]) -> PaymentRef:
    ref = PaymentRef(
        order_id=_text(data.get("payment_request_id_client"), "payment_request_id_client")
        or _text(data.get("payment_request_id"), "payment_request_id"),
        provider_payment_id=_text(data.get("payment_id_coinbar"), "payment_id_coinbar"),
    )
    if not ref:
        raise MalformedCallback(
            "names no payment: no payment_request_id_client, payment_request_id or "
            "payment_id_coinbar"
        )
    return checked_ref(ref)


def _snapshot(data: Mapping[str, Any]) -> Snapshot:
    """A status answer (or a callback shaped like one) in our vocabulary."""
    status = data.get("status")
    if not isinstance(status, str) or not status:
        raise MalformedCallback(f"status is missing or not text: {status!r}")
    detail = data.get("payment_detail") or {}
    if not isinstance(detail, Mapping):
        raise MalformedCallback("payment_detail is not an object")
    descr = data.get("status_descr")
    snapshot = Snapshot(
        provider_status=status,
        order_id=_text(data.get("payment_request_id_client"), "payment_request_id_client")
        or _text(data.get("payment_request_id"), "payment_request_id"),
        provider_payment_id=_text(data.get("payment_id_coinbar"), "payment_id_coinbar"),
        amount=to_decimal(detail.get("total_price"), "payment_detail.total_price"),
        currency=_text(data.get("input_coin"), "input_coin"),
        pay_amount=to_decimal(
            detail.get("destination_amount"), "payment_detail.destination_amount"
        ),
        pay_currency=_text(detail.get("destination_coin"), "payment_detail.destination_coin"),
        as_of=parse_time(data.get("update_time"), "update_time"),
        detail=descr if isinstance(descr, str) else "",
    )
    return checked_snapshot(snapshot)
