"""The long-lived objects a process needs: settings, the database and the provider adapters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ipn.config import DEFAULT_ACCOUNT, Settings
from ipn.db import Database
from ipn.errors import UnknownAccount
from ipn.events import outbox
from ipn.providers import Provider, build_accounts, build_providers, provider_sessions


def _nowhere(delivery_ids: list[int]) -> None:
    """Until a queue is attached, new deliveries wait for `deliver_due` to find them."""


@dataclass
class Services:
    settings: Settings
    db: Database
    # Each provider's `default` account, by provider.
    providers: dict[str, Provider]
    # The further accounts of IPN_ACCOUNTS_FILE, by (provider, account).
    accounts: dict[tuple[str, str], Provider] = field(default_factory=dict)
    # Called after each commit that wrote deliveries of merchant events, with their ids.
    wake_deliveries: Callable[[list[int]], None] = field(default=_nowhere)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        sessions = provider_sessions(settings)
        services = cls(
            settings,
            Database(settings.database_url),
            build_providers(settings, sessions=sessions),
            build_accounts(settings, sessions=sessions),
        )
        outbox.install(services.db.sessions, settings.events)
        outbox.wake_after_commit(
            services.db.sessions, lambda delivery_ids: services.wake_deliveries(delivery_ids)
        )
        return services

    def provider(self, name: str, account: str = DEFAULT_ACCOUNT) -> Provider:
        """The adapter for one account of a provider; UnknownAccount if it is not configured."""
        try:
            if account == DEFAULT_ACCOUNT:
                return self.providers[name]
            return self.accounts[(name, account)]
        except KeyError:
            raise UnknownAccount(name, account) from None
