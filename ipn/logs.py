"""Logging for every process kind (web, worker, beat, the `ipn` command): text or JSON lines
carrying the context bound while they were logged, with secrets and email addresses redacted."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any

from gunicorn import glogging
from pythonjsonlogger.json import JsonFormatter

if TYPE_CHECKING:
    from ipn.config import Settings

# The context a line may carry, in the order the text format shows it.
CONTEXT_FIELDS = (
    "request_id",
    "provider",
    "account",
    "notification_id",
    "payment_id",
    "order_id",
    "task_id",
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"
JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
REDACTED = "[redacted]"
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# A request id a client may choose: short, and nothing a log line or a terminal could misread.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{8,64}")
# Shorter values are too likely to occur in ordinary words to be replaced everywhere.
MIN_SECRET_LENGTH = 6

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "ipn_log_context", default=MappingProxyType({})
)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Every line logged inside the block carries `fields` (and what `bind` adds there)."""
    token = _context.set({**_context.get(), **_present(fields)})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add fields to the context of the enclosing `bound` block, once they are known."""
    _context.set({**_context.get(), **_present(fields)})


def current_context() -> dict[str, Any]:
    return dict(_context.get())


def _present(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def request_id_from(incoming: str | None) -> str:
    """The caller's `X-Request-Id` when it is a sane one, else a fresh id."""
    if incoming and REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


class ContextFilter(logging.Filter):
    """Puts the bound context and the running Celery task's id on each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = dict(_context.get())
        task_id = _celery_task_id()
        if task_id and "task_id" not in fields:
            fields["task_id"] = task_id
        for name in CONTEXT_FIELDS:
            if name in fields and not hasattr(record, name):
                setattr(record, name, fields[name])
        shown = [f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if name in fields]
        record.context = f" [{' '.join(shown)}]" if shown else ""
        return True


def _celery_task_id() -> str | None:
    # The same lookup Celery's own TaskFormatter makes; celery is always installed here.
    from celery._state import get_current_task

    task = get_current_task()
    request = getattr(task, "request", None) if task is not None else None
    task_id = getattr(request, "id", None)
    return str(task_id) if task_id else None


class Redacting(logging.Formatter):
    """The last line of defence: known secret values and email addresses never leave the
    process in a line this formatter writes, whatever the code above logged (message,
    arguments, traceback, context fields). It redacts the finished line rather than the
    record, which other handlers share: those see what the code really logged, so a test
    can still catch the code that logged a secret."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str | None] = ()) -> None:
        super().__init__()
        self.inner = inner
        values = {value for value in secrets if value and len(value) >= MIN_SECRET_LENGTH}
        # A JSON line holds a secret with its quotes and backslashes escaped.
        values |= {json.dumps(value)[1:-1] for value in values}
        # Longest first: a secret containing another is replaced whole.
        self.secrets = sorted(values, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return EMAIL.sub("[email]", text)

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(self.inner.format(record))


def secret_values(settings: Settings) -> list[str]:
    """Every secret the settings hold, for the redacting filter."""
    values = [
        settings.api_token,
        settings.secret_key,
        settings.alert_webhook_url,
        settings.events.webhook_secret,
    ]
    for account in settings.all_accounts():
        # An account's secrets are the fields it keeps out of its repr.
        values += [getattr(account, item.name) for item in fields(account) if not item.repr]
        values += [previous.secret for previous in account.previous_secrets]
    return [value for value in values if isinstance(value, str) and value]


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(
            JSON_FORMAT,
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            # The text format's rendering of the same fields, not wanted twice.
            reserved_attrs=[*_RESERVED, "context"],
        )
    return logging.Formatter(TEXT_FORMAT)


_RESERVED = list(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys() | {"message"}
)


def decorate(handler: logging.Handler, log_format: str, secrets: Iterable[str]) -> None:
    """Give a handler (ours, or one a server made itself) our format, context and redaction."""
    handler.setFormatter(Redacting(formatter(log_format), secrets))
    for old in [f for f in handler.filters if isinstance(f, ContextFilter)]:
        handler.removeFilter(old)
    handler.addFilter(ContextFilter())


def configure_logging(
    settings: Settings | None = None,
    *,
    level: int | str | None = None,
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Install the one root handler of this process (replacing an earlier one of ours).

    Without settings (a command that has not read them yet) the format is text and nothing is
    known to redact but email addresses. Without a level, an earlier call's level stays (the
    `ipn` command asks for WARNING before the app is built), else INFO.
    """
    root = logging.getLogger()
    earlier = [handler for handler in root.handlers if getattr(handler, "ipn", False)]
    if level is None:
        level = root.level if earlier else logging.INFO
    for handler in earlier:
        root.removeHandler(handler)
    log_format = settings.log_format if settings is not None else "text"
    secrets = secret_values(settings) if settings is not None else []
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.ipn = True  # type: ignore[attr-defined]
    decorate(handler, log_format, secrets)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


class GunicornLogger(glogging.Logger):
    """Gunicorn's own lines (start-up, worker boots and deaths, the access log if on) in the
    same format and through the same filters as the application's."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        from ipn.config import Settings

        settings = Settings.from_env()
        for handler in [*self.error_log.handlers, *self.access_log.handlers]:
            decorate(handler, settings.log_format, secret_values(settings))
