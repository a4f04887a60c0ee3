"""Server-to-server calls: timeouts, transient or permanent errors, retries on transient ones."""

from __future__ import annotations

import functools
import json
import logging
import time
import weakref
from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from ipn.config import HTTPSettings
from ipn.errors import PaymentNotFound, ProviderRejected, ProviderUnavailable
from ipn.metrics import PROVIDER_REQUEST_DURATION, PROVIDER_REQUESTS

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 300
# Answers are read a piece at a time so that the total deadline is checked between pieces.
CHUNK = 16384


def call_json(
    session: requests.Session,
    method: str,
    url: str,
    *,
    http: HTTPSettings,
    provider: str,
    operation: str = "status",
    attempts: int | None = None,
    **kwargs: Any,
) -> Any:
    """Send one request, retrying transient failures, and return the JSON answer (Decimals).

    Raises ProviderUnavailable for timeouts, connection errors, 429, 5xx and answers that are
    not JSON (after the last retry); PaymentNotFound for 404; ProviderRejected for other 4xx.
    `attempts=1` for calls that must not be repeated blindly, such as creating a payment.
    Each request is counted by `operation` (`status`, `create`) and outcome in ipn.metrics.
    The whole call, retries and waits included, ends within `http.total_timeout` seconds plus
    at most one socket timeout.
    """
    deadline = time.monotonic() + http.total_timeout
    where = f"{provider}: {method} {_path(url)}"

    def attempt() -> Any:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProviderUnavailable(f"{where} gave no answer within {http.total_timeout:g} s")
        started = time.perf_counter()
        outcome = "unreachable"
        try:
            try:
                response = send(
                    session,
                    method,
                    url,
                    (min(http.connect_timeout, remaining), min(http.read_timeout, remaining)),
                    **kwargs,
                )
                try:
                    read_body(response, deadline, http.read_timeout)
                finally:
                    response.close()
            except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
                outcome = "timeout"
                raise ProviderUnavailable(f"{where} timed out") from None
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise ProviderUnavailable(f"{where} failed: {type(exc).__name__}") from None
            except Overdue:
                outcome = "timeout"
                raise ProviderUnavailable(
                    f"{where} gave no answer within {http.total_timeout:g} s"
                ) from None
            log.info(
                "%s %s %s -> %s in %.0f ms",
                provider,
                method,
                _path(url),
                response.status_code,
                response.elapsed.total_seconds() * 1000,
            )
            outcome = status_class(response.status_code)
            try:
                return read_answer(response, provider)
            except ProviderUnavailable:
                # A success status whose body cannot be read as JSON.
                if outcome == "ok":
                    outcome = "garbage"
                raise
        finally:
            counted, timed = _metrics(provider, operation, outcome)
            counted.inc()
            timed.observe(time.perf_counter() - started)

    return _retrying(attempts or http.attempts, http.total_timeout, http.backoff_max)(attempt)


@functools.lru_cache(maxsize=256)
def _metrics(provider: str, operation: str, outcome: str) -> tuple[Any, Any]:
    """The request counter and duration histogram of one provider, operation and outcome,
    looked up once: `labels()` takes a lock and checks its labels on every call."""
    return (
        PROVIDER_REQUESTS.labels(provider, operation, outcome),
        PROVIDER_REQUEST_DURATION.labels(provider, operation),
    )


@functools.lru_cache(maxsize=64)
def _retrying(attempts: int, total_timeout: float, backoff_max: float) -> Retrying:
    """The retry policy, built once per setting: building it for every call cost more than
    the rest of the call's own work against a fast provider. Each call keeps its own state,
    its clock included."""
    return Retrying(
        retry=retry_if_exception_type(ProviderUnavailable),
        stop=stop_after_attempt(max(1, attempts)) | stop_after_delay(total_timeout),
        # Exponential from 0.1 s with up to a second of jitter, so that workers that failed
        # together do not retry together; never longer than backoff_max.
        wait=wait_exponential_jitter(multiplier=0.1, max=backoff_max),
        reraise=True,
    )


# What the environment says about each origin (proxies, CA bundle), by session: read once, as
# it does not change while the process runs.
_ENVIRONMENT: weakref.WeakKeyDictionary[requests.Session, dict[str, dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


def send(
    session: requests.Session,
    method: str,
    url: str,
    timeout: tuple[float, float],
    **kwargs: Any,
) -> requests.Response:
    """One request, streamed, through the session's transport adapter and its keep-alive pool.

    `Session.request` costs more than the exchange itself on a fast network: it merges cookies,
    hooks and the environment's proxy and netrc settings on every call. Here the session's
    headers and auth are merged as it would, the environment (proxies, CA bundle) is read once
    per origin, and neither cookies nor netrc are used: a provider's API is stateless and signed.
    Redirects are not followed (a signed request goes only where it was addressed);
    `read_answer` refuses them."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    known = _ENVIRONMENT.setdefault(session, {})
    if origin not in known:
        known[origin] = dict(
            session.merge_environment_settings(
                origin, session.proxies, True, session.verify, session.cert
            )
        )
    request = requests.PreparedRequest()
    # `prepare` less its cookies and hooks, the URL's checks and quoting done once per URL.
    request.method = method.upper()
    request.url = _prepared_url(url)
    request.prepare_headers({**session.headers, **(kwargs.pop("headers", None) or {})})
    request.prepare_body(
        kwargs.pop("data", None), kwargs.pop("files", None), kwargs.pop("json", None)
    )
    request.prepare_auth(kwargs.pop("auth", None) or session.auth, request.url)
    if kwargs:
        raise TypeError(f"send() got unexpected arguments: {', '.join(sorted(kwargs))}")
    started = time.perf_counter()
    response = session.get_adapter(url).send(request, timeout=timeout, **known[origin])
    response.elapsed = timedelta(seconds=time.perf_counter() - started)
    return response


@functools.lru_cache(maxsize=1024)
def _prepared_url(url: str) -> str:
    """The URL as requests would send it (IDNA host, quoted path), or its error."""
    request = requests.PreparedRequest()
    request.prepare_url(url, None)
    return request.url or url


def status_class(status: int) -> str:
    """The outcome label of an answer with this HTTP status."""
    if status >= 500:
        return "5xx"
    if status >= 400:
        return "4xx"
    return "ok"


class Overdue(Exception):
    """The answer was still arriving when the call's deadline came."""


def read_body(response: requests.Response, deadline: float, read_timeout: float) -> None:
    """Read a streamed answer into `response.content`, a piece at a time, until `deadline`
    (a `time.monotonic()` value): a read timeout bounds each wait for the next byte, not the
    whole answer."""
    pieces = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Overdue()
        sock = getattr(getattr(response.raw, "connection", None), "sock", None)
        if sock is not None:
            sock.settimeout(min(read_timeout, remaining))
        piece = response.raw.read1(CHUNK, decode_content=True)
        if not piece:
            break
        pieces.append(piece)
    # What `response.content` would have read itself, had the answer not been streamed.
    response._content = b"".join(pieces)


def read_answer(response: requests.Response, provider: str) -> Any:
    """Classify a provider's HTTP answer, returning its JSON on success."""
    status = response.status_code
    where = f"{provider}: {response.request.method} {_path(response.url)}"
    if status == 429 or status >= 500:
        raise ProviderUnavailable(f"{where} answered {status}: {error_message(response)}")
    if status == 404:
        raise PaymentNotFound(f"{where} answered 404: {error_message(response)}")
    if status >= 400:
        raise ProviderRejected(f"{where} answered {status}: {error_message(response)}")
    if 300 <= status < 400:
        # Not followed: the signed request was meant for this address only.
        target = response.headers.get("Location", "nowhere")
        raise ProviderRejected(f"{where} answered {status}, a redirect to {_clip(target)}")
    try:
        return json.loads(response.content.decode("utf-8"), parse_float=Decimal)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProviderUnavailable(
            f"{where} answered {status} with a body that is not JSON: "
            f"{_clip(response.content.decode('utf-8', 'replace'))}"
        ) from None


def error_message(response: requests.Response) -> str:
    """The provider's own words from an error answer, in any of the shapes providers use."""
    try:
        payload = response.json()
    except ValueError:
        return _clip(response.text) or response.reason or "no message"
    return _clip(message_from(payload)) or response.reason or "no message"


def message_from(payload: Any) -> str:
    if isinstance(payload, list):  # BitcoinPaygate: [{"message": "..."}, ...]
        return "; ".join(message_from(item) for item in payload)
    if isinstance(payload, dict):
        for key in ("message", "error", "data", "status_descr", "detail"):
            value = payload.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict | list) and value:
                return message_from(value)
        return json.dumps(payload, default=str)
    return str(payload)


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def _path(url: str) -> str:
    """The URL without scheme and host, for logs: hosts are config, paths tell what happened."""
    rest = url.split("://", 1)[-1]
    return "/" + rest.split("/", 1)[1] if "/" in rest else "/"
