"""A per-provider call budget shared by every worker: a counter per provider, account and period
in the database, taken with one conditional upsert so two workers can never both take the last
call, and a batch's calls with one statement."""

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
    return take_many(db, provider, limit, period, now, 1, account=account) == 1


def take_many(
    db: Database,
    provider: str,
    limit: int,
    period: str,
    now: datetime,
    wanted: int,
    *,
    account: str = DEFAULT_ACCOUNT,
) -> int:
    """Take up to `wanted` calls of an account's budget in one statement; how many it got.

    The counter moves by the whole `wanted` while any call is left, so each taker owns the
    range [before, before + wanted) of it, and gets the part of that range below the limit:
    racing takers, serialized on the row, never get more than the limit between them. (RETURNING
    sees only the new count, from which `before` follows.) The count may pass the limit by less
    than one batch; readers clamp it."""
    if wanted <= 0:
        return 0
    insert = pg_insert if db.is_postgresql else sqlite_insert
    key = period_key(period, now)
    statement = (
        insert(ProviderCalls)
        .values(provider=provider, account=account, period=key, calls=wanted)
        .on_conflict_do_update(
            index_elements=["provider", "account", "period"],
            set_={"calls": ProviderCalls.calls + wanted},
            where=ProviderCalls.calls < limit,
        )
        .returning(ProviderCalls.calls)
    )
    with db.engine.begin() as connection:
        after = connection.execute(statement).scalar_one_or_none()
    if after is None:
        return 0
    before = after - wanted
    return max(0, min(wanted, limit - before))
