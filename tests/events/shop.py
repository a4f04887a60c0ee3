"""A merchant's shop as the delivery engine sees it: it verifies each event with the
`standardwebhooks` library, as a real shop would, and answers as a test tells it to."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from standardwebhooks import Webhook

from ipn.events import urls


class Shop:
    def __init__(self, *secrets: str) -> None:
        self.secrets = secrets
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.headers: list[dict[str, str]] = []
        # What the next attempts get, in order: a status code or an exception to raise.
        self.answers: list[int | Exception] = []

    def __call__(self, url: str, body: bytes, headers: Mapping[str, str], **_: Any) -> urls.Answer:
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, Exception):
            raise answer
        for secret in self.secrets:  # each secret the shop knows must verify on its own
            Webhook(secret).verify(body.decode(), dict(headers))
        self.headers.append(dict(headers))
        self.received.append((headers["webhook-id"], json.loads(body)))
        return urls.Answer(answer, b"x" * 3000 if answer >= 400 else b"ok", 3)

    @property
    def types(self) -> list[str]:
        return [body["type"] for _, body in self.received]

    @property
    def ids(self) -> list[str]:
        return [webhook_id for webhook_id, _ in self.received]
