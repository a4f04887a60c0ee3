"""The sandbox's memory: fake payments, the money sent to them, the callbacks they caused."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from ipn.sandbox import wire

BODY_LIMIT = 2000


@dataclass
class Transaction:
    """Money the customer sent, in the pay currency."""

    txid: str
    amount: Decimal
    at: datetime
    confirmed: bool = True
    # Arrived after the payment had ended; providers do not count it in the payment.
    late: bool = False

    def view(self) -> dict[str, Any]:
        return {
            "txid": self.txid,
            "amount": wire.number(self.amount),
            "at": wire.iso(self.at, millis=True),
            "confirmed": self.confirmed,
            "late": self.late,
        }


@dataclass(frozen=True)
class OutgoingCallback:
    """A callback ready to send: the exact bytes and headers the provider would post."""

    kind: str
    url: str
    body: bytes
    headers: tuple[tuple[str, str], ...]


@dataclass
class Delivery:
    """One attempt to post a callback, and what the receiver answered."""

    kind: str
    url: str
    at: datetime
    body: bytes
    headers: tuple[tuple[str, str], ...]
    resend: bool = False
    status_code: int | None = None
    answer: str | None = None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def view(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "url": self.url,
            "at": wire.iso(self.at, millis=True),
            "resend": self.resend,
            "request": {
                "headers": dict(self.headers),
                "body": self.body.decode("utf-8", "replace"),
            },
            "status_code": self.status_code,
            "body": self.answer,
            "error": self.error,
            "delivered": self.delivered,
        }


@dataclass
class Change:
    at: datetime
    action: str
    status: int | str
    detail: str = ""

    def view(self) -> dict[str, Any]:
        return {
            "at": wire.iso(self.at, millis=True),
            "action": self.action,
            "status": self.status,
            "detail": self.detail,
        }


@dataclass
class FakePayment:
    """One payment as a provider holds it. `status` is the provider's own value (CubePay: int)."""

    provider: str
    payment_id: str
    order_id: str
    created_at: datetime
    expires_at: datetime
    status: int | str
    # What the merchant asked for, and what the customer must send for it.
    amount: Decimal
    currency: str
    pay_amount: Decimal
    pay_currency: str
    address: str
    # Decimal places of the pay currency as this provider writes it.
    places: int = 8
    base_url: str = ""
    # The create request as received (form fields or parsed JSON), for echoes in callbacks.
    request: dict[str, Any] = field(default_factory=dict)
    # Provider-specific values fixed at creation (tokens, labels, secondary ids).
    extra: dict[str, Any] = field(default_factory=dict)
    status_descr: str | None = None
    updated_at: datetime | None = None
    paid_at: datetime | None = None
    transactions: list[Transaction] = field(default_factory=list)
    history: list[Change] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    last_callback: OutgoingCallback | None = None
    # True once the provider's status moved without its callback (expiry by the clock).
    callback_owed: bool = False

    @property
    def paid_amount(self) -> Decimal:
        """Funds seen in time, confirmed or not."""
        return sum((t.amount for t in self.transactions if not t.late), Decimal(0))

    @property
    def confirmed_amount(self) -> Decimal:
        return sum((t.amount for t in self.transactions if not t.late and t.confirmed), Decimal(0))

    @property
    def late_amount(self) -> Decimal:
        return sum((t.amount for t in self.transactions if t.late), Decimal(0))

    @property
    def remaining(self) -> Decimal:
        return max(self.pay_amount - self.paid_amount, Decimal(0))

    @property
    def has_unconfirmed(self) -> bool:
        return any(not t.confirmed and not t.late for t in self.transactions)

    def move(self, status: int | str, at: datetime, action: str, detail: str = "") -> None:
        self.status = status
        self.updated_at = at
        self.history.append(Change(at, action, status, detail))


class Ledger:
    """Every fake payment, by provider and id, behind one lock (the dev server is threaded)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._payments: dict[tuple[str, str], FakePayment] = {}
        # A provider may accept the same merchant reference twice (CubePay); the last one wins.
        self._by_order: dict[tuple[str, str], str] = {}

    def add(self, payment: FakePayment) -> None:
        with self.lock:
            self._payments[(payment.provider, payment.payment_id)] = payment
            self._by_order[(payment.provider, payment.order_id)] = payment.payment_id

    def get(self, provider: str, payment_id: str) -> FakePayment | None:
        with self.lock:
            return self._payments.get((provider, payment_id))

    def by_order(self, provider: str, order_id: str) -> FakePayment | None:
        with self.lock:
            payment_id = self._by_order.get((provider, order_id))
            return None if payment_id is None else self._payments.get((provider, payment_id))

    def find(self, provider: str, ident: str) -> FakePayment | None:
        """By the provider's payment id, else by the merchant's order id."""
        return self.get(provider, ident) or self.by_order(provider, ident)

    def all(self) -> list[FakePayment]:
        """In the order they were created (an injected clock may give them all one time)."""
        with self.lock:
            return list(self._payments.values())

    def clear(self) -> None:
        with self.lock:
            self._payments.clear()
            self._by_order.clear()
