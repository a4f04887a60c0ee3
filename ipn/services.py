"""The long-lived objects a process needs: settings, the database and the provider adapters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ipn.config import Settings
from ipn.db import Database
from ipn.events import outbox
from ipn.providers import Provider, build_providers


def _nowhere(delivery_ids: list[int]) -> None:
    """Until a queue is attached, new deliveries wait for `deliver_due` to find them."""


@dataclass
class Services:
    settings: Settings
    db: Database
    providers: dict[str, Provider]
    # Called after each commit that wrote deliveries of merchant events, with their ids.
    wake_deliveries: Callable[[list[int]], None] = field(default=_nowhere)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        services = cls(settings, Database(settings.database_url), build_providers(settings))
        outbox.install(services.db.sessions, settings.events)
        outbox.wake_after_commit(
            services.db.sessions, lambda delivery_ids: services.wake_deliveries(delivery_ids)
        )
        return services

    def provider(self, name: str) -> Provider:
        return self.providers[name]
