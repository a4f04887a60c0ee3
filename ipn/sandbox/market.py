"""The sandbox's make-believe market: fixed exchange rates and fake addresses, ids and transactions.

Rates are fixed so that tests can predict every amount: each fiat currency is worth one unit of
value, and a coin is worth the price below in those units (1 BTC = 50 000 EUR = 50 000 USD).
"""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime
from decimal import ROUND_UP, Decimal, localcontext

COIN_PRICES: dict[str, Decimal] = {
    "BTC": Decimal("50000"),
    "ETH": Decimal("2500"),
    "LTC": Decimal("100"),
    "USDT": Decimal("1"),
    "USDC": Decimal("1"),
    "TRX": Decimal("0.25"),
    "XDB": Decimal("0.05"),
}
COIN_NAMES = {
    "BTC": "Bitcoin",
    "ETH": "Ethereum",
    "LTC": "Litecoin",
    "USDT": "Tether",
    "USDC": "USD Coin",
    "TRX": "Tron",
    "XDB": "DigitalBits",
}
# CryptoProcessing names a coin's chain; these are the defaults its docs list.
NETWORKS = {
    "BTC": "bitcoin",
    "ETH": "ethereum",
    "LTC": "litecoin",
    "USDT": "ethereum",
    "USDC": "ethereum",
    "TRX": "tron",
}
URI_SCHEMES = {"BTC": "bitcoin", "ETH": "ethereum", "LTC": "litecoin", "XDB": "digitalbits"}
FIAT = frozenset(
    "EUR USD GBP CHF JPY CAD AUD NZD PLN CZK HUF SEK NOK DKK RON BGN TRY TWD HKD SGD CNY KRW INR "
    "BRL MXN ZAR AED ILS RUB UAH".split()
)
FIAT_NAMES = {
    "EUR": "Euro",
    "USD": "US Dollar",
    "GBP": "Pound Sterling",
    "TWD": "New Taiwan Dollar",
}

COIN_PLACES = 8


def is_coin(code: str) -> bool:
    return code in COIN_PRICES


def is_fiat(code: str) -> bool:
    return code in FIAT


def known(code: str) -> bool:
    return is_coin(code) or is_fiat(code)


def price(code: str) -> Decimal:
    """What one unit is worth in the sandbox's unit of value; KeyError for an unknown currency."""
    if code in FIAT:
        return Decimal(1)
    return COIN_PRICES[code]


def rate(coin: str, quote: str) -> Decimal:
    """How many `quote` units one `coin` buys (1 BTC = 50000 EUR)."""
    return price(coin) / price(quote)


def convert(amount: Decimal, source: str, target: str, places: int = COIN_PLACES) -> Decimal:
    """`amount` of `source` in `target`, rounded up so that paying it always covers the price."""
    if source == target:
        return amount
    return divide_up(amount * price(source), price(target), places)


def divide_up(amount: Decimal, divisor: Decimal, places: int) -> Decimal:
    """`amount / divisor` to `places` decimals, rounded up, however many digits that takes."""
    # The default 28 digits are too few for a large amount written to 18 decimals.
    with localcontext(prec=80):
        return (amount / divisor).quantize(Decimal(1).scaleb(-places), rounding=ROUND_UP)


def display_name(code: str) -> str:
    return COIN_NAMES.get(code) or FIAT_NAMES.get(code) or code


def payment_uri(coin: str, address: str, amount: Decimal) -> str:
    scheme = URI_SCHEMES.get(coin, coin.lower())
    return f"{scheme}:{address}?amount={amount.normalize():f}"


_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def fake_address(coin: str) -> str:
    """An address of the coin's shape on its test network; never a real one."""
    if coin == "BTC":
        return "tb1q" + "".join(secrets.choice(_BECH32) for _ in range(38))
    if coin == "LTC":
        return "tltc1q" + "".join(secrets.choice(_BECH32) for _ in range(38))
    if coin == "TRX":
        alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
        return "T" + "".join(secrets.choice(alphabet) for _ in range(33))
    if coin == "XDB":
        return "G" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(55))
    return "0x" + secrets.token_hex(20)


def fake_txid() -> str:
    return secrets.token_hex(32)


def uuid7(moment: datetime) -> str:
    """A time-ordered UUID (version 7) for `moment`, as CryptoProcessing's ids are."""
    millis = int(moment.timestamp() * 1000) & ((1 << 48) - 1)
    rand_a = secrets.randbits(12)
    rand_b = secrets.randbits(62)
    value = (millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))
