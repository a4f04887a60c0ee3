"""Endpoint URLs: what check_url refuses and why, and what one post() does against real local
servers: answers kept short, redirects not followed, a deadline a trickling server cannot
stretch, and connections only to the address that was vetted."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ipn.events import urls
from ipn.events.urls import Answer, DeliveryError, UnsafeURL, check_url, post

from helpers import self_signed_certificate

PUBLIC = "93.184.215.14"


def resolver(answers: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]

    return resolve


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://shop.example/hook", "url must be https://"),
        ("https://127.0.0.1/x", "private address (127.0.0.1, loopback)"),
        ("https://10.0.0.1/x", "private address (10.0.0.1)"),
        ("https://[::ffff:10.0.0.1]/", "embeds 10.0.0.1"),
        ("https://[::1]/", "loopback"),
        ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("https://[fd00:ec2::254]/", "cloud metadata"),
        ("https://100.64.0.7/", "shared address space"),
        ("https://224.0.0.1/", "multicast"),
        ("https://0.0.0.0/", "unspecified"),
        ("https://[2002:a00:1::]/", "embeds 10.0.0.1"),
        ("https://[64:ff9b::7f00:1]/", "embeds 127.0.0.1"),
        ("https://[fe80::1]/", "link-local"),
        ("https://240.0.0.1/", "private address"),
        ("https://0x7f.1/", "127.0.0.1"),
        ("https://localhost/", "loopback"),
        ("https://", "url is malformed"),
        ("not a url", "url is malformed"),
        ("https://exa mple.com/", "url is malformed"),
        ("https://exa_mple.com/", "url is malformed"),
        ("https://shop.example:99999/", "url is malformed"),
        ("https:shop.example/", "url is malformed"),
        ("https://user:password@shop.example/", "must not carry a user name or password"),
        ("https://user@shop.example/", "must not carry a user name or password"),
        ("https://shop.example/" + "a" * 2048, "longer than 2048"),
        ("https://nowhere.example/", "url host nowhere.example does not resolve"),
        ("ftp://shop.example/", "url must be https://"),
    ],
)
def test_check_url_refuses_with_the_reason(url: str, problem: str) -> None:
    known = resolver({"shop.example": [PUBLIC]})

    def resolve(host: str, port: int) -> list[str]:
        # These two are the system's to answer: it really maps them to loopback.
        return (
            urls.system_resolve(host, port)
            if host in ("localhost", "0x7f.1")
            else known(host, port)
        )

    with pytest.raises(UnsafeURL) as refused:
        check_url(url, allow_private=False, resolve=resolve)
    assert problem in str(refused.value)
    assert str(refused.value).startswith("url ")
    assert isinstance(refused.value, ValueError)


def test_one_private_address_among_public_ones_refuses_the_host() -> None:
    resolve = resolver({"mixed.example": [PUBLIC, "10.1.2.3"], "internal.example": ["192.168.1.4"]})
    with pytest.raises(UnsafeURL, match=r"10\.1\.2\.3"):
        check_url("https://mixed.example/", allow_private=False, resolve=resolve)
    with pytest.raises(UnsafeURL, match=r"192\.168\.1\.4"):
        check_url("https://internal.example/", allow_private=False, resolve=resolve)


def test_public_addresses_are_returned_and_the_resolver_is_asked_with_the_port() -> None:
    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return [PUBLIC, "2606:4700::1111", PUBLIC]

    assert check_url(
        "https://Shop.Example:8443/hook?x=1", allow_private=False, resolve=resolve
    ) == [
        ipaddress.ip_address(PUBLIC),
        ipaddress.ip_address("2606:4700::1111"),
    ]
    assert asked == [("shop.example", 8443)]
    assert check_url("https://8.8.8.8/", allow_private=False) == [ipaddress.ip_address("8.8.8.8")]
    # NAT64 of a public address (an IPv6-only network's DNS64) is public.
    assert check_url("https://[64:ff9b::808:808]/", allow_private=False)


def test_allow_private_permits_loopback_and_plain_http_but_not_malformed_urls() -> None:
    assert check_url("http://127.0.0.1:8080/", allow_private=True) == [
        ipaddress.ip_address("127.0.0.1")
    ]
    assert check_url("https://10.0.0.1/", allow_private=True)
    with pytest.raises(UnsafeURL, match="user name or password"):
        check_url("http://a:b@127.0.0.1/", allow_private=True)
    with pytest.raises(UnsafeURL, match="malformed"):
        check_url("http://", allow_private=True)
    with pytest.raises(UnsafeURL, match="http"):
        check_url("ftp://127.0.0.1/", allow_private=True)


# --- post() against real local servers --------------------------------------------------------


class Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/big":
            self._answer(200, b"x" * 10_000)
        elif self.path == "/trickle-headers":
            self._trickle(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"y" * 1000)
        elif self.path == "/trickle-body":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            self.wfile.flush()
            self._trickle(b"z" * 1000)
        else:
            self._answer(200 if self.path != "/error" else 500, b"ok")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, data: bytes) -> None:
        # One byte every 50 ms: every wait is short, the whole answer takes very long.
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass
        self.close_connection = True


@pytest.fixture
def server() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    handler = type("Handler", (Recorder,), {"seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1], seen
    httpd.shutdown()
    httpd.server_close()


def send(url: str, **kwargs: Any) -> Answer:
    options: dict[str, Any] = {"allow_private": True, "connect_timeout": 2.0, "total_timeout": 5.0}
    options.update(kwargs)
    return post(url, b'{"type": "payment.paid"}', {"webhook-id": "evt_1"}, **options)


def test_a_2xx_answer_with_the_body_and_headers_sent(server: tuple[int, list[Any]]) -> None:
    port, seen = server
    answer = send(f"http://127.0.0.1:{port}/ok?shop=1")
    assert (answer.status_code, answer.body) == (200, b"ok")
    assert 0 <= answer.duration_ms < 5000
    assert seen[0]["path"] == "/ok?shop=1"
    assert seen[0]["body"] == b'{"type": "payment.paid"}'
    assert seen[0]["headers"]["webhook-id"] == "evt_1"
    assert send(f"http://127.0.0.1:{port}/error").status_code == 500


def test_a_redirect_is_an_answer_not_followed(server: tuple[int, list[Any]]) -> None:
    port, seen = server
    answer = send(f"http://127.0.0.1:{port}/redirect")
    assert answer.status_code == 302
    assert [request["path"] for request in seen] == ["/redirect"]


def test_only_the_first_2_kib_of_an_answer_are_read(server: tuple[int, list[Any]]) -> None:
    port, _ = server
    answer = send(f"http://127.0.0.1:{port}/big")
    assert answer.status_code == 200
    assert answer.body == b"x" * 2048


@pytest.mark.parametrize("path", ["/trickle-headers", "/trickle-body"])
def test_a_trickling_server_cannot_stretch_the_attempt_past_its_deadline(
    server: tuple[int, list[Any]], path: str
) -> None:
    port, _ = server
    started = time.monotonic()
    with pytest.raises(DeliveryError, match=r"timed out after 1\.0 s"):
        send(f"http://127.0.0.1:{port}{path}", total_timeout=1.0)
    assert 0.9 <= time.monotonic() - started < 2.0


def test_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DeliveryError) as failed:
        send(f"http://127.0.0.1:{port}/")
    assert str(failed.value) == "connection refused"
    assert not isinstance(failed.value, UnsafeURL)


def test_a_loopback_url_is_refused_before_any_connection(server: tuple[int, list[Any]]) -> None:
    port, seen = server
    with pytest.raises(UnsafeURL, match="loopback"):
        send(f"https://127.0.0.1:{port}/ok", allow_private=False)
    with pytest.raises(UnsafeURL, match="https"):
        send(f"http://127.0.0.1:{port}/ok", allow_private=False)
    assert seen == []


def test_dns_rebinding_is_refused_by_the_check_inside_post(server: tuple[int, list[Any]]) -> None:
    port, seen = server
    answers = iter([[PUBLIC], ["127.0.0.1"]])

    def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    url = f"https://shop.example:{port}/ok"
    # Public when it was registered ...
    assert check_url(url, allow_private=False, resolve=rebinding)
    # ... loopback by the time an event is sent.
    with pytest.raises(UnsafeURL, match=r"127\.0\.0\.1"):
        send(url, allow_private=False, resolve=rebinding)
    assert seen == []


def test_post_resolves_once_and_connects_to_the_vetted_address(
    server: tuple[int, list[Any]],
) -> None:
    port, seen = server
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        # A second resolution would not reach the server: only the vetted answer can.
        return ["127.0.0.1"] if len(asked) == 1 else ["192.0.2.1"]

    answer = send(f"http://shop.test:{port}/ok", resolve=resolve)
    assert answer.status_code == 200
    assert asked == ["shop.test"]
    assert seen[0]["headers"]["Host"] == f"shop.test:{port}"
    assert seen[0]["headers"]["User-Agent"] == "ipn-receiver"


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path, list[dict[str, Any]]]]:
    cert, key = self_signed_certificate(tmp_path, "shop.test")
    seen: list[dict[str, Any]] = []
    names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def note_name(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        names.append(name)

    context.sni_callback = note_name
    handler = type("Handler", (Recorder,), {"seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    seen.append({"sni": names})
    yield httpd.server_address[1], cert, seen
    httpd.shutdown()
    httpd.server_close()


def test_https_goes_to_the_vetted_address_and_verifies_the_host_name(
    tls_server: tuple[int, Path, list[dict[str, Any]]],
) -> None:
    port, cert, seen = tls_server
    trusted = ssl.create_default_context(cafile=str(cert))
    resolve = resolver({"shop.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    answer = send(f"https://shop.test:{port}/ok", resolve=resolve, tls=trusted)
    assert answer.status_code == 200
    assert seen[0]["sni"] == ["shop.test"]
    assert seen[1]["headers"]["Host"] == f"shop.test:{port}"
    # The same address under a name the certificate does not carry.
    with pytest.raises(DeliveryError, match="TLS: certificate verify failed"):
        send(f"https://other.test:{port}/ok", resolve=resolve, tls=trusted)
    # And the system's trust store does not know the test certificate.
    with pytest.raises(DeliveryError, match="TLS: certificate verify failed"):
        send(f"https://shop.test:{port}/ok", resolve=resolve)
