"""A per-provider call budget shared by every worker: a counter per provider and period in the
database, taken with one conditional upsert so two workers can never both take the last call."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ipn.config import DEFAULT_ACCOUNT
from ipn.db import Database
from models import ProviderCalls


def period_key(period: str, now: datetime) -> str:
    if period == "day":
        return f"day:{now:%Y-%m-%d}"
    return f"minute:{now:%Y-%m-%dT%H:%M}"


def take(
    db: Database,
    provider: str,
    limit: int,
    period: str,
    now: datetime,
    *,
    account: str = DEFAULT_ACCOUNT,
) -> bool:
    """Use one call of an account's budget for the current period; False when it is spent."""
    insert = pg_insert if db.is_postgresql else sqlite_insert
    key = period_key(period, now)
    statement = (
        insert(ProviderCalls)
        .values(provider=provider, account=account, period=key, calls=1)
        .on_conflict_do_update(
            index_elements=["provider", "account", "period"],
            set_={"calls": ProviderCalls.calls + 1},
            where=ProviderCalls.calls < limit,
        )
        .returning(ProviderCalls.calls)
    )
    with db.engine.begin() as connection:
        return connection.execute(statement).scalar_one_or_none() is not None
