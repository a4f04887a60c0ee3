"""CubePay: reads its signed IPNs, queries and creates its payments, and maps its status codes."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from ipn.config import CubePaySettings
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
    to_decimal,
)
from ipn.providers.http import MESSAGE_LIMIT, call_json, message_from
from models import PaymentStatus

# "The payment will expire after 6 hours." (payment/coin); the answers carry no expiry time.
PAYMENT_LIFETIME = timedelta(hours=6)

# The `status` codes of a CubePay payment (payment/query).
CANCELED, INIT, PAYING, PAID, COIN_SENT, COMPLETED, REFUNDING, REFUNDED = range(-1, 7)

_INTEGER = re.compile(r"-?[0-9]+")


def sign(fields: Mapping[str, str], secret: str) -> str:
    """CubePay's `sign`: SHA-256 of the sorted `k=v` pairs (raw values, `sign` itself left out)
    followed by `&client_secret=<secret>`, as upper-case hex."""
    pairs = "&".join(f"{name}={fields[name]}" for name in sorted(fields) if name != "sign")
    return hashlib.sha256(f"{pairs}&client_secret={secret}".encode()).hexdigest().upper()


class CubePay(Provider):
    name: ClassVar[str] = "cubepay"
    kinds: ClassVar[tuple[str, ...]] = ("ipn",)
    has_status_api: ClassVar[bool] = True

    settings: CubePaySettings
    settings_type = CubePaySettings

    # Callbacks ---------------------------------------------------------------------------------

    def _read_callback(self, kind: str, body: bytes, headers: Mapping[str, str]) -> Callback:
        fields, values = _read_ipn(body, header(headers, "Content-Type"))
        ref = _ipn_ref(values)
        self._check_client_id(fields)
        return Callback(
            kind=kind,
            authenticity=self._check_sign(fields),
            ref=ref,
            fields=fields,
            # Kept as received: an empty `other` must not pass for "no token echoed".
            token=fields.get("other"),
        )

    def _check_client_id(self, fields: Mapping[str, str]) -> None:
        ours = self.settings.client_id
        if not ours:
            raise ForgedCallback("cubepay: no client id is configured to check the IPN against")
        given = fields.get("client_id")
        if given is None:
            raise ForgedCallback("cubepay: the IPN has no client_id")
        if not constant_time_equal(given, ours):
            raise ForgedCallback("cubepay: the IPN's client_id is not ours")

    def _check_sign(self, fields: Mapping[str, str]) -> Authenticity:
        given = fields.get("sign")
        if given is None:
            return Authenticity.UNSIGNED
        secret = self.settings.client_secret
        if not secret:
            raise ForgedCallback("cubepay: the IPN is signed but no client secret is configured")
        if not constant_time_equal(given.upper(), sign(fields, secret)):
            raise ForgedCallback("cubepay: the IPN's sign does not verify")
        return Authenticity.VERIFIED

    # Server to server --------------------------------------------------------------------------

    def fetch_status(self, payment: PaymentRef) -> Snapshot:
        # The CubePay id names one record; a merchant id names the last of possibly several.
        if payment.provider_payment_id:
            query = {"id": payment.provider_payment_id}
        elif payment.order_id:
            query = {"merchant_transaction_id": payment.order_id}
        else:
            raise PaymentNotFound("cubepay: payment/query needs the CubePay id or our order id")
        answer = self._post("payment/query", query, attempts=None)
        data = _unwrap(answer, "payment/query", creating=False)
        records = data if isinstance(data, list) else [data]
        if data is None or not records:
            raise PaymentNotFound("cubepay: payment/query answered no payment")
        if not all(isinstance(record, dict) for record in records):
            raise ProviderUnavailable("cubepay: payment/query answered data that is not a payment")
        wanted = payment.provider_payment_id
        matching = [record for record in records if wanted and record.get("id") == wanted]
        return self._snapshot(matching[0] if matching else records[-1], "payment/query")

    def check_request(self, request: PaymentRequest) -> None:
        self._currency_id(request.pay_currency, "pay_currency")
        self._currency_id(request.currency, "currency")
        if not request.amount.is_finite() or request.amount <= 0:
            raise InvalidPaymentRequest("amount", "CubePay takes only a positive amount")
        if not request.order_id:
            raise InvalidPaymentRequest("order_id", "CubePay needs a merchant transaction id")

    def create_payment(self, request: PaymentRequest) -> Snapshot:
        self.check_request(request)
        coin_id = self._currency_id(request.pay_currency, "pay_currency")
        source_coin_id = self._currency_id(request.currency, "currency")
        fields = {
            "coin_id": str(coin_id),
            "source_coin_id": str(source_coin_id),
            # Formatted once: the same string goes on the wire and into the sign.
            "source_amount": format(request.amount, "f"),
            "item_name": request.description or f"Order {request.order_id}",
            "merchant_transaction_id": request.order_id,
            "other": request.callback_token or "",
            "ipn_url": request.notification_url or "",
        }
        # An empty optional field is left out rather than signed empty.
        answer = self._post(
            "payment/coin",
            {k: v for k, v in fields.items() if v},
            attempts=1,
            operation="create",
        )
        data = _unwrap(answer, "payment/coin", creating=True)
        if isinstance(data, list) and data:
            data = data[-1]
        if not isinstance(data, dict):
            raise ProviderUnavailable("cubepay: payment/coin answered data that is not a payment")
        snapshot = self._snapshot(data, "payment/coin")
        return replace(
            snapshot,
            order_id=snapshot.order_id or request.order_id,
            amount=snapshot.amount if snapshot.amount is not None else request.amount,
            currency=snapshot.currency or request.currency,
            expires_at=datetime.now(UTC) + PAYMENT_LIFETIME,
        )

    def _currency_id(self, code: str | None, field: str) -> int:
        if not code:
            raise InvalidPaymentRequest(field, "CubePay needs a currency here")
        number = self.settings.currency_ids.get(code.upper())
        if number is None:
            raise InvalidPaymentRequest(
                field, f"CubePay has no currency id for {code!r} (see CUBEPAY_CURRENCY_IDS)"
            )
        return number

    def _post(
        self,
        path: str,
        fields: Mapping[str, str],
        *,
        attempts: int | None,
        operation: str = "status",
    ) -> Any:
        client_id, secret = self.settings.client_id, self.settings.client_secret
        if not client_id or not secret:
            raise ProviderRejected("cubepay: the client id and client secret are not configured")
        form = {**fields, "client_id": client_id}
        form["sign"] = sign(form, secret)
        return call_json(
            self.session,
            "POST",
            f"{self.settings.api_url.rstrip('/')}/{path}",
            http=self.http,
            provider=self.name,
            operation=operation,
            attempts=attempts,
            data=form,
        )

    def _snapshot(self, record: Mapping[str, Any], what: str) -> Snapshot:
        """One payment object of a create or query answer; both revisions of its shape."""
        try:
            pay_info = _object(record.get("pay_info"), "pay_info")
            status = record.get("status")
            if status is None:
                raise MalformedCallback("the payment has no status")
            code = _code(status)
            snapshot = Snapshot(
                # An unknown status is kept as sent so that it is recorded and flagged.
                provider_status=str(code) if code is not None else str(status),
                order_id=_text(pay_info.get("merchant_transaction_id")),
                provider_payment_id=_text(record.get("id")),
                amount=to_decimal(pay_info.get("source_amount"), "pay_info.source_amount"),
                currency=self._symbol(pay_info, "source_coin"),
                pay_amount=to_decimal(pay_info.get("amount"), "pay_info.amount"),
                pay_currency=self._symbol(pay_info, "coin"),
                paid_amount=to_decimal(pay_info.get("paid_amount"), "pay_info.paid_amount"),
                pay_address=_text(pay_info.get("address")),
                pay_url=_text(record.get("pay_url")),
                detail=_text(record.get("status_message")) or "",
            )
            return checked_snapshot(snapshot)
        except UnstorableValue as exc:
            # Asking again gives the same answer: permanent, not a provider hiccup.
            raise ProviderRejected(f"cubepay: {what} answered what we cannot keep: {exc}") from None
        except MalformedCallback as exc:
            raise ProviderUnavailable(
                f"cubepay: {what} answered a payment we cannot read: {exc}"
            ) from None

    def _symbol(self, pay_info: Mapping[str, Any], key: str) -> str | None:
        """A coin's symbol, else the code our settings give its id."""
        coin = _object(pay_info.get(key), f"pay_info.{key}")
        symbol = _text(coin.get("symbol"))
        if symbol:
            return symbol
        number = _code(coin.get("id", pay_info.get(f"{key}_id")))
        return next((c for c, n in self.settings.currency_ids.items() if n == number), None)

    # Status ------------------------------------------------------------------------------------

    def decide(self, snapshot: Snapshot, payment: PaymentFacts | None, now: datetime) -> Decision:
        code = _code(snapshot.provider_status)
        paid = snapshot.paid_amount
        expected = snapshot.pay_amount
        if expected is None and payment is not None:
            expected = payment.pay_amount
        if code == CANCELED:
            # CubePay reports an expired payment as canceled; only its age tells them apart.
            if payment is not None and now >= _aware(payment.created_at) + PAYMENT_LIFETIME:
                return Decision(PaymentStatus.EXPIRED, note="canceled after its 6 h lifetime")
            return Decision(PaymentStatus.CANCELLED)
        if code == INIT:
            return Decision(PaymentStatus.PENDING)
        if code == PAYING:
            if paid is not None and expected is not None and 0 < paid < expected:
                return Decision(PaymentStatus.UNDERPAID, note=f"paid {paid} of {expected}")
            return Decision(PaymentStatus.CONFIRMING)
        if code in (PAID, COIN_SENT, COMPLETED):
            # Without a paid amount the provider's word that it is paid is all there is.
            if paid is not None and expected is not None and paid < expected:
                return Decision(PaymentStatus.UNDERPAID, note=f"paid {paid} of {expected}")
            return Decision(PaymentStatus.PAID)
        if code == REFUNDING:
            return Decision(PaymentStatus.PAID, note="refund in progress")
        if code == REFUNDED:
            return Decision(PaymentStatus.REFUNDED)
        return Decision(None, note=f"unknown CubePay status {snapshot.provider_status!r}")


# The IPN -------------------------------------------------------------------------------------


class _Number(str):
    """A JSON number kept as the characters the provider wrote, so it signs as it was sent."""

    __slots__ = ()


def _read_ipn(body: bytes, content_type: str | None) -> tuple[dict[str, str], Mapping[str, Any]]:
    """The IPN's fields as the strings its sign covers, and the values to find the payment in."""
    if "json" in (content_type or "").lower() or body.lstrip()[:1] in (b"{", b"["):
        values = _read_json(body)
        try:
            fields = {name: _form_value(value) for name, value in values.items()}
        except RecursionError:
            raise MalformedCallback("body is nested too deeply") from None
        return fields, values
    fields = _read_form(body)
    return fields, fields


def _read_form(body: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        raise MalformedCallback(f"body is not UTF-8: {exc.reason}") from None
    return _unique(pairs)


def _read_json(body: bytes) -> dict[str, Any]:
    # Encoding, syntax, nesting and shape are reported the way every adapter reports them; the
    # second parse keeps numbers as written and refuses repeated names.
    loads_json_object(body)
    try:
        values = json.loads(
            body.decode("utf-8"),
            parse_float=_Number,
            parse_int=_Number,
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique,
        )
    except RecursionError:
        raise MalformedCallback("body is nested too deeply") from None
    result: dict[str, Any] = values
    return result


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise MalformedCallback(f"the IPN repeats the field {name!r}")
        result[name] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise MalformedCallback(f"the IPN holds {name}, which is not a number")


def _form_value(value: Any) -> str:
    """A JSON IPN value as the form field it stands for: strings as they are, numbers as
    written, true/false as those words, null as empty, objects and arrays as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return _json_text(value)


def _json_text(value: Any) -> str:
    if isinstance(value, _Number):
        return str(value)
    if isinstance(value, dict):
        items = (f"{json.dumps(k, ensure_ascii=False)}:{_json_text(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_json_text(item) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _ipn_ref(values: Mapping[str, Any]) -> PaymentRef:
    """Our order id and, in the query-shaped IPN, CubePay's id."""
    pay_info = values.get("pay_info")
    nested = pay_info.get("merchant_transaction_id") if isinstance(pay_info, dict) else None
    ref = PaymentRef(
        order_id=_text(values.get("merchant_transaction_id"))
        or _text(nested)
        or _text(values.get("pay_info[merchant_transaction_id]")),
        provider_payment_id=_text(values.get("id")),
    )
    if not ref:
        raise MalformedCallback("the IPN names no payment: no merchant_transaction_id and no id")
    return checked_ref(ref, "the IPN")


# Answers ---------------------------------------------------------------------------------------


def _unwrap(answer: Any, what: str, *, creating: bool) -> Any:
    """The `data` of a `{"status": code, "data": ...}` answer, or the error its code stands for."""
    if not isinstance(answer, dict) or "status" not in answer:
        raise ProviderUnavailable(f"cubepay: {what} answered without a status code")
    code = _code(answer["status"])
    if code == 200:
        return answer.get("data")
    text = f"cubepay: {what} answered status {answer['status']}: {_message(answer.get('data'))}"
    if code == 404 and not creating:
        raise PaymentNotFound(text)
    if code in (400, 401, 404) or (creating and code is not None and code != 500):
        raise ProviderRejected(text)
    raise ProviderUnavailable(text)


def _message(data: Any) -> str:
    text = " ".join(message_from(data).split()) if data is not None else ""
    return text[:MESSAGE_LIMIT] or "no message"


def _code(value: Any) -> int | None:
    """A status code sent as a number or as digits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | str) and str(value):
        return str(value)
    return None


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedCallback(f"{what} is not an object")
    return value


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; every time we store is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
