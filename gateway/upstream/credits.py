"""A user's OpenRouter credits: looked up with their own key, judged against the low-balance line.

Why the two sources: OpenRouter's `GET /credits` gives the account's `total_credits` and
`total_usage`, but its spec says only management keys may read it; where the user's key
may not, the key's own `GET /key` `limit` and `usage` are what that key can spend, so
they stand in (`source: "key"`). Money stays Decimal from the upstream JSON to the reply.

Why the flag: OpenRouter checks billing more often when a balance is in single-digit
dollars, which adds latency to every request (OPENROUTER.md §7), so the gateway tells
users under `accounting.low_balance_usd` (default $10) before they notice.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Awaitable, Callable

from gateway.core.money import to_decimal
from gateway.upstream.client import UpstreamClient, UpstreamConnectionError

TOP_UP_URL = "https://openrouter.ai/credits"
Pace = Callable[[], Awaitable[None]]


class CreditsUnavailable(Exception):
    """OpenRouter could not tell us the credits now (unreachable or an unexpected answer)."""


class KeyRejected(CreditsUnavailable):
    """OpenRouter refused the user's key (deleted, disabled or invalid)."""


@dataclass(frozen=True, slots=True)
class Credits:
    total_credits: Decimal | None  # None: the key has no limit and may not read the account's credits
    total_usage: Decimal
    source: str  # "credits" (GET /credits) or "key" (GET /key limit and usage)

    @property
    def balance(self) -> Decimal | None:
        return None if self.total_credits is None else self.total_credits - self.total_usage


async def _no_pace() -> None:
    return None


async def _call(upstream: UpstreamClient, path: str, key: str, pace: Pace) -> tuple[int, Any]:
    await pace()
    try:
        return await upstream.call("GET", path, key=key)
    except UpstreamConnectionError as exc:
        raise CreditsUnavailable(f"OpenRouter could not be reached ({exc})") from None


def _data(body: Any) -> dict[str, Any] | None:
    data = body.get("data") if isinstance(body, dict) else None
    return data if isinstance(data, dict) else None


async def fetch_credits(upstream: UpstreamClient, key: str, *, pace: Pace = _no_pace) -> Credits:
    """The credits the key can see: `/credits` where it may read it, else its `/key` limit and usage."""
    status, body = await _call(upstream, "/credits", key, pace)
    data = _data(body)
    if status == 200 and data is not None:
        total, usage = to_decimal(data.get("total_credits")), to_decimal(data.get("total_usage"))
        if total is not None and usage is not None:
            return Credits(total, usage, "credits")
    if status == 401:
        raise KeyRejected("OpenRouter rejected the connected key (HTTP 401)")
    status, body = await _call(upstream, "/key", key, pace)
    data = _data(body)
    if status in (401, 403):
        raise KeyRejected(f"OpenRouter rejected the connected key (HTTP {status})")
    if status != 200 or data is None:
        raise CreditsUnavailable(f"OpenRouter answered HTTP {status} for the key's credits")
    return Credits(to_decimal(data.get("limit")), to_decimal(data.get("usage")) or Decimal(0), "key")


def credits_view(
    total_credits: Decimal | None, total_usage: Decimal | None, *, source: str | None, threshold: Decimal,
    synced_at: str | None = None,
) -> dict[str, Any]:
    """OpenRouter's `data` shape plus `balance`, `low_balance` and a `note` saying why it matters."""
    usage = total_usage if total_usage is not None else Decimal(0)
    balance = None if total_credits is None else total_credits - usage
    low = balance is not None and balance < threshold
    if low:
        note = (f"Your OpenRouter balance (${balance}) is under ${threshold}: OpenRouter checks billing more often "
                f"on low balances, which adds latency to every request. Top up at {TOP_UP_URL}.")
    elif balance is None:
        note = ("This key has no spending limit and may not read the account's credits "
                "(OpenRouter's /credits needs a management key), so the balance is unknown.")
    else:
        note = None
    return {
        "total_credits": total_credits,
        "total_usage": usage,
        "balance": balance,
        "low_balance": low,
        "low_balance_threshold_usd": threshold,
        "note": note,
        "source": source,
        "synced_at": synced_at,
    }
