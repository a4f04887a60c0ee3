"""Where every process of one deployment keeps its Prometheus metric files (prometheus-client's
multiprocess mode), chosen before prometheus-client is first imported, and the clearing of the
files of processes that are gone when the web server starts."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_NAME = "prometheus-multiproc"
# counter_1234.db, histogram_1234.db, gauge_livesum_1234.db: the writer's pid comes last.
_PID = re.compile(r"_(\d+)\.db$")


def configure() -> Path:
    """Set PROMETHEUS_MULTIPROC_DIR, when unset, to a directory under IPN_DATA_DIR, as an
    absolute path so that child processes started elsewhere agree, and create it.

    prometheus-client reads the variable once, when it is imported: this runs first, from the
    package's `__init__`, in every web, worker and scheduler process."""
    if not os.environ.get(VARIABLE):
        data_dir = Path(os.environ.get("IPN_DATA_DIR") or ".")
        directory = (data_dir / DEFAULT_NAME).resolve()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            # `ipn --version` in a directory it may not write to must still answer; the
            # processes this one starts inherit the fallback and still share it.
            directory = Path(tempfile.gettempdir()) / f"ipn-{DEFAULT_NAME}-{os.getuid()}"
        os.environ[VARIABLE] = str(directory)
    directory = Path(os.environ[VARIABLE])
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def clear_departed(directory: Path | None = None) -> list[Path]:
    """Remove the files of processes no longer running; return what was removed.

    prometheus-client asks for the directory to be wiped before the server starts. Files of
    processes still running (a Celery worker started before the web server, sharing the
    directory) are kept: removing them would hide that worker's counts until it restarts."""
    directory = directory or Path(os.environ[VARIABLE])
    removed = []
    for path in directory.glob("*.db"):
        match = _PID.search(path.name)
        if match and _running(int(match.group(1))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
