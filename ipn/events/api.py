"""Merchant events over the API, behind the operator API's token: the merchant's endpoints
(thin views over ipn.events.endpoints) and the delivery log (over ipn.events.history)."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select

from ipn.api import (
    BadRequest,
    _choice,
    _json_body,
    _page,
    _services,
    _text_arg,
    _time,
    bad_request,
    require_token,
)
from ipn.events import endpoints, history
from ipn.events import serialize as shapes
from ipn.serialize import when
from models import DeliveryStatus, EventType, MerchantEvent, utcnow

bp = Blueprint("endpoints", __name__, url_prefix="/api/endpoints")
# The operator API's own guard and error answer, not a copy of them.
bp.before_request(require_token)
bp.register_error_handler(BadRequest, bad_request)

events_bp = Blueprint("events", __name__, url_prefix="/api/events")
events_bp.before_request(require_token)
events_bp.register_error_handler(BadRequest, bad_request)

EVENT_ID = re.compile(r"evt_[0-9a-hjkmnp-tv-z]{26}")


@bp.errorhandler(endpoints.InvalidEndpoint)
def invalid(error: endpoints.InvalidEndpoint) -> tuple[Response, int]:
    return jsonify(error=str(error), field=error.field), 422


@bp.errorhandler(endpoints.EndpointNotFound)
def not_found(error: endpoints.EndpointNotFound) -> tuple[Response, int]:
    return jsonify(error=str(error)), 404


@bp.errorhandler(endpoints.EndpointNotEditable)
def not_editable(error: endpoints.EndpointNotEditable) -> tuple[Response, int]:
    return jsonify(error=str(error)), 409


@bp.post("")
def create() -> tuple[Response, int]:
    services = _services()
    body = _json_body()
    with services.db.transaction() as session:
        endpoint, secret = endpoints.register(
            session,
            body.get("url"),
            body.get("events"),
            body.get("description"),
            settings=services.settings,
            now=utcnow(),
        )
        return jsonify(shapes.endpoint(endpoint, secret=secret)), 201


@bp.get("")
def list_endpoints() -> Response:
    with _services().db.sessions() as session:
        items = [shapes.endpoint(e) for e in endpoints.listing(session)]
    return jsonify(items=items, next=None)


@bp.get("/<endpoint_id>")
def show(endpoint_id: str) -> Response:
    with _services().db.sessions() as session:
        return jsonify(shapes.endpoint(endpoints.get(session, endpoint_id)))


@bp.patch("/<endpoint_id>")
def change(endpoint_id: str) -> Response:
    services = _services()
    changes: dict[str, Any] = _json_body()
    with services.db.transaction() as session:
        endpoint = endpoints.update(
            session, endpoint_id, changes, settings=services.settings, now=utcnow()
        )
        return jsonify(shapes.endpoint(endpoint))


@bp.delete("/<endpoint_id>")
def delete(endpoint_id: str) -> tuple[str, int]:
    with _services().db.transaction() as session:
        endpoints.delete(session, endpoint_id, utcnow())
    return "", 204


@bp.post("/<endpoint_id>/rotate-secret")
def rotate_secret(endpoint_id: str) -> Response:
    services = _services()
    with services.db.transaction() as session:
        secret = endpoints.rotate_secret(
            session, endpoint_id, settings=services.settings, now=utcnow()
        )
        endpoint = endpoints.get(session, endpoint_id)
        return jsonify(
            id=endpoint.id,
            secret=secret,
            previous_secret_valid_until=when(endpoint.previous_secret_until),
        )


# The delivery log ----------------------------------------------------------------------------


@events_bp.get("")
def list_events() -> Response:
    return _page(
        _event_filter(request.args).apply(select(MerchantEvent)),
        MerchantEvent.id,
        history.item,
        cursor=_text_arg("cursor"),
    )


@events_bp.get("/<event_id>")
def show_event(event_id: str) -> Response:
    with _services().db.sessions() as session:
        event = session.get(MerchantEvent, _event_id(event_id))
        if event is None:
            raise BadRequest(f"no event {event_id}", 404)
        return jsonify(history.detail(session, event))


@events_bp.post("/<event_id>/redeliver")
def redeliver_one(event_id: str) -> tuple[Response, int]:
    services = _services()
    with services.db.sessions() as session:
        if session.get(MerchantEvent, _event_id(event_id)) is None:
            raise BadRequest(f"no event {event_id}", 404)
    queued = history.redeliver(services, [event_id], utcnow())
    return jsonify(count=len(queued), ids=queued), 202


@events_bp.post("/redeliver")
def redeliver_many() -> Response:
    body = _json_body()
    which = _event_filter(body)
    if not which:
        raise BadRequest("give at least one of payment_id, type, status, since, until")
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise BadRequest("dry_run must be true or false")
    services = _services()
    ids = list(history.matching_ids(services, which))
    if not dry_run:
        ids = history.redeliver(services, ids, utcnow())
    return jsonify(count=len(ids), ids=ids, dry_run=dry_run)


def _event_id(value: str) -> str:
    if not EVENT_ID.fullmatch(value):
        raise BadRequest(f"event id: {value[:40]!r} is not an event id (evt_...)", 404)
    return value


def _event_filter(args: Any) -> history.EventFilter:
    event_type = args.get("type")
    status = args.get("status")
    payment_id = args.get("payment_id")
    if payment_id is not None and (not isinstance(payment_id, str) or "\x00" in payment_id):
        raise BadRequest("payment_id must be a payment id")
    return history.EventFilter(
        payment_id=payment_id or None,
        type=_choice(EventType, event_type, "type") if event_type else None,
        status=_choice(DeliveryStatus, status, "status") if status else None,
        since=_time(args.get("since"), "since"),
        until=_time(args.get("until"), "until"),
    )
