"""The provider sessions' keep-alive transport against a real HTTP/1.1 server on loopback:
connections kept and reused, dropped ones noticed, every way an answer can go wrong mapped
to the error `call_json` classifies."""

from __future__ import annotations

import gzip
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from ipn.config import HTTPSettings
from ipn.errors import ProviderUnavailable
from ipn.providers.http import call_json
from ipn.providers.transport import KeepAliveAdapter, keep_alive_session

from helpers import self_signed_certificate

ONE_TRY = HTTPSettings(connect_timeout=1, read_timeout=0.5, attempts=1, total_timeout=5)


class Provider:
    """A provider API that answers by path and counts the connections it was asked on."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.connections = 0
        self.seen: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                owner.connections += 1

            def do_GET(self) -> None:
                self.answer()

            def do_POST(self) -> None:
                self.answer()

            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                owner.seen.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": self.rfile.read(length),
                    }
                )
                ANSWERS[self.path.split("?")[0].rsplit("/", 1)[-1]](self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # A client that gave up (the timeout tests) leaves the handler a broken pipe.
        self.server.handle_error = lambda request, address: None  # type: ignore[method-assign]
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _json(handler: BaseHTTPRequestHandler, body: bytes = b'{"amount": 0.1}') -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("X-Seen", "one")
    handler.send_header("X-Seen", "two")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _closing(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Connection", "close")
    handler.send_header("Content-Length", "2")
    handler.end_headers()
    handler.wfile.write(b"{}")
    handler.close_connection = True


def _hangs_up(handler: BaseHTTPRequestHandler) -> None:
    """Answers as if the connection stayed open, then closes it: an idle timeout."""
    _json(handler)
    handler.wfile.flush()
    handler.close_connection = True


def _chunked(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    for piece in (b'{"amount": ', b"12.30", b"}"):
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
    handler.wfile.write(b"0\r\n\r\n")


def _cut_short(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "100")
    handler.end_headers()
    handler.wfile.write(b'{"amount": ')
    handler.close_connection = True


def _slow(handler: BaseHTTPRequestHandler) -> None:
    time.sleep(1.5)
    _json(handler)


def _large(handler: BaseHTTPRequestHandler) -> None:
    _json(handler, b'{"pad": "' + b"x" * 100_000 + b'"}')


def _gzipped(handler: BaseHTTPRequestHandler) -> None:
    body = gzip.compress(b"{}")
    handler.send_response(200)
    handler.send_header("Content-Encoding", "gzip")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _not_http(handler: BaseHTTPRequestHandler) -> None:
    handler.wfile.write(b"SUCCESS\r\n\r\n")
    handler.close_connection = True


def _bad_chunk(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    handler.wfile.write(b'5\r\n{"a":\r\nzz\r\n')
    handler.close_connection = True


ANSWERS: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {
    "json": _json,
    "closing": _closing,
    "hangs-up": _hangs_up,
    "chunked": _chunked,
    "cut-short": _cut_short,
    "slow": _slow,
    "large": _large,
    "gzipped": _gzipped,
    "not-http": _not_http,
    "bad-chunk": _bad_chunk,
}


@pytest.fixture
def provider() -> Iterator[Provider]:
    server = Provider()
    yield server
    server.stop()


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with keep_alive_session() as kept:
        yield kept


def ask(session: requests.Session, url: str, **kwargs: Any) -> Any:
    return call_json(session, "POST", url, http=ONE_TRY, provider="test", **kwargs)


def test_calls_share_one_connection_and_send_what_was_prepared(
    provider: Provider, session: requests.Session
) -> None:
    answers = [
        ask(session, f"{provider.url}/v1/json?id=7", data={"id": "C1", "note": "a b&c"})
        for _ in range(5)
    ]
    assert answers == [{"amount": Decimal("0.1")}] * 5
    assert provider.connections == 1
    first = provider.seen[0]
    assert first["method"] == "POST" and first["path"] == "/v1/json?id=7"
    assert first["body"] == b"id=C1&note=a+b%26c"
    assert first["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert first["headers"]["Host"] == provider.url.split("//")[1]
    assert first["headers"]["Accept-Encoding"] == "identity"


def test_the_answer_reads_as_requests_would_give_it(
    provider: Provider, session: requests.Session
) -> None:
    answer = session.get(f"{provider.url}/json", auth=("key", "secret"), timeout=1)
    assert answer.status_code == 200 and answer.reason == "OK"
    assert answer.json() == {"amount": 0.1}
    # A repeated header is joined as urllib3 joins it; names are case-insensitive.
    assert answer.headers["x-seen"] == "one, two"
    assert answer.url == f"{provider.url}/json"
    assert provider.seen[0]["headers"]["Authorization"] == "Basic a2V5OnNlY3JldA=="


def test_a_server_that_says_close_gets_a_new_connection_each_time(
    provider: Provider, session: requests.Session
) -> None:
    for _ in range(3):
        assert ask(session, f"{provider.url}/closing") == {}
    assert provider.connections == 3


def test_a_connection_the_server_dropped_while_idle_is_not_reused(
    provider: Provider, session: requests.Session
) -> None:
    for _ in range(3):
        assert ask(session, f"{provider.url}/hangs-up") == {"amount": Decimal("0.1")}
        time.sleep(0.05)  # the server's close arrives while the connection is idle
    assert provider.connections == 3
    assert len(provider.seen) == 3


def test_a_chunked_answer_is_read_whole_and_its_connection_kept(
    provider: Provider, session: requests.Session
) -> None:
    assert ask(session, f"{provider.url}/chunked") == {"amount": Decimal("12.30")}
    assert ask(session, f"{provider.url}/json") == {"amount": Decimal("0.1")}
    assert provider.connections == 1


def test_a_large_answer_is_read_in_pieces(provider: Provider, session: requests.Session) -> None:
    assert ask(session, f"{provider.url}/large") == {"pad": "x" * 100_000}
    assert ask(session, f"{provider.url}/json") == {"amount": Decimal("0.1")}
    assert provider.connections == 1


def test_an_answer_abandoned_half_read_closes_its_connection(
    provider: Provider, session: requests.Session
) -> None:
    answer = session.get(f"{provider.url}/large", stream=True, timeout=1)
    assert answer.raw.read1(10) == b'{"pad": "x'
    answer.close()
    assert session.get(f"{provider.url}/json", timeout=1).json() == {"amount": 0.1}
    assert provider.connections == 2


def test_an_answer_cut_short_is_unavailable(provider: Provider, session: requests.Session) -> None:
    with pytest.raises(ProviderUnavailable, match="failed: ConnectionError"):
        ask(session, f"{provider.url}/cut-short")
    assert ask(session, f"{provider.url}/json") == {"amount": Decimal("0.1")}
    assert provider.connections == 2


def test_a_slow_answer_times_out_and_its_connection_is_not_reused(
    provider: Provider, session: requests.Session
) -> None:
    with pytest.raises(requests.ReadTimeout):
        session.get(f"{provider.url}/slow", timeout=(1, 0.3))
    with pytest.raises(ProviderUnavailable, match="timed out"):
        ask(session, f"{provider.url}/slow")
    assert ask(session, f"{provider.url}/json") == {"amount": Decimal("0.1")}
    assert provider.connections == 3


def test_nobody_listening_is_unavailable(session: requests.Session) -> None:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
    with pytest.raises(requests.ConnectionError):
        session.get(f"http://127.0.0.1:{port}/json", timeout=1)
    with pytest.raises(ProviderUnavailable, match="failed: ConnectionError"):
        ask(session, f"http://127.0.0.1:{port}/json")


def test_an_encoded_answer_is_refused_not_misread(
    provider: Provider, session: requests.Session
) -> None:
    with pytest.raises(ProviderUnavailable, match="failed: ContentDecodingError"):
        ask(session, f"{provider.url}/gzipped")
    assert ask(session, f"{provider.url}/json") == {"amount": Decimal("0.1")}
    assert provider.connections == 2


def test_idle_connections_beyond_the_pool_size_are_closed(provider: Provider) -> None:
    adapter = KeepAliveAdapter(pool_maxsize=2)
    with requests.Session() as session:
        session.mount("http://", adapter)
        streamed = [session.get(f"{provider.url}/json", stream=True, timeout=1) for _ in range(4)]
        for answer in streamed:
            assert answer.raw.read(100) == b'{"amount": 0.1}'
            answer.close()
        assert provider.connections == 4
        # Two were kept: four answers open at once again take those two and two new ones.
        again = [session.get(f"{provider.url}/json", stream=True, timeout=1) for _ in range(4)]
        assert provider.connections == 4 + 2
        for answer in again:
            answer.close()


def test_through_a_proxy_requests_own_adapter_sends(
    provider: Provider, session: requests.Session
) -> None:
    # The provider server stands in for the proxy: a proxied request names the whole URL.
    answer = session.get(
        "http://provider.invalid/v1/json",
        proxies={"http": provider.url},
        timeout=1,
    )
    assert answer.json() == {"amount": 0.1}
    assert provider.seen[0]["path"] == "http://provider.invalid/v1/json"


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path, "127.0.0.1")


@pytest.mark.parametrize("answer", ["not-http", "bad-chunk"])
def test_an_answer_that_is_not_http_is_unavailable_not_an_error_of_ours(
    provider: Provider, session: requests.Session, answer: str
) -> None:
    """A provider answering garbage is a transient failure (ProviderUnavailable, retried),
    never http.client's own exception escaping as a permanent error of the notification."""
    with pytest.raises(requests.ConnectionError):
        session.post(f"{provider.url}/{answer}", timeout=2).content  # noqa: B018
    with pytest.raises(ProviderUnavailable, match="failed: ConnectionError"):
        ask(session, f"{provider.url}/{answer}")
    assert ask(session, f"{provider.url}/json") == {"amount": Decimal("0.1")}


def test_https_checks_the_certificate_and_keeps_the_connection(
    certificate: tuple[Path, Path], session: requests.Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every request here goes through the keep-alive pool, none through urllib3's adapter.
    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", None)
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = Provider(tls=context)
    try:
        # Not in certifi's bundle: refused, and nothing was asked.
        with pytest.raises(requests.exceptions.SSLError):
            session.get(f"{server.url}/json", timeout=2)
        with pytest.raises(ProviderUnavailable, match="failed: SSLError"):
            ask(session, f"{server.url}/json")
        assert server.seen == []
        for _ in range(3):
            answer = session.get(f"{server.url}/json", verify=str(cert), timeout=2)
            assert answer.json() == {"amount": 0.1}
        assert len(server.seen) == 3
        # The refused handshakes never became connections; one carried the trusted calls.
        assert server.connections == 1
        # verify=False, as requests means it: no certificate check, a pool of its own.
        answer = session.get(f"{server.url}/json", verify=False, timeout=2)
        assert answer.json() == {"amount": 0.1}
        assert server.connections == 2
    finally:
        server.stop()


def test_a_request_is_prepared_as_requests_prepares_it(
    provider: Provider, session: requests.Session
) -> None:
    url = f"{provider.url}/v1/caf\u00e9/json"
    ask(session, url, json={"amount": "1.10"}, headers={"X-Key": "k"}, auth=("key", "secret"))
    sent = provider.seen[0]
    assert sent["path"] == "/v1/caf%C3%A9/json"
    assert sent["body"] == b'{"amount": "1.10"}'
    assert sent["headers"]["Content-Type"] == "application/json"
    assert sent["headers"]["Content-Length"] == str(len(sent["body"]))
    assert sent["headers"]["X-Key"] == "k"
    assert sent["headers"]["Authorization"] == "Basic a2V5OnNlY3JldA=="
    with pytest.raises(TypeError, match="params"):
        ask(session, url, params={"id": "1"})
