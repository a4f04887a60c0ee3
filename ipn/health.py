"""Liveness, readiness (database and broker reachable) and Prometheus metrics; no token needed."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from ipn import metrics

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    services = current_app.extensions["ipn"]
    checks: dict[str, str] = {}
    try:
        with services.db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        celery = current_app.extensions["celery"]
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return jsonify(status="ready" if ready else "not ready", checks=checks), 200 if ready else 503


@bp.get("/metrics")
def prometheus() -> Response:
    # content_type, not mimetype: CONTENT_TYPE_LATEST carries its charset already.
    services = current_app.extensions["ipn"]
    return Response(
        metrics.render(services.db, services.settings.poll_limits),
        content_type=CONTENT_TYPE_LATEST,
    )
