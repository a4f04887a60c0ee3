"""Builds the web application, with its Celery app and services, from settings."""

from __future__ import annotations

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from ipn.callbacks import CallbackEndpoints, error_headers, plain_error
from ipn.config import Settings
from ipn.dispatch import Dispatcher, RedisPublisher, batch_sender, delivery_sender
from ipn.logs import configure_logging
from ipn.services import Services
from workers.app import make_celery


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; settings come from the environment unless a test passes its own."""
    settings = settings or Settings.from_env()
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    configure_logging(settings)

    services = Services.from_settings(settings)
    app.extensions["ipn"] = services

    celery = make_celery(app, settings)
    app.extensions["celery"] = celery
    publish = (
        RedisPublisher(settings.redis_url, settings.queue)
        if settings.redis_url
        else batch_sender(celery)
    )
    app.extensions["ipn.dispatcher"] = Dispatcher(send_batch=publish)
    app.extensions["ipn.event_dispatcher"] = Dispatcher(
        delivery_sender(celery), what="event delivery"
    )

    def wake(delivery_ids: list[int]) -> None:
        dispatcher = app.extensions["ipn.event_dispatcher"]
        for delivery_id in delivery_ids:
            dispatcher.submit(delivery_id)

    services.wake_deliveries = wake

    from ipn import api, cli, health
    from ipn.events import api as endpoints_api

    app.register_blueprint(health.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(endpoints_api.bp)
    app.register_blueprint(endpoints_api.events_bp)
    cli.register(app)
    if settings.console:
        from ipn import console

        console.init_app(app, settings)

    # Callbacks are answered in front of Flask (ipn.callbacks), behind the proxy's fixes.
    app.wsgi_app = CallbackEndpoints(app.wsgi_app, app.extensions)  # type: ignore[method-assign]
    if settings.trusted_proxies:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies
        )

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        # No HTML pages and never a stack trace: JSON for API clients, elsewhere a short line
        # a provider's log can show.
        if request.path == "/api" or request.path.startswith("/api/"):
            response = jsonify(error=f"{error.name}: {error.description}")
        elif settings.console and (
            request.path == "/console" or request.path.startswith("/console/")
        ):
            from ipn.console.views import error_page

            response = error_page(error.code or 500, error.name, _sentence(error))
        else:
            status, headers, body = plain_error(error)
            return Response(body, status=status, headers=headers)
        response.status_code = error.code or 500
        for name, value in error_headers(error):
            response.headers[name] = value
        return response

    return app


def _sentence(error: HTTPException) -> str:
    """What a console page says about an error: our own words, or werkzeug's stock ones; a 500
    never shows the exception behind it."""
    if (error.code or 500) >= 500:
        return "Something went wrong on our side; the error is in the server's log."
    return error.description or ""
