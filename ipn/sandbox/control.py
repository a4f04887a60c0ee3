"""The sandbox as one object: fakes, payments, faults, and what the control API does to them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import flask

from ipn.config import PROVIDERS, Settings
from ipn.sandbox import wire
from ipn.sandbox.bitcoinpaygate import BitcoinPaygate
from ipn.sandbox.coinbarpay import CoinbarPay
from ipn.sandbox.credentials import resolve_keys
from ipn.sandbox.cryptoprocessing import CryptoProcessing
from ipn.sandbox.cubepay import CubePay
from ipn.sandbox.delivery import Courier
from ipn.sandbox.fake import (
    ACTIONS,
    ActionOptions,
    ActionRefused,
    Answer,
    BadOptions,
    FakeProvider,
    Incoming,
    Refused,
    Timings,
)
from ipn.sandbox.faults import MODES, FaultBoard, misbehave
from ipn.sandbox.state import FakePayment, Ledger


class NotFound(LookupError):
    pass


def utc_now() -> datetime:
    return datetime.now(UTC)


class Sandbox:
    """Four fake providers sharing one ledger, one fault board, one clock and one courier."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = utc_now,
        receiver_url: str | None = None,
        fault_delay: float = 15.0,
        delivery_timeout: float = 5.0,
        timings: Timings | None = None,
    ) -> None:
        self.clock = _aware(clock)
        self.receiver_url = (receiver_url or settings.public_url).rstrip("/")
        self.fault_delay = fault_delay
        self.keys = resolve_keys(settings)
        self.ledger = Ledger()
        self.faults = FaultBoard()
        self.courier = Courier(self.ledger, self.clock, delivery_timeout)
        timings = timings or Timings(coinbarpay_timeout=settings.coinbarpay.payment_timeout)
        shared: dict[str, Any] = {
            "courier": self.courier,
            "clock": self.clock,
            "receiver_url": self.receiver_url,
            "timings": timings,
        }
        self.fakes: dict[str, FakeProvider] = {
            "cubepay": CubePay(
                self.ledger,
                self.keys.cubepay,
                currency_ids=settings.cubepay.currency_ids,
                **shared,
            ),
            "bitcoinpaygate": BitcoinPaygate(self.ledger, self.keys.bitcoinpaygate, **shared),
            "coinbarpay": CoinbarPay(self.ledger, self.keys.coinbarpay, **shared),
            "cryptoprocessing": CryptoProcessing(self.ledger, self.keys.cryptoprocessing, **shared),
        }
        assert tuple(self.fakes) == PROVIDERS

    # -- the providers' APIs ------------------------------------------------------------------

    def call(
        self, provider: str, handler: Callable[[Incoming], Answer], incoming: Incoming
    ) -> Answer:
        """Run one API call of a provider, through the fault board first."""
        fake = self.fakes[provider]

        def answer() -> Answer:
            try:
                return handler(incoming)
            except Refused as refused:
                return refused.answer

        mode = self.faults.take(provider, flask.request.path if flask.has_request_context() else "")
        if mode is None:
            return answer()
        return misbehave(mode, fake, answer, self.fault_delay)

    # -- control ------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What the sandbox serves; credentials by origin only, never their values."""
        return {
            "providers": {
                name: {
                    "credentials": self.keys.for_provider(name).source,
                    "routes": [route.rule for route in fake.routes()],
                }
                for name, fake in self.fakes.items()
            },
            "receiver_url": self.receiver_url,
            "callback_urls": {
                "coinbarpay": f"{self.receiver_url}/ipn/coinbarpay",
                "cryptoprocessing": f"{self.receiver_url}/ipn/cryptoprocessing",
            },
            "actions": list(ACTIONS),
            "fault_modes": list(MODES),
            # How long a `timeout` fault holds its answer.
            "timeout_fault_seconds": f"{self.fault_delay:g}",
            "now": wire.iso(self.clock(), millis=True),
        }

    def payments(self) -> list[dict[str, Any]]:
        now = self.clock()
        with self.ledger.lock:
            views = []
            for payment in self.ledger.all():
                self.fakes[payment.provider].refresh(payment, now)
                views.append(self.view(payment, now))
            return views

    def payment(self, provider: str, ident: str) -> dict[str, Any]:
        now = self.clock()
        with self.ledger.lock:
            payment = self._find(provider, ident)
            self.fakes[provider].refresh(payment, now)
            return self.view(payment, now)

    def act(self, provider: str, ident: str, action: str, body: Any) -> dict[str, Any]:
        """Move a payment and post what the provider would post; the answer tells both."""
        if action not in ACTIONS:
            raise BadOptions(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        if not isinstance(body, Mapping):
            raise BadOptions("the body is a JSON object of options")
        options = ActionOptions.parse(body)
        now = self.clock()
        with self.ledger.lock:
            payment = self._find(provider, ident)
            outcome = self.fakes[provider].perform(payment, action, options, now)
        deliveries = [self.courier.send(payment, callback) for callback in outcome.callbacks]
        with self.ledger.lock:
            return {
                "status": payment.status,
                "payment": self.view(payment, self.clock()),
                "deliveries": [delivery.view() for delivery in deliveries],
                "notes": outcome.notes,
            }

    def resend(self, provider: str, ident: str) -> dict[str, Any]:
        """Post the last callback again, byte for byte, as a provider's retry does."""
        with self.ledger.lock:
            payment = self._find(provider, ident)
            callback = payment.last_callback
        if callback is None:
            raise ActionRefused("no callback was sent for this payment yet")
        delivery = self.courier.send(payment, callback, resend=True)
        with self.ledger.lock:
            return {
                "status": payment.status,
                "payment": self.view(payment, self.clock()),
                "deliveries": [delivery.view()],
                "notes": [],
            }

    def add_fault(self, body: Any) -> list[dict[str, Any]]:
        if not isinstance(body, Mapping):
            raise BadOptions("the body is a JSON object: provider, mode, count")
        provider, mode, count = body.get("provider"), body.get("mode"), body.get("count", 1)
        path = body.get("path")
        if path is not None and (not isinstance(path, str) or not path.startswith("/")):
            raise BadOptions("path is part of an API path, starting with /")
        if provider not in self.fakes:
            raise BadOptions(f"provider is one of {', '.join(self.fakes)}")
        if mode not in MODES:
            raise BadOptions(f"mode is one of {', '.join(MODES)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise BadOptions("count is a whole number from 1")
        self.faults.add(provider, mode, count, path)
        return self.faults.view()

    def clear_faults(self, provider: str | None = None) -> list[dict[str, Any]]:
        if provider is not None and provider not in self.fakes:
            raise BadOptions(f"provider is one of {', '.join(self.fakes)}")
        self.faults.clear(provider)
        return self.faults.view()

    def reset(self) -> int:
        with self.ledger.lock:
            count = len(self.ledger.all())
            self.ledger.clear()
        self.faults.clear()
        return count

    def view(self, payment: FakePayment, now: datetime) -> dict[str, Any]:
        """The payment for people and scripts: amounts as exact strings, times in ISO 8601."""
        fake = self.fakes[payment.provider]
        return {
            "provider": payment.provider,
            "payment_id": payment.payment_id,
            "order_id": payment.order_id,
            "status": payment.status,
            "status_descr": payment.status_descr,
            "open": fake.is_open(payment),
            "amount": wire.number(payment.amount),
            "currency": payment.currency,
            "pay_amount": wire.number(payment.pay_amount),
            "pay_currency": payment.pay_currency,
            "paid_amount": wire.number(payment.paid_amount),
            "confirmed_amount": wire.number(payment.confirmed_amount),
            "late_amount": wire.number(payment.late_amount),
            "address": payment.address,
            "created_at": wire.iso(payment.created_at, millis=True),
            "updated_at": wire.iso(payment.updated_at or payment.created_at, millis=True),
            "expires_at": wire.iso(payment.expires_at, millis=True),
            "callback_owed": payment.callback_owed,
            "transactions": [funds.view() for funds in payment.transactions],
            "history": [change.view() for change in payment.history],
            "callbacks": [delivery.view() for delivery in payment.deliveries],
            "provider_view": fake.wire_view(payment, now),
        }

    def _find(self, provider: str, ident: str) -> FakePayment:
        if provider not in self.fakes:
            raise NotFound(f"no provider {provider!r}; one of {', '.join(self.fakes)}")
        payment = self.ledger.find(provider, ident)
        if payment is None:
            raise NotFound(f"no {provider} payment {ident!r}")
        return payment


def _aware(clock: Callable[[], datetime]) -> Callable[[], datetime]:
    """A clock that always answers in UTC, whatever the injected one returns."""

    def now() -> datetime:
        moment = clock()
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

    return now
