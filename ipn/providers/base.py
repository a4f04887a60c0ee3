"""The one interface every provider adapter implements, and the values that cross it."""

from __future__ import annotations

import enum
import hmac
import json
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from decimal import Context, Decimal, InvalidOperation
from typing import Any, ClassVar, Protocol

import requests

from ipn.config import HTTPSettings, ProviderSettings
from ipn.errors import ForgedCallback, MalformedCallback, UnstorableValue
from ipn.providers.transport import keep_alive_session
from models import PaymentStatus
from models.base import MONEY_PRECISION, MONEY_SCALE

# What the payment columns keep (models.payment): ids and addresses String(255), a provider's
# status String(64), currency codes String(16), money NUMERIC(48, 24).
ID_LIMIT = 255
STATUS_LIMIT = 64
CURRENCY_LIMIT = 16
MONEY_INTEGER_DIGITS = MONEY_PRECISION - MONEY_SCALE
_SMALLEST_MONEY = Decimal(1).scaleb(-MONEY_SCALE)
_MONEY_CONTEXT = Context(prec=MONEY_PRECISION)


class Authenticity(enum.StrEnum):
    VERIFIED = "verified"  # a signature or token was present and correct: evidence
    UNSIGNED = "unsigned"  # nothing to check where the provider may send nothing: a hint only


@dataclass(frozen=True)
class PaymentRef:
    """How a callback or a query names a payment: our merchant reference, the provider's id."""

    order_id: str | None = None
    provider_payment_id: str | None = None

    def __bool__(self) -> bool:
        return bool(self.order_id or self.provider_payment_id)


@dataclass(frozen=True)
class Snapshot:
    """What the provider says about one payment at one moment, in our vocabulary of fields.

    Every amount is a Decimal parsed straight from the wire. `amount`/`currency` are what the
    payment was created for (the merchant's side); `pay_*` what the customer sends.
    """

    provider_status: str
    order_id: str | None = None
    provider_payment_id: str | None = None
    amount: Decimal | None = None
    currency: str | None = None
    pay_amount: Decimal | None = None
    pay_currency: str | None = None
    paid_amount: Decimal | None = None
    pay_address: str | None = None
    pay_url: str | None = None
    payment_uri: str | None = None
    expires_at: datetime | None = None
    # The provider's own clock when it took the snapshot (BitcoinPaygate `currentTime`).
    as_of: datetime | None = None
    detail: str = ""

    @property
    def ref(self) -> PaymentRef:
        return PaymentRef(self.order_id, self.provider_payment_id)


@dataclass(frozen=True)
class Callback:
    """A stored callback, parsed and authenticated by its provider's adapter."""

    kind: str
    authenticity: Authenticity
    ref: PaymentRef
    fields: Mapping[str, Any] = field(default_factory=dict, repr=False)
    # What the callback itself asserts. Acted on directly only where the provider has no status
    # API; elsewhere it only lets a stale snapshot be recognised before asking.
    snapshot: Snapshot | None = None
    # The per-payment token the provider echoed back (CubePay `other`), if any.
    token: str | None = field(default=None, repr=False)
    # False for callback types we store but do not act on; `reason` says which.
    handled: bool = True
    reason: str = ""
    # Which of the account's secrets verified it: `current` or a previous one's label.
    verified_by: str | None = None


@dataclass(frozen=True)
class PaymentRequest:
    """A payment the merchant asks us to create at a provider."""

    order_id: str
    amount: Decimal
    currency: str
    # Where the provider must send its callbacks (built from IPN_PUBLIC_URL).
    notification_url: str
    pay_currency: str | None = None
    description: str | None = None
    customer_email: str | None = None
    # A fresh per-payment secret the provider echoes back (CubePay `other`).
    callback_token: str | None = field(default=None, repr=False)
    # BitcoinPaygate's second callback URL, for anomaly notifications.
    anomaly_url: str | None = None


class PaymentFacts(Protocol):
    """What a status mapping may know of the payment as we hold it (a Payment row satisfies it)."""

    @property
    def status(self) -> PaymentStatus: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def amount(self) -> Decimal | None: ...
    @property
    def currency(self) -> str | None: ...
    @property
    def pay_amount(self) -> Decimal | None: ...
    @property
    def paid_amount(self) -> Decimal | None: ...


@dataclass(frozen=True)
class Decision:
    """Where a snapshot says the payment stands. `state` None: a status we do not know."""

    state: PaymentStatus | None
    note: str = ""
    # Anomalies the mapping itself sees (BitcoinPaygate INVALID, for one): (kind, evidence).
    anomalies: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    # Why the snapshot predates what the payment holds, where only the adapter can tell (a
    # status its provider never reports after what was seen): the snapshot is then ignored.
    older: str = ""


class Provider(ABC):
    """A payment provider: reads its callbacks, asks it for the truth, maps its statuses to ours.

    Methods that talk to the provider raise the ProviderError family; methods that read a
    callback raise MalformedCallback or ForgedCallback. Nothing here touches the database.
    """

    name: ClassVar[str]
    # Whether `fetch_status` exists. Without it a verified callback is the only evidence.
    has_status_api: ClassVar[bool]
    # The callback kinds the provider sends, each with its own endpoint.
    kinds: ClassVar[tuple[str, ...]]
    # The settings class this adapter reads; another is a wiring mistake, refused at once.
    settings_type: ClassVar[type]

    def __init__(
        self,
        settings: ProviderSettings,
        http: HTTPSettings | None = None,
        session: requests.Session | None = None,
    ) -> None:
        if not isinstance(settings, self.settings_type):
            raise TypeError(
                f"{type(self).__name__} needs {self.settings_type.__name__}, "
                f"not {type(settings).__name__}"
            )
        self.settings = settings
        self.http = http or HTTPSettings()
        self.session = session or keep_alive_session()

    @property
    def configured(self) -> bool:
        return bool(self.settings.configured)

    @property
    def account(self) -> str:
        """The merchant account whose credentials this adapter holds."""
        return self.settings.account

    def read_callback(
        self,
        kind: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        received_at: datetime | None = None,
    ) -> Callback:
        """Parse and authenticate a stored callback, received at `received_at` (now if not
        given): the current secret first, then each replaced one still valid at that time.

        Raises MalformedCallback when the body is not what the provider sends (or comes to an
        endpoint of a kind the provider does not send), ForgedCallback when a signature, token,
        client id or key is present and wrong (or missing where one is required).
        """
        if kind not in self.kinds:
            raise MalformedCallback(f"{self.name} sends no {kind!r} callbacks")
        try:
            callback = self._read_callback(kind, body, headers)
        except ForgedCallback:
            earlier = self._read_with_previous(kind, body, headers, received_at or _now())
            if earlier is None:
                raise
            return earlier
        if callback.authenticity is Authenticity.VERIFIED:
            return replace(callback, verified_by="current")
        return callback

    def _read_with_previous(
        self, kind: str, body: bytes, headers: Mapping[str, str], received_at: datetime
    ) -> Callback | None:
        """The callback as a replaced secret still valid when it arrived verifies it, if one
        does: what was signed before the provider switched keys is not lost."""
        for previous in self.settings.previous_secrets:
            if not previous.valid_at(received_at):
                continue
            secret: dict[str, Any] = {self.settings.signed_with: previous.secret}
            changed = replace(self.settings, **secret)
            try:
                callback = type(self)(changed, self.http, self.session)._read_callback(
                    kind, body, headers
                )
            except ForgedCallback:
                continue
            if callback.authenticity is Authenticity.VERIFIED:
                return replace(callback, verified_by=previous.label)
        return None

    @abstractmethod
    def _read_callback(self, kind: str, body: bytes, headers: Mapping[str, str]) -> Callback:
        """The provider's own reading of a callback of one of its kinds."""

    def token_matches(self, callback: Callback, expected: str | None) -> bool:
        """Whether the per-payment token the callback echoes is the one we stored, if any."""
        if expected is None or callback.token is None:
            return True
        return constant_time_equal(callback.token, expected)

    def fetch_status(self, payment: PaymentRef) -> Snapshot:
        """Ask the provider, server to server, where the payment stands."""
        raise NotImplementedError(f"{self.name} has no status API")

    def check_request(self, request: PaymentRequest) -> None:  # noqa: B027 - optional hook
        """Raise InvalidPaymentRequest for what this provider cannot take; nothing is sent."""

    def create_payment(self, request: PaymentRequest) -> Snapshot:
        """Create the payment at the provider; the snapshot holds everything the customer needs.

        Raises ProviderUnavailable or ProviderRejected; nothing is retried that could create
        the payment twice (a create is retried only where the request never reached the
        provider, i.e. a connection error).
        """
        raise NotImplementedError(f"{self.name} cannot create payments")

    @abstractmethod
    def decide(self, snapshot: Snapshot, payment: PaymentFacts | None, now: datetime) -> Decision:
        """Map the provider's status to our state, given the payment as we hold it (if we do),
        at `now`. Each anomaly's evidence carries a `detail` saying in words what happened."""


def _now() -> datetime:
    return datetime.now(UTC)


def constant_time_equal(given: str | bytes, expected: str | bytes) -> bool:
    """Compare secrets without leaking where they differ; case-sensitive."""
    # A lone surrogate in what was sent must compare unequal, not raise.
    a = given.encode("utf-8", "surrogatepass") if isinstance(given, str) else given
    b = expected.encode("utf-8", "surrogatepass") if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by name, case-insensitively, as werkzeug and proxies change the case."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def loads_json(body: bytes | str) -> Any:
    """JSON with every number that has a point or exponent as a Decimal, never a float."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        value = json.loads(text, parse_float=Decimal)
        _refuse_unstorable(value)
        return value
    except UnicodeDecodeError as exc:
        raise MalformedCallback(f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except RecursionError:
        raise MalformedCallback("body is nested too deeply") from None
    except ValueError as exc:
        raise MalformedCallback(f"body is not JSON: {exc}") from None


def loads_json_object(body: bytes | str) -> dict[str, Any]:
    value = loads_json(body)
    if not isinstance(value, dict):
        raise MalformedCallback(f"body is JSON {type(value).__name__}, not an object")
    return value


def to_decimal(value: Any, what: str) -> Decimal | None:
    """A wire amount (string, int or Decimal from `loads_json`) as a Decimal; floats refused."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or isinstance(value, float):
        raise MalformedCallback(f"{what} is not an exact number: {value!r}")
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise MalformedCallback(f"{what} is not a number: {value!r}") from None
    if not result.is_finite():
        raise MalformedCallback(f"{what} is not a finite number: {value!r}")
    return checked_money(result, what)


def checked_money(value: Decimal, what: str) -> Decimal:
    """An amount the money column keeps exactly: at most 24 integer digits and 24 decimals
    (trailing zeros beyond those are dropped, as they change nothing)."""
    if not value.is_finite():
        raise UnstorableValue(f"{what} is not a finite number: {value}")
    if value.is_zero():
        return Decimal(0)
    if value.adjusted() >= MONEY_INTEGER_DIGITS:
        shown = f"{value:.3e}" if value.adjusted() > 60 else str(value)
        raise UnstorableValue(
            f"{what} is {shown}, beyond the {MONEY_INTEGER_DIGITS} integer digits an amount has"
        )
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MONEY_SCALE:
        exact = value.quantize(_SMALLEST_MONEY, context=_MONEY_CONTEXT)
        if exact != value:
            raise UnstorableValue(f"{what} has more than {MONEY_SCALE} decimals: {value}")
        value = exact
    return value


def checked_id(value: str, what: str) -> str:
    """An id from the wire (an order id, a provider's payment id) as it can be kept and looked
    up: at most 255 characters, no control characters, no lone surrogates."""
    checked_text(value, what, ID_LIMIT)
    control = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise UnstorableValue(f"{what} holds the control character {control!a}")
    return value


def checked_text(value: str, what: str, limit: int | None = None) -> str:
    """Text that PostgreSQL and SQLite both keep as sent: no NUL byte, no lone surrogate, and
    at most `limit` characters where the column has a limit."""
    if limit is not None and len(value) > limit:
        raise UnstorableValue(f"{what} is {len(value)} characters long, more than {limit}")
    if "\x00" in value:
        raise UnstorableValue(f"{what} holds a NUL byte")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnstorableValue(
            f"{what} holds the lone surrogate {value[exc.start]!a}, which is not text"
        ) from None
    return value


def checked_ref(ref: PaymentRef, what: str = "the callback") -> PaymentRef:
    """A payment reference whose ids can be looked up and kept (see `checked_id`)."""
    if ref.order_id is not None:
        checked_id(ref.order_id, f"{what}'s order id")
    if ref.provider_payment_id is not None:
        checked_id(ref.provider_payment_id, f"{what}'s payment id")
    return ref


_TEXT_LIMITS = {
    "provider_status": STATUS_LIMIT,
    "order_id": ID_LIMIT,
    "provider_payment_id": ID_LIMIT,
    "currency": CURRENCY_LIMIT,
    "pay_currency": CURRENCY_LIMIT,
    "pay_address": ID_LIMIT,
}


def checked_snapshot(snapshot: Snapshot) -> Snapshot:
    """A snapshot every field of which the payment's columns keep as the provider sent it;
    UnstorableValue names the first that does not fit."""
    for item in fields(snapshot):
        value = getattr(snapshot, item.name)
        if item.name in ("order_id", "provider_payment_id") and value is not None:
            checked_id(value, item.name)
        elif isinstance(value, str):
            checked_text(value, item.name, _TEXT_LIMITS.get(item.name))
        elif isinstance(value, Decimal):
            checked_money(value, item.name)
    return snapshot


def _refuse_unstorable(value: Any, where: str = "the body") -> None:
    """No provider sends a NUL byte or half a surrogate pair (JSON may escape both); either
    would fail in the database later, so the callback is refused while it is read."""
    if isinstance(value, str):
        checked_text(value, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            checked_text(key, f"a field name in {where}")
            _refuse_unstorable(item, f"field {key!a}")
    elif isinstance(value, list):
        for item in value:
            _refuse_unstorable(item, where)


def parse_time(value: Any, what: str) -> datetime | None:
    """An ISO 8601 time (`Z` or an offset) or epoch seconds, as an aware datetime."""
    from datetime import UTC

    if value is None or value == "":
        return None
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(float(value), UTC)
        except (OverflowError, OSError, ValueError):
            raise MalformedCallback(f"{what} is not a time: {value!r}") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise MalformedCallback(f"{what} is not an ISO 8601 time: {value!r}") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise MalformedCallback(f"{what} is not a time: {value!r}")
