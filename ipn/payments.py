"""Creating payments at providers and recording them: validated input, one record per provider,
account and order id, nothing recorded when the provider fails, and a retry that cannot create twice
where the provider can be asked about our order id."""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from ipn.callbacks import callback_path
from ipn.config import DEFAULT_ACCOUNT
from ipn.currencies import decimals
from ipn.errors import InvalidPaymentRequest, PaymentNotFound, UnknownAccount
from ipn.events.urls import UnsafeURL, check_url
from ipn.polling import Schedule
from ipn.providers.base import PaymentRef, PaymentRequest, Snapshot
from ipn.services import Services
from ipn.transitions import Evidence, apply_snapshot, record_creation
from models import Endpoint, EndpointOrigin, EventSource, Payment, utcnow
from models.base import MONEY_PRECISION, MONEY_SCALE

MAX_ORDER_ID = 255
MAX_TEXT = 1000
# What the money columns keep, NUMERIC(48, 24): at most 24 digits before the point. A larger
# amount must be refused before the provider is asked to create it, not when it is recorded.
MAX_INTEGER_DIGITS = MONEY_PRECISION - MONEY_SCALE
# Providers whose status API finds a payment by our order id: a retried create asks first.
LOOKUP_BY_ORDER_ID = frozenset({"cubepay", "coinbarpay"})


class DuplicateOrder(Exception):
    def __init__(self, payment: Payment) -> None:
        where = payment.provider
        if payment.account != DEFAULT_ACCOUNT:
            where += f" (account {payment.account})"
        super().__init__(f"order {payment.order_id!r} already has payment {payment.id} at {where}")
        self.payment = payment


@dataclass(frozen=True)
class CreateRequest:
    provider: str
    order_id: str
    amount: Decimal
    currency: str
    pay_currency: str | None = None
    description: str | None = None
    customer_email: str | None = None
    # Where this payment's own events go, beside the merchant's endpoints.
    notify_url: str | None = None
    # Which of the provider's merchant accounts creates it.
    account: str = DEFAULT_ACCOUNT


def parse_create_request(data: Mapping[str, Any], providers: Mapping[str, object]) -> CreateRequest:
    """Check a merchant's create request field by field; InvalidPaymentRequest names the first
    field that is wrong. Amounts must be strings (or exact JSON numbers) of a positive decimal
    with no more places than the currency has."""
    provider = _text(data, "provider", required=True)
    if provider not in providers:
        raise InvalidPaymentRequest("provider", f"must be one of {', '.join(providers)}")
    order_id = _text(data, "order_id", required=True)
    if len(order_id) > MAX_ORDER_ID or not order_id.isprintable():
        raise InvalidPaymentRequest(
            "order_id", f"must be printable, at most {MAX_ORDER_ID} characters"
        )
    currency = _text(data, "currency", required=True).upper()
    places = decimals(currency)
    if places is None:
        raise InvalidPaymentRequest("currency", f"unknown currency {currency!r}")
    amount = _amount(data.get("amount"), places)
    pay_currency = _text(data, "pay_currency")
    if pay_currency is not None:
        pay_currency = pay_currency.upper()
        if decimals(pay_currency) is None:
            raise InvalidPaymentRequest("pay_currency", f"unknown currency {pay_currency!r}")
    email = _text(data, "customer_email")
    if email is not None and ("@" not in email or len(email) > 254):
        raise InvalidPaymentRequest("customer_email", "is not an e-mail address")
    return CreateRequest(
        provider,
        order_id,
        amount,
        currency,
        pay_currency,
        _text(data, "description"),
        email,
        _text(data, "notify_url"),
        _text(data, "account") or DEFAULT_ACCOUNT,
    )


def create_payment(services: Services, request: CreateRequest) -> tuple[Payment, bool]:
    """Create at the provider and record it: (payment, True), or (payment, False) when an
    earlier attempt that looked failed had in fact created it. Raises DuplicateOrder,
    InvalidPaymentRequest (nothing sent) and ProviderError (nothing recorded)."""
    try:
        provider = services.provider(request.provider, request.account)
    except UnknownAccount as exc:
        names = ", ".join(services.settings.account_names(request.provider))
        raise InvalidPaymentRequest("account", f"{exc} (configured: {names})") from None
    if not provider.configured:
        raise InvalidPaymentRequest(
            "provider",
            f"{provider.name} is not configured: set {' and '.join(provider.settings.missing())}",
        )
    _check_notify_url(services, request.notify_url)
    with order_lock(services, request):
        existing = _find(services, request)
        if existing is not None:
            raise DuplicateOrder(existing)
        token = secrets.token_urlsafe(24)
        kind = provider.kinds[0]
        wire = PaymentRequest(
            order_id=request.order_id,
            amount=request.amount,
            currency=request.currency,
            notification_url=_callback_url(services, request, kind),
            pay_currency=request.pay_currency,
            description=request.description,
            customer_email=request.customer_email,
            callback_token=token,
            anomaly_url=_callback_url(services, request, "anomaly")
            if "anomaly" in provider.kinds
            else None,
        )
        provider.check_request(wire)
        found = _created_earlier(services, request)
        if found is not None:
            return _record_found(services, request, found), False
        snapshot = provider.create_payment(wire)
        return _record(services, request, snapshot, token), True


def _check_notify_url(services: Services, url: str | None) -> None:
    """A notify_url is held to the rules of any endpoint, and its events are signed with
    IPN_MERCHANT_WEBHOOK_SECRET, which the shop knows."""
    if url is None:
        return
    events = services.settings.events
    if not events.webhook_secret:
        raise InvalidPaymentRequest(
            "notify_url", "needs IPN_MERCHANT_WEBHOOK_SECRET set to sign its events"
        )
    try:
        check_url(url, allow_private=events.allow_private)
    except UnsafeURL as exc:
        raise InvalidPaymentRequest("notify_url", str(exc).removeprefix("url ")) from None


def _notify_endpoint(payment: Payment, url: str, now: datetime) -> Endpoint:
    return Endpoint(
        url=url,
        description=f"notify_url of {payment.order_id}",
        events=[],
        origin=EndpointOrigin.PAYMENT,
        payment=payment,
        created_at=now,
        updated_at=now,
    )


def _created_earlier(services: Services, request: CreateRequest) -> Snapshot | None:
    """After a create that timed out, the provider may hold the payment: ask before creating."""
    if request.provider not in LOOKUP_BY_ORDER_ID:
        return None
    try:
        return services.provider(request.provider, request.account).fetch_status(
            PaymentRef(request.order_id)
        )
    except PaymentNotFound:
        return None


def _record(services: Services, request: CreateRequest, snapshot: Snapshot, token: str) -> Payment:
    now = utcnow()
    payment = Payment(
        provider=request.provider,
        account=request.account,
        order_id=request.order_id,
        provider_payment_id=snapshot.provider_payment_id,
        provider_status=snapshot.provider_status or None,
        amount=request.amount,
        currency=request.currency,
        pay_amount=snapshot.pay_amount,
        pay_currency=snapshot.pay_currency or request.pay_currency,
        pay_address=snapshot.pay_address,
        pay_url=snapshot.pay_url,
        payment_uri=snapshot.payment_uri,
        description=request.description,
        expires_at=snapshot.expires_at,
        callback_token=token,
        created_at=now,
        updated_at=now,
    )
    detail = (
        f"created at {request.provider} as {snapshot.provider_payment_id or '-'}"
        f", expires {snapshot.expires_at.isoformat() if snapshot.expires_at else '-'}"
    )
    try:
        with services.db.transaction() as session:
            if request.notify_url:
                session.add(_notify_endpoint(payment, request.notify_url, now))
            record_creation(
                session,
                payment,
                Evidence(EventSource.CREATE, "create"),
                detail,
                now,
                schedule=Schedule.from_settings(services.settings),
            )
    except IntegrityError:
        # Only possible if a callback adopted it between the provider's answer and now.
        existing = _find(services, request)
        if existing is None:
            raise
        raise DuplicateOrder(existing) from None
    return payment


def _record_found(services: Services, request: CreateRequest, snapshot: Snapshot) -> Payment:
    """The provider already had it: record it from its answer, as an adoption says."""
    now = utcnow()
    with services.db.transaction() as session:
        applied = apply_snapshot(
            session,
            services.provider(request.provider, request.account),
            snapshot,
            Evidence(EventSource.CREATE, "create retried: the provider already had this order"),
            now=now,
            ref=PaymentRef(request.order_id),
            may_adopt=True,
            schedule=Schedule.from_settings(services.settings),
        )
        assert applied is not None
        payment = applied.payment
        payment.description = request.description
        if request.notify_url:
            session.add(_notify_endpoint(payment, request.notify_url, now))
        if payment.amount is None:
            payment.amount, payment.currency = request.amount, request.currency
    return payment


def _find(services: Services, request: CreateRequest) -> Payment | None:
    with services.db.sessions() as session:
        return session.scalars(
            select(Payment).where(
                Payment.provider == request.provider,
                Payment.account == request.account,
                Payment.order_id == request.order_id,
            )
        ).first()


def _callback_url(services: Services, request: CreateRequest, kind: str) -> str:
    """The account's own callback path: its secret, and only its, verifies what comes there."""
    return services.settings.public_url + callback_path(request.provider, kind, request.account)


_local_locks: dict[str, threading.Lock] = {}
_local_guard = threading.Lock()


@contextmanager
def order_lock(services: Services, request: CreateRequest) -> Iterator[None]:
    """One create at a time per provider, account and order id: a PostgreSQL advisory lock
    across processes and machines; on SQLite (one web process) a lock in this process."""
    key = f"{request.provider}:{request.order_id}"
    if request.account != DEFAULT_ACCOUNT:
        key = f"{request.provider}/{request.account}:{request.order_id}"
    if services.db.is_postgresql:
        number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        with services.db.engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": number})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": number})
                connection.commit()
        return
    with _local_guard:
        lock = _local_locks.setdefault(key, threading.Lock())
    with lock:
        yield


def _text(data: Mapping[str, Any], field: str, *, required: bool = False) -> Any:
    value = data.get(field)
    if value is None or value == "":
        if required:
            raise InvalidPaymentRequest(field, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidPaymentRequest(field, "must be a string")
    if len(value) > MAX_TEXT:
        raise InvalidPaymentRequest(field, f"must be at most {MAX_TEXT} characters")
    # Neither can be stored (PostgreSQL refuses NUL, UTF-8 has no lone surrogates): refuse them
    # before the provider is asked, not when the payment it created is recorded.
    if "\x00" in value or not _encodable(value):
        raise InvalidPaymentRequest(field, "must not contain NUL bytes or lone surrogates")
    return value.strip()


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _amount(value: Any, places: int) -> Decimal:
    if value is None or value == "":
        raise InvalidPaymentRequest("amount", "is required")
    if isinstance(value, bool) or isinstance(value, float):
        raise InvalidPaymentRequest("amount", 'must be a string holding a decimal, e.g. "10.00"')
    try:
        amount = Decimal(str(value).strip()) if isinstance(value, str | int | Decimal) else None
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite():
        raise InvalidPaymentRequest("amount", f"{value!r} is not a decimal number")
    if amount <= 0:
        raise InvalidPaymentRequest("amount", "must be more than zero")
    exponent = amount.as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > places:
        raise InvalidPaymentRequest("amount", f"has more than {places} decimals")
    if amount.adjusted() >= MAX_INTEGER_DIGITS:
        raise InvalidPaymentRequest(
            "amount", f"is too large: at most {MAX_INTEGER_DIGITS} digits before the point"
        )
    return amount
