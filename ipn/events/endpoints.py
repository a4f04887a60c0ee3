"""Registering, changing, rotating and deleting the merchant's endpoints, within the caller's
transaction.

IPNError
 └── EndpointError            an endpoint request that cannot be carried out
      ├── InvalidEndpoint     bad input, naming the field (url, events, description, status)
      ├── EndpointNotFound    no such endpoint, or a deleted one (also a LookupError)
      └── EndpointNotEditable it comes from configuration or a payment's notify_url
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Mapping
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, select
from sqlalchemy import update as sql_update
from sqlalchemy.orm import Session

from ipn.config import Settings
from ipn.errors import IPNError
from ipn.events import urls
from ipn.events.delivery import refresh_event_status
from ipn.events.signing import new_secret
from models.event import (
    Delivery,
    DeliveryStatus,
    Endpoint,
    EndpointOrigin,
    EndpointStatus,
    EventType,
)

log = logging.getLogger(__name__)

MAX_DESCRIPTION = 1000
CHANGEABLE = ("url", "events", "description", "status")
DELETED_ERROR = "endpoint deleted"
OPERATOR_DISABLED = "disabled by the operator"


class EndpointError(IPNError):
    pass


class InvalidEndpoint(EndpointError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class EndpointNotFound(EndpointError, LookupError):
    pass


class EndpointNotEditable(EndpointError):
    pass


def register(
    session: Session,
    url: Any,
    events: Any,
    description: Any,
    *,
    settings: Settings,
    now: datetime,
) -> tuple[Endpoint, str]:
    """A new enabled endpoint and its secret, which is shown this once."""
    endpoint = Endpoint(
        url=_url(url, settings),
        events=_events(events),
        description=_description(description),
        status=EndpointStatus.ENABLED,
        origin=EndpointOrigin.API,
        secret=new_secret(),
        created_at=now,
        updated_at=now,
    )
    session.add(endpoint)
    session.flush()
    log.info("endpoint %s registered for %s", endpoint.id, _host(endpoint.url))
    assert endpoint.secret is not None
    return endpoint, endpoint.secret


def update(
    session: Session,
    endpoint_id: str,
    changes: Mapping[str, Any],
    *,
    settings: Settings,
    now: datetime,
) -> Endpoint:
    """Change the url, events, description or status; enabling forgets the failing state."""
    unknown = [name for name in changes if name not in CHANGEABLE]
    if unknown:
        raise InvalidEndpoint(
            unknown[0],
            f"{', '.join(map(str, unknown))}: cannot be changed (only {', '.join(CHANGEABLE)})",
        )
    # Every value is checked before any is applied: a refused change changes nothing.
    values: dict[str, Any] = {}
    if "url" in changes:
        values["url"] = _url(changes["url"], settings)
    if "events" in changes:
        values["events"] = _events(changes["events"])
    if "description" in changes:
        values["description"] = _description(changes["description"])
    if "status" in changes:
        values["status"] = _status(changes["status"])
    # Switching an endpoint off and on is allowed whatever configured it; nothing else is.
    endpoint = _editable(session, endpoint_id, switching=set(values) == {"status"})
    status = values.pop("status", None)
    for name, value in values.items():
        setattr(endpoint, name, value)
    if status is EndpointStatus.ENABLED:
        _enable(session, endpoint, now)
    elif status is EndpointStatus.DISABLED and endpoint.status is not EndpointStatus.DISABLED:
        endpoint.status = EndpointStatus.DISABLED
        endpoint.disabled_reason = OPERATOR_DISABLED
    endpoint.updated_at = now
    log.info("endpoint %s changed: %s", endpoint.id, ", ".join(sorted(changes)) or "nothing")
    return endpoint


def disable(session: Session, endpoint_id: str, reason: str, now: datetime) -> Endpoint:
    """Stop delivering to the endpoint, saying why; its deliveries wait until it is enabled.
    Any endpoint may be switched off and on, whatever configured it."""
    endpoint = _editable(session, endpoint_id, switching=True)
    endpoint.status = EndpointStatus.DISABLED
    endpoint.disabled_reason = reason
    endpoint.updated_at = now
    log.info("endpoint %s disabled: %s", endpoint.id, reason)
    return endpoint


def enable(session: Session, endpoint_id: str, now: datetime) -> Endpoint:
    """Deliver again; every event that waited for the endpoint goes now, on a fresh schedule."""
    endpoint = _editable(session, endpoint_id, switching=True)
    _enable(session, endpoint, now)
    endpoint.updated_at = now
    log.info("endpoint %s enabled", endpoint.id)
    return endpoint


def delete(session: Session, endpoint_id: str, now: datetime) -> Endpoint:
    """Hide the endpoint for good and fail its deliveries still waiting; the row stays as the
    target of its past deliveries."""
    endpoint = _editable(session, endpoint_id)
    endpoint.deleted_at = now
    endpoint.status = EndpointStatus.DISABLED
    endpoint.disabled_reason = DELETED_ERROR
    endpoint.updated_at = now
    waiting = set(
        session.scalars(
            select(Delivery.event_id).where(
                Delivery.endpoint_id == endpoint.id, Delivery.status == DeliveryStatus.PENDING
            )
        )
    )
    failed = cast(
        CursorResult[Any],
        session.execute(
            sql_update(Delivery)
            .where(Delivery.endpoint_id == endpoint.id, Delivery.status == DeliveryStatus.PENDING)
            .values(status=DeliveryStatus.FAILED, last_error=DELETED_ERROR, next_attempt_at=None)
            .execution_options(synchronize_session=False)
        ),
    )
    for event_id in sorted(waiting):
        refresh_event_status(session, event_id)
    log.info("endpoint %s deleted; %d pending deliveries failed", endpoint.id, failed.rowcount)
    return endpoint


def rotate_secret(session: Session, endpoint_id: str, *, settings: Settings, now: datetime) -> str:
    """A new secret, shown this once; the old one still signs for `settings.events.secret_overlap`
    so that the shop can switch without missing an event."""
    endpoint = _editable(session, endpoint_id)
    secret = new_secret()
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_until = now + settings.events.secret_overlap
    endpoint.secret = secret
    endpoint.updated_at = now
    log.info("endpoint %s has a new secret", endpoint.id)
    return secret


def get(session: Session, endpoint_id: str) -> Endpoint:
    """The endpoint, unless it was deleted."""
    endpoint = session.get(Endpoint, endpoint_id) if isinstance(endpoint_id, str) else None
    if endpoint is None or endpoint.deleted_at is not None:
        raise EndpointNotFound(f"no endpoint {endpoint_id}")
    return endpoint


def listing(session: Session) -> list[Endpoint]:
    """Every endpoint not deleted, oldest first."""
    query = select(Endpoint).where(Endpoint.deleted_at.is_(None)).order_by(Endpoint.id)
    return list(session.scalars(query))


def _editable(session: Session, endpoint_id: str, *, switching: bool = False) -> Endpoint:
    endpoint = session.execute(
        select(Endpoint).where(Endpoint.id == endpoint_id).with_for_update()
    ).scalar_one_or_none()
    if endpoint is None or endpoint.deleted_at is not None:
        raise EndpointNotFound(f"no endpoint {endpoint_id}")
    if switching:
        return endpoint
    if endpoint.origin is EndpointOrigin.ENVIRONMENT:
        raise EndpointNotEditable(
            f"endpoint {endpoint_id} comes from IPN_MERCHANT_WEBHOOK_URL: change it there"
        )
    if endpoint.origin is EndpointOrigin.PAYMENT:
        raise EndpointNotEditable(
            f"endpoint {endpoint_id} is the notify_url of payment {endpoint.payment_id}"
            " and cannot be changed"
        )
    return endpoint


def _enable(session: Session, endpoint: Endpoint, now: datetime) -> None:
    """Deliver again: every event that waited goes now, on a fresh schedule."""
    was_disabled = endpoint.status is EndpointStatus.DISABLED
    endpoint.status = EndpointStatus.ENABLED
    endpoint.failing_since = None
    endpoint.disabled_reason = None
    if was_disabled:
        session.execute(
            sql_update(Delivery)
            .where(Delivery.endpoint_id == endpoint.id, Delivery.status == DeliveryStatus.PENDING)
            .values(next_attempt_at=now, attempts=0)
            .execution_options(synchronize_session=False)
        )


def _url(value: Any, settings: Settings) -> str:
    if not isinstance(value, str):
        raise InvalidEndpoint("url", "url must be a string: the endpoint's https:// URL")
    try:
        urls.check_url(value, allow_private=settings.events.allow_private)
    except urls.UnsafeURL as exc:
        raise InvalidEndpoint("url", str(exc)) from None
    return value


def _events(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidEndpoint("events", "events must be a list of event types (empty: all)")
    known = {member.value for member in EventType}
    unknown = [item for item in value if item not in known]
    if unknown:
        raise InvalidEndpoint(
            "events",
            f"events: unknown event type {', '.join(map(repr, dict.fromkeys(unknown)))}"
            f" (known: {', '.join(member.value for member in EventType)})",
        )
    return list(dict.fromkeys(value))


def _description(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or "\x00" in value or len(value) > MAX_DESCRIPTION:
        raise InvalidEndpoint(
            "description", f"description must be text of at most {MAX_DESCRIPTION} characters"
        )
    return value


def _status(value: Any) -> EndpointStatus:
    try:
        return EndpointStatus(value)
    except ValueError:
        allowed = ", ".join(member.value for member in EndpointStatus)
        raise InvalidEndpoint("status", f"status must be one of {allowed}, not {value!r}") from None


def _host(url: str) -> str:
    """What the logs show of an endpoint: its host only, as a query string may hold a token."""
    return urllib.parse.urlsplit(url).hostname or "?"
