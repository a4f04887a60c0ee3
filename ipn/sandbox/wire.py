"""Exact JSON and times on the sandbox's wire: Decimals in and out as JSON numbers, never floats."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any


def dumps(value: Any) -> str:
    """Compact JSON (no spaces, keys in insertion order, non-ASCII as is) with exact Decimals.

    This is what JavaScript's `JSON.stringify` writes for the same object, which matters where a
    signature covers the bytes. The standard encoder cannot write a Decimal as a number without a
    float in between, hence this small writer.
    """
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts)


def dump_bytes(value: Any) -> bytes:
    return dumps(value).encode("utf-8")


def loads(body: bytes | str) -> Any:
    """JSON with every number that has a point or exponent as a Decimal; ValueError if not JSON."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        return json.loads(text, parse_float=Decimal, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from None


def number(value: Decimal | int) -> str:
    """A number as JSON writes it: plain digits, no exponent, exactly the Decimal's digits."""
    if isinstance(value, bool):
        raise TypeError("a bool is not an amount")
    if isinstance(value, int):
        return str(value)
    if not value.is_finite():
        raise ValueError(f"{value} has no JSON form")
    text = format(value, "f")
    return "0" if text == "-0" else text


def iso(moment: datetime, *, millis: bool = False) -> str:
    """ISO 8601 in UTC with a `Z`, to the second or the millisecond."""
    utc = moment.astimezone(UTC)
    if millis:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(moment: datetime) -> int:
    return int(moment.timestamp())


def epoch_millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _write(value: Any, parts: list[str]) -> None:
    if value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, str):
        parts.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, Decimal | int):
        parts.append(number(value))
    elif isinstance(value, float):
        raise TypeError(f"refusing to write the float {value!r}: amounts are Decimals")
    elif isinstance(value, Mapping):
        parts.append("{")
        for index, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                raise TypeError(f"JSON keys are strings, not {type(key).__name__}")
            if index:
                parts.append(",")
            parts.append(json.dumps(key, ensure_ascii=False))
            parts.append(":")
            _write(item, parts)
        parts.append("}")
    elif isinstance(value, list | tuple):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _write(item, parts)
        parts.append("]")
    else:
        raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")
