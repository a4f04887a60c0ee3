"""The operator and merchant API: JSON behind a bearer token, thin views over plain functions."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select

from ipn import payments, serialize
from ipn import replay as replays
from ipn.anomalies import resolve_anomaly
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
    # With no token configured the API is closed; the comparison is constant-time either way.
    if (
        not expected
        or scheme.lower() != "bearer"
        or not hmac.compare_digest(token.strip().encode(), expected.encode())
    ):
        return jsonify(error="missing or wrong bearer token"), 401
    return None


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
    if order_id := request.args.get("order_id"):
        query = query.where(Payment.order_id == order_id)
    if provider := request.args.get("provider"):
        query = query.where(Payment.provider == _provider(provider))
    if status := request.args.get("status"):
        query = query.where(Payment.status == _choice(PaymentStatus, status, "status"))
    return _page(query, Payment.id, serialize.payment, cursor=request.args.get("cursor"))


@bp.get("/payments/<payment_id>")
def show_payment(payment_id: str) -> Response:
    with _services().db.sessions() as session:
        payment = session.get(Payment, payment_id)
        if payment is None:
            raise BadRequest(f"no payment {payment_id}", 404)
        return jsonify(serialize.payment_detail(session, payment))


@bp.post("/payments/<payment_id>/reconcile")
def reconcile_payment(payment_id: str) -> Response:
    from ipn.reconcile import check_payment

    services = _services()
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
    cursor = request.args.get("cursor")
    return _page(
        which.apply(select(Notification)),
        Notification.id,
        serialize.notification,
        cursor=int(cursor) if cursor and cursor.isdigit() else None,
    )


@bp.get("/notifications/<int:notification_id>")
def show_notification(notification_id: int) -> Response:
    with _services().db.sessions() as session:
        row = session.get(Notification, notification_id)
        if row is None:
            raise BadRequest(f"no notification {notification_id}", 404)
        return jsonify(serialize.notification_detail(session, row))


@bp.post("/notifications/<int:notification_id>/replay")
def replay_one(notification_id: int) -> tuple[Response, int]:
    body = _json_body(optional=True)
    mode = _choice(ReplayMode, body.get("mode", "stored"), "mode")
    services = _services()
    if not replays.existing(services, [notification_id]):
        raise BadRequest(f"no notification {notification_id}", 404)
    replays.replay(services, [notification_id], mode, _send, requested_by="api")
    return jsonify(count=1, ids=[notification_id], mode=mode.value), 202


@bp.post("/notifications/replay")
def replay_many() -> Response:
    body = _json_body()
    which = _replay_filter(body)
    if not which:
        raise BadRequest("give at least one of provider, status, since, until")
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
    if payment_id := request.args.get("payment_id"):
        query = query.where(Anomaly.payment_id == payment_id)
    cursor = request.args.get("cursor")
    return _page(
        query,
        Anomaly.id,
        serialize.anomaly,
        cursor=int(cursor) if cursor and cursor.isdigit() else None,
    )


@bp.post("/anomalies/<int:anomaly_id>/resolve")
def resolve(anomaly_id: int) -> Response:
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
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
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


def _provider(value: str) -> str:
    if value not in _services().providers:
        raise BadRequest(f"provider must be one of {', '.join(_services().providers)}")
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
    return replays.ReplayFilter(
        provider=_provider(provider) if provider else None,
        status=_choice(NotificationStatus, status, "status") if status else None,
        since=_time(args.get("since"), "since"),
        until=_time(args.get("until"), "until"),
    )
