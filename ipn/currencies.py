"""The currencies a payment may be asked in, with how many decimals each amount may carry."""

from __future__ import annotations

# ISO 4217 minor units for fiat; the chains' own units for crypto (where a provider quotes
# finer, e.g. ETH to 18 places, the amount we ask is still bounded by this table).
DECIMALS: dict[str, int] = {
    "EUR": 2,
    "USD": 2,
    "GBP": 2,
    "CHF": 2,
    "CAD": 2,
    "AUD": 2,
    "PLN": 2,
    "CZK": 2,
    "SEK": 2,
    "NOK": 2,
    "DKK": 2,
    "HUF": 2,
    "RON": 2,
    "TWD": 2,
    "HKD": 2,
    "SGD": 2,
    "BRL": 2,
    "MXN": 2,
    "TRY": 2,
    "ZAR": 2,
    "INR": 2,
    "CNY": 2,
    "JPY": 0,
    "KRW": 0,
    "KWD": 3,
    "BHD": 3,
    "BTC": 8,
    "LTC": 8,
    "BCH": 8,
    "DOGE": 8,
    "ETH": 18,
    "USDT": 6,
    "USDC": 6,
    "TRX": 6,
    "XRP": 6,
    "XDB": 7,
    "BNB": 18,
    "SOL": 9,
}


def decimals(code: str) -> int | None:
    """How many decimals an amount in `code` may have; None for a currency we do not know."""
    return DECIMALS.get(code.upper())
