"""The provider adapters, one module each behind `Provider`, and the registry that builds them."""

from __future__ import annotations

import requests

from ipn.config import DEFAULT_ACCOUNT, PROVIDERS, Settings
from ipn.providers.base import Provider
from ipn.providers.bitcoinpaygate import BitcoinPaygate
from ipn.providers.coinbarpay import CoinbarPay
from ipn.providers.cryptoprocessing import CryptoProcessing
from ipn.providers.cubepay import CubePay
from ipn.providers.transport import keep_alive_session

PROVIDER_CLASSES: dict[str, type[Provider]] = {
    cls.name: cls for cls in (CubePay, BitcoinPaygate, CoinbarPay, CryptoProcessing)
}
assert tuple(PROVIDER_CLASSES) == PROVIDERS


def provider_sessions(settings: Settings) -> dict[str, requests.Session]:
    """A keep-alive session per provider, its pool as large as a reconciliation batch's calls
    in flight, so concurrent status queries reuse connections instead of opening new ones."""
    sessions = {}
    for name in PROVIDERS:
        sessions[name] = keep_alive_session(max(10, settings.reconcile_concurrency))
    return sessions


def build_providers(
    settings: Settings,
    session: requests.Session | None = None,
    sessions: dict[str, requests.Session] | None = None,
) -> dict[str, Provider]:
    """One adapter per provider, on `session` if given, else on its provider's session."""
    sessions = sessions or provider_sessions(settings)
    return {
        name: cls(settings.provider(name), settings.http, session or sessions[name])
        for name, cls in PROVIDER_CLASSES.items()
    }


def build_accounts(
    settings: Settings,
    session: requests.Session | None = None,
    sessions: dict[str, requests.Session] | None = None,
) -> dict[tuple[str, str], Provider]:
    """One adapter per further account, by (provider, account), on its provider's session;
    the defaults are `build_providers`'s."""
    sessions = sessions or provider_sessions(settings)
    return {
        (name, account): PROVIDER_CLASSES[name](
            settings.account(name, account), settings.http, session or sessions[name]
        )
        for name in PROVIDERS
        for account in settings.account_names(name)
        if account != DEFAULT_ACCOUNT
    }


__all__ = [
    "PROVIDER_CLASSES",
    "Provider",
    "build_accounts",
    "build_providers",
    "provider_sessions",
]
