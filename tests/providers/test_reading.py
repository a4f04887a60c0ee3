"""What every adapter refuses while it reads: ids, texts and amounts no column keeps as sent."""

from __future__ import annotations

from decimal import Decimal

import pytest
import responses

from ipn.config import Settings
from ipn.errors import MalformedCallback, ProviderRejected, UnstorableValue
from ipn.providers import build_providers
from ipn.providers.base import PaymentRef, checked_id, checked_money, loads_json

from conftest import PROVIDER_ENV, PROVIDER_URL
from helpers import bpg_snapshot, coinbarpay_status, cubepay_query_answer, provider_mock


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("0", "0"),
        ("0E-40", "0"),
        ("-5", "-5"),
        ("9" * 24, "9" * 24),
        ("0." + "1" * 24, "0." + "1" * 24),
        ("1." + "0" * 30, "1." + "0" * 24),
        ("9" * 24 + "." + "9" * 24, "9" * 24 + "." + "9" * 24),
        ("1" * 24 + ".5" + "0" * 30, "1" * 24 + ".5" + "0" * 23),
    ],
)
def test_amounts_the_column_keeps_pass_unchanged_in_value(value: str, kept: str) -> None:
    result = checked_money(Decimal(value), "amount")
    assert result == Decimal(kept) and str(result) == str(Decimal(kept))


@pytest.mark.parametrize(
    "value", ["1e999", "1" + "0" * 24, "-1e24", "0." + "1" * 25, "1" * 24 + "." + "1" * 25]
)
def test_amounts_beyond_the_column_are_refused(value: str) -> None:
    with pytest.raises(UnstorableValue, match="amount"):
        checked_money(Decimal(value), "amount")


@pytest.mark.parametrize("value", ["a\x00b", "a\udc80b", "a\x1fb", "x" * 256])
def test_ids_that_cannot_be_kept_or_looked_up_are_refused(value: str) -> None:
    with pytest.raises(UnstorableValue, match="order id"):
        checked_id(value, "order id")
    assert checked_id("x" * 255, "order id") == "x" * 255


def test_a_json_body_with_half_a_surrogate_pair_is_malformed() -> None:
    with pytest.raises(MalformedCallback, match=r"field 'note' holds the lone surrogate"):
        loads_json(b'{"note": "\\udc80"}')
    assert loads_json(b'{"note": "\\ud83d\\ude00"}') == {"note": "\U0001f600"}


PROVIDERS = build_providers(Settings.from_env(PROVIDER_ENV))


@pytest.mark.parametrize(
    ("provider", "url", "answer", "ref"),
    [
        (
            "cubepay",
            f"{PROVIDER_URL}/cubepay/payment/query",
            cubepay_query_answer(2, paid="0." + "1" * 28),
            PaymentRef("M12345678", "C1536678153791231775"),
        ),
        (
            "coinbarpay",
            f"{PROVIDER_URL}/coinbarpay/coinbar/api/v2/pay/gateway/payment/order-1001/status",
            coinbarpay_status("S" * 86),
            PaymentRef("order-1001"),
        ),
        (
            "bitcoinpaygate",
            f"{PROVIDER_URL}/bitcoinpaygate/v2/payments/p1",
            bpg_snapshot("CONFIRMED", amount="1" + "0" * 30, payment_id="p1"),
            PaymentRef(None, "p1"),
        ),
    ],
    ids=["cubepay-28-decimals", "coinbarpay-86-character-status", "bitcoinpaygate-10^30"],
)
def test_an_answer_that_cannot_be_kept_is_a_permanent_refusal(
    provider: str, url: str, answer: bytes, ref: PaymentRef
) -> None:
    """Asking again gives the same answer: not ProviderUnavailable, which would be retried."""
    method = responses.POST if provider == "cubepay" else responses.GET
    with provider_mock() as mock:
        mock.add(method, url, body=answer, content_type="application/json")
        with pytest.raises(ProviderRejected, match="cannot keep"):
            PROVIDERS[provider].fetch_status(ref)
