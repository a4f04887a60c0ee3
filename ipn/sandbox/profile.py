"""The sandbox profile: the settings of a running `ipn run --sandbox`, kept in the data directory
so that `ipn` commands started beside it reach the same sandbox, token and database."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path

FILENAME = "ipn-sandbox.env"
# Who wrote the profile: it applies only while that process lives.
PID_VARIABLE = "IPN_SANDBOX_PID"
# Signs the events sent to the sandbox's shop. Public, like the sandbox's provider keys (the key
# bytes spell what it is): never configure it for a real merchant endpoint.
SANDBOX_MERCHANT_WEBHOOK_SECRET = "whsec_c2FuZGJveC1zaG9wLW5vdC1hLXNlY3JldC0zMmJ5dGU="  # noqa: S105 - public
SHOP_EVENTS_PATH = "/sandbox/shop/events"


def merchant_environment(sandbox_url: str) -> dict[str, str]:
    """The settings that send the merchant events to the shop of a sandbox at `sandbox_url`."""
    return {
        "IPN_MERCHANT_WEBHOOK_URL": sandbox_url.rstrip("/") + SHOP_EVENTS_PATH,
        "IPN_MERCHANT_WEBHOOK_SECRET": SANDBOX_MERCHANT_WEBHOOK_SECRET,
        # The shop listens on loopback, which endpoints may not use otherwise.
        "IPN_MERCHANT_ALLOW_PRIVATE": "1",
    }


def path(data_dir: Path) -> Path:
    return data_dir / FILENAME


def write(data_dir: Path, values: Mapping[str, str], pid: int) -> Path:
    """Write the profile, readable by its owner only: it holds the API token."""
    target = path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Written by `ipn run --sandbox` (pid {pid}) for the `ipn` commands run beside it;",
        "# removed when it stops. `ipn sandbox env` prints it for a shell.",
        f"{PID_VARIABLE}={pid}",
        *(f"{name}={shlex.quote(value)}" for name, value in sorted(values.items())),
    ]
    temporary = target.with_name(f".{FILENAME}.{pid}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write("\n".join(lines) + "\n")
    temporary.replace(target)
    return target


def read(data_dir: Path) -> dict[str, str] | None:
    """The profile's variables, or None when there is none or the process that wrote it is gone."""
    from dotenv import dotenv_values

    target = path(data_dir)
    if not target.is_file():
        return None
    values = {name: value for name, value in dotenv_values(target).items() if value is not None}
    pid = values.pop(PID_VARIABLE, "")
    if not pid.isdigit() or not _alive(int(pid)):
        return None
    return values


def remove(data_dir: Path, pid: int) -> None:
    """Remove the profile if `pid` wrote it (a later run may have written its own since)."""
    from dotenv import dotenv_values

    target = path(data_dir)
    try:
        if dotenv_values(target).get(PID_VARIABLE) == str(pid):
            target.unlink()
    except FileNotFoundError:
        pass


def shell_exports(values: Mapping[str, str]) -> str:
    """`export NAME=value` lines, quoted for a POSIX shell (`eval "$(ipn sandbox env)"`)."""
    return "".join(
        f"export {name}={shlex.quote(value)}\n" for name, value in sorted(values.items())
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
