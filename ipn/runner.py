"""`ipn run`: web, worker and scheduler as child processes of one command, stopped together."""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType

from ipn import migrate
from ipn.config import Settings
from ipn.db import Database

STOP_GRACE_SECONDS = 10
START_TIMEOUT_SECONDS = 60
EVERY_INTERFACE = "0.0.0.0"  # noqa: S104 - `ipn run` receives callbacks from providers
LOOPBACK = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _embedded_worker_class(settings: Settings) -> list[str]:
    """SQLite's C library blocks a gevent worker's whole event loop while it waits for a lock
    that the worker in the next process holds; threads wait one at a time instead."""
    return ["--worker-class", "gthread", "--threads", "8"] if settings.embedded else []


def commands(
    settings: Settings, host: str, port: int, sandbox_port: int | None
) -> dict[str, list[str]]:
    python = sys.executable
    web_workers = "1" if settings.embedded else os.environ.get("WEB_CONCURRENCY", "2")
    children = {
        "web": [
            python,
            "-m",
            "gunicorn",
            "wsgi:app",
            "--bind",
            f"{host}:{port}",
            "--config",
            "python:ipn.gunicorn_config",
            *_embedded_worker_class(settings),
            "--workers",
            web_workers,
            # One control socket per user is shared by every gunicorn: a second one, or one
            # stopping, would take it from the other.
            "--no-control-socket",
        ],
        # -B runs the beat scheduler inside the worker: one process fewer for one machine.
        "worker": [
            python,
            "-m",
            "celery",
            "-A",
            "workers.main",
            "worker",
            "-B",
            "--loglevel",
            "INFO",
            "--concurrency",
            "2",
            "--queues",
            settings.queue,
        ],
    }
    if sandbox_port is not None:
        children["sandbox"] = [
            python,
            "-m",
            "ipn.cli",
            "sandbox",
            "--host",
            host,
            "--port",
            str(sandbox_port),
        ]
    return children


def sandbox_settings(
    env: dict[str, str], host: str, port: int, sandbox_port: int
) -> dict[str, str]:
    """What `--sandbox` sets, over anything exported: every provider at the sandbox with the
    sandbox's keys, callbacks to this receiver, the merchant events to the sandbox's shop, and an
    API token that only this run knows."""
    from ipn.sandbox import profile, sandbox_environment

    shown = LOOPBACK if host == EVERY_INTERFACE else host
    sandbox_url = f"http://{shown}:{sandbox_port}"
    return {
        **sandbox_environment(sandbox_url),
        **profile.merchant_environment(sandbox_url),
        "IPN_PUBLIC_URL": f"http://{shown}:{port}",
        "IPN_API_TOKEN": env.get("IPN_API_TOKEN", "").strip() or secrets.token_hex(20),
    }


def run_all(
    settings: Settings,
    *,
    port: int | None = None,
    host: str | None = None,
    sandbox: bool = False,
) -> int:
    port = port or settings.port
    env = dict(os.environ)
    sandbox_port = None
    profile: dict[str, str] = {}
    if sandbox:
        host = host or LOOPBACK
        sandbox_port = port + 1
        profile = sandbox_settings(env, host, port, sandbox_port)
        env.update(profile)
        # The children must see the same settings as the checks below.
        settings = Settings.from_env(env)
        profile["DATABASE_URL"] = settings.database_url
        if settings.redis_url:
            profile["REDIS_URL"] = settings.redis_url
    host = host or EVERY_INTERFACE

    for wanted in (port, sandbox_port):
        if wanted is not None and (reason := _taken(host, wanted)):
            say(f"port {wanted} on {host} is taken ({reason}): pick another with --port")
            return 1

    db = Database(settings.database_url)
    if settings.embedded or db.engine.dialect.name == "sqlite":
        migrate.upgrade(db)
    elif migrate.pending(db):
        say("warning: the database is behind; run `ipn db upgrade`")
    db.engine.dispose()

    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)

    processes: dict[str, subprocess.Popen[bytes]] = {}
    exit_code = 0
    try:
        for name, argv in commands(settings, host, port, sandbox_port).items():
            # Each child leads a process group of its own: a signal to ours (Ctrl-C, a
            # supervisor's stop) reaches this process only, which stops each child exactly once
            # and then removes whatever its group left behind.
            processes[name] = subprocess.Popen(  # noqa: S603 - our own argv
                argv, env=env, start_new_session=True, preexec_fn=_end_with_parent
            )
        if sandbox:
            from ipn.sandbox import profile as profiles

            profiles.write(settings.data_dir, profile, os.getpid())
        exit_code = _wait_until_listening(processes, host, port, lambda: stopping)
        if exit_code or stopping:
            return exit_code
        mode = "embedded SQLite broker" if settings.embedded else "Redis broker"
        say(f"listening on http://{host}:{port} ({mode}); callbacks at /ipn/<provider>")
        if sandbox_port:
            say(f"provider sandbox on http://{host}:{sandbox_port}")
            say(
                f"API token: {profile['IPN_API_TOKEN']} (`ipn` commands run in "
                f"{settings.data_dir.resolve()} use the sandbox; `ipn sandbox env` prints it all)"
            )
        while not stopping:
            exited = _exited(processes)
            if exited:
                name, code = exited
                say(f"{name} exited with {code}; stopping")
                exit_code = code or 1
                break
            time.sleep(0.3)
        return exit_code
    finally:
        _stop(processes)
        if sandbox:
            from ipn.sandbox import profile as profiles

            profiles.remove(settings.data_dir, os.getpid())


def _end_with_parent() -> None:
    """In each child before it starts: SIGTERM when this process dies without stopping it (a
    SIGKILL to the group), so that its children never outlive it. Linux only."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def say(line: str) -> None:
    print(f"ipn: {line}", file=sys.stderr, flush=True)


def _taken(host: str, port: int) -> str | None:
    """Why `port` cannot be listened on, or None when it can (as gunicorn binds: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _wait_until_listening(
    processes: dict[str, subprocess.Popen[bytes]],
    host: str,
    port: int,
    stopping: Callable[[], bool],
) -> int:
    """0 once the web process accepts connections; a child's exit status if one ends first."""
    target = LOOPBACK if host == EVERY_INTERFACE else host
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if stopping():
            return 0
        exited = _exited(processes)
        if exited:
            name, code = exited
            say(f"{name} exited with {code} while starting; stopping")
            return code or 1
        try:
            with socket.create_connection((target, port), timeout=0.5):
                return 0
        except OSError:
            time.sleep(0.2)
    say(f"the web process did not listen on port {port} within {START_TIMEOUT_SECONDS}s; stopping")
    return 1


def _exited(processes: dict[str, subprocess.Popen[bytes]]) -> tuple[str, int] | None:
    for name, process in processes.items():
        code = process.poll()
        if code is not None:
            return name, code
    return None


def _stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM each child once, wait for it, then SIGKILL whatever is left in its group (a worker
    its master did not take down), so that nothing outlives the command or keeps its port."""
    for process in processes.values():
        if process.poll() is None:
            _signal_process(process, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes.values():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in processes.values():
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
    for process in processes.values():
        _wait_for_group(process.pid)


def _signal_process(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


def _wait_for_group(pgid: int, timeout: float = 5.0) -> None:
    """Until the group is empty: its SIGKILLed members may take a moment to be gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
