"""The transport under the provider sessions: keep-alive `http.client` connections per origin.

Against a fast provider, requests' own adapter (urllib3's pool, its retry and response objects,
a dropped-connection poll and a header copy per call) cost about four times the CPU of the
exchange itself, and a reconciliation pass makes thousands of these calls a second. This
adapter sends a prepared request on a kept `http.client` connection and hands back the same
`requests.Response`, streamed, so everything above it (sessions, `call_json`, the tests'
`responses` mocks) is unchanged. A request through a proxy or with a client certificate goes
through requests' own adapter: neither is how providers are reached in practice, and both are
requests' to get right.
"""

from __future__ import annotations

import functools
import http.client
import os
import select
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.adapters
from requests.structures import CaseInsensitiveDict
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_encoding_from_headers, select_proxy

# (scheme, host, port, what verifies the certificate)
Origin = tuple[str, str, int, bool | str]
DEFAULT_PORTS = {"http": 80, "https": 443}


class KeepAliveAdapter(requests.adapters.HTTPAdapter):
    """Keeps up to `pool_maxsize` idle connections per origin, the most recently used first."""

    def __init__(self, pool_maxsize: int = 10) -> None:
        super().__init__(pool_connections=4, pool_maxsize=pool_maxsize)
        self._keep = pool_maxsize
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def send(  # type: ignore[override]
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        url = request.url or ""
        parts = urlsplit(url)
        if cert or select_proxy(url, proxies or {}) or parts.scheme not in DEFAULT_PORTS:
            return super().send(
                request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies
            )
        connect_timeout, read_timeout = _timeouts(timeout)
        origin: Origin = (
            parts.scheme,
            parts.hostname or "",
            parts.port or DEFAULT_PORTS[parts.scheme],
            verify,
        )
        connection = self._checkout(origin)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = request.body.encode("utf-8") if isinstance(request.body, str) else request.body
        try:
            if connection.sock is None:
                connection.timeout = connect_timeout
                try:
                    connection.connect()
                except TimeoutError as exc:
                    raise requests.ConnectTimeout(exc, request=request) from None
            assert connection.sock is not None
            connection.sock.settimeout(read_timeout)
            connection.request(request.method or "GET", target, body, dict(request.headers))
            answer = connection.getresponse()
        except requests.RequestException:
            connection.close()
            raise
        except TimeoutError as exc:
            connection.close()
            raise requests.ReadTimeout(exc, request=request) from None
        except ssl.SSLError as exc:
            connection.close()
            raise requests.exceptions.SSLError(exc, request=request) from None
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise requests.ConnectionError(exc, request=request) from None

        response = requests.Response()
        response.status_code = answer.status
        response.reason = answer.reason
        response.headers = _headers(answer)
        response.encoding = get_encoding_from_headers(response.headers)
        response.url = url
        response.request = request
        response.connection = self
        response.raw = Answer(answer, connection, lambda: self._checkin(origin, connection))
        if response.headers.get("Content-Encoding", "identity").lower() != "identity":
            # Provider sessions ask for identity; an answer encoded anyway is not read.
            response.raw.close()
            raise requests.exceptions.ContentDecodingError(
                f"answer encoded as {response.headers['Content-Encoding']}", request=request
            )
        if not stream:
            response.content  # noqa: B018 (reads the body, as requests does unstreamed)
        return response

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()
        super().close()

    def _checkout(self, origin: Origin) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                kept = self._idle.get(origin)
                connection = kept.pop() if kept else None
            if connection is None:
                return _connection(origin)
            if _still_open(connection):
                return connection
            connection.close()

    def _checkin(self, origin: Origin, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            kept = self._idle.setdefault(origin, [])
            if len(kept) < self._keep:
                kept.append(connection)
                return
        connection.close()


class Answer:
    """The streamed body of one answer, as `read_body` and `requests.Response` read it: the
    connection goes back to its pool once the body is read to its end, and is closed if the
    answer is abandoned half read or the server said it will close."""

    def __init__(
        self,
        answer: http.client.HTTPResponse,
        connection: http.client.HTTPConnection,
        release: Any,
    ) -> None:
        self._answer = answer
        self.connection: http.client.HTTPConnection | None = connection
        self._release = release

    def read1(self, amount: int, decode_content: bool = True) -> bytes:
        return self._read(self._answer.read1, amount)

    def read(self, amount: int | None = None, decode_content: bool = True) -> bytes:
        return self._read(self._answer.read, amount)

    def _read(self, read: Any, amount: int | None) -> bytes:
        try:
            piece: bytes = read(amount) if amount is not None else read()
        except TimeoutError:
            self.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            # A body cut short (IncompleteRead) or a broken chunked encoding.
            raise requests.ConnectionError(exc) from None
        if not piece and self._answer.length:
            # http.client's read1 takes the end of the stream for the end of the body.
            self.close()
            raise requests.ConnectionError(
                http.client.IncompleteRead(b"", self._answer.length)
            ) from None
        if not piece or self._answer.isclosed():
            self._finish()
        return piece

    def _finish(self) -> None:
        connection, self.connection = self.connection, None
        if connection is None:
            return
        # http.client closes an answer read to its end only on the read after the last byte.
        read = self._answer.isclosed() or self._answer.length == 0
        if read and not self._answer.will_close:
            self._answer.close()  # the connection sends its next request only after this
            self._release()
        else:
            connection.close()

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()

    def release_conn(self) -> None:
        """Called by `Response.close()` after `close()`: nothing left to release."""


def _connection(origin: Origin) -> http.client.HTTPConnection:
    scheme, host, port, verify = origin
    if scheme == "https":
        return http.client.HTTPSConnection(host, port, context=_tls_context(verify))
    return http.client.HTTPConnection(host, port)


@functools.lru_cache(maxsize=8)
def _tls_context(verify: bool | str) -> ssl.SSLContext:
    """Certificates checked as requests checks them: against certifi's bundle, or the bundle
    or directory `verify` names, or not at all for `verify=False`. Built once: loading a
    bundle costs milliseconds."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    where = DEFAULT_CA_BUNDLE_PATH if verify is True else verify
    if os.path.isdir(where):
        return ssl.create_default_context(capath=where)
    return ssl.create_default_context(cafile=where)


def _still_open(connection: http.client.HTTPConnection) -> bool:
    """Whether an idle connection can carry another request: a socket with something to read
    while no request is out has been closed by the server (or sent garbage)."""
    sock = connection.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _timeouts(timeout: Any) -> tuple[float | None, float | None]:
    if isinstance(timeout, tuple):
        return timeout[0], timeout[1]
    return timeout, timeout


def _headers(answer: http.client.HTTPResponse) -> CaseInsensitiveDict[str]:
    """The answer's headers, a repeated one joined with commas as urllib3 joins them."""
    headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
    for name, value in answer.getheaders():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def keep_alive_session(pool_maxsize: int = 10) -> requests.Session:
    """A session whose http and https requests go through a `KeepAliveAdapter`."""
    session = requests.Session()
    # Status answers are small, and the adapter reads bodies as they arrive, undecoded.
    session.headers["Accept-Encoding"] = "identity"
    adapter = KeepAliveAdapter(pool_maxsize)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


__all__ = ["Answer", "KeepAliveAdapter", "keep_alive_session"]
