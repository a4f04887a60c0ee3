"""The one interface every provider adapter implements, and the values that cross it."""

from __future__ import annotations

import enum
import hmac
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Protocol

import requests

from ipn.config import HTTPSettings, ProviderSettings
from ipn.errors import MalformedCallback
from models import PaymentStatus


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


@dataclass(frozen=True)
class Decision:
    """Where a snapshot says the payment stands. `state` None: a status we do not know."""

    state: PaymentStatus | None
    note: str = ""
    # Anomalies the mapping itself sees (BitcoinPaygate INVALID, for one): (kind, evidence).
    anomalies: tuple[tuple[str, Mapping[str, Any]], ...] = ()


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
        self.session = session or requests.Session()

    @property
    def configured(self) -> bool:
        return bool(self.settings.configured)

    def read_callback(self, kind: str, body: bytes, headers: Mapping[str, str]) -> Callback:
        """Parse and authenticate a stored callback.

        Raises MalformedCallback when the body is not what the provider sends (or comes to an
        endpoint of a kind the provider does not send), ForgedCallback when a signature, token,
        client id or key is present and wrong (or missing where one is required).
        """
        if kind not in self.kinds:
            raise MalformedCallback(f"{self.name} sends no {kind!r} callbacks")
        return self._read_callback(kind, body, headers)

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


def constant_time_equal(given: str | bytes, expected: str | bytes) -> bool:
    """Compare secrets without leaking where they differ; case-sensitive."""
    a = given.encode() if isinstance(given, str) else given
    b = expected.encode() if isinstance(expected, str) else expected
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
        return json.loads(text, parse_float=Decimal)
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
    return result


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
