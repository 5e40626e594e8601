"""Money rules in one place: Decimal parsing and the tier markup.

Money is `decimal.Decimal` from parsing to storage to reports; a float never touches it.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

import orjson

ZERO = Decimal(0)
FREE_MODEL_REASON = "free_model"
PICO = Decimal(10) ** 12
_NUMBER_TEXT = rb'"\s*:\s*(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)'  # after a key: a JSON number, exactly
_KEY_NUMBER: dict[str, re.Pattern[bytes]] = {}


def to_decimal(value: Any) -> Decimal | None:
    """Decimal from upstream JSON (already Decimal or int) or stored text; floats are refused."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        raise TypeError("money must not pass through float; parse JSON with parse_float=Decimal")
    try:
        result = Decimal(value) if isinstance(value, (int, Decimal)) else Decimal(str(value))
    except InvalidOperation:
        return None
    return result if result.is_finite() else None


def markup_for(provider_cost: Decimal, tier_name: str, markup_pct: Decimal, *, free: bool) -> tuple[Decimal, str]:
    """The one rule of what a user pays on top of the provider's cost: `provider_cost × markup_pct / 100`
    and its reason, none on a free model. What they are charged is the cost plus this (`charged`)."""
    if free:
        return ZERO, FREE_MODEL_REASON
    return provider_cost * markup_pct / 100, f"{tier_name}_tier_{markup_pct.normalize():f}pct"


def charged(provider_cost: Decimal, markup_pct: Decimal, *, free: bool = False) -> Decimal:
    """Provider cost plus markup (what budgets count), by `markup_for`."""
    return provider_cost + markup_for(provider_cost, "", markup_pct, free=free)[0]


def to_pico(amount: Decimal, rounding: str = ROUND_HALF_EVEN) -> int:
    """Whole picodollars (10⁻¹² USD), the unit the limit counters add in.

    Counters add integers (exact, and far cheaper than Decimal on the request path, or atomic
    in Redis); charges round half-even, reservations round up (`ROUND_CEILING`) so none holds
    less than its estimate. Records, reports and bills stay exact Decimal."""
    return int((amount * PICO).to_integral_value(rounding))


def from_pico(value: Any) -> Decimal:
    """Decimal dollars from whole picodollars (an int, or its text as Redis returns it)."""
    return Decimal(int(value or 0)) / PICO


def dumps(payload: Any) -> bytes:
    """JSON with Decimals written as exact numbers (never through float): API bodies and upstream payloads."""
    body = orjson.dumps(payload, default=_mark)
    if b'"\\u0000D:' in body:
        body = _unmark(body)
    return body


_MARK = "\x00D:"


def _mark(value: Any) -> Any:
    if isinstance(value, Decimal):
        return _MARK + format(value, "f")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _unmark(body: bytes) -> bytes:
    out = []
    start = 0
    token = b'"\\u0000D:'
    while True:
        index = body.find(token, start)
        if index < 0:
            out.append(body[start:])
            return b"".join(out)
        end = body.index(b'"', index + len(token))
        out.append(body[start:index])
        out.append(body[index + len(token) : end])
        start = end + 1


def number_after(key: str) -> re.Pattern[bytes]:
    """`"key": <number>` in JSON text, the number's exact text as group 1 (where orjson would give a float,
    money is read from this). Compiled once per key; the keys are a bounded set (the upstream's field names)."""
    pattern = _KEY_NUMBER.get(key)
    if pattern is None:
        pattern = re.compile(rb'"' + re.escape(key.encode()) + _NUMBER_TEXT)
        if len(_KEY_NUMBER) < 256:
            _KEY_NUMBER[key] = pattern
    return pattern
