"""Declarative base and the column types all tables share: exact money, UTC times, sortable ids."""

from __future__ import annotations

import enum
import os
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, DateTime, Dialect, Enum, Integer, MetaData, Numeric, String
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

# CoinbarPay answers amounts with 20 decimals; 24 keeps every digit a provider sends.
MONEY_SCALE = 24
MONEY_PRECISION = 48

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# SQLite autoincrements only an INTEGER PRIMARY KEY; PostgreSQL gets 64 bits.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id(prefix: str) -> str:
    """A ULID-style id: 48 bits of milliseconds then 80 random bits, so ids sort by creation."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_CROCKFORD[digit])
    return prefix + "".join(reversed(chars)).lower()


def enum_column(cls: type[enum.Enum], length: int = 16) -> Enum:
    """Enums are stored by value as plain strings, portable across backends."""
    return Enum(
        cls,
        native_enum=False,
        length=length,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class Money(TypeDecorator[Decimal]):
    """An exact decimal: NUMERIC(48, 24) on PostgreSQL, text on SQLite (never REAL).

    Floats are refused outright, and so are values finer than 24 decimals, which a NUMERIC
    column would round without a word.
    """

    impl = Numeric(MONEY_PRECISION, MONEY_SCALE)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(64))
        return dialect.type_descriptor(Numeric(MONEY_PRECISION, MONEY_SCALE, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, Decimal):
            raise TypeError(f"money must be a Decimal, not {type(value).__name__}")
        if not value.is_finite():
            raise ValueError(f"money must be finite, not {value}")
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -MONEY_SCALE:
            raise ValueError(f"money has more than {MONEY_SCALE} decimals: {value}")
        return format(value, "f") if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return value if isinstance(value, Decimal) else Decimal(value)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend; naive datetimes are refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: times are stored in UTC and must say so")
        value = value.astimezone(UTC)
        # SQLite keeps text; naive UTC text sorts and compares correctly.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), Decimal: Money()}
