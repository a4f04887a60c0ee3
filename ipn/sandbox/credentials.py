"""Which keys the sandbox checks and signs with: the receiver's settings, else well-known ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ipn.config import Settings

# Fixed so that a receiver and a sandbox started apart agree without sharing anything. They are
# not secrets: never configure them against a real provider.
SANDBOX_CREDENTIALS: Mapping[str, str] = MappingProxyType(
    {
        "CUBEPAY_CLIENT_ID": "sandbox-cubepay-client",
        "CUBEPAY_CLIENT_SECRET": "sandbox-cubepay-secret",
        "BITCOINPAYGATE_API_KEY_NAME": "sandbox-bitcoinpaygate-key",
        "BITCOINPAYGATE_API_KEY_SECRET": "sandbox-bitcoinpaygate-secret",
        "BITCOINPAYGATE_HMAC_KEY": "sandbox-bitcoinpaygate-hmac",
        "COINBARPAY_SERVICE_CLIENT_ID": "5a4db0c0-cb00-4a00-8000-000000000001",
        "COINBARPAY_SECRET_KEY": "sandbox-coinbarpay-secret",
        "CRYPTOPROCESSING_API_KEY": "sandbox-cryptoprocessing-key",
        "CRYPTOPROCESSING_SECRET": "sandbox-cryptoprocessing-secret",
    }
)

API_URL_VARIABLES = (
    "CUBEPAY_API_URL",
    "BITCOINPAYGATE_API_URL",
    "COINBARPAY_API_URL",
    "CRYPTOPROCESSING_API_URL",
)


def sandbox_environment(base_url: str) -> dict[str, str]:
    """The environment that points a receiver at a sandbox at `base_url` with its default keys."""
    root = base_url.rstrip("/")
    return {**SANDBOX_CREDENTIALS, **dict.fromkeys(API_URL_VARIABLES, root)}


@dataclass(frozen=True)
class ProviderKeys:
    """One provider's credentials as the sandbox uses them; `source` says where they came from."""

    key_id: str
    secret: str = field(repr=False)
    # BitcoinPaygate's separate notification key; None: notifications go out unsigned, as the real
    # one sends them before the merchant has generated a key.
    hmac_key: str | None = field(default=None, repr=False)
    source: str = "sandbox"


@dataclass(frozen=True)
class SandboxKeys:
    cubepay: ProviderKeys
    bitcoinpaygate: ProviderKeys
    coinbarpay: ProviderKeys
    cryptoprocessing: ProviderKeys

    def for_provider(self, name: str) -> ProviderKeys:
        keys: ProviderKeys = getattr(self, name)
        return keys


def resolve_keys(settings: Settings) -> SandboxKeys:
    """Each provider configured in the settings keeps its keys; the others get the sandbox's."""
    fixed = SANDBOX_CREDENTIALS
    cube, bpg = settings.cubepay, settings.bitcoinpaygate
    coinbar, cp = settings.coinbarpay, settings.cryptoprocessing
    return SandboxKeys(
        cubepay=(
            ProviderKeys(cube.client_id or "", cube.client_secret or "", source="settings")
            if cube.configured
            else ProviderKeys(fixed["CUBEPAY_CLIENT_ID"], fixed["CUBEPAY_CLIENT_SECRET"])
        ),
        bitcoinpaygate=(
            ProviderKeys(
                bpg.api_key_name or "", bpg.api_key_secret or "", bpg.hmac_key, source="settings"
            )
            if bpg.configured
            else ProviderKeys(
                fixed["BITCOINPAYGATE_API_KEY_NAME"],
                fixed["BITCOINPAYGATE_API_KEY_SECRET"],
                fixed["BITCOINPAYGATE_HMAC_KEY"],
            )
        ),
        coinbarpay=(
            ProviderKeys(
                coinbar.service_client_id or "", coinbar.secret_key or "", source="settings"
            )
            if coinbar.configured
            else ProviderKeys(fixed["COINBARPAY_SERVICE_CLIENT_ID"], fixed["COINBARPAY_SECRET_KEY"])
        ),
        cryptoprocessing=(
            ProviderKeys(cp.api_key or "", cp.secret or "", source="settings")
            if cp.configured
            else ProviderKeys(fixed["CRYPTOPROCESSING_API_KEY"], fixed["CRYPTOPROCESSING_SECRET"])
        ),
    )
