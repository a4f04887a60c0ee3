"""The long-lived objects a process needs: settings, the database and the provider adapters."""

from __future__ import annotations

from dataclasses import dataclass

from ipn.config import Settings
from ipn.db import Database
from ipn.providers import Provider, build_providers


@dataclass
class Services:
    settings: Settings
    db: Database
    providers: dict[str, Provider]

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        return cls(settings, Database(settings.database_url), build_providers(settings))

    def provider(self, name: str) -> Provider:
        return self.providers[name]
