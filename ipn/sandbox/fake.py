"""What every fake provider shares: requests in, answers out, and how actions move a payment."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal, InvalidOperation, localcontext
from typing import Any, ClassVar

from ipn.sandbox import market, wire
from ipn.sandbox.credentials import ProviderKeys
from ipn.sandbox.delivery import Courier
from ipn.sandbox.state import Change, FakePayment, Ledger, OutgoingCallback, Transaction

ACTIONS = ("pay", "underpay", "overpay", "confirm", "pay-late", "expire", "refund", "cancel")


@dataclass(frozen=True)
class Incoming:
    """One API call as the fake sees it: the raw bytes are what signatures cover."""

    method: str
    headers: Mapping[str, str]
    body: bytes
    base_url: str
    form: tuple[tuple[str, str], ...] = ()
    basic_auth: tuple[str, str] | None = None
    args: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    # A Content-Length larger than the body: the connection closes before the promised end.
    declared_length: int | None = None

    @classmethod
    def json(cls, status: int, value: Any, *headers: tuple[str, str]) -> Answer:
        return cls(status, wire.dump_bytes(value), "application/json", headers)


@dataclass(frozen=True)
class Route:
    rule: str
    methods: tuple[str, ...]
    endpoint: str
    handler: Callable[[Incoming], Answer]


class Refused(Exception):
    """An API call the provider refuses; `answer` is its own error response."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


class ActionRefused(Exception):
    """The action cannot happen to the payment in its current state (409 on the control API)."""


class BadOptions(ValueError):
    """The action's options are malformed (400 on the control API)."""


@dataclass(frozen=True)
class ActionOptions:
    amount: Decimal | None = None
    confirmed: bool = True
    # None: send when the provider would; False: never; True: even where it would not.
    callback: bool | None = None

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> ActionOptions:
        amount = body.get("amount")
        if amount is not None:
            if isinstance(amount, bool | float) or not isinstance(amount, str | int | Decimal):
                raise BadOptions("amount must be a decimal string")
            try:
                amount = Decimal(str(amount))
            except InvalidOperation:
                raise BadOptions(f"amount is not a number: {body['amount']!r}") from None
            if not amount.is_finite() or amount <= 0:
                raise BadOptions("amount must be a positive number")
        confirmed = body.get("confirmed", True)
        callback = body.get("callback")
        if not isinstance(confirmed, bool):
            raise BadOptions("confirmed must be true or false")
        if callback is not None and not isinstance(callback, bool):
            raise BadOptions("callback must be true, false or absent")
        return cls(amount, confirmed, callback)


@dataclass(frozen=True)
class Timings:
    """How long payments live where the provider decides it (CubePay's 6 h is in its fake)."""

    bitcoinpaygate_expiry: timedelta = timedelta(minutes=15)
    coinbarpay_timeout: timedelta = timedelta(minutes=30)


@dataclass
class Outcome:
    """What an action produced: callbacks to post, and why others were not sent."""

    callbacks: list[OutgoingCallback] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class FakeProvider(ABC):
    """A provider's API and its payments' life, as far as its protocol file describes them."""

    name: ClassVar[str]
    # The provider's error status for bad credentials, and its words when rate limited.
    auth_status: ClassVar[int] = 401
    rate_limit_message: ClassVar[str] = "Too many requests"
    # Whether the provider posts anything about money that arrives after the payment ended.
    reports_late_funds: ClassVar[bool] = False

    def __init__(
        self,
        ledger: Ledger,
        keys: ProviderKeys,
        courier: Courier,
        clock: Callable[[], datetime],
        receiver_url: str,
        timings: Timings,
    ) -> None:
        self.ledger = ledger
        self.keys = keys
        self.courier = courier
        self.clock = clock
        self.receiver_url = receiver_url.rstrip("/")
        self.timings = timings

    # -- the provider's API -------------------------------------------------------------------

    @abstractmethod
    def routes(self) -> list[Route]:
        """The provider's endpoints, served at the sandbox's root."""

    @abstractmethod
    def error(self, status: int, message: str) -> Answer:
        """An error answer in the provider's own shape."""

    def unauthorized(self) -> Answer:
        return self.error(self.auth_status, "Authentication failed")

    def refuse(self, status: int, message: str) -> Refused:
        return Refused(self.error(status, message))

    def lookup(self, ident: str) -> FakePayment:
        """A payment by the provider's id or the merchant's reference, brought up to the clock."""
        payment = self.ledger.find(self.name, ident)
        if payment is None:
            raise self.refuse(404, "Payment not found")
        self.refresh(payment, self.clock())
        return payment

    # -- the payment's life -------------------------------------------------------------------

    @abstractmethod
    def is_open(self, payment: FakePayment) -> bool:
        """Whether the payment still takes funds."""

    @abstractmethod
    def settle_funds(self, payment: FakePayment, action: str) -> None:
        """Set the status the provider shows after funds arrived or were confirmed."""

    @abstractmethod
    def expire(self, payment: FakePayment) -> None:
        """Set the status the provider shows when the payment's time is up."""

    def refund(self, payment: FakePayment) -> None:
        raise ActionRefused(f"{self.name} has no refund status for a payment")

    def cancel(self, payment: FakePayment) -> None:
        raise ActionRefused(f"{self.name} has no way to cancel a payment")

    @abstractmethod
    def sends_callback(self, payment: FakePayment, before: int | str, action: str) -> bool:
        """Whether the real provider posts a callback after this change."""

    @abstractmethod
    def build_callback(self, payment: FakePayment, now: datetime) -> OutgoingCallback | None:
        """The signed callback for the payment as it stands; None when it has nowhere to go."""

    def late_callback(
        self, payment: FakePayment, funds: Transaction, now: datetime
    ) -> OutgoingCallback | None:
        """What the provider posts about money that came after the end, if anything."""
        return None

    @abstractmethod
    def wire_view(self, payment: FakePayment, now: datetime) -> Any:
        """The payment as the provider's status endpoint (or its create answer) shows it."""

    # -- shared machinery ---------------------------------------------------------------------

    def refresh(self, payment: FakePayment, now: datetime) -> None:
        """Apply an expiry the clock has reached; the callback for it is owed, not sent."""
        if not self.is_open(payment) or now < payment.expires_at:
            return
        before = payment.status
        try:
            self.expire(payment)
        except ActionRefused:
            return
        payment.move(payment.status, payment.expires_at, "expire", "the clock passed expiry")
        payment.callback_owed = self.sends_callback(payment, before, "expire")

    def perform(
        self, payment: FakePayment, action: str, options: ActionOptions, now: datetime
    ) -> Outcome:
        """Move the payment as the action says, and collect the callbacks the provider sends."""
        outcome = Outcome()
        self.refresh(payment, now)
        if action == "pay-late":
            self._pay_late(payment, options, now, outcome)
            return outcome
        if action == "expire" and payment.callback_owed:
            # Expired by the clock already: what is left to do is the callback it owed.
            payment.callback_owed = False
            self._callback_after(payment, None, action, options, now, outcome, owed=True)
            return outcome
        before = payment.status
        detail = self._apply(payment, action, options, now)
        payment.move(payment.status, now, action, detail)
        self._callback_after(payment, before, action, options, now, outcome)
        return outcome

    def _apply(
        self, payment: FakePayment, action: str, options: ActionOptions, now: datetime
    ) -> str:
        if action in ("pay", "underpay", "overpay"):
            if not self.is_open(payment):
                raise ActionRefused(
                    f"the payment is {payment.status} and takes no more funds; use pay-late"
                )
            amount = self._amount(payment, action, options)
            payment.transactions.append(
                Transaction(market.fake_txid(), amount, now, confirmed=options.confirmed)
            )
            payment.paid_at = payment.paid_at or now
            self.settle_funds(payment, action)
            state = "" if options.confirmed else " (unconfirmed)"
            return f"{amount} {payment.pay_currency} received{state}"
        if action == "confirm":
            if not payment.has_unconfirmed or not self.is_open(payment):
                raise ActionRefused("there are no unconfirmed funds on an open payment")
            for funds in payment.transactions:
                funds.confirmed = True
            self.settle_funds(payment, action)
            return "funds confirmed"
        if action == "expire":
            if not self.is_open(payment):
                raise ActionRefused(f"the payment is {payment.status}, not open")
            self.expire(payment)
            return "expired"
        if action == "refund":
            self.refund(payment)
            return "refunded"
        if action == "cancel":
            self.cancel(payment)
            return "cancelled"
        raise BadOptions(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")

    def _amount(self, payment: FakePayment, action: str, options: ActionOptions) -> Decimal:
        step = Decimal(1).scaleb(-payment.places)
        remaining = payment.remaining
        if remaining <= 0:
            raise ActionRefused("the full amount has arrived already; confirm it instead")
        if action == "pay":
            return remaining
        # Room for 18 decimals on a large amount.
        with localcontext(prec=80):
            half = (remaining / 2).quantize(step, rounding=ROUND_DOWN)
            tenth = (payment.pay_amount / 10).quantize(step, rounding=ROUND_DOWN)
        if action == "underpay":
            amount = options.amount or half
            if not 0 < amount < remaining:
                raise BadOptions(f"an underpayment is less than the {remaining} still due")
            return amount
        amount = options.amount or remaining + max(tenth, step)
        if amount <= remaining:
            raise BadOptions(f"an overpayment is more than the {remaining} still due")
        return amount

    def _pay_late(
        self, payment: FakePayment, options: ActionOptions, now: datetime, outcome: Outcome
    ) -> None:
        if self.is_open(payment):
            # Funds after expiry need an expired payment first, with whatever that sends.
            before = payment.status
            self.expire(payment)
            payment.move(payment.status, now, "expire", "expired before the late funds")
            self._callback_after(payment, before, "expire", options, now, outcome)
        elif payment.callback_owed:
            payment.callback_owed = False
            self._callback_after(payment, None, "expire", options, now, outcome, owed=True)
        funds = Transaction(
            market.fake_txid(), options.amount or payment.pay_amount, now, confirmed=True, late=True
        )
        payment.transactions.append(funds)
        payment.history.append(
            Change(now, "pay-late", payment.status, f"{funds.amount} {payment.pay_currency} late")
        )
        if options.callback is False:
            outcome.notes.append("pay-late: callback suppressed")
            return
        callback = self.late_callback(payment, funds, now)
        if callback is None:
            outcome.notes.append(
                "pay-late: no URL to report late funds to"
                if self.reports_late_funds
                else f"pay-late: {self.name} sends nothing about late funds"
            )
            return
        payment.last_callback = callback
        outcome.callbacks.append(callback)

    def _callback_after(
        self,
        payment: FakePayment,
        before: int | str | None,
        action: str,
        options: ActionOptions,
        now: datetime,
        outcome: Outcome,
        *,
        owed: bool = False,
    ) -> None:
        if options.callback is False:
            outcome.notes.append(f"{action}: callback suppressed")
            return
        wanted = (
            owed
            or options.callback
            or (before is not None and self.sends_callback(payment, before, action))
        )
        if not wanted:
            outcome.notes.append(f"{action}: {self.name} sends no callback for this change")
            return
        callback = self.build_callback(payment, now)
        if callback is None:
            outcome.notes.append(f"{action}: no callback URL for this payment")
            return
        payment.last_callback = callback
        outcome.callbacks.append(callback)


def decimal_field(value: Any) -> Decimal | None:
    """A wire amount as a Decimal (string, int or parsed Decimal); None when it is not one."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return None
    if not isinstance(value, str | int | Decimal):
        return None
    try:
        result = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return result if result.is_finite() else None
