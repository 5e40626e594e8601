"""Strict reading of the numbers clients and admins send: money and whole-number limits.

`Decimal("1e999999999")` is a valid Decimal whose arithmetic overflows later (a 500 on every
request of that user), and `Decimal("1e-999999999")` makes `quantize`/`format` build a billion
digits with the event loop blocked. So money is accepted only as what a person writes: a JSON
number or a string of ASCII digits with an optional point (no exponent, sign, NaN, Infinity,
underscores, spaces or non-ASCII digits), between 0 and `MAX_USD`, with at most `MAX_PLACES`
decimal places. The same rules judge values already stored by an older version (`stored_usd`).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

MAX_USD = Decimal(1_000_000_000)
MAX_PLACES = 12
MAX_COUNT = 1_000_000_000
_PLAIN = re.compile(r"[0-9]{1,10}(?:\.[0-9]{0,12})?|\.[0-9]{1,12}", re.ASCII)
USD_RULE = f"a plain number of US dollars from 0 to {MAX_USD:,}, at most {MAX_PLACES} decimal places (e.g. 25 or \"12.50\")"
COUNT_RULE = f"a whole number from 0 to {MAX_COUNT:,}"


class AmountError(ValueError):
    """The value breaks the rules; the message says which rule, for the caller to name the field."""


def parse_usd(value: Any) -> Decimal:
    """An exact amount of US dollars from a JSON number (int, or Decimal: the API and config parse decimals
    exactly) or a decimal string. A float is refused: it cannot hold money exactly."""
    if isinstance(value, float):
        raise TypeError("money must not pass through float; parse JSON and YAML decimals as Decimal")
    if isinstance(value, bool) or not isinstance(value, (int, str, Decimal)):
        raise AmountError(f"must be {USD_RULE}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_USD:
            raise AmountError(f"must be {USD_RULE}")
        return Decimal(value)
    if isinstance(value, Decimal):
        if not value.is_finite() or value < 0 or value > MAX_USD or _places(value) > MAX_PLACES:
            raise AmountError(f"must be {USD_RULE}")
        return value
    text = str(value)
    if len(text) > 24 or not _PLAIN.fullmatch(text):
        raise AmountError(f"must be {USD_RULE}")
    amount = Decimal(text)
    if amount > MAX_USD:
        raise AmountError(f"must be {USD_RULE}")
    return amount


def parse_count(value: Any) -> int:
    """A whole-number limit (requests, tokens, concurrency): a JSON integer from 0 to `MAX_COUNT`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise AmountError(f"must be {COUNT_RULE}")
    return value


def stored_usd(value: Any) -> Decimal | None:
    """A stored amount (text such as "12.5" or "1E-7"), or None when it is out of range or has more than
    `MAX_PLACES` places (written by an older version): such a value is treated as unset."""
    if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        amount = Decimal(value)
    elif isinstance(value, str) and len(value) <= 40:
        try:
            amount = Decimal(value)
        except ArithmeticError:
            return None
    else:
        return None
    if not amount.is_finite() or not 0 <= amount <= MAX_USD or _places(amount) > MAX_PLACES:
        return None
    return amount


def stored_count(value: Any) -> int | None:
    try:
        return parse_count(value)
    except AmountError:
        return None


def _places(amount: Decimal) -> int:
    """Decimal places of a finite amount (`Decimal("1.50")` has 2)."""
    exponent = amount.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0
