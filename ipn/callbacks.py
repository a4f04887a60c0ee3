"""The callback endpoints: store the raw request in one INSERT, commit, enqueue, answer."""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Response, current_app, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from ipn.config import DEFAULT_ACCOUNT
from ipn.inbox import store_callback
from ipn.logs import bind, bound, request_id_from
from ipn.metrics import CALLBACK_DURATION, CALLBACKS, CALLBACKS_REFUSED

log = logging.getLogger(__name__)

bp = Blueprint("callbacks", __name__, url_prefix="/ipn")

# path of the default account -> (provider, kind)
ENDPOINTS = {
    "/cubepay": ("cubepay", "ipn"),
    "/bitcoinpaygate/notification": ("bitcoinpaygate", "notification"),
    "/bitcoinpaygate/anomaly": ("bitcoinpaygate", "anomaly"),
    "/coinbarpay": ("coinbarpay", "callback"),
    "/cryptoprocessing": ("cryptoprocessing", "callback"),
}


def callback_path(provider: str, kind: str, account: str = DEFAULT_ACCOUNT) -> str:
    """Where one account's callbacks of one kind come: `/ipn/<provider>/<account>`, with the
    kind after it where a provider has two; today's paths are the default account's."""
    for path, (name, its_kind) in ENDPOINTS.items():
        if (name, its_kind) == (provider, kind):
            if account == DEFAULT_ACCOUNT:
                return f"{bp.url_prefix}{path}"
            head, _, tail = path[1:].partition("/")
            return f"{bp.url_prefix}/{head}/{account}" + (f"/{tail}" if tail else "")
    raise KeyError((provider, kind))


def receive(provider: str, kind: str, account: str = DEFAULT_ACCOUNT) -> Response:
    started = time.perf_counter()
    request_id = request_id_from(request.headers.get("X-Request-Id"))
    if not current_app.extensions["ipn"].settings.has_account(provider, account):
        # Nothing stored: no credentials could ever verify it. Not 2xx, so a provider pointed
        # here by mistake keeps retrying until the account is configured.
        CALLBACKS_REFUSED.labels(provider, "404").inc()
        return Response(f"no {provider} account {account!r}\n", status=404, mimetype="text/plain")
    try:
        # Only a named account is worth a word on every line.
        named = None if account == DEFAULT_ACCOUNT else account
        with bound(request_id=request_id, provider=provider, account=named):
            response = _receive(provider, kind, request_id, account)
    except RequestEntityTooLarge:
        CALLBACKS_REFUSED.labels(provider, "413").inc()
        raise
    finally:
        CALLBACK_DURATION.labels(provider).observe(time.perf_counter() - started)
    response.headers["X-Request-Id"] = request_id
    return response


def _receive(provider: str, kind: str, request_id: str, account: str) -> Response:
    services = current_app.extensions["ipn"]
    body = request.get_data(cache=False)
    # The app's MAX_CONTENT_LENGTH is one byte over the cap: a declared length over it is
    # refused before reading, and a chunked body (no length) reads one byte too many. Werkzeug
    # would otherwise cut a chunked body at the limit without a word, and store it truncated.
    if len(body) > services.settings.max_body_bytes:
        raise RequestEntityTooLarge()
    # A server may hand over what arrived before the client hung up without a word: a body
    # shorter than its declared length is a cut-off upload, never stored, never `success`.
    if request.content_length is not None and len(body) < request.content_length:
        return _incomplete(provider, kind)
    try:
        notification_id = store_callback(
            services.db,
            provider,
            kind,
            body,
            dict(request.headers),
            request.remote_addr,
            request_id=request_id,
            account=account,
        )
    except SQLAlchemyError as exc:
        CALLBACKS_REFUSED.labels(provider, "503").inc()
        log.error("%s %s callback not stored: %s", provider, kind, type(exc).__name__)
        # Not 200: the provider must send it again.
        return Response("unavailable\n", status=503, mimetype="text/plain")
    CALLBACKS.labels(provider, kind).inc()
    bind(notification_id=notification_id)
    log.info("%s %s callback stored as notification %s", provider, kind, notification_id)
    current_app.extensions["ipn.dispatcher"].submit(notification_id)
    return Response("success", status=200, mimetype="text/plain")


def _incomplete(provider: str, kind: str) -> Response:
    CALLBACKS_REFUSED.labels(provider, "400").inc()
    log.warning("%s %s callback cut short by the client; not stored", provider, kind)
    return Response("incomplete body\n", status=400, mimetype="text/plain")


for _path, (_provider, _kind) in ENDPOINTS.items():
    bp.add_url_rule(
        _path,
        endpoint=f"{_provider}_{_kind}",
        view_func=lambda provider=_provider, kind=_kind: receive(provider, kind),
        methods=["POST"],
        # Providers only POST (CONTRACT): OPTIONS is refused like any other method.
        provide_automatic_options=False,
    )
    _head, _, _tail = _path[1:].partition("/")
    bp.add_url_rule(
        f"/{_head}/<account>" + (f"/{_tail}" if _tail else ""),
        endpoint=f"{_provider}_{_kind}_account",
        view_func=lambda account, provider=_provider, kind=_kind: receive(provider, kind, account),
        methods=["POST"],
        provide_automatic_options=False,
    )
