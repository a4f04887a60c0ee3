"""Gunicorn settings of the web process (`gunicorn --config python:ipn.gunicorn_config`).

gevent workers: each connection waits in a greenlet of its own, so clients that send their
request slowly hold only themselves, not the threads a provider's callback needs (with
`gthread`, 16 slow connections held every request thread and `/healthz` stopped answering).
psycopg 3 sees gevent's patched `select` and waits cooperatively; redis-py, the SQLAlchemy pool
and the dispatch thread of ipn.dispatch run on patched sockets, locks and queues. Nothing here
imports the application: gunicorn patches the standard library in each worker before
loading it.
"""

import os
from typing import Any

from ipn import metric_files
from ipn.config import settings_or_exit, warn_if_lax

worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Connections each worker keeps at once, slow or not; beyond it they wait in the listen backlog.
worker_connections = 1000
# Seconds a connection may take to send each request's headers, the first one included
# (gunicorn's async workers read them under this timeout), and to start its next request on a
# keep-alive connection: a client that trickles its headers is closed after it.
keepalive = 5
# Gunicorn's own lines in IPN_LOG_FORMAT, redacted like the application's (ipn.logs).
logger_class = "ipn.logs.GunicornLogger"


# Bad settings are refused in one line while gunicorn reads this file, before it logs its start
# or boots a worker that would fail with a traceback (ipn.config imports nothing heavy).
warn_if_lax(settings_or_exit())


def on_starting(server: Any) -> None:
    """Metric files of processes gone since the last start would be summed into the scrape."""
    metric_files.clear_departed()


def child_exit(server: Any, worker: Any) -> None:
    """A worker that exits takes its live gauges (queue depth) with it; its counters stay."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
