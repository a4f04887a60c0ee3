"""The sandbox's Flask app: fake provider APIs at the root, the control API under /sandbox/, and
a merchant's shop that the receiver's events go to under /sandbox/shop."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request

from ipn.config import Settings
from ipn.sandbox import shop, wire
from ipn.sandbox.control import NotFound, Sandbox, utc_now
from ipn.sandbox.fake import ACTIONS, ActionRefused, Answer, BadOptions, Incoming, Route, Timings

log = logging.getLogger(__name__)

bp = Blueprint("sandbox", __name__, url_prefix="/sandbox")
_ACTION_RULE = "<any({}):action>".format(", ".join(f'"{a}"' for a in (*ACTIONS, "resend")))


def create_app(
    settings: Settings | None = None,
    *,
    clock: Callable[[], datetime] | None = None,
    receiver_url: str | None = None,
    fault_delay: float | None = None,
    delivery_timeout: float = 5.0,
    bitcoinpaygate_expiry: timedelta = timedelta(minutes=15),
    coinbarpay_timeout: timedelta | None = None,
) -> Flask:
    """One app serving every fake provider; credentials from `settings` (else the sandbox's own).

    `receiver_url` (default IPN_PUBLIC_URL) is where CoinbarPay and CryptoProcessing callbacks go;
    CubePay and BitcoinPaygate send theirs to the URLs named in each create request.
    `fault_delay` is how long a `timeout` fault holds its answer: by default past the read
    timeout the settings give the receiver, so that the receiver really times out.
    """
    settings = settings or Settings.from_env()
    if fault_delay is None:
        fault_delay = timeout_fault_delay(settings)
    sandbox = Sandbox(
        settings,
        clock=clock or utc_now,
        receiver_url=receiver_url,
        fault_delay=fault_delay,
        delivery_timeout=delivery_timeout,
        timings=Timings(
            bitcoinpaygate_expiry=bitcoinpaygate_expiry,
            coinbarpay_timeout=coinbarpay_timeout or settings.coinbarpay.payment_timeout,
        ),
    )
    app = Flask(__name__, static_folder=None)
    app.extensions["ipn_sandbox"] = sandbox
    app.extensions[shop.EXTENSION] = shop.shop_for(settings, sandbox.clock)
    for name, fake in sandbox.fakes.items():
        for route in fake.routes():
            app.add_url_rule(
                route.rule,
                route.endpoint,
                _provider_view(sandbox, name, route),
                methods=list(route.methods),
            )
    app.register_blueprint(bp)
    app.register_blueprint(shop.bp)
    return app


def timeout_fault_delay(settings: Settings) -> float:
    """Longer than the receiver's read timeout, with room for its clock and the scheduler."""
    return settings.http.read_timeout * 1.5 + 2


def serve(
    host: str = "127.0.0.1",
    port: int = 8001,
    settings: Settings | None = None,
    receiver_url: str | None = None,
) -> None:
    """Run the sandbox with werkzeug's threaded server until interrupted (`ipn sandbox`)."""
    from werkzeug.serving import run_simple

    app = create_app(settings, receiver_url=receiver_url)
    sandbox: Sandbox = app.extensions["ipn_sandbox"]
    log.info(
        "provider sandbox on http://%s:%d; CoinbarPay and CryptoProcessing callbacks go to %s",
        host,
        port,
        sandbox.receiver_url,
    )
    run_simple(host, port, app, threaded=True, use_reloader=False, use_debugger=False)


def _provider_view(sandbox: Sandbox, provider: str, route: Route) -> Callable[..., Response]:
    def view(**args: str) -> Response:
        body = request.get_data(cache=True)
        auth = request.authorization
        incoming = Incoming(
            method=request.method,
            headers=dict(request.headers.items()),
            body=body,
            base_url=request.host_url,
            form=tuple(request.form.items(multi=True)),
            basic_auth=(
                (auth.username or "", auth.password or "")
                if auth is not None and auth.type == "basic"
                else None
            ),
            args=args,
        )
        return _response(sandbox.call(provider, route.handler, incoming))

    view.__name__ = route.endpoint
    return view


def _response(answer: Answer) -> Response:
    response = Response(answer.body, status=answer.status, content_type=answer.content_type)
    for name, value in answer.headers:
        response.headers[name] = value
    if answer.declared_length is not None:
        # Promise more than is sent and close: a client sees the body end early.
        response.headers["Content-Length"] = str(answer.declared_length)
        response.headers["Connection"] = "close"
    return response


# -- control API ----------------------------------------------------------------------------


def _sandbox() -> Sandbox:
    sandbox: Sandbox = current_app.extensions["ipn_sandbox"]
    return sandbox


def _json(value: Any, status: int = 200) -> Response:
    return Response(wire.dumps(value), status=status, content_type="application/json")


def _body() -> Any:
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        return wire.loads(raw)
    except ValueError as exc:
        raise BadOptions(f"the body is not JSON: {exc}") from None


@bp.errorhandler(NotFound)
def _not_found(exc: NotFound) -> Response:
    return _json({"error": str(exc)}, 404)


@bp.errorhandler(BadOptions)
def _bad_options(exc: BadOptions) -> Response:
    return _json({"error": str(exc)}, 400)


@bp.errorhandler(ActionRefused)
def _refused(exc: ActionRefused) -> Response:
    return _json({"error": str(exc)}, 409)


@bp.get("/")
def index() -> Response:
    return _json(_sandbox().describe())


@bp.get("/payments")
def list_payments() -> Response:
    return _json({"items": _sandbox().payments()})


@bp.delete("/payments")
def reset() -> Response:
    return _json({"deleted": _sandbox().reset()})


@bp.get("/payments/<provider>/<path:ident>")
def show_payment(provider: str, ident: str) -> Response:
    return _json(_sandbox().payment(provider, ident))


@bp.post(f"/payments/<provider>/<path:ident>/{_ACTION_RULE}")
def act(provider: str, ident: str, action: str) -> Response:
    if action == "resend":
        return _json(_sandbox().resend(provider, ident))
    return _json(_sandbox().act(provider, ident, action, _body()))


@bp.get("/faults")
def list_faults() -> Response:
    return _json({"faults": _sandbox().faults.view()})


@bp.post("/faults")
def add_fault() -> Response:
    return _json({"faults": _sandbox().add_fault(_body())}, 201)


@bp.delete("/faults")
def clear_faults() -> Response:
    return _json({"faults": _sandbox().clear_faults(request.args.get("provider"))})
