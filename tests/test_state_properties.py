"""Property test of the money paths: for each provider, random interleavings of verified
callbacks, status polls, exact duplicates, stale and reordered snapshots, replays (stored and
refetch) and expiry passes, through the functions the task and the beat pass call, while the
provider's truth moves forward by its own rules. After every step:

- the payment never moves backwards (README.md rule 1; the one exception of rule 3: an expiry
  our clock inferred, overturned by the provider's verified `paid`, if the provider itself never
  reported an unpaid end);
- a change is applied once: each timeline transition follows from the one before, comes from
  evidence the payment had not been given yet (or from our clock past the deadline, when the
  provider still says unpaid), and goes where that evidence says;
- the paid amount never decreases, and money the provider reports is never dropped: it is on the
  payment or in an anomaly;
- `paid` needs a matching amount and currency; a mismatch or an absence opens an anomaly.

The provider's truth is a model here; its status API (faked with `responses`) answers from it,
and its callbacks are signed with the test-vector credentials. Mappings from provider statuses
to ours are written out below from ../shared/providers, not imported from the code.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar

import pytest
import responses
import time_machine
from flask import Flask
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from ipn.processing import process_notification
from ipn.reconcile import check_payment, reconcile_due
from ipn.replay import replay
from ipn.services import Services
from models import (
    Anomaly,
    EventSource,
    EventType,
    MerchantEvent,
    Payment,
    PaymentEvent,
    PaymentStatus,
    ReplayMode,
)

from conftest import clean
from helpers import (
    CUBEPAY_IPN,
    FORM,
    PROVIDER_URL,
    bpg_signature,
    coinbarpay_signature,
    cryptoprocessing_headers,
    make_payment,
    provider_mock,
)

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

P = PaymentStatus
START = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
ZERO = Decimal("0")

# Shrinking a failure costs minutes at a few hundred milliseconds an example on a shared
# machine; IPN_PROPERTY_SHRINK=1 asks for the minimal example.
SHRINK = os.environ.get("IPN_PROPERTY_SHRINK") == "1"
PROPERTIES = settings(
    max_examples=50,
    phases=list(Phase) if SHRINK else [p for p in Phase if p is not Phase.shrink],
    report_multiple_bugs=False,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# Where a payment may go (README.md rule 1), written out here. Every other move is backwards or
# out of a terminal state.
FORWARD: dict[PaymentStatus, set[PaymentStatus]] = {
    P.PENDING: {P.CONFIRMING, P.UNDERPAID, P.PAID, P.EXPIRED, P.FAILED, P.CANCELLED, P.REFUNDED},
    P.CONFIRMING: {P.UNDERPAID, P.PAID, P.EXPIRED, P.FAILED, P.CANCELLED, P.REFUNDED},
    P.UNDERPAID: {P.CONFIRMING, P.PAID, P.EXPIRED, P.FAILED, P.CANCELLED, P.REFUNDED},
    P.PAID: {P.REFUNDED},
}
UNPAID_ENDS = {P.EXPIRED, P.FAILED, P.CANCELLED}


class Fidelity(enum.StrEnum):
    """How the provider's answers name the amount and currency the payment was created for."""

    MATCH = "match"
    AMOUNT = "other amount"
    CURRENCY = "other currency"
    ABSENT = "no verifiable amount or currency"


@dataclass(frozen=True)
class Truth:
    """Where the payment stands at the provider: its status, the money it has seen, and (for
    CoinbarPay) the reason it gives. `late` marks money after the provider's own end."""

    status: str
    received: Decimal = ZERO
    descr: str = ""
    late: bool = False


@dataclass(frozen=True)
class Told:
    """One piece of evidence the receiver was given: what the provider said, and where our
    rules say it puts the payment."""

    key: tuple[Any, ...]
    state: PaymentStatus | None  # None: a status we do not know
    received: Decimal | None
    # Where else the evidence may fairly put the payment, where the provider's words allow two.
    also: frozenset[PaymentStatus] = frozenset()


def fractions(expected: Decimal) -> list[Decimal]:
    return [expected * Decimal(n) / 4 for n in (1, 2, 3)]


class Story:
    """One provider's rules: its truth's forward moves, its wire formats, its mapping."""

    name: ClassVar[str]
    has_api: ClassVar[bool] = True
    path: ClassVar[str]
    expected: ClassVar[Decimal]  # the crypto amount the customer must send
    lifetime: ClassVar[timedelta]
    payment: ClassVar[dict[str, Any]]

    def initial(self) -> Truth:
        raise NotImplementedError

    def moves(self, truth: Truth, now: datetime, expires_at: datetime) -> list[Truth]:
        raise NotImplementedError

    def sends_callback(self, truth: Truth) -> bool:
        return True

    def state(self, truth: Truth, current: PaymentStatus, now: datetime) -> PaymentStatus | None:
        raise NotImplementedError

    def also(self, truth: Truth, current: PaymentStatus) -> frozenset[PaymentStatus]:
        return frozenset()

    def answer(self, truth: Truth, fidelity: Fidelity, now: datetime, changed: datetime) -> bytes:
        """The status API's answer (or, without one, the callback body)."""
        raise NotImplementedError

    def callback(
        self, truth: Truth, fidelity: Fidelity, now: datetime, changed: datetime
    ) -> tuple[bytes, dict[str, str]]:
        raise NotImplementedError

    def register(self, api: responses.RequestsMock, answer: Callable[[], bytes]) -> None:
        raise NotImplementedError

    def unknown(self, truth: Truth) -> Truth:
        """The same truth under a status nobody documented."""
        return replace(truth, status="ON_HOLD")

    def received(self, truth: Truth) -> Decimal | None:
        return truth.received

    def more_money(self, truth: Truth, status: str) -> list[Truth]:
        return [Truth(status, r) for r in fractions(self.expected) if r > truth.received]


# --- CubePay ------------------------------------------------------------------------------


class CubePayStory(Story):
    name = "cubepay"
    path = "/ipn/cubepay"
    expected = Decimal("0.01")
    lifetime = timedelta(hours=6)
    payment = {
        "order_id": "M12345678",
        "amount": Decimal("500"),
        "currency": "TWD",
        "pay_amount": Decimal("0.01"),
        "pay_currency": "BTC",
        "provider_payment_id": "C1536678153791231775",
        "callback_token": "tok_5f2b9c",
    }

    def initial(self) -> Truth:
        return Truth("0")

    def moves(self, truth: Truth, now: datetime, expires_at: datetime) -> list[Truth]:
        full = Truth("2", self.expected)
        code = int(truth.status)
        if code == 0:
            return [Truth("1"), *self.more_money(truth, "1"), full, Truth("-1")]
        if code == 1:
            return [*self.more_money(truth, "1"), full, Truth("-1", truth.received)]
        if code == -1 and not truth.late:
            return [replace(full, late=True)]  # paid after its end, against the rules
        following = {2: ("3", "5"), 3: ("4", "5"), 4: ("5",), 5: ("6",)}.get(code, ())
        return [replace(truth, status=status) for status in following]

    def sends_callback(self, truth: Truth) -> bool:
        return truth.status in ("2", "3", "4")  # the IPN comes only on success

    def state(self, truth: Truth, current: PaymentStatus, now: datetime) -> PaymentStatus | None:
        code = int(truth.status) if truth.status.lstrip("-").isdigit() else None
        if code == -1:
            # CubePay reports an expired payment as canceled; its age tells them apart.
            return P.EXPIRED if now >= START + self.lifetime else P.CANCELLED
        if code == 0:
            return P.PENDING
        if code == 1:
            return P.UNDERPAID if ZERO < truth.received < self.expected else P.CONFIRMING
        if code in (2, 3, 4, 5):
            return P.PAID if truth.received >= self.expected else P.UNDERPAID
        if code == 6:
            return P.REFUNDED
        return None

    def unknown(self, truth: Truth) -> Truth:
        return replace(truth, status="9")

    def answer(self, truth: Truth, fidelity: Fidelity, now: datetime, changed: datetime) -> bytes:
        source_coin: dict[str, Any] = {"id": 443, "symbol": "TWD"}
        if fidelity is Fidelity.CURRENCY:
            source_coin = {"id": 447, "symbol": "USD"}
        elif fidelity is Fidelity.ABSENT:
            source_coin = {"id": 999}  # a coin id we have not configured
        record = {
            "id": self.payment["provider_payment_id"],
            "status": int(truth.status),
            "status_message": "whatever",
            "pay_url": "https://pay.example/C1536678153791231775",
            "pay_info": {
                "coin": {"id": 2, "symbol": "BTC", "name": "Bitcoin"},
                "address": "bc1qexampleaddress",
                "amount": str(self.expected),
                "paid_amount": str(truth.received),
                "merchant_transaction_id": self.payment["order_id"],
                "item_name": "Test item name",
                "source_coin": source_coin,
                "source_amount": "499" if fidelity is Fidelity.AMOUNT else "500",
            },
        }
        return json.dumps({"status": 200, "data": [record]}).encode()

    def callback(
        self, truth: Truth, fidelity: Fidelity, now: datetime, changed: datetime
    ) -> tuple[bytes, dict[str, str]]:
        # The IPN only says "ask me": the worker acts on the query's answer.
        return CUBEPAY_IPN, FORM

    def register(self, api: responses.RequestsMock, answer: Callable[[], bytes]) -> None:
        api.add_callback(
            "POST",
            f"{PROVIDER_URL}/cubepay/payment/query",
            callback=lambda request: (200, {}, answer()),
        )


# --- BitcoinPaygate -----------------------------------------------------------------------


BPG_ID = "95bf1d853cf2e040f0ce219221f9b17206525941"


class BitcoinPaygateStory(Story):
    name = "bitcoinpaygate"
    path = "/ipn/bitcoinpaygate/notification"
    expected = Decimal("0.02")
    lifetime = timedelta(minutes=15)
    payment = {
        "order_id": "2015-03-10/123/1",
        "amount": Decimal("10.00"),
        "currency": "USD",
        "pay_amount": Decimal("0.02"),
        "pay_currency": "BTC",
        "provider_payment_id": BPG_ID,
    }
    STATES: ClassVar[dict[str, PaymentStatus]] = {
        "NEW": P.PENDING,
        "UNDERPAID": P.UNDERPAID,
        "UNCONFIRMED": P.CONFIRMING,
        "CONFIRMED": P.PAID,
        "EXPIRED": P.EXPIRED,
        "INVALID": P.FAILED,
    }

    def initial(self) -> Truth:
        return Truth("NEW")

    def moves(self, truth: Truth, now: datetime, expires_at: datetime) -> list[Truth]:
        full = self.expected
        if truth.status == "NEW":
            found = [*self.more_money(truth, "UNDERPAID"), Truth("UNCONFIRMED", full)]
            found.append(Truth("CONFIRMED", full))
            return found + ([Truth("EXPIRED")] if now >= expires_at else [])
        if truth.status == "UNDERPAID":
            return [
                *self.more_money(truth, "UNDERPAID"),
                Truth("UNCONFIRMED", full),
                Truth("CONFIRMED", full),
                Truth("INVALID", truth.received),
            ]
        if truth.status == "UNCONFIRMED":
            return [Truth("CONFIRMED", full), Truth("INVALID", full)]
        if truth.status in ("EXPIRED", "INVALID") and not truth.late:
            return [Truth("CONFIRMED", full, late=True)]  # confirmed after its end
        return []

    def state(self, truth: Truth, current: PaymentStatus, now: datetime) -> PaymentStatus | None:
        return self.STATES.get(truth.status)

    def answer(self, truth: Truth, fidelity: Fidelity, now: datetime, changed: datetime) -> bytes:
        return self._snapshot(truth, fidelity, now)

    def _snapshot(self, truth: Truth, fidelity: Fidelity, at: datetime) -> bytes:
        body: dict[str, Any] = {
            "paymentId": BPG_ID,
            "amount": "9.00" if fidelity is Fidelity.AMOUNT else "10.00",
            "amountBtc": str(self.expected),
            "currency": "EUR" if fidelity is Fidelity.CURRENCY else "USD",
            "status": truth.status,
            "paidBtc": str(truth.received),
            "expirationTime": iso(START + self.lifetime),
            "currentTime": iso(at),
            "merchantTransactionId": self.payment["order_id"],
            "btcTransactions": [],
            "notificationType": "REGULAR",
        }
        if fidelity is Fidelity.ABSENT:
            del body["currency"]
        return json.dumps(body, separators=(",", ":")).encode()

    def callback(
        self, truth: Truth, fidelity: Fidelity, now: datetime, changed: datetime
    ) -> tuple[bytes, dict[str, str]]:
        # A notification is the snapshot at the change, stamped with the provider's clock then.
        body = self._snapshot(truth, fidelity, changed)
        return body, {"Content-Type": "application/json", "X-BPG-Signature": bpg_signature(body)}

    def register(self, api: responses.RequestsMock, answer: Callable[[], bytes]) -> None:
        api.add_callback(
            "GET",
            f"{PROVIDER_URL}/bitcoinpaygate/v2/payments/{BPG_ID}",
            callback=lambda request: (200, {}, answer()),
        )


# --- CoinbarPay ---------------------------------------------------------------------------


class CoinbarPayStory(Story):
    name = "coinbarpay"
    path = "/ipn/coinbarpay"
    expected = Decimal("0.00045145423250897323")
    lifetime = timedelta(minutes=30)
    payment = {
        "order_id": "order-1001",
        "amount": Decimal("8.99"),
        "currency": "EUR",
        "pay_amount": Decimal("0.00045145423250897323"),
        "pay_currency": "BTC",
        "provider_payment_id": "499f5adb-5911-4d1f-8642-2c53c24075d9",
    }

    def initial(self) -> Truth:
        return Truth("CREATED")

    def moves(self, truth: Truth, now: datetime, expires_at: datetime) -> list[Truth]:
        if truth.status == "CREATED":
            found = [Truth("PENDING"), Truth("SUCCESS"), Truth("CANCELED")]
            found.append(Truth("FAILED", descr="Rejected"))
            return found + ([Truth("FAILED", descr="Timeout")] if now >= expires_at else [])
        if truth.status == "PENDING":
            return [Truth("SUCCESS"), Truth("FAILED", descr="Rejected")]
        if truth.status == "SUCCESS" and not truth.late:
            return [Truth("FAILED", descr="Refunded")]
        if truth.status == "CANCELED" or truth.descr in ("Timeout", "Rejected"):
            return [Truth("SUCCESS", late=True)]  # executed after its end
        return []

    def sends_callback(self, truth: Truth) -> bool:
        # "once the payment is executed, canceled, or times out"
        return truth.status in ("SUCCESS", "CANCELED", "FAILED")

    def state(self, truth: Truth, current: PaymentStatus, now: datetime) -> PaymentStatus | None:
        if truth.status == "FAILED":
            if current in (P.PAID, P.REFUNDED):
                return P.REFUNDED
            return P.EXPIRED if truth.descr == "Timeout" else P.FAILED
        return {
            "CREATED": P.PENDING,
            "PENDING": P.CONFIRMING,
            "SUCCESS": P.PAID,
            "CANCELED": P.CANCELLED,
        }.get(truth.status)

    def also(self, truth: Truth, current: PaymentStatus) -> frozenset[PaymentStatus]:
        # FAILED after a SUCCESS the receiver never saw is a refund it may recognise.
        return frozenset({P.REFUNDED}) if truth.descr == "Refunded" else frozenset()

    def received(self, truth: Truth) -> Decimal | None:
        return None  # CoinbarPay reports no amount received

    def answer(self, truth: Truth, fidelity: Fidelity, now: datetime, changed: datetime) -> bytes:
        body: dict[str, Any] = {
            "payment_id_coinbar": self.payment["provider_payment_id"],
            "payment_request_id_client": self.payment["order_id"],
            "service_client_id": "2cb63353-2541-4c4e-90d4-7bf1d4b42c5c",
            "status": truth.status,
            "payment_detail": {
                "destination_coin": "BTC",
                "trade_pair": "BTC/EUR",
                "destination_amount": str(self.expected),
                "total_price": "8.98" if fidelity is Fidelity.AMOUNT else "8.99",
            },
            "input_coin": "GBP" if fidelity is Fidelity.CURRENCY else "EUR",
            "creation_time": iso(START),
            # The time of the payment's last change: older callbacks carry older ones.
            "update_time": iso(changed),
            "status_descr": truth.descr,
        }
        if fidelity is Fidelity.ABSENT:
            del body["payment_detail"]
        return json.dumps(body, separators=(",", ":")).encode()

    def callback(
        self, truth: Truth, fidelity: Fidelity, now: datetime, changed: datetime
    ) -> tuple[bytes, dict[str, str]]:
        body = self.answer(truth, fidelity, now, changed)
        return body, {
            "Content-Type": "application/json",
            "CBPAY-API-KEY": "2cb63353-2541-4c4e-90d4-7bf1d4b42c5c",
            "SIGNATURE": coinbarpay_signature(body),
        }

    def register(self, api: responses.RequestsMock, answer: Callable[[], bytes]) -> None:
        api.add_callback(
            "GET",
            f"{PROVIDER_URL}/coinbarpay/coinbar/api/v2/pay/gateway/payment/order-1001/status",
            callback=lambda request: (200, {}, answer()),
        )


# --- CryptoProcessing ---------------------------------------------------------------------


class CryptoProcessingStory(Story):
    name = "cryptoprocessing"
    has_api = False
    path = "/ipn/cryptoprocessing"
    expected = Decimal("0.0094")
    lifetime = timedelta(hours=1)
    payment = {
        "order_id": "order_12345",
        "amount": Decimal("0.3"),
        "currency": "ETH",
        "pay_amount": Decimal("0.0094"),
        "pay_currency": "BTC",
        "provider_payment_id": "019c0ebf-81e5-751d-aa57-fb9e2cba23c2",
    }
    STATES: ClassVar[dict[str, PaymentStatus]] = {
        "created": P.PENDING,
        "paid": P.PAID,
        "failed": P.FAILED,
        "expired": P.EXPIRED,
    }

    def initial(self) -> Truth:
        return Truth("created")

    def moves(self, truth: Truth, now: datetime, expires_at: datetime) -> list[Truth]:
        full = Truth("paid", self.expected)
        if truth.status == "created":
            found = [Truth("processing"), *self.more_money(truth, "processing"), full]
            found.append(Truth("failed"))
            return found + ([Truth("expired")] if now >= expires_at else [])
        if truth.status == "processing":
            found = [*self.more_money(truth, "processing"), Truth("processing", self.expected)]
            found = [t for t in found if t.received > truth.received]
            return [*found, full, Truth("failed", truth.received)]
        if truth.status == "expired":
            # Deposits after the end: each one a late payment, then perhaps a late `paid`.
            late = [replace(t, late=True) for t in self.more_money(truth, "expired")]
            return [*late, replace(full, late=True)]
        if truth.status == "failed":
            return [replace(full, late=True)]
        return []

    def state(self, truth: Truth, current: PaymentStatus, now: datetime) -> PaymentStatus | None:
        if truth.status == "processing":
            return P.UNDERPAID if ZERO < truth.received < self.expected else P.CONFIRMING
        return self.STATES.get(truth.status)

    def unknown(self, truth: Truth) -> Truth:
        return replace(truth, status="on_hold")

    def answer(self, truth: Truth, fidelity: Fidelity, now: datetime, changed: datetime) -> bytes:
        body: dict[str, Any] = {
            "payment_request_id": self.payment["provider_payment_id"],
            "foreign_id": self.payment["order_id"],
            "type": "payment_request",
            "status": truth.status,
            "payment_request_address": {
                "id": "019c0ebf-84a1-7bdc-a09c-8b62294cc75d",
                "currency": {"iso": "BTC", "network_name": "bitcoin"},
                "address": "tb1qj0d4rsczat6dx3yy065g98rrz5hewkrdcrz7je",
            },
            "payment_request_amount": {
                "currency": {"iso": "LTC" if fidelity is Fidelity.CURRENCY else "ETH"},
                "amount": "0.29" if fidelity is Fidelity.AMOUNT else "0.3",
            },
            "currency_sent": {
                "currency": {"iso": "BTC", "network_name": "bitcoin"},
                "expected_amount": str(self.expected),
                "received_amount": str(truth.received),
                "remaining_amount": str(max(ZERO, self.expected - truth.received)),
            },
            "expires_at": int((START + self.lifetime).timestamp()),
        }
        if fidelity is Fidelity.ABSENT:
            del body["payment_request_amount"]
        return json.dumps(body, separators=(",", ":")).encode()

    def callback(
        self, truth: Truth, fidelity: Fidelity, now: datetime, changed: datetime
    ) -> tuple[bytes, dict[str, str]]:
        body = self.answer(truth, fidelity, now, changed)
        return body, cryptoprocessing_headers(body)

    def register(self, api: responses.RequestsMock, answer: Callable[[], bytes]) -> None:
        pass  # no status API for payment requests


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def numbers_in(value: Any) -> set[Decimal]:
    return {Decimal(n) for n in re.findall(r"\d+(?:\.\d+)?", json.dumps(value, default=str))}


@dataclass
class Sent:
    """A callback the provider sent: its bytes, and the truth it carries."""

    index: int
    body: bytes
    headers: dict[str, str]
    truth: Truth


class PaymentStory(RuleBasedStateMachine):
    """One payment at one provider, from creation through whatever happens to it."""

    story: ClassVar[Story]
    app: ClassVar[Flask]

    def __init__(self) -> None:
        super().__init__()
        self.services: Services = self.app.extensions["ipn"]
        clean(self.services.db)
        self.dispatcher = self.app.extensions["ipn.dispatcher"]
        self.client = self.app.test_client()
        self.now = START
        self.clock = time_machine.travel(START, tick=False)
        self.traveller = self.clock.start()
        self.api = provider_mock(assert_all_requests_are_fired=False)
        self.api.start()
        self.story.register(self.api, self._answer)
        self.expires_at = START + self.story.lifetime
        self.payment_id = make_payment(
            self.services.db,
            provider=self.story.name,
            created_at=START,
            updated_at=START,
            expires_at=self.expires_at,
            next_check_at=START + timedelta(minutes=1),
            **self.story.payment,
        ).id
        self.fidelity = Fidelity.MATCH
        self.truth = self.story.initial()
        self.changed_at = START
        self.unknown_next = False
        self.sent: list[Sent] = []
        self.stored: dict[int, Sent] = {}  # inbox row id -> the callback it holds
        self.last_post: Sent | None = None
        self.newest_delivered = -1
        # What the receiver has been given, and what it has shown, before this step.
        self.told_before: set[tuple[Any, ...]] = set()
        self.told_amounts: set[Decimal] = set()
        self.provider_ended_unpaid = False
        self.paid_refused = False
        self.unknown_told = False
        self.seen_events = 0
        self.most_paid = ZERO
        self.status = P.PENDING
        self.step_told: list[Told] = []

    def teardown(self) -> None:
        self.api.stop()
        self.clock.stop()

    # The provider --------------------------------------------------------------------------

    def _told(self, truth: Truth) -> Told:
        state = self.story.state(truth, self.status, self.now)
        key = (truth.status, truth.received, truth.descr, self.fidelity)
        return Told(key, state, self.story.received(truth), self.story.also(truth, self.status))

    def _answer(self) -> bytes:
        truth = self.truth
        if self.unknown_next:
            truth, self.unknown_next = self.story.unknown(truth), False
        self.step_told.append(self._told(truth))
        return self.story.answer(truth, self.fidelity, self.now, self.changed_at)

    def _tick(self, by: timedelta) -> None:
        self.now += by
        self.traveller.move_to(self.now)

    @initialize(fidelity=st.sampled_from([Fidelity.MATCH] * 3 + list(Fidelity)[1:]))
    def created(self, fidelity: Fidelity) -> None:
        self.fidelity = fidelity

    @precondition(lambda self: self.story.moves(self.truth, self.now, self.expires_at))
    @rule(data=st.data(), arrives=st.booleans())
    def provider_moves(self, data: st.DataObject, arrives: bool) -> None:
        """The truth takes one of its forward moves; the provider may send a callback, which
        arrives at once or later (see callback_arrives)."""
        moves = self.story.moves(self.truth, self.now, self.expires_at)
        self._move(data.draw(st.sampled_from(moves), "move"), arrives)

    def _move(self, truth: Truth, arrives: bool) -> None:
        self._tick(timedelta(seconds=1))
        self.truth = truth
        self.changed_at = self.now
        if self.story.sends_callback(self.truth):
            body, headers = self.story.callback(self.truth, self.fidelity, self.now, self.now)
            self.sent.append(Sent(len(self.sent), body, headers, self.truth))
            if arrives:
                self._post(self.sent[-1])

    @precondition(lambda self: self._unpaid_ends())
    @rule(data=st.data(), arrives=st.booleans())
    def provider_gives_up(self, data: st.DataObject, arrives: bool) -> None:
        """Rarer on its own among the moves, so asked for: the provider ends the payment unpaid
        (expired, cancelled, failed), after which only a late payment can come."""
        self._move(data.draw(st.sampled_from(self._unpaid_ends()), "end"), arrives)

    def _unpaid_ends(self) -> list[Truth]:
        return [
            move
            for move in self.story.moves(self.truth, self.now, self.expires_at)
            if self.story.state(move, P.PENDING, self.now) in UNPAID_ENDS
        ]

    @rule(minutes=st.integers(min_value=1, max_value=240))
    def time_passes(self, minutes: int) -> None:
        self._tick(timedelta(minutes=minutes))

    # The receiver --------------------------------------------------------------------------

    def _process(self, notification_id: int) -> None:
        sent = self.stored[notification_id]
        if not self.story.has_api:
            # No timestamp to tell order by: only the receipt of the newest callback so far is
            # news; an older one arriving late is a stale snapshot.
            if sent.index >= self.newest_delivered:
                self.step_told.append(self._told(sent.truth))
            self.newest_delivered = max(self.newest_delivered, sent.index)
        process_notification(self.services, notification_id, now=self.now)

    def _post(self, sent: Sent) -> None:
        response = self.client.post(self.story.path, data=sent.body, headers=sent.headers)
        assert (response.status_code, response.get_data()) == (200, b"success")
        notification_id = self.dispatcher.submitted[-1]
        self.stored[notification_id] = sent
        self.last_post = sent
        self._process(notification_id)

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def callback_arrives(self, data: st.DataObject) -> None:
        """One of the callbacks sent so far arrives: the newest, or an older one late."""
        index = data.draw(st.integers(0, len(self.sent) - 1).map(lambda i: len(self.sent) - 1 - i))
        self._post(self.sent[index])

    @precondition(lambda self: self.last_post is not None)
    @rule()
    def exact_duplicate(self) -> None:
        assert self.last_post is not None
        self._post(self.last_post)

    @rule()
    def status_poll(self) -> None:
        check_payment(self.services, self.payment_id, now=self.now)

    @precondition(lambda self: self.story.has_api)
    @rule()
    def poll_answers_an_unknown_status(self) -> None:
        self.unknown_next = True
        check_payment(self.services, self.payment_id, now=self.now)
        self.unknown_next = False

    @precondition(lambda self: self.stored)
    @rule(data=st.data(), mode=st.sampled_from(ReplayMode))
    def operator_replays(self, data: st.DataObject, mode: ReplayMode) -> None:
        notification_id = data.draw(st.sampled_from(sorted(self.stored)), "notification")
        replay(self.services, [notification_id], mode, send=lambda _: None)
        self._process(notification_id)

    @rule(extra=st.integers(min_value=1, max_value=120))
    def expiry_pass(self, extra: int) -> None:
        """Our clock passes the deadline plus grace (if it has not yet), then a beat pass."""
        deadline = self._deadline()
        if self.now < deadline:
            self._tick(deadline - self.now)
        self._tick(timedelta(seconds=extra))
        reconcile_due(self.services, now=self.now)

    def _deadline(self) -> datetime:
        retries = timedelta() if self.story.has_api else timedelta(hours=24)
        return self.expires_at + retries + self.services.settings.expiry_grace

    # The rules -----------------------------------------------------------------------------

    @invariant()
    def money_paths_hold(self) -> None:
        with self.services.db.sessions() as session:
            payment = session.get(Payment, self.payment_id)
            assert payment is not None
            timeline = list(
                session.scalars(
                    select(PaymentEvent)
                    .where(PaymentEvent.payment_id == self.payment_id)
                    .order_by(PaymentEvent.id)
                )
            )
            opened = list(session.scalars(select(Anomaly).where(Anomaly.payment_id == payment.id)))
            told_shop = list(
                session.scalars(
                    select(MerchantEvent)
                    .where(MerchantEvent.payment_id == payment.id)
                    .order_by(MerchantEvent.sequence)
                )
            )
        moves = [e for e in timeline if e.from_status != e.to_status]

        # The shop is told of every move, in order, and of every anomaly opened: once each.
        assert [e.sequence for e in told_shop] == list(range(1, len(told_shop) + 1))
        assert [
            e.type.value
            for e in told_shop
            if e.type.value.startswith("payment.") and e.type is not EventType.PAYMENT_CREATED
        ] == [f"payment.{m.to_status.value}" for m in moves]
        assert sorted(e.anomaly_id for e in told_shop if e.type is EventType.ANOMALY_OPENED) == (
            sorted(a.id for a in opened)
        )
        new_moves = [e for e in timeline[self.seen_events :] if e.from_status != e.to_status]

        # Each transition starts where the one before ended, and they end where the payment is.
        at = P.PENDING
        for event in moves:
            assert event.from_status is at, f"transition {event.from_status} -> {event.to_status}"
            at = event.to_status
        assert payment.status is at, f"payment is {payment.status}, its timeline says {at}"

        assert len(new_moves) <= 1, f"one step, {len(new_moves)} transitions"
        news = [t for t in self.step_told if t.key not in self.told_before and t.state]
        for event in new_moves:
            before, after = event.from_status, event.to_status
            overturn = (
                before is P.EXPIRED
                and after is P.PAID
                and self._expired_by_our_clock(moves)
                and not self.provider_ended_unpaid
            )
            assert after in FORWARD.get(before, set()) or overturn, (
                f"{before} -> {after} moves backwards or out of a final state"
            )
            if event.source is EventSource.EXPIRY:
                assert self.now >= self._deadline(), "expired by our clock before the deadline"
                if self.story.has_api:
                    last = self.step_told[-1] if self.step_told else None
                    assert last is not None and last.state is P.PENDING, (
                        f"expired by our clock while the provider says {last}"
                    )
            else:
                assert news, f"{before} -> {after} without any news from the provider"
                assert after in {t.state for t in news}.union(*(t.also for t in news)), (
                    f"{before} -> {after}, but the news says {[t.state for t in news]}"
                )

        # Paid only with the amount and currency the payment was created for.
        if payment.status is P.PAID:
            assert self.fidelity is Fidelity.MATCH, f"paid on an answer with {self.fidelity}"
        if self.paid_refused or any(t.state is P.PAID for t in self.step_told):
            if self.fidelity is not Fidelity.MATCH:
                self.paid_refused = True
                assert opened, f"`paid` with {self.fidelity} refused without an anomaly"
        if self.unknown_told or any(t.state is None for t in self.step_told):
            self.unknown_told = True
            assert opened, "an unknown status was not flagged"

        # Money seen never decreases and is never dropped.
        paid = payment.paid_amount or ZERO
        assert paid >= self.most_paid, f"paid amount went from {self.most_paid} to {paid}"
        self.most_paid = paid
        self.told_amounts |= {t.received for t in self.step_told if t.received and t.state}
        kept: set[Decimal] = set().union(*(numbers_in(a.evidence) for a in opened))
        for amount in self.told_amounts:
            assert paid >= amount or amount in kept, (
                f"the provider reported {amount}; the payment shows {paid} and no anomaly has it"
            )

        self.seen_events = len(timeline)
        self.status = payment.status
        self.told_before |= {t.key for t in self.step_told}
        self.provider_ended_unpaid |= any(t.state in UNPAID_ENDS for t in self.step_told)
        self.step_told = []

    def _expired_by_our_clock(self, moves: list[Any]) -> bool:
        into_expired = [e for e in moves if e.to_status is P.EXPIRED]
        return bool(into_expired) and into_expired[-1].source is EventSource.EXPIRY


def run(story: Story, app: Flask) -> None:
    machine = type(f"{type(story).__name__}Machine", (PaymentStory,), {"story": story, "app": app})
    run_state_machine_as_test(machine, settings=PROPERTIES)


def test_cubepay_payments_only_move_forward_once_with_their_money(app: Flask) -> None:
    run(CubePayStory(), app)


def test_bitcoinpaygate_payments_only_move_forward_once_with_their_money(app: Flask) -> None:
    run(BitcoinPaygateStory(), app)


def test_coinbarpay_payments_only_move_forward_once_with_their_money(app: Flask) -> None:
    run(CoinbarPayStory(), app)


def test_cryptoprocessing_payments_only_move_forward_once_with_their_money(app: Flask) -> None:
    run(CryptoProcessingStory(), app)
