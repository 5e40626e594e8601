"""What a user may do and the one rule that refuses: limits, counters' snapshot, `first_refusal`, the refusal's error.

Checks run cheapest first (SPEC §6): requests per minute / hour and max concurrent (429), tokens per
hour (429), then the daily and monthly budget (402). Both counter backends apply exactly these rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, Protocol

from gateway.core.amounts import stored_count, stored_usd
from gateway.core.clock import iso
from gateway.core.config import TierConfig
from gateway.core.errors import PaymentRequired, RateLimited
from gateway.core.money import ZERO, to_pico
from gateway.core.windows import (
    SlidingWindow,
    frees_at,
    period_end,
)

MINUTE, HOUR = 60.0, 3600.0
MINUTE_BUCKET_S, HOUR_BUCKET_S = SlidingWindow(MINUTE).bucket_s, SlidingWindow(HOUR).bucket_s
REQUEST_LIMITS = ("requests_per_minute", "requests_per_hour", "max_concurrent")
BUDGETS = {"daily_budget_usd": "day", "monthly_budget_usd": "month"}
UNLIMITED = 1 << 62  # above any count or amount: a limit that is not set, as the counters' hot path compares it


@dataclass(frozen=True, slots=True)
class Limits:
    """One user's limits: the tier's, with the admin's per-user overrides on top (None = unlimited)."""

    requests_per_minute: int | None = None
    requests_per_hour: int | None = None
    max_concurrent: int | None = None
    tokens_per_hour: int | None = None
    daily_budget_usd: Decimal | None = None
    monthly_budget_usd: Decimal | None = None
    # Derived once for the counters: whether requests hold reservations (any budget), and each
    # limit as an int to compare with no None test (`UNLIMITED` when not set; money in picodollars).
    budgeted: bool = field(init=False, compare=False)
    rpm_cap: int = field(init=False, compare=False)
    rph_cap: int = field(init=False, compare=False)
    concurrent_cap: int = field(init=False, compare=False)
    tokens_cap: int = field(init=False, compare=False)
    daily_cap_pico: int = field(init=False, compare=False)
    monthly_cap_pico: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        def cap(value: int | None) -> int:
            return UNLIMITED if value is None else value

        daily, monthly = self.daily_budget_usd, self.monthly_budget_usd
        for name, value in (
            ("budgeted", daily is not None or monthly is not None),
            ("rpm_cap", cap(self.requests_per_minute)), ("rph_cap", cap(self.requests_per_hour)),
            ("concurrent_cap", cap(self.max_concurrent)), ("tokens_cap", cap(self.tokens_per_hour)),
            ("daily_cap_pico", UNLIMITED if daily is None else to_pico(daily)),
            ("monthly_cap_pico", UNLIMITED if monthly is None else to_pico(monthly)),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def of(cls, tier: TierConfig, overrides: dict[str, Any] | None = None) -> "Limits":
        values: dict[str, Any] = {f.name: getattr(tier, f.name) for f in fields(cls) if f.init}
        for name, value in (overrides or {}).items():
            if name not in values or value is None:
                continue
            checked = stored_usd(value) if name.endswith("_usd") else stored_count(value)
            if checked is not None:  # out of range (an older version's value): unset, reported at start-up
                values[name] = checked
        return cls(**values)


@dataclass(slots=True)
class Snapshot:
    """A user's counters at one moment, as either backend reads them (money in Decimal).

    Bucket dicts are in ascending bucket order, so the oldest bucket is the first key."""

    minute: dict[int, int] = field(default_factory=dict)  # bucket → requests
    hour: dict[int, int] = field(default_factory=dict)  # bucket → requests
    tokens: dict[int, int] = field(default_factory=dict)  # bucket → tokens
    inflight: int = 0
    reserved: Decimal = ZERO
    spend: dict[str, Decimal] = field(default_factory=dict)  # "day"/"week"/"month"/"all" → charged

    def used(self, name: str) -> int | Decimal:
        if name == "requests_per_minute":
            return sum(self.minute.values())
        if name == "requests_per_hour":
            return sum(self.hour.values())
        if name == "max_concurrent":
            return self.inflight
        if name == "tokens_per_hour":
            return sum(self.tokens.values())
        return self.spent(name)

    def spent(self, budget: str) -> Decimal:
        """What counts against a budget: its period's spend plus what requests in flight hold."""
        return self.spend.get(BUDGETS[budget], ZERO) + self.reserved


def first_refusal(limits: Limits, snapshot: Snapshot, *, free: bool) -> str | None:
    """The name of the first limit (in check order) that refuses one more request, or None.

    The Redis Lua script (`limits_redis.ADMIT`) and the memory backend's hot path
    (`limits_memory._UserCounters.acquire`) apply exactly these rules. Budgets compare
    in whole picodollars, as both backends count money.
    """
    for name in (*REQUEST_LIMITS, "tokens_per_hour"):
        value = getattr(limits, name)
        if value is not None and snapshot.used(name) >= value:
            return name
    if not free:
        for name in BUDGETS:
            value = getattr(limits, name)
            if value is not None and to_pico(snapshot.spent(name)) >= to_pico(value):
                return name
    return None


def frees_up_at(name: str, limits: Limits, snapshot: Snapshot, now: float) -> float:
    """When the named limit lets a request through again (as far as can be known now)."""
    value = getattr(limits, name)
    if name == "requests_per_minute":
        return frees_at(snapshot.minute, MINUTE_BUCKET_S, value, now)
    if name == "requests_per_hour":
        return frees_at(snapshot.hour, HOUR_BUCKET_S, value, now)
    if name == "tokens_per_hour":
        return frees_at(snapshot.tokens, HOUR_BUCKET_S, value, now)
    if name == "max_concurrent":
        return now + 1  # a request in flight may end any moment
    return period_end(BUDGETS[name], now).timestamp()


class Refusal(Exception):
    """A backend's answer when a limit refuses: which one, and the counters as it saw them."""

    def __init__(self, name: str, snapshot: Snapshot) -> None:
        super().__init__(name)
        self.name = name
        self.snapshot = snapshot


class Counters(Protocol):
    """Where the counters live: this process's memory, or Redis shared by every instance.

    Money goes in as whole picodollars (`money.to_pico`): reservations and charges are ints."""

    async def acquire(self, user_id: str, limits: Limits, reserve: int, free: bool, now: float) -> Any:
        """Atomically: count the request and hold its reservation, or raise `Refusal`.

        Returns the hold: what `finish` needs to let go of it. A backend that never waits may also
        offer `user(user_id)`: that user's counters with `acquire` and `finish` as plain methods
        (the same without the user id), which the limiter then keeps on the user's plan."""

    def finish(self, user_id: str, hold: Any, at: float, amount: int, tokens: int, now: float) -> None:
        """The request is over: it no longer counts as in flight, its reservation is dropped, and
        its charge (`spend(at, amount, tokens, now)`) is counted, in one step."""

    def spend(self, user_id: str, at: float, amount: int, tokens: int, now: float) -> None:
        """Add a charge (picodollars, made by a request started at `at`) and tokens used now."""

    async def snapshot(self, user_id: str, now: float) -> Snapshot: ...

    async def seed(self, spend: dict[str, dict[str, Decimal]], now: float) -> None:
        """Spend per period ("day", "week", "month", "all") per user, from the database at start-up."""

    async def close(self) -> None: ...


def _epoch_ms(ts: float) -> str:
    return str(int(math.ceil(ts * 1000)))


def _money(amount: Decimal) -> str:
    return f"${amount.normalize():f}" if amount == amount.to_integral() else f"${amount:f}"


def refusal(name: str, limits: Limits, snapshot: Snapshot, now: float) -> RateLimited | PaymentRequired:
    """The error for a refused request: which limit, its value, what is used, when it frees up."""
    value = getattr(limits, name)
    used = snapshot.used(name)
    at = frees_up_at(name, limits, snapshot, now)
    wait = max(1, math.ceil(at - now))
    metadata = {
        "error_type": "budget_exceeded" if name in BUDGETS else "rate_limit_exceeded",
        "limit": name,
        "value": str(value),
        "used": str(used),
        "resets_at": iso(at),
    }
    if name in BUDGETS:
        period = "day" if name == "daily_budget_usd" else "month"
        in_flight = f" ({_money(snapshot.reserved)} of it held by requests in flight)" if snapshot.reserved else ""
        return PaymentRequired(
            f"Your {'daily' if period == 'day' else 'monthly'} budget is spent: {name} is {_money(value)} and "
            f"{_money(snapshot.spent(name))} is used{in_flight}. It resets at {iso(at)} (start of the next UTC {period}); "
            "ask your admin to raise it, or use a free model (`:free`).",
            param=name,
            metadata=metadata,
        )
    what = {
        "requests_per_minute": f"{used} requests in the last minute",
        "requests_per_hour": f"{used} requests in the last hour",
        "max_concurrent": f"{used} requests in flight",
        "tokens_per_hour": f"{used} tokens in the last hour",
    }[name]
    headers = {
        "retry-after": str(wait),
        "x-ratelimit-limit": str(value),
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": _epoch_ms(at),
    }
    return RateLimited(
        f"Rate limit reached: {name} is {value} for your account ({what}). "
        f"It frees up at {iso(at)} (in {wait} s); retry after that.",
        param=name,
        headers=headers,
        metadata=metadata,
    )
