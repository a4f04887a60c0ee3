"""`ipn run`: web, worker and scheduler as child processes of one command, stopped together."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from ipn import migrate
from ipn.config import Settings
from ipn.db import Database

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10
SANDBOX_API_TOKEN = "sandbox"  # noqa: S105 - public by design, sandbox only


def commands(settings: Settings, port: int, sandbox_port: int | None) -> dict[str, list[str]]:
    python = sys.executable
    web_workers = "1" if settings.embedded else os.environ.get("WEB_CONCURRENCY", "2")
    children = {
        "web": [
            python,
            "-m",
            "gunicorn",
            "wsgi:app",
            "--bind",
            f"0.0.0.0:{port}",
            "--worker-class",
            "gthread",
            "--threads",
            "8",
            "--workers",
            web_workers,
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
        children["sandbox"] = [python, "-m", "ipn.cli", "sandbox", "--port", str(sandbox_port)]
    return children


def run_all(settings: Settings, *, port: int | None = None, sandbox: bool = False) -> int:
    port = port or settings.port
    env = dict(os.environ)
    sandbox_port = None
    if sandbox:
        from ipn.sandbox import sandbox_environment

        sandbox_port = port + 1
        env.setdefault("IPN_PUBLIC_URL", f"http://127.0.0.1:{port}")
        # A sandbox needs no secret API: open it with a token everybody can read below.
        env.setdefault("IPN_API_TOKEN", SANDBOX_API_TOKEN)
        for name, value in sandbox_environment(f"http://127.0.0.1:{sandbox_port}").items():
            env.setdefault(name, value)
        # The children must see the same settings as the checks below.
        settings = Settings.from_env(env)

    db = Database(settings.database_url)
    if settings.embedded or db.engine.dialect.name == "sqlite":
        migrate.upgrade(db)
    elif migrate.pending(db):
        print("warning: the database is behind; run `ipn db upgrade`", file=sys.stderr)
    db.engine.dispose()

    processes: dict[str, subprocess.Popen[bytes]] = {}
    for name, argv in commands(settings, port, sandbox_port).items():
        processes[name] = subprocess.Popen(argv, env=env)  # noqa: S603 - our own argv
    mode = "embedded SQLite broker" if settings.embedded else "Redis broker"
    print(
        f"ipn: listening on http://127.0.0.1:{port} ({mode}); callbacks at /ipn/<provider>",
        file=sys.stderr,
        flush=True,
    )
    if sandbox_port:
        print(
            f"ipn: provider sandbox on http://127.0.0.1:{sandbox_port}", file=sys.stderr, flush=True
        )

    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    while not stopping:
        for name, process in processes.items():
            code = process.poll()
            if code is not None:
                print(f"ipn: {name} exited with {code}; stopping", file=sys.stderr, flush=True)
                exit_code = code or 1
                stopping = True
                break
        time.sleep(0.3)
    _stop(processes)
    return exit_code


def _stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes.values():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
