"""The provider adapters, one module each behind `Provider`, and the registry that builds them."""

from __future__ import annotations

import requests

from ipn.config import DEFAULT_ACCOUNT, PROVIDERS, Settings
from ipn.providers.base import Provider
from ipn.providers.bitcoinpaygate import BitcoinPaygate
from ipn.providers.coinbarpay import CoinbarPay
from ipn.providers.cryptoprocessing import CryptoProcessing
from ipn.providers.cubepay import CubePay

PROVIDER_CLASSES: dict[str, type[Provider]] = {
    cls.name: cls for cls in (CubePay, BitcoinPaygate, CoinbarPay, CryptoProcessing)
}
assert tuple(PROVIDER_CLASSES) == PROVIDERS


def build_providers(
    settings: Settings, session: requests.Session | None = None
) -> dict[str, Provider]:
    """One adapter per provider, sharing one HTTP connection pool."""
    session = session or requests.Session()
    return {
        name: cls(settings.provider(name), settings.http, session)
        for name, cls in PROVIDER_CLASSES.items()
    }


def build_accounts(
    settings: Settings, session: requests.Session | None = None
) -> dict[tuple[str, str], Provider]:
    """One adapter per further account, by (provider, account); the defaults are
    `build_providers`'s."""
    session = session or requests.Session()
    return {
        (name, account): PROVIDER_CLASSES[name](
            settings.account(name, account), settings.http, session
        )
        for name in PROVIDERS
        for account in settings.account_names(name)
        if account != DEFAULT_ACCOUNT
    }


__all__ = ["PROVIDER_CLASSES", "Provider", "build_accounts", "build_providers"]
