"""The callback endpoints: store the raw request in one INSERT, commit, enqueue, answer.

A callback is answered by `CallbackEndpoints`, a plain WSGI layer in front of Flask: it is the
one request a provider sends us by the hundred a second, and Flask's request machinery (a
request context, URL routing, the Response object) cost more of the web's CPU than the
answer's own work. It owns these paths: any other method on them is refused with 405, and every
other path goes on to Flask.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import (
    HTTPException,
    InternalServerError,
    MethodNotAllowed,
    RequestEntityTooLarge,
)
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_content_length, get_input_stream

from ipn.config import DEFAULT_ACCOUNT
from ipn.inbox import store_callback
from ipn.logs import bind, bound, request_id_from
from ipn.metrics import CALLBACK_DURATION, CALLBACKS, CALLBACKS_REFUSED

if TYPE_CHECKING:
    from ipn.dispatch import Dispatcher
    from ipn.services import Services

log = logging.getLogger(__name__)

PREFIX = "/ipn"

# path of the default account -> (provider, kind)
ENDPOINTS = {
    "/cubepay": ("cubepay", "ipn"),
    "/bitcoinpaygate/notification": ("bitcoinpaygate", "notification"),
    "/bitcoinpaygate/anomaly": ("bitcoinpaygate", "anomaly"),
    "/coinbarpay": ("coinbarpay", "callback"),
    "/cryptoprocessing": ("cryptoprocessing", "callback"),
}

# (status line, headers, body) of an answer
Answer = tuple[str, list[tuple[str, str]], bytes]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

TEXT = "text/plain; charset=utf-8"


def callback_path(provider: str, kind: str, account: str = DEFAULT_ACCOUNT) -> str:
    """Where one account's callbacks of one kind come: `/ipn/<provider>/<account>`, with the
    kind after it where a provider has two; today's paths are the default account's."""
    for path, (name, its_kind) in ENDPOINTS.items():
        if (name, its_kind) == (provider, kind):
            if account == DEFAULT_ACCOUNT:
                return f"{PREFIX}{path}"
            head, _, tail = path[1:].partition("/")
            return f"{PREFIX}/{head}/{account}" + (f"/{tail}" if tail else "")
    raise KeyError((provider, kind))


_DEFAULT_PATHS = {f"{PREFIX}{path}": route for path, route in ENDPOINTS.items()}
# (provider segment, segment after the account or "") -> (provider, kind)
_ACCOUNT_PATHS = {
    (path[1:].partition("/")[0], path[1:].partition("/")[2]): route
    for path, route in ENDPOINTS.items()
}


def route(path: str) -> tuple[str, str, str] | None:
    """(provider, kind, account) of a callback path, or None for any other path."""
    found = _DEFAULT_PATHS.get(path)
    if found is not None:
        return (*found, DEFAULT_ACCOUNT)
    parts = path.split("/")
    # "", "ipn", provider, account[, kind]
    if len(parts) not in (4, 5) or f"/{parts[1]}" != PREFIX or not parts[3]:
        return None
    if len(parts) == 5 and not parts[4]:
        return None  # a trailing slash: not a path of ours, as in Flask
    found = _ACCOUNT_PATHS.get((parts[2], parts[4] if len(parts) == 5 else ""))
    if found is None:
        return None
    # WSGI hands the path over as latin-1; Flask matches it decoded as UTF-8.
    account = parts[3].encode("latin-1").decode("utf-8", "replace")
    return (*found, account)


class CallbackEndpoints:
    """WSGI middleware that answers providers' POSTs to the callback paths itself."""

    def __init__(self, app: WSGIApp, extensions: dict[str, Any]) -> None:
        self.app = app
        # Read on each request, as the Flask app's own extensions are (a test may swap one).
        self.extensions = extensions

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        found = route(environ.get("PATH_INFO", ""))
        if found is None:
            return self.app(environ, start_response)
        if environ.get("REQUEST_METHOD") == "POST":
            services, dispatcher = self.extensions["ipn"], self.extensions["ipn.dispatcher"]
            status, headers, body = receive(services, dispatcher, environ, *found)
        else:
            # Providers only POST (CONTRACT): OPTIONS is refused like any other method.
            status, headers, body = plain_error(MethodNotAllowed(valid_methods=["POST"]))
        start_response(status, headers)
        return [body]


def receive(
    services: Services,
    dispatcher: Dispatcher,
    environ: dict[str, Any],
    provider: str,
    kind: str,
    account: str = DEFAULT_ACCOUNT,
) -> Answer:
    """Store one callback and answer it: `success` only once its row is committed."""
    started = time.perf_counter()
    request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID"))
    try:
        if not services.settings.has_account(provider, account):
            # Nothing stored: no credentials could ever verify it. Not 2xx, so a provider
            # pointed here by mistake keeps retrying until the account is configured.
            CALLBACKS_REFUSED.labels(provider, "404").inc()
            return _text(404, f"no {provider} account {account!r}\n")
        # Only a named account is worth a word on every line.
        named = None if account == DEFAULT_ACCOUNT else account
        with bound(request_id=request_id, provider=provider, account=named):
            status, headers, body = _receive(
                services, dispatcher, environ, provider, kind, account, request_id
            )
    except HTTPException as error:
        if isinstance(error, RequestEntityTooLarge):
            CALLBACKS_REFUSED.labels(provider, "413").inc()
        status, headers, body = plain_error(error)
    except Exception:
        log.exception("%s %s callback failed", provider, kind)
        status, headers, body = plain_error(InternalServerError())
    finally:
        CALLBACK_DURATION.labels(provider).observe(time.perf_counter() - started)
    headers.append(("X-Request-Id", request_id))
    return status, headers, body


def _receive(
    services: Services,
    dispatcher: Dispatcher,
    environ: dict[str, Any],
    provider: str,
    kind: str,
    account: str,
    request_id: str,
) -> Answer:
    cap = services.settings.max_body_bytes
    # Read to one byte over the cap: a declared length over it is refused before reading, and
    # a chunked body (no length) reads one byte too many. Werkzeug would otherwise cut a
    # chunked body at the limit without a word, and store it truncated.
    body = get_input_stream(environ, max_content_length=cap + 1).read()
    if len(body) > cap:
        raise RequestEntityTooLarge()
    # A server may hand over what arrived before the client hung up without a word: a body
    # shorter than its declared length is a cut-off upload, never stored, never `success`.
    declared = get_content_length(environ)
    if declared is not None and len(body) < declared:
        return _incomplete(provider, kind)
    try:
        notification_id = store_callback(
            services.db,
            provider,
            kind,
            body,
            dict(EnvironHeaders(environ)),
            environ.get("REMOTE_ADDR"),
            request_id=request_id,
            account=account,
        )
    except SQLAlchemyError as exc:
        CALLBACKS_REFUSED.labels(provider, "503").inc()
        log.error("%s %s callback not stored: %s", provider, kind, type(exc).__name__)
        # Not 200: the provider must send it again.
        return _text(503, "unavailable\n")
    CALLBACKS.labels(provider, kind).inc()
    bind(notification_id=notification_id)
    log.info("%s %s callback stored as notification %s", provider, kind, notification_id)
    dispatcher.submit(notification_id)
    return _text(200, "success")


def _incomplete(provider: str, kind: str) -> Answer:
    CALLBACKS_REFUSED.labels(provider, "400").inc()
    log.warning("%s %s callback cut short by the client; not stored", provider, kind)
    return _text(400, "incomplete body\n")


def _text(code: int, text: str) -> Answer:
    body = text.encode()
    status = f"{code} {HTTP_STATUS_CODES.get(code, 'UNKNOWN').upper()}"
    return status, [("Content-Type", TEXT), ("Content-Length", str(len(body)))], body


def plain_error(error: HTTPException) -> Answer:
    """An error as a short line a provider's log can show: never HTML, never a stack trace."""
    code = error.code or 500
    status, headers, body = _text(code, f"{code} {error.name}: {error.description}\n")
    return status, headers + error_headers(error), body


def error_headers(error: HTTPException) -> list[tuple[str, str]]:
    """What an error adds to its answer, Allow (405) and the like: the body's own Content-Type
    stays."""
    return [(n, v) for n, v in error.get_headers() if n.lower() != "content-type"]
