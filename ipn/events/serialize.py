"""The JSON shape of an endpoint, shared by the API and the CLI: its secret only when asked."""

from __future__ import annotations

from typing import Any

from ipn.serialize import when
from models.event import Endpoint


def endpoint(e: Endpoint, *, secret: str | None = None) -> dict[str, Any]:
    """The endpoint; `secret` is passed only by the answers that show a new secret, once."""
    shape: dict[str, Any] = {
        "id": e.id,
        "url": e.url,
        "events": list(e.events or []),
        "description": e.description,
        "status": e.status.value,
        "origin": e.origin.value,
        "payment_id": e.payment_id,
        "failing_since": when(e.failing_since),
        "disabled_reason": e.disabled_reason,
        "created_at": when(e.created_at),
        "updated_at": when(e.updated_at),
    }
    if secret is not None:
        shape["secret"] = secret
    return shape
