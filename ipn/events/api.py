"""The merchant's endpoints over the API: thin views over ipn.events.endpoints, behind the
operator API's token."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from ipn.api import BadRequest, _json_body, _services, bad_request, require_token
from ipn.events import endpoints
from ipn.events import serialize as shapes
from ipn.serialize import when
from models import utcnow

bp = Blueprint("endpoints", __name__, url_prefix="/api/endpoints")
# The operator API's own guard and error answer, not a copy of them.
bp.before_request(require_token)
bp.register_error_handler(BadRequest, bad_request)


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
