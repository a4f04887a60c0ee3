"""The operator and merchant API: JSON behind a bearer token, thin views over plain functions."""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select

from ipn import openapi, payments, serialize
from ipn import replay as replays
from ipn.anomalies import resolve_anomaly
from ipn.config import DEFAULT_ACCOUNT
from ipn.dispatch import enqueue
from ipn.errors import InvalidPaymentRequest, ProviderError
from ipn.services import Services
from models import (
    Anomaly,
    AnomalyStatus,
    Notification,
    NotificationStatus,
    Payment,
    PaymentStatus,
    ReplayMode,
)

bp = Blueprint("api", __name__, url_prefix="/api")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Row ids are 64-bit signed integers on PostgreSQL; a larger number names no row.
MAX_ROW_ID = 2**63 - 1
WHOLE_NUMBER = re.compile(r"[0-9]{1,19}")
PAYMENT_ID = re.compile(r"pay_[0-9a-hjkmnp-tv-z]{26}")
MAX_REFERENCE = 255


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@bp.errorhandler(BadRequest)
def bad_request(error: BadRequest) -> tuple[Response, int]:
    return jsonify(error=error.message), error.status


@bp.before_request
def require_token() -> tuple[Response, int] | None:
    expected = _services().settings.api_token
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if not expected:
        return jsonify(error="the API is closed: IPN_API_TOKEN is not set on this server"), 401
    # The comparison is constant-time whatever is given.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        return jsonify(error="missing or wrong bearer token"), 401
    return None


@bp.get("/openapi.json")
def openapi_document() -> Response:
    """The OpenAPI 3.1 document of this API; behind the token like the rest of /api."""
    return jsonify(openapi.DOCUMENT)


@bp.post("/payments")
def create_payment() -> tuple[Response, int]:
    services = _services()
    body = _json_body()
    try:
        request_ = payments.parse_create_request(body, services.providers)
        payment, created = payments.create_payment(services, request_)
    except InvalidPaymentRequest as exc:
        return jsonify(error=str(exc), field=exc.field), 422
    except payments.DuplicateOrder as exc:
        return jsonify(error=str(exc), payment=serialize.payment(exc.payment)), 409
    except ProviderError as exc:
        # Nothing was recorded: the same create may be sent again.
        return jsonify(error=f"the provider did not create the payment: {exc}"), 502
    return jsonify(serialize.payment(payment)), 201 if created else 200


@bp.get("/payments")
def list_payments() -> Response:
    query = select(Payment)
    if order_id := _text_arg("order_id"):
        query = query.where(Payment.order_id == order_id)
    if provider := request.args.get("provider"):
        query = query.where(Payment.provider == _provider(provider))
    if account := request.args.get("account"):
        query = query.where(Payment.account == _account(account, provider))
    if status := request.args.get("status"):
        query = query.where(Payment.status == _choice(PaymentStatus, status, "status"))
    cursor = _text_arg("cursor")
    if cursor is not None and not PAYMENT_ID.fullmatch(cursor):
        raise BadRequest(f"cursor: {cursor!r} is not the `next` of an earlier page")
    return _page(query, Payment.id, serialize.payment, cursor=cursor)


@bp.get("/payments/<path:reference>")
def show_payment(reference: str) -> Response:
    with _services().db.sessions() as session:
        payment = _payment_by_reference(session, reference)
        return jsonify(serialize.payment_detail(session, payment))


@bp.post("/payments/<path:reference>/reconcile")
def reconcile_payment(reference: str) -> Response:
    from ipn.reconcile import check_payment

    services = _services()
    with services.db.sessions() as session:
        payment_id = _payment_by_reference(session, reference).id
    check = check_payment(services, payment_id, force=True)
    if check.message == "no such payment":
        raise BadRequest(f"no payment {payment_id}", 404)
    with services.db.sessions() as session:
        payment = session.get(Payment, payment_id)
        assert payment is not None
        return jsonify(
            {
                **serialize.payment(payment),
                "check": {"outcome": check.outcome, "message": check.message},
            }
        )


@bp.get("/notifications")
def list_notifications() -> Response:
    which = _replay_filter(request.args)
    return _page(
        which.apply(select(Notification)),
        Notification.id,
        serialize.notification,
        cursor=_row_id_arg("cursor"),
    )


@bp.get("/notifications/<notification_ref>")
def show_notification(notification_ref: str) -> Response:
    notification_id = _row_id(notification_ref, "notification id")
    with _services().db.sessions() as session:
        row = session.get(Notification, notification_id)
        if row is None:
            raise BadRequest(f"no notification {notification_id}", 404)
        return jsonify(serialize.notification_detail(session, row))


@bp.post("/notifications/<notification_ref>/replay")
def replay_one(notification_ref: str) -> tuple[Response, int]:
    notification_id = _row_id(notification_ref, "notification id")
    body = _json_body(optional=True)
    mode = _choice(ReplayMode, body.get("mode", "stored"), "mode")
    services = _services()
    if not replays.existing(services, [notification_id]):
        raise BadRequest(f"no notification {notification_id}", 404)
    if gone := replays.pruned(services, [notification_id]):
        raise BadRequest(replays.pruned_message(gone), 409)
    replays.replay(services, [notification_id], mode, _send, requested_by="api")
    return jsonify(count=1, ids=[notification_id], mode=mode.value), 202


@bp.post("/notifications/replay")
def replay_many() -> Response:
    body = _json_body()
    which = _replay_filter(body)
    if not which:
        raise BadRequest("give at least one of provider, account, status, since, until")
    mode = _choice(ReplayMode, body.get("mode", "stored"), "mode")
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise BadRequest("dry_run must be true or false")
    services = _services()
    ids = list(replays.matching_ids(services, which))
    if not dry_run:
        replays.replay(services, ids, mode, _send, requested_by="api")
    return jsonify(count=len(ids), ids=ids, mode=mode.value, dry_run=dry_run)


@bp.get("/anomalies")
def list_anomalies() -> Response:
    query = select(Anomaly)
    if status := request.args.get("status"):
        query = query.where(Anomaly.status == _choice(AnomalyStatus, status, "status"))
    if payment_id := _text_arg("payment_id"):
        query = query.where(Anomaly.payment_id == payment_id)
    return _page(query, Anomaly.id, serialize.anomaly, cursor=_row_id_arg("cursor"))


@bp.post("/anomalies/<anomaly_ref>/resolve")
def resolve(anomaly_ref: str) -> Response:
    anomaly_id = _row_id(anomaly_ref, "anomaly id")
    resolution = _json_body().get("resolution")
    if not isinstance(resolution, str) or not resolution.strip():
        raise BadRequest("resolution: say what was done (a non-empty string)", 422)
    try:
        with _services().db.transaction() as session:
            anomaly = resolve_anomaly(session, anomaly_id, resolution.strip(), by="api")
            return jsonify(serialize.anomaly(anomaly))
    except LookupError as exc:
        raise BadRequest(str(exc), 404) from None
    except ValueError as exc:
        raise BadRequest(str(exc), 409) from None


def _services() -> Services:
    services: Services = current_app.extensions["ipn"]
    return services


def _send(notification_id: int) -> None:
    enqueue(current_app.extensions["celery"], notification_id)


def _page(query: Any, key: Any, shape: Callable[[Any], dict[str, Any]], *, cursor: Any) -> Response:
    """Keyset pagination: `next` is the last key of this page, or null on the last page."""
    limit = request.args.get("limit", str(DEFAULT_LIMIT))
    if not WHOLE_NUMBER.fullmatch(limit) or not 1 <= int(limit) <= MAX_LIMIT:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    size = int(limit)
    if cursor is not None:
        query = query.where(key > cursor)
    with _services().db.sessions() as session:
        rows = session.scalars(query.order_by(key).limit(size + 1)).all()
    more = len(rows) > size
    rows = rows[:size]
    next_cursor = getattr(rows[-1], key.key) if more and rows else None
    return jsonify(items=[shape(row) for row in rows], next=next_cursor)


def _json_body(*, optional: bool = False) -> dict[str, Any]:
    raw = request.get_data(cache=True)
    if optional and not raw:
        return {}
    try:
        # Exact decimals: an amount sent as a JSON number must not pass through a float.
        body = json.loads(raw, parse_float=Decimal)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _choice(enum: Any, value: Any, name: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise BadRequest(f"{name} must be one of {allowed}, not {value!r}") from None


def _payment_by_reference(session: Any, reference: str) -> Payment:
    """Our payment id, or the merchant's order id when it names one payment only."""
    if "\x00" in reference or len(reference) > MAX_REFERENCE:
        raise BadRequest(
            f"payment: {reference!r} is neither a payment id nor an order id"
            f" (at most {MAX_REFERENCE} characters, no NUL)"
        )
    payment = session.get(Payment, reference) if PAYMENT_ID.fullmatch(reference) else None
    if payment is not None:
        return payment
    found = session.scalars(
        select(Payment).where(Payment.order_id == reference).order_by(Payment.id)
    ).all()
    if len(found) > 1:
        names = ", ".join(f"{_where(p)} ({p.id})" for p in found)
        raise BadRequest(f"order id {reference!r} is used at {names}: give the payment id", 409)
    if not found:
        raise BadRequest(f"no payment with id or order id {reference!r}", 404)
    return found[0]


def _where(payment: Payment) -> str:
    if payment.account == DEFAULT_ACCOUNT:
        return payment.provider
    return f"{payment.provider} account {payment.account}"


def _text_arg(name: str) -> str | None:
    value = request.args.get(name)
    if value and "\x00" in value:
        raise BadRequest(f"{name}: must not contain a NUL byte")
    return value or None


def _row_id(value: str, name: str) -> int:
    if not WHOLE_NUMBER.fullmatch(value) or int(value) > MAX_ROW_ID:
        raise BadRequest(f"{name}: {value!r} is not a whole number from 0 to {MAX_ROW_ID}")
    return int(value)


def _row_id_arg(name: str) -> int | None:
    value = request.args.get(name)
    return None if value is None or value == "" else _row_id(value, name)


def _provider(value: Any) -> str:
    if not isinstance(value, str) or value not in _services().providers:
        raise BadRequest(f"provider must be one of {', '.join(_services().providers)}")
    return value


def _account(value: Any, provider: str | None) -> str:
    """A configured account's name: of `provider` if given, else of any provider."""
    names = _services().settings.names_of_accounts(provider)
    if not isinstance(value, str) or value not in names:
        where = f" of {provider}" if provider else ""
        raise BadRequest(f"account must be one of the accounts{where}: {', '.join(names)}")
    return value


def _time(value: Any, name: str) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        return serialize.parse_time(str(value))
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}") from None


def _replay_filter(args: Any) -> replays.ReplayFilter:
    provider = args.get("provider")
    status = args.get("status")
    account = args.get("account")
    return replays.ReplayFilter(
        provider=_provider(provider) if provider else None,
        status=_choice(NotificationStatus, status, "status") if status else None,
        since=_time(args.get("since"), "since"),
        until=_time(args.get("until"), "until"),
        account=_account(account, provider if isinstance(provider, str) else None)
        if account
        else None,
    )
