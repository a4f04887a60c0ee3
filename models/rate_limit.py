"""Calls made to each provider per time window, counted in the database so every worker shares
one budget (CoinbarPay allows a thousand calls a day per client)."""

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base


class ProviderCalls(Base):
    __tablename__ = "provider_calls"

    provider: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Each merchant account has its own budget at the provider.
    account: Mapped[str] = mapped_column(
        String(40), primary_key=True, default="default", server_default="default"
    )
    # The period's start as text, e.g. "day:2026-11-21" or "minute:2026-11-21T10:05".
    period: Mapped[str] = mapped_column(String(32), primary_key=True)
    calls: Mapped[int] = mapped_column(default=0)
