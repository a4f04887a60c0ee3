"""Whether a merchant's endpoint URL may be called from here (no private networks), and the one
bounded HTTP POST that delivers an event to it.

IPNError
 └── DeliveryError      an attempt gave no HTTP answer (timeout, refused, TLS, not HTTP)
      └── UnsafeURL     the URL may not be called: malformed, not https, or a private address
                        (also a ValueError: registration refuses it as bad input)

A caller of `post` catches DeliveryError for every failed attempt; `UnsafeURL` among them tells
that the URL itself is refused, before any connection was made.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ipn.errors import IPNError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

MAX_URL = 2048
# The first bytes of an answer are kept for the operator; the rest is never read.
MAX_ANSWER = 2048
# Cloud instance metadata services: credentials live there.
METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
CGNAT = ipaddress.ip_network("100.64.0.0/10")
# NAT64 prefixes (RFC 6052, RFC 8215): the IPv4 address is the last 32 bits.
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")


class DeliveryError(IPNError):
    """No HTTP answer; the text is a short reason fit for an attempt's row (never a secret)."""


class UnsafeURL(DeliveryError, ValueError):
    """The URL may not be called; the text names the problem, starting with `url`."""


@dataclass
class Answer:
    status_code: int
    body: bytes  # at most the first MAX_ANSWER bytes
    duration_ms: int


def system_resolve(host: str, port: int) -> list[str]:
    """Every address the system's resolver gives for `host`."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # An IPv6 scope (`fe80::1%eth0`) is not part of the address.
    return [str(info[4][0]).split("%", 1)[0] for info in infos]


def check_url(
    url: str, *, allow_private: bool, resolve: Resolver = system_resolve
) -> list[Address]:
    """The addresses `url` may be called at, all of them public unless `allow_private`.

    Raises UnsafeURL when the URL is malformed, not https:// (http:// too with allow_private),
    carries a user name or password, or has a host that does not resolve or of which any
    address is not public: one private address among public ones is enough for a rebinding
    attacker, so it refuses the whole host.
    """
    host, port, _ = _parts(url, allow_private=allow_private)
    literal = _literal(host)
    if literal is not None:
        found = [literal]
    else:
        try:
            found = [ipaddress.ip_address(text) for text in resolve(host, port)]
        except (OSError, UnicodeError, ValueError):
            found = []
        if not found:
            raise UnsafeURL(f"url host {host} does not resolve")
    addresses = list(dict.fromkeys(found))
    if not allow_private:
        for address in addresses:
            problem = _not_public(address)
            if problem is not None:
                detail = f"{address}" if problem == "private" else f"{address}, {problem}"
                raise UnsafeURL(f"url resolves to a private address ({detail})")
    return addresses


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    allow_private: bool,
    connect_timeout: float,
    total_timeout: float,
    resolve: Resolver = system_resolve,
    tls: ssl.SSLContext | None = None,
) -> Answer:
    """POST `body` to `url` once and return the answer's status and first bytes.

    The URL is checked again (its DNS may have changed since it was registered) and the
    connection goes to one of the vetted addresses, never to a second resolution's answer; for
    https the certificate is still verified against the host name (SNI included). Redirects
    are not followed. The whole attempt, however slowly the server answers, ends within
    `total_timeout` seconds. `tls` replaces the default verifying context (a private CA).
    Raises UnsafeURL or DeliveryError.
    """
    started = time.monotonic()
    deadline = started + total_timeout
    addresses = check_url(url, allow_private=allow_private, resolve=resolve)
    host, port, target = _parts(url, allow_private=allow_private)
    https = url[:6].lower() == "https:"
    connection = _PinnedConnection(
        host,
        port,
        addresses,
        connect_timeout=connect_timeout,
        deadline=deadline,
        tls=(tls or _verifying_context()) if https else None,
    )
    # Socket timeouts bound each wait, not their sum: at the deadline the socket is shut down
    # under whatever read is still waiting for its next byte.
    overdue = threading.Event()

    def cut() -> None:
        overdue.set()
        connection.cut()

    watchdog = threading.Timer(total_timeout, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.putrequest("POST", target, skip_accept_encoding=True)
        sent = {name.lower() for name in headers}
        for name, value in headers.items():
            connection.putheader(name, value)
        if "user-agent" not in sent:
            connection.putheader("User-Agent", "ipn-receiver")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        status = response.status
        answer = response.read(MAX_ANSWER)
    except Exception as exc:
        if isinstance(exc, TimeoutError) and connection.sock is None and not overdue.is_set():
            raise DeliveryError(f"connect timed out after {connect_timeout} s") from None
        if overdue.is_set() or isinstance(exc, TimeoutError):
            raise DeliveryError(f"timed out after {total_timeout} s") from None
        raise DeliveryError(_reason(exc)) from None
    finally:
        watchdog.cancel()
        connection.close()
    if overdue.is_set():
        raise DeliveryError(f"timed out after {total_timeout} s")
    return Answer(status, answer, int((time.monotonic() - started) * 1000))


class _PinnedConnection(http.client.HTTPSConnection):
    """An HTTP(S) connection to an address vetted beforehand, not to what the host resolves to
    by the time it connects; the Host header, SNI and certificate check use the host name."""

    def __init__(
        self,
        host: str,
        port: int,
        addresses: list[Address],
        *,
        connect_timeout: float,
        deadline: float,
        tls: ssl.SSLContext | None,
    ) -> None:
        # A context is always given: left None, http.client builds one per connection, loading
        # the system's certificates each time (25 ms of CPU), even for plain http.
        super().__init__(host, port, timeout=connect_timeout, context=tls or _verifying_context())
        # The Host header leaves out the scheme's own port, which for plain http is 80.
        self.default_port = 443 if tls else 80
        self.addresses = addresses
        self.connect_timeout = connect_timeout
        self.deadline = deadline
        self.tls = tls
        self._raw: socket.socket | None = None
        self._lock = threading.Lock()
        self._cut = False

    def connect(self) -> None:
        error: OSError | None = None
        for address in self.addresses:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            try:
                raw = socket.create_connection(
                    (str(address), self.port), timeout=min(self.connect_timeout, remaining)
                )
            except OSError as exc:
                error = exc
                continue
            break
        else:
            assert error is not None
            raise error
        with self._lock:
            self._raw = raw
            if self._cut:
                raw.close()
                raise TimeoutError()
        raw.settimeout(max(self.deadline - time.monotonic(), 0.001))
        self.sock = self.tls.wrap_socket(raw, server_hostname=self.host) if self.tls else raw

    def cut(self) -> None:
        """Unblock any read or write in progress, from another thread."""
        with self._lock:
            self._cut = True
            if self._raw is not None:
                try:
                    # The plain socket's shutdown, under TLS too: it only ends the stream.
                    self._raw.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@functools.cache
def _verifying_context() -> ssl.SSLContext:
    """The default verifying TLS context, built once: building it loads the system's CA store,
    and one context serves any number of connections and threads."""
    return ssl.create_default_context()


def _parts(url: str, *, allow_private: bool) -> tuple[str, int, str]:
    """Host (lower case, IDNA, no brackets), port and request target of an acceptable URL."""
    if not isinstance(url, str) or not url:
        raise UnsafeURL("url is malformed: it is empty")
    if len(url) > MAX_URL:
        raise UnsafeURL(f"url is longer than {MAX_URL} characters")
    if SPACE_OR_CONTROL.search(url):
        raise UnsafeURL("url is malformed: it contains a space or a control character")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"url is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme != "https" and not (allow_private and scheme == "http"):
        raise UnsafeURL("url must be https://" if not allow_private else "url must be http(s)://")
    if not url[len(scheme) : len(scheme) + 3] == "://":
        raise UnsafeURL("url is malformed: it must start with https://")
    if "@" in parts.netloc:
        raise UnsafeURL("url must not carry a user name or password")
    host = _host(parts.hostname or "")
    if port == 0:
        raise UnsafeURL("url is malformed: port 0")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port or (443 if scheme == "https" else 80), target


def _host(name: str) -> str:
    if not name:
        raise UnsafeURL("url is malformed: it has no host")
    if _literal(name) is not None:
        return name
    try:
        ascii_name = name.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise UnsafeURL(f"url is malformed: {name!r} is not a host name") from None
    labels = ascii_name.split(".")
    if not all(HOST_LABEL.fullmatch(label) for label in labels) or len(ascii_name) > 253:
        raise UnsafeURL(f"url is malformed: {name!r} is not a host name")
    return ascii_name


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _not_public(address: Address) -> str | None:
    """Why `address` is not a public one (a word or two), or None when it is."""
    if address in METADATA:
        return "cloud metadata"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and any(address in net for net in NAT64):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            inner = _not_public(embedded)
            return None if inner is None else f"embeds {embedded}, {inner}"
        if address.is_site_local:
            return "site-local"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if isinstance(address, ipaddress.IPv4Address) and address in CGNAT:
        return "shared address space"
    if address.is_private:
        return "private"
    if address.is_reserved or not address.is_global:
        return "reserved"
    return None


def _reason(exc: BaseException) -> str:
    """A short reason for a failed attempt, without the URL (which may carry a token)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or type(exc).__name__}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the endpoint closed the connection without an answer"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, http.client.HTTPException):
        return f"the answer is not HTTP ({type(exc).__name__})"
    if isinstance(exc, OSError):
        return f"connection failed: {exc.strerror or type(exc).__name__}"
    return f"failed: {type(exc).__name__}"
