"""The state machine's decision, cell by cell: every (held state, reported state, expiry inferred
or not, kind of evidence) against a table written out here, not imported from the code."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import responses
from flask import Flask
from sqlalchemy import inspect
from sqlalchemy.orm.exc import StaleDataError

from ipn.anomalies import resolve_anomaly
from ipn.config import (
    BitcoinPaygateSettings,
    CoinbarPaySettings,
    CryptoProcessingSettings,
    CubePaySettings,
)
from ipn.polling import Schedule
from ipn.processing import process_notification
from ipn.providers.base import Decision, PaymentRef, Snapshot
from ipn.providers.bitcoinpaygate import BitcoinPaygate
from ipn.providers.coinbarpay import CoinbarPay
from ipn.providers.cryptoprocessing import CryptoProcessing
from ipn.providers.cubepay import CubePay
from ipn.reconcile import check_payment, reconcile_due
from ipn.services import Services
from ipn.transitions import (
    Change,
    Evidence,
    Finding,
    Verdict,
    apply_snapshot,
    can_move,
    expire_by_clock,
    find_payment,
    judge,
    judge_expiry,
    read_payment,
)
from models import (
    AnomalyKind,
    AnomalyStatus,
    EventSource,
    NotificationStatus,
    Payment,
    PaymentStatus,
)

from helpers import (
    BPG_ID,
    BPG_STATUS,
    COINBAR_STATUS,
    CUBEPAY_QUERY,
    JSON,
    START,
    anomalies,
    bitcoinpaygate_payment,
    bpg_signature,
    bpg_snapshot,
    coinbarpay_signature,
    coinbarpay_status,
    cryptoprocessing_callback,
    cryptoprocessing_headers,
    cubepay_query_answer,
    events,
    load_payment,
    make_payment,
    notification,
)

P = PaymentStatus
AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

STATES = [P.PENDING, P.CONFIRMING, P.UNDERPAID, P.PAID, P.EXPIRED, P.FAILED, P.CANCELLED]
STATES.append(P.REFUNDED)
REPORTED: list[PaymentStatus | None] = [*STATES, None]
SNAPSHOT_KINDS = [EventSource.CALLBACK, EventSource.POLL, EventSource.REPLAY, EventSource.CREATE]

# What each reported state does to each held state, when the provider's status is news.
#   m move   n note, snapshot taken   i note, ignored   d duplicate: no event
#   L refused: late payment   U refused: unknown status   A refused: amount unverified
# Columns: the reported state, in the order of the header; `unknown` is a status we do not know.
NEWS = """
              pending  confirming  underpaid  paid  expired  failed  cancelled  refunded  unknown
pending       n        m           m          m     m        m       m          m         U
confirming    i        n           m          m     m        m       m          m         U
underpaid     i        m           n          m     m        m       m          m         U
paid          i        i           i          n     i        i       i          m         U
expired       i        L           L          L     n        n       n          i         U
failed        i        L           L          L     n        n       n          i         U
cancelled     i        L           L          L     n        n       n          i         U
refunded      i        i           i          i     i        i       i          n         U
expired*      i        L           L          m     n        n       n          i         U
"""
# The same, when the provider repeats the status the payment already holds, for a replay and
# for every other kind of evidence. `expired*` is expired by our own clock.
REPEAT = """
              pending  confirming  underpaid  paid  expired  failed  cancelled  refunded  unknown
pending       d        m           m          m     m        m       m          m         U
confirming    i        d           m          m     m        m       m          m         U
underpaid     i        m           d          m     m        m       m          m         U
paid          i        i           i          d     i        i       i          m         U
expired       i        L           L          L     d        d       d          i         U
failed        i        L           L          L     d        d       d          i         U
cancelled     i        L           L          L     d        d       d          i         U
refunded      i        i           i          i     i        i       i          d         U
expired*      i        L           L          m     n        n       n          i         U
"""
REPEAT_REPLAYED = """
              pending  confirming  underpaid  paid  expired  failed  cancelled  refunded  unknown
pending       i        m           m          m     m        m       m          m         U
confirming    i        i           m          m     m        m       m          m         U
underpaid     i        m           i          m     m        m       m          m         U
paid          i        i           i          i     i        i       i          m         U
expired       i        L           L          L     i        i       i          i         U
failed        i        L           L          L     i        i       i          i         U
cancelled     i        L           L          L     i        i       i          i         U
refunded      i        i           i          i     i        i       i          i         U
expired*      i        L           L          m     n        n       n          i         U
"""
# Our clock's expiry, by held state (the flag says whether an earlier expiry was ours).
EXPIRY = """
pending m   confirming m   underpaid m   paid d   expired d   failed d   cancelled d   refunded d
"""


def grid(text: str) -> dict[tuple[str, str], str]:
    header, *rows = [line.split() for line in text.strip().splitlines()]
    return {
        (row[0], column): cell for row in rows for column, cell in zip(header, row[1:], strict=True)
    }


@dataclass(frozen=True)
class Held:
    """A payment as the decision sees it."""

    status: PaymentStatus
    expiry_inferred: bool = False
    provider_status: str | None = "held"
    paid_amount: Decimal | None = Decimal("0.5")
    snapshot_at: datetime | None = None
    amount: Decimal | None = Decimal("10.00")
    currency: str | None = "USD"
    order_id: str = "order-1"
    provider_payment_id: str | None = "pp-1"
    id: str = "pay_1"


def reported_snapshot(**fields: object) -> Snapshot:
    values: dict[str, object] = {
        "provider_status": "told",
        "order_id": "order-1",
        "provider_payment_id": "pp-1",
        "amount": Decimal("10.00"),
        "currency": "USD",
        "paid_amount": Decimal("0.5"),
    }
    values.update(fields)
    return Snapshot(**values)  # type: ignore[arg-type]


def label(change: Change) -> str:
    if change.verdict is Verdict.MOVE:
        return "m"
    if change.verdict is Verdict.DUPLICATE:
        return "d"
    if change.verdict is Verdict.NOTE:
        return "n" if change.takes_snapshot else "i"
    [finding] = change.findings
    return {
        AnomalyKind.LATE_PAYMENT: "L",
        AnomalyKind.UNKNOWN_STATUS: "U",
        AnomalyKind.AMOUNT_MISMATCH: "A",
        AnomalyKind.REFERENCE_MISMATCH: "R",
    }[finding.kind]


def row_name(state: PaymentStatus, inferred: bool) -> str:
    return f"{state.value}*" if inferred and state is P.EXPIRED else state.value


def cells() -> list[tuple[PaymentStatus, PaymentStatus | None, bool, EventSource]]:
    return [
        (held, reported, inferred, source)
        for held in STATES
        for reported in REPORTED
        for inferred in ((False, True) if held is P.EXPIRED else (False,))  # only ours is inferred
        for source in SNAPSHOT_KINDS
    ]


def check_cell(change: Change, cell: str, held: Held, reported: PaymentStatus | None) -> None:
    assert label(change) == cell
    assert change.before is held.status
    if cell == "m":
        assert change.after is reported
        assert change.expiry_inferred is False
        assert change.takes_snapshot is True
    else:
        assert change.after is held.status
    if cell == "n":
        # The provider's own word on how an unpaid payment ended replaces our clock's.
        ended = reported in {P.EXPIRED, P.FAILED, P.CANCELLED}
        assert change.expiry_inferred is (held.expiry_inferred and not ended)
    elif cell != "m":
        assert change.expiry_inferred is held.expiry_inferred
        assert change.takes_snapshot is False
    assert change.findings == () or cell in "LUA"
    assert change.paid_amount == held.paid_amount


@pytest.mark.parametrize(("state", "reported", "inferred", "source"), cells())
def test_every_cell_when_the_status_is_news(
    state: PaymentStatus, reported: PaymentStatus | None, inferred: bool, source: EventSource
) -> None:
    held = Held(state, expiry_inferred=inferred)
    change = judge(held, reported_snapshot(), Decision(reported), source)
    expected = grid(NEWS)[(row_name(state, inferred), reported.value if reported else "unknown")]
    check_cell(change, expected, held, reported)


@pytest.mark.parametrize(("state", "reported", "inferred", "source"), cells())
def test_every_cell_when_the_status_is_repeated(
    state: PaymentStatus, reported: PaymentStatus | None, inferred: bool, source: EventSource
) -> None:
    held = Held(state, expiry_inferred=inferred, provider_status="told")
    change = judge(held, reported_snapshot(), Decision(reported), source)
    table = REPEAT_REPLAYED if source is EventSource.REPLAY else REPEAT
    expected = grid(table)[(row_name(state, inferred), reported.value if reported else "unknown")]
    check_cell(change, expected, held, reported)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("inferred", [False, True])
def test_our_clock_expires_only_open_payments(state: PaymentStatus, inferred: bool) -> None:
    cells = EXPIRY.split()
    expected = dict(zip(cells[::2], cells[1::2], strict=True))[state.value]
    held = Held(state, expiry_inferred=inferred)
    change = judge_expiry(held, "past the deadline")
    assert label(change) == expected
    assert change.before is state
    assert change.findings == ()
    assert change.paid_amount == held.paid_amount
    if expected == "m":
        assert (change.after, change.expiry_inferred) == (P.EXPIRED, True)
        assert change.summary == "past the deadline"
    else:
        assert (change.after, change.expiry_inferred) == (state, inferred)
        assert change.summary == f"already {state.value}"


def test_the_table_of_moves_itself() -> None:
    allowed = {
        (held, target)
        for held in STATES
        for target in STATES
        if can_move(held, target, expiry_inferred=False)
    }
    forward = {
        P.PENDING: {P.CONFIRMING, P.UNDERPAID, P.PAID, P.EXPIRED, P.FAILED, P.CANCELLED},
        P.CONFIRMING: {P.UNDERPAID, P.PAID, P.EXPIRED, P.FAILED, P.CANCELLED},
        P.UNDERPAID: {P.CONFIRMING, P.PAID, P.EXPIRED, P.FAILED, P.CANCELLED},
        P.PAID: set(),
    }
    expected = {(held, target) for held, targets in forward.items() for target in targets}
    expected |= {(held, P.REFUNDED) for held in (P.PENDING, P.CONFIRMING, P.UNDERPAID, P.PAID)}
    assert allowed == expected
    inferred = {t for t in STATES if can_move(P.EXPIRED, t, expiry_inferred=True)}
    assert inferred == {P.PAID}
    assert not can_move(P.FAILED, P.PAID, expiry_inferred=True)
    assert not can_move(P.CANCELLED, P.PAID, expiry_inferred=True)


# Paid only with a verified amount and currency ------------------------------------------------

MISMATCHES = [
    ({}, {"amount": Decimal("9.99")}, "the amount is 9.99, the payment asked 10.00"),
    ({}, {"currency": "EUR"}, "the currency is EUR, the payment asked USD"),
    ({}, {"amount": None}, "the provider's answer names no amount"),
    ({}, {"currency": None}, "the provider's answer names no currency we know"),
    (
        {"amount": None},
        {},
        "the payment has no amount or currency of its own to check it against",
    ),
    (
        {"currency": None},
        {},
        "the payment has no amount or currency of its own to check it against",
    ),
]


@pytest.mark.parametrize(("held_fields", "told_fields", "problem"), MISMATCHES)
@pytest.mark.parametrize("state", [P.PENDING, P.CONFIRMING, P.UNDERPAID])
def test_paid_without_a_matching_amount_and_currency_is_refused(
    state: PaymentStatus,
    held_fields: dict[str, object],
    told_fields: dict[str, object],
    problem: str,
) -> None:
    held = replace(Held(state), **held_fields)  # type: ignore[arg-type]
    change = judge(held, reported_snapshot(**told_fields), Decision(P.PAID), EventSource.POLL)
    assert label(change) == "A"
    [finding] = change.findings
    assert finding.detail == f"status told says paid, but {problem}: not marked paid"
    amount, currency = (
        told_fields.get("amount", Decimal("10.00")),
        told_fields.get("currency", "USD"),
    )
    assert finding.key == f"amount_mismatch:pay_1:{amount}:{currency}"
    assert finding.proof["provider_status"] == "told"
    assert change.summary == finding.detail


def test_paid_currency_compares_without_case() -> None:
    change = judge(
        Held(P.PENDING), reported_snapshot(currency="usd"), Decision(P.PAID), EventSource.POLL
    )
    assert label(change) == "m"


def test_an_overturned_expiry_checks_the_amount_too() -> None:
    held = Held(P.EXPIRED, expiry_inferred=True)
    told = reported_snapshot(amount=None)
    assert label(judge(held, told, Decision(P.PAID), EventSource.CALLBACK)) == "A"


def test_a_late_payment_is_late_whatever_its_amount() -> None:
    told = reported_snapshot(amount=Decimal("1"), paid_amount=Decimal("0.7"))
    change = judge(Held(P.EXPIRED), told, Decision(P.PAID), EventSource.POLL)
    [finding] = change.findings
    assert finding.kind is AnomalyKind.LATE_PAYMENT
    assert finding.key == "late_payment:pay_1:told:0.7"
    assert (
        finding.detail
        == "status told (paid) after expired: late payment, no change, flagged for review"
    )
    assert change.paid_amount == Decimal("0.7")


# Money seen, older snapshots, duplicates --------------------------------------------------------


def test_money_seen_never_decreases() -> None:
    held = Held(P.CONFIRMING, paid_amount=Decimal("0.005"))
    told = reported_snapshot(paid_amount=Decimal("0"))
    change = judge(held, told, Decision(P.CONFIRMING), EventSource.CALLBACK)
    assert label(change) == "i"
    assert change.paid_amount == Decimal("0.005")
    assert change.summary == (
        "older snapshot: it shows 0 paid, 0.005 was already seen: status told ignored"
    )


@pytest.mark.parametrize("reported", [P.PENDING, P.CONFIRMING, P.UNDERPAID])
def test_a_snapshot_with_less_money_is_older_and_moves_nothing(reported: PaymentStatus) -> None:
    held = Held(P.UNDERPAID, paid_amount=Decimal("0.005"))
    told = reported_snapshot(paid_amount=Decimal("0.001"))
    assert label(judge(held, told, Decision(reported), EventSource.CALLBACK)) == "i"


def test_a_repeated_older_snapshot_is_a_duplicate() -> None:
    held = Held(P.UNDERPAID, paid_amount=Decimal("0.005"), provider_status="told")
    told = reported_snapshot(paid_amount=Decimal("0.001"))
    change = judge(held, told, Decision(P.CONFIRMING), EventSource.CALLBACK)
    # A delayed retry of an earlier callback: same status, less money. Nothing new.
    assert label(change) == "d"
    assert change.summary == ("duplicate: status told: an older copy, no change")
    held = replace(held, paid_amount=Decimal("0.001"))
    change = judge(held, told, Decision(P.CONFIRMING), EventSource.CALLBACK)
    assert label(change) == "m"


@pytest.mark.parametrize("reported", [P.FAILED, P.REFUNDED, P.EXPIRED, P.CANCELLED, P.PAID])
def test_less_money_with_a_final_status_is_judged_by_its_status(reported: PaymentStatus) -> None:
    held = Held(P.CONFIRMING, paid_amount=Decimal("0.005"))
    told = reported_snapshot(paid_amount=Decimal("0"))
    change = judge(held, told, Decision(reported), EventSource.POLL)
    assert label(change) == "m"
    assert change.paid_amount == Decimal("0.005")


@pytest.mark.parametrize("reported", [P.FAILED, P.EXPIRED, P.PAID, P.CONFIRMING])
def test_a_snapshot_its_adapter_calls_older_is_ignored(reported: PaymentStatus) -> None:
    held = Held(P.UNDERPAID, paid_amount=Decimal("0.005"))
    told = reported_snapshot(paid_amount=Decimal("0"))
    change = judge(held, told, Decision(reported, older="sent before"), EventSource.CALLBACK)
    assert (label(change), change.after, change.findings) == ("i", P.UNDERPAID, ())
    assert change.summary == "sent before: status told ignored"
    assert change.paid_amount == Decimal("0.005")
    # The same copy again, as the payment already holds it: nothing new at all.
    same = replace(held, provider_status="told", paid_amount=Decimal("0"))
    change = judge(same, told, Decision(reported, older="sent before"), EventSource.CALLBACK)
    assert label(change) == "d"


def test_more_money_is_news_even_with_the_same_status() -> None:
    held = Held(P.EXPIRED, provider_status="told", paid_amount=Decimal("0.001"))
    told = reported_snapshot(paid_amount=Decimal("0.003"))
    decision = Decision(P.EXPIRED, "late", (("late_payment", {"detail": "0.003 after the end"}),))
    change = judge(held, told, decision, EventSource.CALLBACK)
    assert label(change) == "n"
    assert change.paid_amount == Decimal("0.003")
    [finding] = change.findings
    assert finding == Finding(
        AnomalyKind.LATE_PAYMENT,
        "late_payment:pay_1:told:0.003",
        "0.003 after the end",
        finding.proof,
    )
    assert finding.proof["provider_status"] == "told"
    assert change.summary == "status told (late)"


def test_the_first_money_is_taken_and_none_keeps_what_was_seen() -> None:
    held = Held(P.PENDING, paid_amount=None)
    change = judge(
        held, reported_snapshot(paid_amount=Decimal("2")), Decision(P.CONFIRMING), EventSource.POLL
    )
    assert change.paid_amount == Decimal("2")
    held = Held(P.PENDING, paid_amount=Decimal("1"))
    change = judge(
        held, reported_snapshot(paid_amount=None), Decision(P.CONFIRMING), EventSource.POLL
    )
    assert change.paid_amount == Decimal("1")


def test_a_stale_snapshot_by_the_providers_clock() -> None:
    held = Held(P.PAID, snapshot_at=AT)
    told = reported_snapshot(as_of=AT - timedelta(seconds=1))
    change = judge(held, told, Decision(P.CONFIRMING), EventSource.CALLBACK)
    assert label(change) == "i"
    assert change.summary == (
        "stale snapshot as of 2026-01-01T11:59:59+00:00, newer one applied as of "
        "2026-01-01T12:00:00+00:00: status told ignored"
    )
    # An identical older copy says nothing new: no event at all.
    same = judge(
        replace(held, provider_status="told"), told, Decision(P.CONFIRMING), EventSource.CALLBACK
    )
    assert label(same) == "d"
    assert same.summary == "duplicate: status told: an older copy, no change"
    replayed = judge(
        replace(held, provider_status="told"), told, Decision(P.CONFIRMING), EventSource.REPLAY
    )
    assert label(replayed) == "i"
    assert replayed.summary == "replayed: status told: an older copy, no change"


def test_the_providers_clock_outranks_money() -> None:
    # With a clock on both sides, a newer snapshot is applied even with less money shown.
    held = Held(P.PENDING, snapshot_at=AT, paid_amount=Decimal("1"))
    told = reported_snapshot(as_of=AT, paid_amount=Decimal("0"))
    assert label(judge(held, told, Decision(P.CONFIRMING), EventSource.POLL)) == "m"


def test_duplicate_and_replay_words() -> None:
    held = Held(P.CONFIRMING, provider_status="told")
    change = judge(held, reported_snapshot(), Decision(P.CONFIRMING), EventSource.POLL)
    assert change.summary == "duplicate: already confirming"
    change = judge(held, reported_snapshot(), Decision(P.CONFIRMING), EventSource.REPLAY)
    assert change.summary == "replayed: already confirming"


def test_move_and_note_words() -> None:
    change = judge(
        Held(P.PENDING), reported_snapshot(), Decision(P.PAID, "fully"), EventSource.POLL
    )
    assert change.summary == "status told (fully)"
    change = judge(Held(P.PENDING), reported_snapshot(), Decision(P.PAID), EventSource.POLL)
    assert change.summary == "status told"
    held = Held(P.EXPIRED, expiry_inferred=True)
    change = judge(held, reported_snapshot(), Decision(P.PAID), EventSource.CALLBACK)
    assert change.summary == "status told (overturns the expiry we inferred from our own clock)"
    change = judge(Held(P.PAID), reported_snapshot(), Decision(P.CONFIRMING), EventSource.POLL)
    assert change.summary == "status told (confirming) would move paid backwards: ignored"
    change = judge(Held(P.PAID), reported_snapshot(), Decision(None), EventSource.POLL)
    assert change.summary == "unknown status told: no change, flagged for review"
    [finding] = change.findings
    assert finding.key == "unknown_status:pay_1:told"


def test_a_mapping_anomaly_is_kept_on_a_backwards_report() -> None:
    decision = Decision(P.FAILED, "", (("provider_failure", {}),))
    change = judge(Held(P.PAID), reported_snapshot(), decision, EventSource.POLL)
    assert label(change) == "i"
    [finding] = change.findings
    assert finding.kind is AnomalyKind.PROVIDER_FAILURE
    assert finding.detail == "provider_failure reported by the provider"
    assert finding.key == "provider_failure:pay_1:told:0.5"
    change = judge(Held(P.PAID), reported_snapshot(paid_amount=None), decision, EventSource.POLL)
    assert change.findings[0].key == "provider_failure:pay_1:told:-"
    decision = Decision(P.FAILED, "declared invalid", (("provider_failure", {}),))
    change = judge(Held(P.PENDING), reported_snapshot(), decision, EventSource.POLL)
    assert change.findings[0].detail == "declared invalid"


@pytest.mark.parametrize(
    ("told_fields", "problem"),
    [
        (
            {"order_id": "order-2"},
            "provider names order 'order-2', payment pay_1 is order 'order-1'",
        ),
        ({"provider_payment_id": "pp-2"}, "provider names payment 'pp-2', payment pay_1 is 'pp-1'"),
    ],
)
def test_a_snapshot_about_another_payment_is_refused(
    told_fields: dict[str, object], problem: str
) -> None:
    change = judge(
        Held(P.PENDING), reported_snapshot(**told_fields), Decision(P.PAID), EventSource.POLL
    )
    assert label(change) == "R"
    assert change.summary == problem
    told = reported_snapshot(**told_fields)
    assert change.findings[0].key == (
        f"reference_mismatch:pay_1:{told.provider_payment_id}:{told.order_id}"
    )
    assert change.paid_amount == Decimal("0.5")


def test_a_reference_the_snapshot_or_payment_lacks_is_no_mismatch() -> None:
    told = reported_snapshot(order_id=None, provider_payment_id=None)
    assert label(judge(Held(P.PENDING), told, Decision(P.PAID), EventSource.POLL)) == "m"
    held = Held(P.PENDING, provider_payment_id=None)
    assert label(judge(held, reported_snapshot(), Decision(P.PAID), EventSource.POLL)) == "m"


# Each money-path defect, through the functions the Celery task and the pass call ----------------


def deliver(app: Flask, services: Services, path: str, body: bytes, headers: dict[str, str]) -> Any:
    response = app.test_client().post(path, data=body, headers=headers)
    assert (response.status_code, response.get_data()) == (200, b"success")
    notification_id = app.extensions["ipn.dispatcher"].submitted[-1]
    process_notification(services, notification_id)
    return notification(services.db, notification_id)


def cubepay_due(services: Services, **fields: Any) -> Any:
    values: dict[str, Any] = {
        "provider": "cubepay",
        "order_id": "M12345678",
        "amount": Decimal("500"),
        "currency": "TWD",
        "pay_amount": Decimal("0.01"),
        "pay_currency": "BTC",
        "provider_payment_id": "C1536678153791231775",
        "callback_token": "tok_5f2b9c",
        "created_at": START,
        "updated_at": START,
        "expires_at": START + timedelta(hours=6),
        "next_check_at": START + timedelta(minutes=1),
        **fields,
    }
    return make_payment(services.db, **values)


def coinbar_headers(body: bytes) -> dict[str, str]:
    return {
        **JSON,
        "SIGNATURE": coinbarpay_signature(body),
        "CBPAY-API-KEY": "2cb63353-2541-4c4e-90d4-7bf1d4b42c5c",
    }


def cp_payment(services: Services) -> Any:
    return make_payment(
        services.db,
        provider="cryptoprocessing",
        order_id="order_12345",
        amount=Decimal("0.3"),
        currency="ETH",
    )


def cp_deliver(app: Flask, services: Services, status: str, received: str) -> Any:
    body = cryptoprocessing_callback(status, received=received)
    return deliver(app, services, "/ipn/cryptoprocessing", body, cryptoprocessing_headers(body))


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (cubepay_query_answer(2, source_amount="499"), AnomalyKind.AMOUNT_MISMATCH),
        (cubepay_query_answer(42), AnomalyKind.UNKNOWN_STATUS),
        (cubepay_query_answer(0, order_id="M99"), AnomalyKind.REFERENCE_MISMATCH),
    ],
    ids=["refused-paid", "unknown-status", "another-payment"],
)
def test_defect_1_no_expiry_beside_a_refused_paid_or_an_unknown_status(
    services: Services,
    provider_api: responses.RequestsMock,
    clock: Any,
    answer: bytes,
    kind: AnomalyKind,
) -> None:
    payment = cubepay_due(services)
    provider_api.post(CUBEPAY_QUERY, body=answer)
    clock.move_to(START + timedelta(hours=7))
    report = reconcile_due(services)
    assert (report.checked, report.expired) == (1, 0)
    held = load_payment(services.db, payment.id)
    assert held.status is PaymentStatus.PENDING and not held.expiry_inferred
    assert [a.kind for a in anomalies(services.db)] == [kind]
    assert [e.source for e in events(services.db, payment.id)] == [EventSource.POLL]


def test_defect_1_an_unpaid_answer_still_expires(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    payment = cubepay_due(services)
    provider_api.post(CUBEPAY_QUERY, body=cubepay_query_answer(0, paid="0"))
    clock.move_to(START + timedelta(hours=7))
    assert check_payment(services, payment.id).outcome == "expired"
    expired = load_payment(services.db, payment.id)
    assert expired.status is PaymentStatus.EXPIRED and expired.expiry_inferred
    last = events(services.db, payment.id)[-1]
    assert (last.source, last.from_status, last.to_status) == (
        EventSource.EXPIRY,
        PaymentStatus.PENDING,
        PaymentStatus.EXPIRED,
    )
    assert "expired by our clock" in last.detail


def test_defect_2_a_second_late_deposit_opens_its_own_anomaly_and_keeps_the_money(
    app: Flask, services: Services
) -> None:
    payment = cp_payment(services)
    cp_deliver(app, services, "expired", "0")
    assert load_payment(services.db, payment.id).status is PaymentStatus.EXPIRED
    cp_deliver(app, services, "expired", "0.001")
    [first] = anomalies(services.db)
    assert first.kind is AnomalyKind.LATE_PAYMENT
    assert "0.001" in first.evidence["detail"]
    with services.db.transaction() as session:
        resolve_anomaly(session, first.id, "refunded by hand", "ops")
    row = cp_deliver(app, services, "expired", "0.003")
    assert "duplicate" not in (row.outcome or "")
    late = load_payment(services.db, payment.id)
    assert late.status is PaymentStatus.EXPIRED
    assert late.paid_amount == Decimal("0.003")
    first, second = anomalies(services.db)
    assert second.kind is AnomalyKind.LATE_PAYMENT and second.status is AnomalyStatus.OPEN
    assert "0.003" in second.evidence["detail"]
    # The expiry, the first late deposit, the operator's resolve, the second late deposit.
    timeline = events(services.db, payment.id)
    assert [e.source for e in timeline] == [
        EventSource.CALLBACK,
        EventSource.CALLBACK,
        EventSource.OPERATOR,
        EventSource.CALLBACK,
    ]
    # The same report again is the same fact: nothing more.
    cp_deliver(app, services, "expired", "0.003")
    assert len(anomalies(services.db)) == 2
    assert len(events(services.db, payment.id)) == 4


def test_money_on_a_providers_unpaid_end_after_our_expiry_is_kept_and_flagged(
    app: Flask, services: Services
) -> None:
    """Our clock expired it; the provider then ends it `failed` with money received (it refunds
    such payments itself). The money is recorded and flagged, the provider's end replaces our
    inference, and a later `paid` is late money, not an overturn."""
    payment = make_payment(
        services.db,
        provider="cryptoprocessing",
        order_id="order_12345",
        amount=Decimal("0.3"),
        currency="ETH",
        status=PaymentStatus.EXPIRED,
        expiry_inferred=True,
    )
    cp_deliver(app, services, "failed", "0.0047")
    held = load_payment(services.db, payment.id)
    assert held.status is PaymentStatus.EXPIRED and not held.expiry_inferred
    assert held.paid_amount == Decimal("0.0047")
    [late] = anomalies(services.db)
    assert late.kind is AnomalyKind.LATE_PAYMENT
    assert late.evidence["detail"] == (
        "status failed (failed) with 0.0047 received after expired: "
        "late payment, no change, flagged for review"
    )
    row = cp_deliver(app, services, "failed", "0.0047")
    assert "duplicate" in (row.outcome or "") and len(anomalies(services.db)) == 1
    cp_deliver(app, services, "paid", "0.3")
    assert load_payment(services.db, payment.id).status is PaymentStatus.EXPIRED
    assert [a.kind for a in anomalies(services.db)] == [AnomalyKind.LATE_PAYMENT] * 2


def test_a_providers_unpaid_end_after_our_expiry_ends_the_inference(
    app: Flask, services: Services
) -> None:
    payment = make_payment(
        services.db,
        provider="cryptoprocessing",
        order_id="order_12345",
        amount=Decimal("0.3"),
        currency="ETH",
        status=PaymentStatus.EXPIRED,
        expiry_inferred=True,
    )
    cp_deliver(app, services, "failed", "0")
    held = load_payment(services.db, payment.id)
    assert held.status is PaymentStatus.EXPIRED and not held.expiry_inferred
    assert held.provider_status == "failed" and anomalies(services.db) == []
    assert len(events(services.db, payment.id)) == 1
    cp_deliver(app, services, "failed", "0")
    assert len(events(services.db, payment.id)) == 1


def test_defect_3_the_providers_expiry_after_ours_makes_a_late_paid_an_anomaly(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    payment = bitcoinpaygate_payment(
        services.db,
        created_at=START,
        updated_at=START,
        expires_at=START + timedelta(minutes=15),
        next_check_at=START + timedelta(minutes=1),
    )
    provider_api.get(BPG_STATUS, body=bpg_snapshot("NEW", current_time="2026-11-21T09:30:00Z"))
    clock.move_to(START + timedelta(minutes=30))
    assert check_payment(services, payment.id).outcome == "expired"
    assert load_payment(services.db, payment.id).expiry_inferred
    provider_api.replace(
        responses.GET, BPG_STATUS, body=bpg_snapshot("EXPIRED", current_time="2026-11-21T10:00:00Z")
    )
    clock.move_to(_due(services, payment.id))  # the next poll, when the pass would make it
    check_payment(services, payment.id)
    expired = load_payment(services.db, payment.id)
    assert expired.status is PaymentStatus.EXPIRED and not expired.expiry_inferred
    provider_api.replace(
        responses.GET,
        BPG_STATUS,
        body=bpg_snapshot("CONFIRMED", current_time="2026-11-21T11:00:00Z"),
    )
    clock.move_to(_due(services, payment.id))
    check_payment(services, payment.id)
    assert load_payment(services.db, payment.id).status is PaymentStatus.EXPIRED
    assert [a.kind for a in anomalies(services.db)] == [AnomalyKind.LATE_PAYMENT]


def _due(services: Services, payment_id: str) -> datetime:
    due = load_payment(services.db, payment_id).next_check_at
    assert due is not None
    return due


def test_defect_10_cubepay_paid_in_a_coin_we_do_not_know_is_refused(
    services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    payment = cubepay_due(services, currency="USD")
    answer = cubepay_query_answer(2).replace(
        b'"source_coin": {"id": 443, "symbol": "TWD"}', b'"source_coin": {"id": 999}'
    )
    assert b'"id": 999' in answer
    provider_api.post(CUBEPAY_QUERY, body=answer)
    clock.move_to(START + timedelta(minutes=2))
    check_payment(services, payment.id)
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    [anomaly] = anomalies(services.db)
    assert anomaly.kind is AnomalyKind.AMOUNT_MISMATCH
    assert "names no currency" in anomaly.evidence["detail"]


def test_defect_10_coinbarpay_success_without_payment_detail_is_refused(
    app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = make_payment(
        services.db,
        provider="coinbarpay",
        order_id="order-1001",
        amount=Decimal("8.99"),
        currency="EUR",
    )
    answer = json.loads(coinbarpay_status("SUCCESS"))
    del answer["payment_detail"]
    provider_api.get(COINBAR_STATUS, body=json.dumps(answer))
    body = coinbarpay_status("SUCCESS")
    deliver(app, services, "/ipn/coinbarpay", body, coinbar_headers(body))
    assert load_payment(services.db, payment.id).status is PaymentStatus.PENDING
    [anomaly] = anomalies(services.db)
    assert anomaly.kind is AnomalyKind.AMOUNT_MISMATCH
    assert "names no amount" in anomaly.evidence["detail"]


def test_defect_11_a_delayed_earlier_callback_never_lowers_the_money_or_the_state(
    app: Flask, services: Services
) -> None:
    payment = cp_payment(services)
    cp_deliver(app, services, "processing", "0.005")
    assert load_payment(services.db, payment.id).status is PaymentStatus.UNDERPAID
    cp_deliver(app, services, "processing", "0")
    held = load_payment(services.db, payment.id)
    assert held.status is PaymentStatus.UNDERPAID
    assert held.paid_amount == Decimal("0.005")
    assert len(events(services.db, payment.id)) == 1


def test_bitcoinpaygate_identical_copies_make_no_timeline_events(
    app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = bitcoinpaygate_payment(
        services.db,
    )
    # The status answer carries a later server clock than the notification it confirms.
    provider_api.get(
        BPG_STATUS, body=bpg_snapshot("CONFIRMED", current_time="2018-01-12T15:20:00Z")
    )
    body = bpg_snapshot("CONFIRMED")
    headers = {**JSON, "X-BPG-Signature": bpg_signature(body)}
    for _ in range(10):
        row = deliver(app, services, "/ipn/bitcoinpaygate/notification", body, headers)
        assert row.status is NotificationStatus.PROCESSED
    assert load_payment(services.db, payment.id).status is PaymentStatus.PAID
    [event] = events(services.db, payment.id)
    assert (event.from_status, event.to_status) == (PaymentStatus.PENDING, PaymentStatus.PAID)


def test_coinbarpay_paid_then_refunded_before_the_worker_ran_ends_refunded(
    app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = make_payment(
        services.db,
        provider="coinbarpay",
        order_id="order-1001",
        amount=Decimal("8.99"),
        currency="EUR",
    )
    provider_api.get(COINBAR_STATUS, body=coinbarpay_status("FAILED", descr="Refunded"))
    body = coinbarpay_status("SUCCESS")
    deliver(app, services, "/ipn/coinbarpay", body, coinbar_headers(body))
    assert load_payment(services.db, payment.id).status is PaymentStatus.REFUNDED
    assert [(e.from_status, e.to_status) for e in events(services.db, payment.id)] == [
        (PaymentStatus.PENDING, PaymentStatus.PAID),
        (PaymentStatus.PAID, PaymentStatus.REFUNDED),
    ]


def test_coinbarpay_unsigned_success_answered_failed_is_failed(
    app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    payment = make_payment(
        services.db,
        provider="coinbarpay",
        order_id="order-1001",
        amount=Decimal("8.99"),
        currency="EUR",
    )
    provider_api.get(COINBAR_STATUS, body=coinbarpay_status("FAILED", descr="Refunded"))
    body = coinbarpay_status("SUCCESS")
    headers = {**JSON, "CBPAY-API-KEY": "2cb63353-2541-4c4e-90d4-7bf1d4b42c5c"}
    deliver(app, services, "/ipn/coinbarpay", body, headers)
    assert load_payment(services.db, payment.id).status is PaymentStatus.FAILED


def test_every_anomaly_says_in_words_what_happened(
    app: Flask, services: Services, provider_api: responses.RequestsMock, clock: Any
) -> None:
    # unknown status, refused paid, inferred expiry, provider failure, unexpected funds,
    # reference mismatch, late payment: each one's evidence has a detail.
    cubepay_due(services)
    provider_api.post(CUBEPAY_QUERY, body=cubepay_query_answer(42))
    clock.move_to(START + timedelta(minutes=2))
    reconcile_due(services)
    other = cubepay_due(services, order_id="M2", provider_payment_id="C2", currency="USD")
    provider_api.replace(
        responses.POST,
        CUBEPAY_QUERY,
        body=cubepay_query_answer(2, order_id="M2", payment_id="C2"),
    )
    check_payment(services, other.id)
    wrong = cubepay_due(services, order_id="M3", provider_payment_id="C3")
    provider_api.replace(
        responses.POST,
        CUBEPAY_QUERY,
        body=cubepay_query_answer(2, order_id="M4", payment_id="C3"),
    )
    check_payment(services, wrong.id)
    cp = make_payment(
        services.db,
        provider="cryptoprocessing",
        order_id="order_12345",
        amount=Decimal("0.3"),
        currency="ETH",
        created_at=START,
        expires_at=START,
        next_check_at=START,
    )
    clock.move_to(START + timedelta(hours=25))
    check_payment(services, cp.id)
    cp_deliver(app, services, "processing", "0.001")
    bpg = bitcoinpaygate_payment(
        services.db,
    )
    provider_api.get(BPG_STATUS, body=bpg_snapshot("INVALID"))
    body = bpg_snapshot("INVALID")
    headers = {**JSON, "X-BPG-Signature": bpg_signature(body)}
    deliver(app, services, "/ipn/bitcoinpaygate/notification", body, headers)
    report = b'{"paymentId":"%s","paidBtc":0.1,"notificationType":"ANOMALY"}' % BPG_ID.encode()
    deliver(
        app,
        services,
        "/ipn/bitcoinpaygate/anomaly",
        report,
        {**JSON, "X-BPG-Signature": bpg_signature(report)},
    )
    assert load_payment(services.db, bpg.id).status is PaymentStatus.FAILED
    found = {a.kind: a.evidence["detail"] for a in anomalies(services.db)}
    assert set(found) == set(AnomalyKind), found
    for kind, detail in found.items():
        assert isinstance(detail, str) and len(detail) > 20, (kind, detail)
    assert "unexpected funds" in found[AnomalyKind.UNEXPECTED_FUNDS]
    assert "paidBtc 0.1" in found[AnomalyKind.UNEXPECTED_FUNDS]
    assert "INVALID" in found[AnomalyKind.PROVIDER_FAILURE]
    assert "expired by our clock" in found[AnomalyKind.INFERRED_EXPIRY]


# Each provider's status mapping, against the tables of ../shared/providers ---------------------


@dataclass(frozen=True)
class HeldFacts:
    status: PaymentStatus = P.PENDING
    created_at: datetime = AT
    amount: Decimal | None = Decimal("500")
    currency: str | None = "TWD"
    pay_amount: Decimal | None = Decimal("1")
    paid_amount: Decimal | None = None


def told(
    status: str, paid: str | None = None, pay: str | None = None, detail: str = ""
) -> Snapshot:
    return Snapshot(
        provider_status=status,
        paid_amount=None if paid is None else Decimal(paid),
        pay_amount=None if pay is None else Decimal(pay),
        pay_currency="BTC",
        detail=detail,
    )


# (status, paid, asked in crypto, our state, note); the held payment asks 1 when the answer
# does not say.
CUBEPAY = [
    ("-1", None, None, P.CANCELLED, ""),
    ("0", None, None, P.PENDING, ""),
    ("0", "1", "1", P.PENDING, ""),
    ("1", None, None, P.CONFIRMING, ""),
    ("1", "0", "1", P.CONFIRMING, ""),
    ("1", "0.4", "1", P.UNDERPAID, "paid 0.4 of 1"),
    ("1", "0.4", None, P.UNDERPAID, "paid 0.4 of 1"),
    ("1", "1", "1", P.CONFIRMING, ""),
    ("1", "1.5", "1", P.CONFIRMING, ""),
    ("2", None, None, P.PAID, ""),
    ("2", "1", "1", P.PAID, ""),
    ("2", "1.5", "1", P.PAID, ""),
    ("2", "0.4", "1", P.UNDERPAID, "paid 0.4 of 1"),
    ("2", "0", "1", P.UNDERPAID, "paid 0 of 1"),
    ("3", "1", "1", P.PAID, ""),
    ("3", "0.4", "1", P.UNDERPAID, "paid 0.4 of 1"),
    ("4", "1", "1", P.PAID, ""),
    ("4", "0.4", "1", P.UNDERPAID, "paid 0.4 of 1"),
    ("5", "1", "1", P.PAID, "refund in progress"),
    ("6", "1", "1", P.REFUNDED, ""),
    ("7", "1", "1", None, "unknown CubePay status '7'"),
    ("-2", None, None, None, "unknown CubePay status '-2'"),
    ("paid", "1", "1", None, "unknown CubePay status 'paid'"),
]


@pytest.mark.parametrize(("status", "paid", "pay", "state", "note"), CUBEPAY)
def test_cubepay_mapping(
    status: str, paid: str | None, pay: str | None, state: PaymentStatus | None, note: str
) -> None:
    cubepay = CubePay(CubePaySettings())
    decision = cubepay.decide(told(status, paid, pay), HeldFacts(), AT)
    assert (decision.state, decision.note, decision.anomalies) == (state, note, ())


def test_cubepay_without_the_crypto_amount_anywhere_takes_the_word_paid() -> None:
    decision = CubePay(CubePaySettings()).decide(told("2", "0.4"), None, AT)
    assert decision.state is P.PAID


@pytest.mark.parametrize(
    ("age", "state", "note"),
    [
        (timedelta(0), P.CANCELLED, ""),
        (timedelta(hours=6) - timedelta(microseconds=1), P.CANCELLED, ""),
        (timedelta(hours=6), P.EXPIRED, "canceled after its 6 h lifetime"),
        (timedelta(days=2), P.EXPIRED, "canceled after its 6 h lifetime"),
    ],
)
def test_cubepay_canceled_is_expired_by_the_time_it_is_asked_at(
    age: timedelta, state: PaymentStatus, note: str
) -> None:
    # `now` is the time given, never the wall clock (which is years past AT here).
    decision = CubePay(CubePaySettings()).decide(told("-1"), HeldFacts(), AT + age)
    assert (decision.state, decision.note) == (state, note)


BITCOINPAYGATE = [
    ("NEW", P.PENDING),
    ("UNDERPAID", P.UNDERPAID),
    ("UNCONFIRMED", P.CONFIRMING),
    ("CONFIRMED", P.PAID),
    ("COMPLETED", P.PAID),
    ("PAID", P.CONFIRMING),
    ("EXPIRED", P.EXPIRED),
    (" confirmed ", P.PAID),
    ("REFUNDED", None),
    ("", None),
]


@pytest.mark.parametrize(("status", "state"), BITCOINPAYGATE)
def test_bitcoinpaygate_mapping(status: str, state: PaymentStatus | None) -> None:
    decision = BitcoinPaygate(BitcoinPaygateSettings()).decide(told(status, "1", "1"), None, AT)
    assert decision.state is state
    assert decision.anomalies == ()
    assert decision.note == ("" if state else f"unknown BitcoinPaygate status {status!r}")


def test_bitcoinpaygate_invalid_is_failed_and_flagged() -> None:
    snapshot = replace(told("INVALID", "0.5", "1"), provider_payment_id="p1", order_id="o1")
    decision = BitcoinPaygate(BitcoinPaygateSettings()).decide(snapshot, None, AT)
    assert decision.state is P.FAILED
    assert decision.note == "BitcoinPaygate declared the payment INVALID"
    [(kind, proof)] = decision.anomalies
    assert kind == "provider_failure"
    assert proof == {
        "detail": "BitcoinPaygate declared the payment INVALID (an invalid transaction, the "
        "remainder never came, or overpaid in one transaction): failed, for review",
        "status": "INVALID",
        "paymentId": "p1",
        "merchantTransactionId": "o1",
        "paidBtc": "0.5",
        "amountBtc": "1",
    }


# (status, status_descr, held state or None, our state)
COINBARPAY = [
    ("CREATED", "", P.PENDING, P.PENDING),
    ("PENDING", "", P.PENDING, P.CONFIRMING),
    ("SUCCESS", "", P.PENDING, P.PAID),
    ("SUCCESS", "", None, P.PAID),
    ("FAILED", "Timeout", P.PENDING, P.EXPIRED),
    ("FAILED", " timeout ", None, P.EXPIRED),
    ("FAILED", "Timeout", P.PAID, P.REFUNDED),
    ("FAILED", "", P.PAID, P.REFUNDED),
    ("FAILED", "", P.REFUNDED, P.REFUNDED),
    ("FAILED", "", P.CONFIRMING, P.FAILED),
    ("FAILED", "Rejected", P.PENDING, P.FAILED),
    ("FAILED", "", None, P.FAILED),
    ("CANCELED", "", P.PENDING, P.CANCELLED),
    ("CANCELLED", "", None, P.CANCELLED),
    ("canceled", "", None, P.CANCELLED),
    ("EXPIRED", "", None, None),
    ("REFUNDED", "", P.PAID, None),
]


@pytest.mark.parametrize(("status", "descr", "held", "state"), COINBARPAY)
def test_coinbarpay_mapping(
    status: str, descr: str, held: PaymentStatus | None, state: PaymentStatus | None
) -> None:
    payment = None if held is None else HeldFacts(held)
    decision = CoinbarPay(CoinbarPaySettings()).decide(told(status, detail=descr), payment, AT)
    assert decision.state is state
    assert decision.anomalies == ()


def test_coinbarpay_notes() -> None:
    coinbar = CoinbarPay(CoinbarPaySettings())
    assert coinbar.decide(told("FAILED"), HeldFacts(P.PAID), AT).note == (
        "FAILED after SUCCESS: reversed or refunded"
    )
    assert coinbar.decide(told("FAILED", detail="Timeout"), None, AT).note == (
        "FAILED with Timeout: not paid in time"
    )
    assert coinbar.decide(told("FAILED", detail="Rejected"), None, AT).note == "FAILED: Rejected"
    assert coinbar.decide(told("FAILED"), None, AT).note == "FAILED: no reason given"
    assert coinbar.decide(told("ON_HOLD"), None, AT).note == "unknown coinbarpay status 'ON_HOLD'"
    assert coinbar.decide(told("SUCCESS"), None, AT).note == ""


# (status, received, expected, our state, note, a late payment flagged)
CRYPTOPROCESSING = [
    ("created", "0", "1", P.PENDING, "", False),
    ("processing", "0", "1", P.CONFIRMING, "", False),
    ("processing", None, "1", P.CONFIRMING, "", False),
    ("processing", "0.4", None, P.CONFIRMING, "", False),
    ("processing", "0.4", "1", P.UNDERPAID, "received 0.4 of 1 expected", False),
    ("processing", "1", "1", P.CONFIRMING, "", False),
    ("processing", "1.2", "1", P.CONFIRMING, "", False),
    ("paid", "1", "1", P.PAID, "", False),
    ("PAID", "1", "1", P.PAID, "", False),
    ("failed", "0.4", "1", P.FAILED, "", False),
    ("expired", "0", "1", P.EXPIRED, "", False),
    ("expired", None, "1", P.EXPIRED, "", False),
    ("expired", "0.4", "1", P.EXPIRED, "0.4 received after expiry", True),
    ("cancelled", "0", "1", None, "unknown cryptoprocessing status 'cancelled'", False),
    ("restricted", "1", "1", None, "unknown cryptoprocessing status 'restricted'", False),
]


@pytest.mark.parametrize(
    ("status", "received", "expected", "state", "note", "late"), CRYPTOPROCESSING
)
def test_cryptoprocessing_mapping(
    status: str,
    received: str | None,
    expected: str | None,
    state: PaymentStatus | None,
    note: str,
    late: bool,
) -> None:
    provider = CryptoProcessing(CryptoProcessingSettings())
    decision = provider.decide(told(status, received, expected), None, AT)
    assert (decision.state, decision.note) == (state, note)
    if late:
        [(kind, proof)] = decision.anomalies
        assert kind == "late_payment"
        assert proof == {
            "detail": f"{received} BTC received on a payment request the provider reports "
            "expired: late payment, for review",
            "received_amount": received,
            "pay_currency": "BTC",
        }
    else:
        assert decision.anomalies == ()


# The writer: the one place a payment's state, timeline and anomalies are written ---------------


def apply_told(
    services: Services, payment_id: str, snapshot: Snapshot, source: EventSource = EventSource.POLL
) -> Any:
    with services.db.transaction() as session:
        payment = session.get(Payment, payment_id)
        assert payment is not None
        return apply_snapshot(
            session,
            services.provider("cubepay"),
            snapshot,
            Evidence(source, "the test", None),
            now=AT,
            payment=payment,
        )


def cubepay_told(status: str, **fields: Any) -> Snapshot:
    values: dict[str, Any] = {
        "order_id": "M12345678",
        "amount": Decimal("500"),
        "currency": "TWD",
        "pay_amount": Decimal("0.01"),
        "paid_amount": Decimal("0.01"),
        **fields,
    }
    return Snapshot(provider_status=status, **values)


def test_writer_moves_with_one_event_and_takes_the_snapshot(services: Services) -> None:
    payment = make_payment(services.db, created_at=AT, updated_at=AT)
    as_of = AT + timedelta(minutes=1)
    applied = apply_told(services, payment.id, cubepay_told("2", as_of=as_of, pay_address="bc1q"))
    assert (applied.changed, applied.summary, applied.verdict) == (True, "pending -> paid", "move")
    assert applied.reported is P.PAID and applied.anomaly_ids == []
    paid = load_payment(services.db, payment.id)
    assert (paid.status, paid.provider_status, paid.paid_amount) == (P.PAID, "2", Decimal("0.01"))
    assert (paid.snapshot_at, paid.pay_address, paid.updated_at) == (as_of, "bc1q", AT)
    assert paid.version == 2
    [event] = events(services.db, payment.id)
    assert (event.source, event.from_status, event.to_status) == (
        EventSource.POLL,
        P.PENDING,
        P.PAID,
    )
    assert (event.provider_status, event.detail, event.at) == ("2", "the test: status 2", AT)
    # The same answer again: no event, no anomaly.
    again = apply_told(services, payment.id, cubepay_told("2", as_of=as_of))
    assert (again.changed, again.summary, again.event) == (False, "duplicate: already paid", None)
    assert len(events(services.db, payment.id)) == 1


def test_writer_says_a_refusal_once_per_fact_and_records_each_replay(services: Services) -> None:
    payment = make_payment(services.db, created_at=AT, updated_at=AT, provider_status="0")
    first = apply_told(services, payment.id, cubepay_told("42"))
    assert first.verdict == "refuse" and len(first.anomaly_ids) == 1
    assert first.summary == "unknown status 42: no change, flagged for review"
    second = apply_told(services, payment.id, cubepay_told("42"))
    assert (second.verdict, second.event, second.anomaly_ids) == ("refuse", None, [])
    assert second.summary == "duplicate: unknown status 42: no change, flagged for review"
    replayed = apply_told(services, payment.id, cubepay_told("42"), EventSource.REPLAY)
    assert replayed.event is not None and replayed.anomaly_ids == []
    held = load_payment(services.db, payment.id)
    assert (held.status, held.provider_status) == (P.PENDING, "0")
    assert [e.source for e in events(services.db, payment.id)] == [
        EventSource.POLL,
        EventSource.REPLAY,
    ]
    [anomaly] = anomalies(services.db)
    assert anomaly.evidence["detail"] == "unknown status 42: no change, flagged for review"
    assert anomaly.evidence["source"] == "the test"
    assert anomaly.payment_id == payment.id


def test_writer_never_lowers_money_or_the_providers_clock(services: Services) -> None:
    later = AT + timedelta(hours=1)
    payment = make_payment(
        services.db, created_at=AT, updated_at=AT, paid_amount=Decimal("0.02"), snapshot_at=later
    )
    apply_told(services, payment.id, cubepay_told("6", paid_amount=Decimal("0"), as_of=later))
    refunded = load_payment(services.db, payment.id)
    assert (refunded.status, refunded.paid_amount) == (P.REFUNDED, Decimal("0.02"))
    assert refunded.snapshot_at == later


def test_our_clock_expires_an_open_payment_once(services: Services) -> None:
    payment = make_payment(services.db, created_at=AT, updated_at=AT, provider_status="0")
    with services.db.transaction() as session:
        held = session.get(Payment, payment.id)
        assert held is not None
        applied = expire_by_clock(session, held, "past the deadline", AT, Schedule(), flag=True)
        assert applied.changed and applied.summary == "pending -> expired"
    with services.db.transaction() as session:
        held = session.get(Payment, payment.id)
        assert held is not None
        again = expire_by_clock(session, held, "past the deadline", AT, Schedule(), flag=True)
        assert (again.changed, again.event) == (False, None)
    expired = load_payment(services.db, payment.id)
    assert expired.status is P.EXPIRED and expired.expiry_inferred
    [event] = events(services.db, payment.id)
    assert (event.source, event.detail, event.provider_status) == (
        EventSource.EXPIRY,
        "expiry: past the deadline",
        "0",
    )
    [anomaly] = anomalies(services.db)
    assert anomaly.kind is AnomalyKind.INFERRED_EXPIRY
    assert anomaly.evidence == {
        "last_status": "0",
        "detail": "past the deadline",
        "source": "expiry",
    }


@pytest.mark.parametrize(
    ("held_at", "told_at"), [(None, AT), (AT, None)], ids=["first-clock", "no-clock"]
)
def test_with_a_clock_on_one_side_only_money_orders_the_snapshots(
    held_at: datetime | None, told_at: datetime | None
) -> None:
    held = Held(P.UNDERPAID, snapshot_at=held_at, paid_amount=Decimal("0.5"))
    less = reported_snapshot(as_of=told_at, paid_amount=Decimal("0.1"))
    assert label(judge(held, less, Decision(P.CONFIRMING), EventSource.POLL)) == "i"
    more = reported_snapshot(as_of=told_at, paid_amount=Decimal("0.9"))
    assert label(judge(held, more, Decision(P.CONFIRMING), EventSource.POLL)) == "m"


def test_a_refusal_keeps_the_snapshot_as_exact_text() -> None:
    told = reported_snapshot(
        provider_status="2", amount=Decimal("9.990"), pay_currency="", as_of=AT, detail="Paid"
    )
    [finding] = judge(Held(P.PENDING), told, Decision(P.PAID), EventSource.POLL).findings
    assert finding.proof == {
        "provider_status": "2",
        "snapshot": {
            "provider_status": "2",
            "order_id": "order-1",
            "provider_payment_id": "pp-1",
            "amount": "9.990",
            "currency": "USD",
            "paid_amount": "0.5",
            "as_of": "2026-01-01 12:00:00+00:00",
            "detail": "Paid",
        },
    }


def test_writer_schedules_the_next_check_even_for_a_duplicate(services: Services) -> None:
    payment = make_payment(
        services.db, created_at=AT, updated_at=AT, provider_status="0", next_check_at=AT
    )
    applied = apply_told(services, payment.id, cubepay_told("0", paid_amount=None))
    assert applied.verdict == "duplicate"
    assert load_payment(services.db, payment.id).next_check_at > AT


def test_writer_a_refusal_on_record_changes_nothing(services: Services) -> None:
    payment = make_payment(services.db, created_at=AT, updated_at=AT, provider_status="0")
    apply_told(services, payment.id, cubepay_told("42"))
    again = apply_told(services, payment.id, cubepay_told("42"))
    assert (again.changed, again.event, again.anomaly_ids) == (False, None, [])


def test_writer_keeps_the_providers_clock_when_a_snapshot_has_none(services: Services) -> None:
    payment = make_payment(services.db, created_at=AT, updated_at=AT, snapshot_at=AT)
    apply_told(services, payment.id, cubepay_told("1", as_of=None))
    held = load_payment(services.db, payment.id)
    assert (held.status, held.snapshot_at) == (P.CONFIRMING, AT)


def test_writer_fills_every_detail_the_payment_lacks(services: Services) -> None:
    payment = make_payment(services.db, created_at=AT, updated_at=AT)
    expires = AT + timedelta(hours=6)
    details = {
        "provider_payment_id": "C100",
        "pay_amount": Decimal("0.01"),
        "pay_currency": "BTC",
        "pay_address": "bc1qaddress",
        "pay_url": "https://pay.example/C100",
        "payment_uri": "bitcoin:bc1qaddress?amount=0.01",
        "expires_at": expires,
    }
    apply_told(services, payment.id, cubepay_told("1", **details))
    held = load_payment(services.db, payment.id)
    assert {name: getattr(held, name) for name in details} == details
    # What the payment already holds is kept.
    apply_told(services, payment.id, cubepay_told("2", pay_address="bc1qother"))
    assert load_payment(services.db, payment.id).pay_address == "bc1qaddress"


def test_our_clocks_expiry_anomaly_is_keyed_by_the_payment(services: Services) -> None:
    payment = make_payment(services.db, created_at=AT, updated_at=AT)
    with services.db.transaction() as session:
        held = session.get(Payment, payment.id)
        assert held is not None
        expire_by_clock(session, held, "past the deadline", AT, Schedule(), flag=True)
    [anomaly] = anomalies(services.db)
    assert anomaly.dedupe_key == f"inferred_expiry:{payment.id}"


@pytest.mark.parametrize("lookup", ["find_payment", "read_payment"])
def test_a_payment_lookup_trusts_the_providers_id_over_our_order_id(
    services: Services, lookup: str
) -> None:
    first = make_payment(services.db, order_id="A1", provider_payment_id="C1")
    second = make_payment(services.db, order_id="A2", provider_payment_id="C2")
    make_payment(services.db, order_id="A3", provider_payment_id="C3", account="shop-b")
    with services.db.sessions() as session, services.db.reading_connection() as connection:

        def find(ref: PaymentRef, account: str = "default") -> str | None:
            if lookup == "find_payment":
                found = find_payment(session, "cubepay", ref, account=account)
            else:
                found = read_payment(connection, "cubepay", ref, account=account)
            return found.id if found is not None else None

        assert find(PaymentRef("A1", "C2")) == second.id
        assert find(PaymentRef("A2", "C1")) == first.id
        assert find(PaymentRef(None, "C1")) == first.id
        assert find(PaymentRef("A2", None)) == second.id
        assert find(PaymentRef(None, "C3")) is None
        assert find(PaymentRef("A1", "C1"), account="shop-b") is None
        assert find(PaymentRef()) is None


def test_a_payment_read_outside_a_session_is_the_one_the_orm_loads(services: Services) -> None:
    """Every column as the ORM loads it, no pending change, and a session can write it with
    its version compare-and-set, as the worker writes the payment it read before asking."""
    payment = make_payment(
        services.db,
        order_id="A1",
        provider_payment_id="C1",
        paid_amount=Decimal("0.00012345"),
        provider_status="2",
    )
    ref = PaymentRef("A1", "C1")
    with services.db.reading() as session:
        loaded = find_payment(session, "cubepay", ref)
    with services.db.reading_connection() as connection:
        read = read_payment(connection, "cubepay", ref)
    assert loaded is not None and read is not None
    keys = [prop.key for prop in Payment.__mapper__.column_attrs]
    assert [getattr(read, key) for key in keys] == [getattr(loaded, key) for key in keys]
    assert isinstance(read.paid_amount, Decimal) and read.status is PaymentStatus.PENDING
    state = inspect(read)
    assert (state.detached, state.modified, state.identity) == (True, False, (payment.id,))

    with services.db.transaction() as session:
        held = session.merge(read, load=False)
        held.provider_status = "3"
    assert load_payment(services.db, payment.id).provider_status == "3"
    with pytest.raises(StaleDataError), services.db.transaction() as session:
        # Read before that write: its version is behind, so its UPDATE matches no row.
        session.merge(read, load=False).provider_status = "4"
    assert load_payment(services.db, payment.id).provider_status == "3"


def test_a_snapshot_naming_nothing_finds_its_payment_by_the_callbacks_reference(
    services: Services,
) -> None:
    payment = make_payment(services.db, created_at=AT, updated_at=AT)
    with services.db.transaction() as session:
        applied = apply_snapshot(
            session,
            services.provider("cubepay"),
            cubepay_told("1", order_id=None),
            Evidence(EventSource.CALLBACK, "the test", None),
            now=AT,
            ref=PaymentRef("M12345678"),
        )
        assert applied is not None and applied.payment.id == payment.id


def test_the_snapshots_own_reference_wins_over_the_callbacks(services: Services) -> None:
    """The provider's answer names the payment: a callback reference naming nothing of ours
    (another order id) does not lose it."""
    payment = make_payment(services.db, created_at=AT, updated_at=AT)
    with services.db.transaction() as session:
        applied = apply_snapshot(
            session,
            services.provider("cubepay"),
            cubepay_told("1"),
            Evidence(EventSource.CALLBACK, "the test", None),
            now=AT,
            ref=PaymentRef("NOT-OURS"),
        )
        assert applied is not None and applied.payment.id == payment.id


def test_adoption_takes_the_references_provider_id_and_says_so(services: Services) -> None:
    with services.db.transaction() as session:
        applied = apply_snapshot(
            session,
            services.provider("cubepay"),
            cubepay_told("1", order_id="NEW1"),
            Evidence(EventSource.CALLBACK, "ipn #9", None),
            now=AT,
            ref=PaymentRef("NEW1", "C900"),
            may_adopt=True,
        )
        assert applied is not None
        payment_id = applied.payment.id
    adopted = load_payment(services.db, payment_id)
    assert (adopted.order_id, adopted.provider_payment_id, adopted.adopted) == (
        "NEW1",
        "C900",
        True,
    )
    first = events(services.db, payment_id)[0]
    assert first.detail == "adopted: first seen through ipn #9"


@pytest.mark.parametrize(
    ("state", "inferred"),
    [(P.EXPIRED, True), (P.EXPIRED, False), (P.CANCELLED, False), (P.FAILED, False)],
)
def test_money_refunded_after_an_unpaid_end_is_a_late_payment_kept(
    state: PaymentStatus, inferred: bool
) -> None:
    """Paid after the payment had ended and sent back before we asked: the money came, so it is
    recorded and flagged, and the provider's final word leaves no expiry of ours to overturn."""
    held = Held(state, expiry_inferred=inferred, paid_amount=Decimal("0"))
    told = reported_snapshot(provider_status="6", paid_amount=Decimal("0.01"))
    change = judge(held, told, Decision(P.REFUNDED), EventSource.POLL)
    assert label(change) == "L"
    [finding] = change.findings
    assert finding.key == "late_payment:pay_1:6:0.01"
    assert finding.detail == (
        f"status 6 (refunded) with 0.01 received after {state.value}: "
        "late payment, no change, flagged for review"
    )
    assert (change.after, change.paid_amount) == (state, Decimal("0.01"))
    assert change.takes_snapshot is True
    assert change.expiry_inferred is False
    # No money beyond what was seen: nothing to flag, and the payment stays as it ended.
    same = judge(
        Held(state, expiry_inferred=inferred, paid_amount=Decimal("0.01")),
        told,
        Decision(P.REFUNDED),
        EventSource.POLL,
    )
    assert same.findings == () and same.after is state
