"""The sandbox's shop: a merchant endpoint that verifies, dedupes and shows the events it gets."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from flask import Blueprint, Response, current_app, render_template_string, request
from standardwebhooks import Webhook, WebhookVerificationError

from ipn.config import Settings
from ipn.sandbox import wire
from ipn.sandbox.fake import BadOptions
from ipn.sandbox.profile import SANDBOX_MERCHANT_WEBHOOK_SECRET

bp = Blueprint("sandbox_shop", __name__, url_prefix="/sandbox/shop")

EXTENSION = "ipn_sandbox_shop"
# What the page and the JSON show; older entries drop off.
KEEP = 500
# Webhook-ids and payments remembered for dedupe and ordering, far more than are shown.
REMEMBER = 10_000
MODES = ("ok", "fail", "slow")


@dataclass(frozen=True)
class ShopEvent:
    """One verified event as the shop took it; `answered` is the status it got back."""

    webhook_id: str
    type: str | None
    payment_id: str | None
    order_id: str | None
    status: str | None
    sequence: int | None
    received_at: datetime
    answered: int = 200
    # The webhook-id was taken before: answered 200 and not counted again.
    repeat: bool = False
    # Its sequence is below the newest already taken for the payment.
    out_of_order: bool = False

    @property
    def verdict(self) -> str:
        if self.answered != 200:
            return f"failed ({self.answered})"
        return "repeat" if self.repeat else "verified"

    def view(self) -> dict[str, Any]:
        return {
            "webhook_id": self.webhook_id,
            "type": self.type,
            "payment_id": self.payment_id,
            "order_id": self.order_id,
            "status": self.status,
            "sequence": self.sequence,
            "received_at": wire.iso(self.received_at, millis=True),
            "answered": self.answered,
            "repeat": self.repeat,
            "out_of_order": self.out_of_order,
            "verdict": self.verdict,
        }


@dataclass(frozen=True)
class Refusal:
    """A request the shop would not believe: no event was taken from it."""

    reason: str
    webhook_id: str | None
    received_at: datetime

    def view(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "webhook_id": self.webhook_id,
            "received_at": wire.iso(self.received_at, millis=True),
            "verdict": "refused",
        }


@dataclass(frozen=True)
class ShopAnswer:
    status: int
    body: dict[str, Any]
    # Held this long before answering (the `slow` mode).
    delay: float = 0.0


@dataclass
class Misbehaviour:
    mode: str = "ok"
    remaining: int = 0
    seconds: float = 0.0

    def view(self) -> dict[str, Any]:
        # A string, as the sandbox writes no floats.
        return {"mode": self.mode, "remaining": self.remaining, "seconds": f"{self.seconds:g}"}


class Shop:
    """What the shop was told, newest last, behind one lock (the dev server is threaded)."""

    def __init__(self, secret: str, clock: Callable[[], datetime], slow_seconds: float) -> None:
        self._webhook = Webhook(secret)
        self._clock = clock
        self._slow_seconds = slow_seconds
        self._lock = threading.Lock()
        self._received: deque[ShopEvent] = deque(maxlen=KEEP)
        self._refused: deque[Refusal] = deque(maxlen=KEEP)
        self._taken: OrderedDict[str, None] = OrderedDict()
        self._newest: OrderedDict[str, int] = OrderedDict()
        self._misbehaviour = Misbehaviour()

    def receive(self, body: bytes, headers: Mapping[str, str]) -> ShopAnswer:
        """Verify, then take the event once per webhook-id, as a merchant's endpoint should."""
        webhook_id = {k.lower(): v for k, v in headers.items()}.get("webhook-id") or None
        try:
            payload = self._webhook.verify(body, dict(headers))
        except WebhookVerificationError as exc:
            return self._refuse(str(exc), webhook_id)
        except ValueError:
            # From inside the library: a signature without its `v1,` or not base64, a body not
            # UTF-8 or not JSON.
            return self._refuse("Malformed signature or body", webhook_id)
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
            return self._refuse("the body is not an event: no data object", webhook_id)
        assert webhook_id is not None  # verify() insists on it
        with self._lock:
            event = self._event(webhook_id, payload, self._clock())
            failing = self._use_misbehaviour()
            if failing is not None and failing.mode == "fail":
                event = replace(event, answered=500)
                self._received.append(event)
                return ShopAnswer(500, {"error": "the shop is failing on purpose"})
            if not event.repeat:
                self._remember(event)
            self._received.append(event)
        delay = failing.seconds if failing is not None else 0.0
        return ShopAnswer(200, {"received": event.webhook_id, "repeat": event.repeat}, delay)

    def misbehave(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, Mapping):
            raise BadOptions("the body is a JSON object: mode, count, seconds")
        mode, count = body.get("mode"), body.get("count", 1)
        seconds = body.get("seconds", Decimal(str(self._slow_seconds)))
        if mode not in MODES:
            raise BadOptions(f"mode is one of {', '.join(MODES)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise BadOptions("count is a whole number from 1")
        # The control API reads JSON numbers as Decimals.
        if isinstance(seconds, bool) or not isinstance(seconds, int | Decimal) or seconds < 0:
            raise BadOptions("seconds is a number from 0")
        with self._lock:
            self._misbehaviour = (
                Misbehaviour()
                if mode == "ok"
                else Misbehaviour(mode, count, float(seconds) if mode == "slow" else 0.0)
            )
            return self._misbehaviour.view()

    def clear(self) -> None:
        with self._lock:
            self._received.clear()
            self._refused.clear()
            self._taken.clear()
            self._newest.clear()
            self._misbehaviour = Misbehaviour()

    def view(self) -> dict[str, Any]:
        """Newest first; `events` counts each webhook-id taken once, repeats apart."""
        with self._lock:
            received = list(reversed(self._received))
            return {
                "received": [event.view() for event in received],
                "refused": [refusal.view() for refusal in reversed(self._refused)],
                "events": len(self._taken),
                "mode": self._misbehaviour.view(),
            }

    def _event(self, webhook_id: str, payload: dict[str, Any], now: datetime) -> ShopEvent:
        data: dict[str, Any] = payload["data"]
        kind = _text(payload.get("type"))
        # A payment's data is the payment; an anomaly's names its payment.
        anomaly = kind is not None and kind.startswith("anomaly.")
        payment_id = _text(data.get("payment_id") if anomaly else data.get("id"))
        sequence = data.get("sequence")
        sequence = (
            sequence if isinstance(sequence, int) and not isinstance(sequence, bool) else None
        )
        newest = self._newest.get(payment_id) if payment_id is not None else None
        return ShopEvent(
            webhook_id=webhook_id,
            type=kind,
            payment_id=payment_id,
            order_id=_text(data.get("order_id")),
            status=_text(data.get("status")),
            sequence=sequence,
            received_at=now,
            repeat=webhook_id in self._taken,
            out_of_order=sequence is not None and newest is not None and sequence < newest,
        )

    def _remember(self, event: ShopEvent) -> None:
        _bounded_put(self._taken, event.webhook_id, None)
        if event.payment_id is not None and event.sequence is not None:
            newest = self._newest.get(event.payment_id)
            _bounded_put(
                self._newest,
                event.payment_id,
                event.sequence if newest is None else max(newest, event.sequence),
            )

    def _use_misbehaviour(self) -> Misbehaviour | None:
        current = self._misbehaviour
        if current.mode == "ok":
            return None
        current.remaining -= 1
        if current.remaining <= 0:
            self._misbehaviour = Misbehaviour()
        return current

    def _refuse(self, reason: str, webhook_id: str | None) -> ShopAnswer:
        with self._lock:
            self._refused.append(Refusal(reason, webhook_id, self._clock()))
        return ShopAnswer(400, {"error": reason})


def shop_for(settings: Settings, clock: Callable[[], datetime]) -> Shop:
    """The shop checks what the receiver signs with: its secret, else the sandbox's."""
    secret = settings.events.webhook_secret or SANDBOX_MERCHANT_WEBHOOK_SECRET
    # Held past the receiver's whole attempt, so that the receiver really gives up.
    return Shop(secret, clock, slow_seconds=settings.events.total_timeout + 2)


def _bounded_put(memory: OrderedDict[str, Any], key: str, value: Any) -> None:
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > REMEMBER:
        memory.popitem(last=False)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    return str(value)


# -- views ----------------------------------------------------------------------------------


def _shop() -> Shop:
    shop: Shop = current_app.extensions[EXTENSION]
    return shop


def _json(value: Any, status: int = 200) -> Response:
    return Response(wire.dumps(value), status=status, content_type="application/json")


@bp.errorhandler(BadOptions)
def _bad_options(exc: BadOptions) -> Response:
    return _json({"error": str(exc)}, 400)


@bp.post("/events")
def receive_event() -> Response:
    answer = _shop().receive(request.get_data(cache=True), dict(request.headers.items()))
    if answer.delay:
        time.sleep(answer.delay)
    return _json(answer.body, answer.status)


@bp.get("")
def show() -> Response | str:
    view = _shop().view()
    wanted = request.accept_mimetypes.best_match(["text/html", "application/json"])
    if request.args.get("format") == "json" or wanted == "application/json":
        return _json(view)
    return render_template_string(PAGE, **view)


@bp.delete("")
def clear() -> Response:
    _shop().clear()
    return _json(_shop().view())


@bp.post("/mode")
def set_mode() -> Response:
    raw = request.get_data(cache=True)
    try:
        body = wire.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise BadOptions(f"the body is not JSON: {exc}") from None
    return _json({"mode": _shop().misbehave(body)})


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Sandbox shop</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem; }
table { border-collapse: collapse; margin-bottom: 2rem; }
th, td { border-bottom: 1px solid #ccc; padding: .3rem .6rem; text-align: left; }
td.id { font-family: monospace; font-size: .9em; }
.refused, .failed { color: #a00; } .repeat { color: #777; }
</style>
</head>
<body>
<h1>Sandbox shop</h1>
<p>{{ events }} event{{ "" if events == 1 else "s" }} taken; the shop is
<strong>{{ mode.mode }}</strong>
{%- if mode.remaining %} for the next {{ mode.remaining }}{% endif %}.
Events come to <code>POST /sandbox/shop/events</code>; this page as JSON:
<a href="?format=json">?format=json</a>.</p>
<h2>Received</h2>
{% if received %}
<table>
<tr><th>time</th><th>type</th><th>payment</th><th>order</th><th>status</th><th>sequence</th>
<th>webhook-id</th><th>verdict</th></tr>
{% for event in received %}
<tr class="{{ event.verdict.split()[0] }}">
<td>{{ event.received_at }}</td><td>{{ event.type or "" }}</td>
<td class="id">{{ event.payment_id or "" }}</td><td>{{ event.order_id or "" }}</td>
<td>{{ event.status or "" }}</td>
<td>{{ event.sequence if event.sequence is not none else "" }}{% if event.out_of_order %}
(out of order){% endif %}</td>
<td class="id">{{ event.webhook_id }}</td><td>{{ event.verdict }}</td>
</tr>
{% endfor %}
</table>
{% else %}
<p>Nothing yet.</p>
{% endif %}
<h2>Refused</h2>
{% if refused %}
<table>
<tr><th>time</th><th>webhook-id</th><th>reason</th></tr>
{% for refusal in refused %}
<tr class="refused"><td>{{ refusal.received_at }}</td>
<td class="id">{{ refusal.webhook_id or "" }}</td><td>{{ refusal.reason }}</td></tr>
{% endfor %}
</table>
{% else %}
<p>Nothing refused.</p>
{% endif %}
</body>
</html>
"""
