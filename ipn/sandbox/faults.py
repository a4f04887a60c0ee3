"""Provider misbehaviour on demand: the next N API calls of a provider time out, fail or lie."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipn.sandbox.fake import Answer, FakeProvider

MODES = ("timeout", "error500", "rate429", "garbage", "truncated", "unauthorized")
# The provider did the work and only the answer went wrong: a create still creates.
PROCESSED = frozenset({"timeout", "garbage", "truncated"})
GARBAGE = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


@dataclass
class Fault:
    provider: str
    mode: str
    remaining: int
    # Only calls whose path contains this, e.g. "/payment/coin" for CubePay's create.
    path: str | None = None

    def view(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "mode": self.mode,
            "remaining": self.remaining,
            "path": self.path,
        }

    def applies_to(self, path: str) -> bool:
        return self.path is None or self.path in path


class FaultBoard:
    """Queued faults per provider; each API call of that provider uses up one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Fault]] = {}

    def add(self, provider: str, mode: str, count: int, path: str | None = None) -> Fault:
        fault = Fault(provider, mode, count, path)
        with self._lock:
            self._queues.setdefault(provider, deque()).append(fault)
        return fault

    def take(self, provider: str, path: str = "") -> str | None:
        with self._lock:
            queue = self._queues.get(provider)
            fault = next((f for f in queue or () if f.applies_to(path)), None)
            if queue is None or fault is None:
                return None
            fault.remaining -= 1
            if fault.remaining <= 0:
                queue.remove(fault)
            return fault.mode

    def clear(self, provider: str | None = None) -> None:
        with self._lock:
            if provider is None:
                self._queues.clear()
            else:
                self._queues.pop(provider, None)

    def view(self) -> list[dict[str, Any]]:
        with self._lock:
            return [fault.view() for queue in self._queues.values() for fault in queue]


def misbehave(mode: str, fake: FakeProvider, answer: Callable[[], Answer], delay: float) -> Answer:
    """The answer the call gets under `mode`; `answer` runs the call for real where it would."""
    if mode == "error500":
        return fake.error(500, "Internal Server Error")
    if mode == "rate429":
        refused = fake.error(429, fake.rate_limit_message)
        return Answer(
            refused.status,
            refused.body,
            refused.content_type,
            (*refused.headers, ("Retry-After", "1")),
        )
    if mode == "unauthorized":
        return fake.unauthorized()
    real = answer()
    if mode == "timeout":
        time.sleep(delay)
        return real
    if mode == "garbage":
        return Answer(200, GARBAGE, "text/html")
    if mode == "truncated":
        return Answer(
            real.status,
            real.body[: len(real.body) // 2],
            real.content_type,
            real.headers,
            declared_length=len(real.body),
        )
    raise ValueError(f"unknown fault mode {mode!r}")
