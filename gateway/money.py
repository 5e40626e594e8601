"""Money rules in one place: Decimal parsing and the tier markup.

Money is `decimal.Decimal` from parsing to storage to reports; a float never touches it.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.config import TierConfig

ZERO = Decimal(0)
FREE_MODEL_REASON = "free_model"


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


def markup_for(provider_cost: Decimal, tier_name: str, tier: TierConfig, *, free: bool) -> tuple[Decimal, str]:
    """`provider_cost × markup_pct / 100` and its reason; free models always carry no markup."""
    if free:
        return ZERO, FREE_MODEL_REASON
    pct = tier.markup_pct
    return provider_cost * pct / 100, f"{tier_name}_tier_{pct.normalize():f}pct"


def charged(provider_cost: Decimal, tier: TierConfig, *, free: bool) -> Decimal:
    """What the user pays: provider cost plus markup (what budgets count)."""
    return ZERO if free else provider_cost + provider_cost * tier.markup_pct / 100
