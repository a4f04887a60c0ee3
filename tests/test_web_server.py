"""The web process as the Procfile starts it (gunicorn, real worker processes, loopback): slow
clients cannot keep a provider's callback from its answer, and an upload cut short is not a
callback."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, Backend, clean, count_notifications, wait_for
from faults_support import forget_queue, free_port, unique_queue
from helpers import CUBEPAY_IPN, FORM

# The Procfile's web line is the production one: PostgreSQL and Redis.
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.parametrize("backend", ["postgresql"], indirect=True),
]

SLOW_CLIENTS = 50
# How often each slow client sends its next byte: well under any idle timeout, so only a
# server that buffers or bounds slow requests keeps answering.
TRICKLE_SECONDS = 0.3


def procfile_web_command() -> str:
    [line] = [
        line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:")
    ]
    return line.removeprefix("web:").strip()


@dataclass
class WebProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def get(self, path: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def web_server(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebProcess]:
    """The Procfile's `web` line, run by a shell as a platform would, on the backend; one
    for the module, since it takes a while to start."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("web") / "web.log"
    # A queue of its own: what this server enqueues must not reach another test's worker.
    queue = unique_queue(backend.env["IPN_QUEUE"])
    env = {
        **os.environ,
        **backend.env,
        "IPN_QUEUE": queue,
        "PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("WEB_CONCURRENCY", None)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {procfile_web_command()}"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = WebProcess(process, port, log_path)

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"web exited: {log_path.read_text()[-3000:]}")
        try:
            return server.get("/healthz") == 200
        except OSError:
            return False

    try:
        wait_for(answering, timeout=60, message="the web process to answer")
        yield server
    finally:
        server.stop()
        forget_queue(backend.env.get("REDIS_URL"), queue)


@pytest.fixture
def web(web_server: WebProcess, backend: Backend) -> WebProcess:
    clean(backend.db)
    return web_server


@pytest.mark.parametrize(
    ("variable", "value"), [("IPN_MAX_BODY_BYTES", "lots"), ("DATABASE_URL", "mysql://db/ipn")]
)
def test_bad_settings_stop_the_web_process_with_one_line(
    backend: Backend, variable: str, value: str
) -> None:
    env = {
        **os.environ,
        **backend.env,
        variable: value,
        "PORT": str(free_port()),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    result = subprocess.run(
        ["bash", "-c", f"exec {procfile_web_command()}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip().splitlines()
    # gunicorn's own start line, then ours.
    assert len(output) <= 2, output
    assert variable in output[-1] and "Traceback" not in result.stderr


class SlowClients:
    """Connections that send a request one byte at a time: half of them still in their
    headers, half with headers done and a declared body that trickles in."""

    def __init__(self, port: int, count: int) -> None:
        self.sockets: list[tuple[socket.socket, bytes]] = []
        headers = (
            "POST /ipn/cubepay HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
        )
        for number in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if number % 2:
                sock.sendall(f"{headers}Content-Length: 100000\r\n\r\n".encode())
                rest = b"x" * 100_000
            else:
                rest = f"{headers}X-Slow: {'y' * 10_000}\r\n\r\n".encode()
            sock.sendall(rest[:1])
            self.sockets.append((sock, rest[1:]))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        offset = 0
        while not self._stop.wait(TRICKLE_SECONDS):
            for sock, rest in self.sockets:
                try:
                    sock.sendall(rest[offset : offset + 1])
                except OSError:
                    pass
            offset += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock, _ in self.sockets:
            sock.close()


def test_slow_clients_do_not_keep_a_callback_from_its_answer(
    web: WebProcess, backend: Backend
) -> None:
    slow = SlowClients(web.port, SLOW_CLIENTS)
    try:
        # Let every slow connection reach the server and be handed whatever it is given.
        time.sleep(2)
        for attempt in range(3):
            started = time.monotonic()
            status, body = web.post("/ipn/cubepay", CUBEPAY_IPN, FORM)
            elapsed = time.monotonic() - started
            assert (status, body) == (200, b"success"), attempt
            assert elapsed < 1.0, f"callback {attempt} answered after {elapsed:.2f}s"
        started = time.monotonic()
        assert web.get("/healthz") == 200
        assert time.monotonic() - started < 1.0
    finally:
        slow.close()
    assert count_notifications(backend.db) == 3
    assert "Traceback" not in web.log_path.read_text()


def test_a_client_that_trickles_its_headers_is_closed(web: WebProcess) -> None:
    """The server bounds the time the headers take (ipn.gunicorn_config.keepalive), so such a
    connection does not wait for ever even under the connection cap."""
    from ipn import gunicorn_config

    sock = socket.create_connection(("127.0.0.1", web.port), timeout=1)
    started = time.monotonic()
    headers = b"POST /ipn/cubepay HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"y" * 1000
    closed = False
    try:
        for byte in headers:
            sock.sendall(bytes([byte]))
            try:
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            if time.monotonic() - started > gunicorn_config.keepalive + 10:
                break
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    finally:
        sock.close()
    assert closed
    assert time.monotonic() - started < gunicorn_config.keepalive + 5


def aborted_upload(port: int, framing: str, sent: bytes, *, half_close: bool) -> bytes:
    """Declare 1000 bytes (or start a chunked body), send `sent`, then stop sending (half
    close) or hang up; the server's answer, if any."""
    if framing == "length":
        head, body = b"Content-Length: 1000\r\n\r\n", sent
    else:
        head = b"Transfer-Encoding: chunked\r\n\r\n"
        body = f"{len(sent):x}\r\n".encode() + sent + b"\r\n3e8\r\n" + sent
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(
            b"POST /ipn/cubepay HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n" + head + body
        )
        if not half_close:
            return b""
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer
    except OSError:
        return b""
    finally:
        sock.close()


@pytest.mark.parametrize("half_close", [True, False], ids=["half-close", "hang-up"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_aborted_upload_is_not_stored_nor_answered_success(
    web: WebProcess, backend: Backend, half_close: bool, framing: str
) -> None:
    answer = aborted_upload(web.port, framing, CUBEPAY_IPN[:10], half_close=half_close)
    assert b"success" not in answer
    if answer:
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer[:200]
    # The server is still well, and it stored only the complete callback sent after.
    assert web.post("/ipn/cubepay", CUBEPAY_IPN, FORM) == (200, b"success")
    time.sleep(0.5)
    assert count_notifications(backend.db) == 1
    assert "Traceback" not in web.log_path.read_text()


# Run in a child process: gevent's patching must not reach the test process.
GEVENT_CHECK = r"""
from gevent import monkey

monkey.patch_all()

import sys
import time

import gevent
import psycopg.waiting
from sqlalchemy import text

from ipn import create_app
from ipn.dispatch import Dispatcher

assert psycopg.waiting.wait is not psycopg.waiting.wait_c, "psycopg would block the hub"
app = create_app()
services = app.extensions["ipn"]
engine = services.db.engine


def sleep_in_database():
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_sleep(0.5)"))


started = time.monotonic()
ticks = []
ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.05)) for _ in range(10)])
gevent.joinall([gevent.spawn(sleep_in_database) for _ in range(8)], raise_error=True)
ticker.join()
elapsed = time.monotonic() - started
# 8 queries of 0.5 s on a pool of 10 overlap, and the hub kept running meanwhile.
assert elapsed < 1.5, f"8 queries took {elapsed:.2f}s"
assert len(ticks) == 10

sent = []
dispatcher = Dispatcher(lambda notification_id: (
    app.extensions["celery"].send_task("ipn.ping", args=[notification_id], retry=False),
    sent.append(notification_id),
))
for notification_id in range(5):
    dispatcher.submit(notification_id)
assert dispatcher.drain(timeout=10), "the dispatch thread did not drain under gevent"
assert sent == list(range(5)), sent
print("cooperative")
"""


def test_database_broker_and_dispatch_thread_cooperate_under_gevent(backend: Backend) -> None:
    """What the gevent worker relies on: psycopg waits through the patched select, the
    SQLAlchemy pool hands out connections to concurrent greenlets, and the background
    dispatch thread publishes to Redis."""
    queue = unique_queue(backend.env["IPN_QUEUE"])
    result = subprocess.run(
        [sys.executable, "-c", GEVENT_CHECK],
        cwd=ROOT,
        env={**os.environ, **backend.env, "IPN_QUEUE": queue},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    forget_queue(backend.env.get("REDIS_URL"), queue)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("cooperative")
