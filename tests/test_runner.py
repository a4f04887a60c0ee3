"""`ipn run` as real processes: the README's walkthrough beside `--sandbox`, a stop by a signal
to the process group that leaves nothing behind, and a taken port said before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import requests
from test_cli import IPN, clean_env

from ipn.config import Settings
from ipn.events.signing import key_of
from ipn.runner import sandbox_settings
from ipn.sandbox import SANDBOX_CREDENTIALS, profile

from conftest import wait_for

pytestmark = pytest.mark.worker


def two_free_ports() -> int:
    """A port whose next one is free too (`--sandbox` takes port + 1)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < 65535 and all(free(p) for p in (port, port + 1)):
            return port
    raise AssertionError("no two free ports in a row")


def free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))  # a probe: is it free on any address
        except OSError:
            return False
    return True


def descendants(pid: int) -> set[int]:
    out = subprocess.run(
        ["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True
    ).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = (int(n) for n in line.split())
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


class Run:
    """`ipn run` started the way a terminal or a supervisor starts it: a process group of its
    own, its stderr kept to read."""

    def __init__(self, cwd: Path, args: list[str], env: dict[str, str]) -> None:
        self.log_path = cwd / f"run-{time.monotonic_ns()}.log"
        self.log: IO[bytes] = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [IPN, "run", *args],
            cwd=cwd,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self) -> None:
        wait_for(
            lambda: "ipn: listening" in self.output() or self.process.poll() is not None,
            timeout=90,
            message="ipn run to listen",
        )
        assert self.process.poll() is None, self.output()[-3000:]

    def signal_group(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)

    def close(self) -> None:
        if self.process.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.process.wait()
        self.log.close()


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        run.close()


def ipn(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [IPN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_walkthrough_second_terminal_reaches_the_sandbox(tmp_path: Path, runs: list[Run]) -> None:
    port = two_free_ports()
    # Exported by a user who has real providers: --sandbox must take over everything.
    first = clean_env(
        CUBEPAY_API_URL="https://api.cubepay.io",
        CUBEPAY_CLIENT_ID="a-real-client",
        CUBEPAY_CLIENT_SECRET="a-real-secret",
    )
    run = Run(tmp_path, ["--sandbox", "--port", str(port)], first)
    runs.append(run)
    run.wait_listening()
    said = run.output()
    assert f"ipn: listening on http://127.0.0.1:{port} " in said
    assert f"ipn: provider sandbox on http://127.0.0.1:{port + 1}" in said
    [token_line] = [line for line in said.splitlines() if line.startswith("ipn: API token: ")]
    token = token_line.split()[3]
    assert token != "sandbox" and len(token) >= 32
    # It listens where it says: loopback only, not every interface.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", port), timeout=1).close()

    # The second terminal: a plain environment, in the same directory.
    second = clean_env()
    exports = ipn(tmp_path, "sandbox", "env", env=second)
    assert exports.returncode == 0, exports.stderr
    assert f"export IPN_API_TOKEN={token}\n" in exports.stdout
    assert f"export CUBEPAY_API_URL=http://127.0.0.1:{port + 1}\n" in exports.stdout
    assert "a-real" not in exports.stdout

    created = requests.post(
        f"http://localhost:{port}/api/payments",
        headers={"Authorization": f"Bearer {token}"},
        json={
            "provider": "cubepay",
            "order_id": "A1",
            "amount": "10.00",
            "currency": "USD",
            "pay_currency": "BTC",
        },
        timeout=30,
    )
    assert created.status_code == 201, created.text
    paid = requests.post(f"http://localhost:{port + 1}/sandbox/payments/cubepay/A1/pay", timeout=30)
    assert paid.status_code == 200, paid.text

    def shown() -> str:
        done = ipn(tmp_path, "payments", "show", "A1", env=second)
        return done.stdout if "status: paid" in done.stdout else ""

    timeline = wait_for(shown, timeout=60, interval=0.5, message="A1 to be paid")
    assert "callback  pending -> paid" in timeline
    assert "INFO" not in timeline

    made = ipn(
        tmp_path,
        *("payments", "create", "--provider", "cubepay", "--order-id", "A2"),
        *("--amount", "10.00", "--currency", "USD", "--pay-currency", "BTC"),
        env=second,
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("created pay_")
    checked = ipn(tmp_path, "reconcile", "--payment", "A2", env=second)
    assert checked.returncode == 0, checked.stderr
    assert "not configured" not in checked.stdout

    run.signal_group(signal.SIGTERM)
    assert run.process.wait(timeout=60) == 0
    assert not (tmp_path / "ipn-sandbox.env").exists()
    gone = ipn(tmp_path, "sandbox", "env", env=second)
    assert gone.returncode != 0 and "no `ipn run --sandbox` is running" in gone.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_to_the_group_leaves_no_process_and_frees_the_port(
    tmp_path: Path, runs: list[Run], signum: int
) -> None:
    port = two_free_ports()
    env = clean_env()
    for _ in range(3):
        run = Run(tmp_path, ["--port", str(port)], env)
        runs.append(run)
        run.wait_listening()
        family = descendants(run.process.pid)
        assert len(family) >= 3, family  # gunicorn master and worker, celery and its pool
        run.signal_group(signum)
        run.process.wait(timeout=60)
        wait_for(
            lambda family=family: not any(alive(pid) for pid in family),  # type: ignore[misc]
            timeout=30,
            message="every child to be gone",
        )
        wait_for(lambda: free(port), timeout=10, message=f"port {port} to be free")


def test_a_taken_port_is_said_in_one_line_before_listening(tmp_path: Path) -> None:
    port = two_free_ports()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        done = subprocess.run(
            [IPN, "run", "--port", str(port)],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert "listening" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert f"port {port}" in lines[0] and "taken" in lines[0]


def test_sandbox_settings_take_over_exported_ones_and_keep_an_exported_token() -> None:
    exported = {"CUBEPAY_API_URL": "https://api.cubepay.io", "CUBEPAY_CLIENT_ID": "real"}
    chosen = sandbox_settings(exported, "127.0.0.1", 8600, 8601)
    assert chosen["CUBEPAY_API_URL"] == "http://127.0.0.1:8601"
    assert chosen["CUBEPAY_CLIENT_ID"] == SANDBOX_CREDENTIALS["CUBEPAY_CLIENT_ID"]
    assert chosen["IPN_PUBLIC_URL"] == "http://127.0.0.1:8600"
    # The merchant events go to the sandbox's shop, on the sandbox's port, signed with its secret.
    assert chosen["IPN_MERCHANT_WEBHOOK_URL"] == "http://127.0.0.1:8601/sandbox/shop/events"
    assert chosen["IPN_MERCHANT_WEBHOOK_SECRET"] == profile.SANDBOX_MERCHANT_WEBHOOK_SECRET
    events = Settings.from_env({"DATABASE_URL": "sqlite://", **chosen}).events
    assert events.allow_private
    assert events.webhook_secret == profile.SANDBOX_MERCHANT_WEBHOOK_SECRET
    assert len(key_of(profile.SANDBOX_MERCHANT_WEBHOOK_SECRET)) == 32
    generated = chosen["IPN_API_TOKEN"]
    assert (
        len(generated) == 40
        and generated != sandbox_settings({}, "127.0.0.1", 1, 2)["IPN_API_TOKEN"]
    )
    mine = sandbox_settings({"IPN_API_TOKEN": "mine"}, "127.0.0.1", 8600, 8601)
    assert mine["IPN_API_TOKEN"] == "mine"


def test_a_profile_applies_only_while_its_writer_lives(tmp_path: Path) -> None:
    written = profile.write(tmp_path, {"IPN_API_TOKEN": "t0k", "X": "a b"}, os.getpid())
    assert written.stat().st_mode & 0o777 == 0o600
    assert profile.read(tmp_path) == {"IPN_API_TOKEN": "t0k", "X": "a b"}
    profile.remove(tmp_path, os.getpid() + 1)  # not its writer: left alone
    assert profile.read(tmp_path) is not None
    gone = subprocess.Popen(["true"])
    gone.wait()
    profile.write(tmp_path, {"IPN_API_TOKEN": "old"}, gone.pid)
    assert profile.read(tmp_path) is None
    profile.remove(tmp_path, gone.pid)
    assert not written.exists()
