"""Rate limits, token limits and budgets with reservations: the proxy's `Admission` hook.

Checks run cheapest first, after the proxy's own (stop → suspended → no key): requests
per minute / hour and max concurrent (429), tokens per hour (429), then the daily and
monthly budget (402). A refusal writes nothing and says which limit, its value and when
it frees up.

Budgets hold under concurrency because every admitted paid request reserves its
estimated charge (prompt size and `max_tokens` at catalogue prices, plus the tier
markup) before it is forwarded, and a request is admitted only while
`spent + reserved < budget`. The reservation is swapped for the real charge when the
outcome is known, so N concurrent requests against a nearly spent budget overrun it by
at most the last admitted request's cost. Free models reserve nothing but count against
the request, concurrency and token limits.

Counters live off the database: in memory for one instance (`MemoryCounters`), in Redis
with `redis.url` set (`RedisCounters`, one Lua script per admission, so limits hold
across instances without read-modify-write races). Spend is loaded once at start-up
(`store.usage.spend_since`), then kept up to date as tickets are released (with the
charge accounting recorded) and from the ledger's corrections once costs settle.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from functools import lru_cache
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Protocol

from gateway.auth import Principal
from gateway.catalog import FREE_SUFFIX, ModelPrice
from gateway.clock import Clock, iso, system_clock
from gateway.config import Config, TierConfig
from gateway.errors import PaymentRequired, RateLimited
from gateway.money import ZERO, charged, to_decimal
from gateway.proxy import ProxyRequest
from gateway.sse import Observation
from gateway.windows import PERIODS, SlidingWindow, expiry, frees_at, period_end, period_start

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.limits")

MINUTE, HOUR = 60.0, 3600.0
MINUTE_BUCKET_S, HOUR_BUCKET_S = SlidingWindow(MINUTE).bucket_s, SlidingWindow(HOUR).bucket_s
REQUEST_LIMITS = ("requests_per_minute", "requests_per_hour", "max_concurrent")
BUDGETS = {"daily_budget_usd": "day", "monthly_budget_usd": "month"}


@dataclass(frozen=True, slots=True)
class Limits:
    """One user's limits: the tier's, with the admin's per-user overrides on top (None = unlimited)."""

    requests_per_minute: int | None = None
    requests_per_hour: int | None = None
    max_concurrent: int | None = None
    tokens_per_hour: int | None = None
    daily_budget_usd: Decimal | None = None
    monthly_budget_usd: Decimal | None = None
    budgeted: bool = field(init=False, compare=False)  # any budget: requests then hold reservations

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgeted", self.daily_budget_usd is not None or self.monthly_budget_usd is not None)

    @classmethod
    def of(cls, tier: TierConfig, overrides: dict[str, Any] | None = None) -> "Limits":
        values: dict[str, Any] = {f.name: getattr(tier, f.name) for f in fields(cls) if f.init}
        for name, value in (overrides or {}).items():
            if name not in values or value is None:
                continue
            if name.endswith("_usd"):
                try:
                    values[name] = Decimal(str(value))
                except InvalidOperation:
                    log.warning("ignoring unreadable override %s=%r", name, value)
            elif isinstance(value, int) and not isinstance(value, bool):
                values[name] = value
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
        return self.spend.get(BUDGETS[name], ZERO) + self.reserved


def first_refusal(limits: Limits, snapshot: Snapshot, *, free: bool) -> str | None:
    """The name of the first limit (in check order) that refuses one more request, or None.

    The Redis Lua script (`limits_redis.ADMIT`) and the memory backend's hot path
    (`limits_memory.MemoryCounters.acquire_now`) apply exactly these rules.
    """
    for name in (*REQUEST_LIMITS, "tokens_per_hour"):
        value = getattr(limits, name)
        if value is not None and snapshot.used(name) >= value:
            return name
    if not free:
        for name in BUDGETS:
            value = getattr(limits, name)
            if value is not None and snapshot.used(name) >= value:
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
    """Where the counters live: this process's memory, or Redis shared by every instance."""

    async def acquire(
        self, user_id: str, limits: Limits, reserve: Decimal, free: bool, now: float
    ) -> tuple[Any, list[tuple[bytes, bytes]]]:
        """Atomically: count the request and hold its reservation, or raise `Refusal`.

        Returns the hold (what `finish` needs to let go of it) and the request's X-RateLimit-*
        headers (`rate_headers`, counting this request). A backend that never waits may also
        offer the same as a plain method, `acquire_now`, which the limiter then calls instead."""

    def finish(self, user_id: str, hold: Any, at: float, amount: Decimal, tokens: int, now: float) -> None:
        """The request is over: it no longer counts as in flight, its reservation is dropped, and
        its charge (`spend(at, amount, tokens, now)`) is counted, in one step."""

    def spend(self, user_id: str, at: float, amount: Decimal, tokens: int, now: float) -> None:
        """Add a charge (made by a request started at `at`) and tokens used now."""

    async def snapshot(self, user_id: str, now: float) -> Snapshot: ...

    async def seed(self, spend: dict[str, dict[str, Decimal]], now: float) -> None:
        """Spend per period ("day", "week", "month", "all") per user, from the database at start-up."""

    async def close(self) -> None: ...


class LimitTicket:
    """An admitted request's hold on its limits: X-RateLimit-* headers and one release."""

    __slots__ = ("headers", "_limiter", "_principal", "_request", "_hold", "_free", "_released")

    def __init__(self, limiter: "Limiter", principal: Principal, request: ProxyRequest, hold: Any, free: bool,
                 headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self._limiter = limiter
        self._principal = principal
        self._request = request
        self._hold = hold
        self._free = free
        self._released = False

    def release(self, observation: Observation | None) -> None:
        """Let go of the hold and count the real charge: what accounting recorded on the request
        (`request.charged`) or, with no ledger, what the response's usage says."""
        if self._released:
            return
        self._released = True
        limiter, request = self._limiter, self._request
        usage = observation.usage if observation is not None else None
        try:
            amount, tokens, now = ZERO, 0, request.ended or request.started
            if usage is not None:
                prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
                tokens = (prompt if type(prompt) is int and prompt > 0 else 0) + (
                    completion if type(completion) is int and completion > 0 else 0)  # counted as the response ended
                if limiter.ledger_attached:
                    amount = request.charged or ZERO
                else:
                    cost = to_decimal(usage.get("cost")) or ZERO
                    if cost > 0:
                        amount = charged(cost, limiter.config.tier(self._principal.tier), free=self._free)
            elif limiter.ledger_attached and request.charged:
                amount = request.charged  # recorded without usage (e.g. a mid-stream error)
            limiter.counters.finish(self._principal.user_id, self._hold, request.started, amount, tokens, now)
        except Exception:
            log.exception("releasing the limits of user %s failed", self._principal.user_id)


class Limiter:
    """The `Admission` the proxy calls; never touches the database on the request path."""

    def __init__(self, config: Config, counters: Counters, catalog: Any, *, clock: Clock = system_clock) -> None:
        self.config = config
        self.counters = counters
        self.catalog = catalog
        self.clock = clock
        self.default_estimate = config.accounting.default_estimate_usd
        self.ledger_attached = False  # then a request's charge is what accounting recorded (`request.charged`)
        self._limits: dict[str, tuple[Principal, Limits]] = {}
        self._quotes: dict[tuple[int, str], Quote] = {}  # (id of a catalogue price, tier) → its quote
        self._acquire_now = getattr(counters, "acquire_now", None)  # no coroutine per request in memory

    def limits_of(self, principal: Principal) -> Limits:
        """The user's limits, computed once per cached principal (a change to the user replaces it)."""
        cached = self._limits.get(principal.user_id)
        if cached is not None and cached[0] is principal:
            return cached[1]
        limits = Limits.of(self.config.tier(principal.tier), principal.overrides)
        if len(self._limits) > 100_000:
            self._limits.clear()
        self._limits[principal.user_id] = (principal, limits)
        return limits

    async def admit(self, principal: Principal, request: ProxyRequest) -> LimitTicket:
        limits = self.limits_of(principal)
        body, model = request.body, request.model
        price = self.catalog.price(model)  # one catalogue look-up serves "is it free" and the estimate
        free = model is not None and (model.endswith(FREE_SUFFIX) or (price is not None and price.free))
        fallbacks = _fallback_models(body) if "models" in body else ()
        if free and fallbacks:
            free = all(self.catalog.is_free(m) for m in fallbacks)
        if free or not limits.budgeted:
            reserve = ZERO  # reservations only matter against a budget
        else:
            reserve = self._quote(price, principal.tier).estimate(body)
            for fallback in fallbacks:
                reserve = max(reserve, self._quote(self.catalog.price(fallback), principal.tier).estimate(body))
        now = self.clock()
        try:
            if self._acquire_now is not None:
                hold, headers = self._acquire_now(principal.user_id, limits, reserve, free, now)
            else:
                hold, headers = await self.counters.acquire(principal.user_id, limits, reserve, free, now)
        except Refusal as refused:
            raise refusal(refused.name, limits, refused.snapshot, now) from None
        return LimitTicket(self, principal, request, hold, free, headers)

    def _quote(self, price: ModelPrice | None, tier: str) -> "Quote":
        """The tier's quote for a price, kept per (price object, tier): catalogue refreshes bring new ones."""
        quote = self._quotes.get((id(price), tier))
        if quote is None or quote.price is not price:
            if len(self._quotes) > 10_000:
                self._quotes.clear()
            quote = self._quotes[(id(price), tier)] = Quote(price, self.config.tier(tier), self.default_estimate)
        return quote

    # -- the ledger's corrections (accounting.py) ------------------------------

    def on_total_changed(self, user_id: str, created_at: float, old: Decimal, new: Decimal) -> None:
        if new != old:
            self.counters.spend(user_id, created_at, new - old, 0, self.clock())

    # -- reading back ------------------------------------------------------------

    async def standing(self, principal: Principal) -> tuple[Limits, Snapshot, float]:
        now = self.clock()
        return self.limits_of(principal), await self.counters.snapshot(principal.user_id, now), now

    async def load_spend(self, usage_repository: Any) -> None:
        """One query per period for every user at start-up; after that, memory only."""
        now = self.clock()
        spend: dict[str, dict[str, Decimal]] = {}
        for period in PERIODS:
            spend[period] = await usage_repository.spend_since(iso(period_start(period, now).timestamp()))
        spend["all"] = await usage_repository.spend_since(iso(0))
        await self.counters.seed(spend, now)


# -- estimates ---------------------------------------------------------------------


def _fallback_models(body: dict[str, Any]) -> list[str]:
    models = body.get("models")
    return [m for m in models if isinstance(m, str)] if isinstance(models, list) else []


def _text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    if isinstance(value, dict):
        return _text_chars(value.get("text")) + _text_chars(value.get("content"))
    return 0


def _message_chars(messages: Any) -> int:
    """`_text_chars` of a chat's messages, with the usual shape (string contents) on a short path."""
    if type(messages) is not list:
        return _text_chars(messages)
    total = 0
    for message in messages:
        content = message.get("content") if type(message) is dict else None
        total += len(content) if type(content) is str and "text" not in message else _text_chars(message)
    return total


def prompt_tokens_bound(body: dict[str, Any]) -> int:
    """A generous token count for the prompt: one token per three characters of text.

    Tokenizers average about four characters a token in English; three leaves room for
    code and other scripts. Over-estimating only holds a little more budget in flight."""
    chars = _message_chars(body.get("messages")) + _text_chars(body.get("prompt")) + _text_chars(body.get("input"))
    return chars // 3 + 1


def completion_tokens_cap(body: dict[str, Any]) -> int | None:
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def estimate_cost(price: ModelPrice | None, body: dict[str, Any], default: Decimal) -> Decimal:
    """Provider cost bound: prompt at the prompt price plus `max_tokens` at the completion price.

    With no price (unknown model, cold catalogue) the configured default stands in; with no
    `max_tokens` the default stands in for the completion."""
    if price is None:
        return default
    cost = price.request + prompt_tokens_bound(body) * price.prompt
    cap = completion_tokens_cap(body)
    return cost + (cap * price.completion if cap is not None else default)


class Quote:
    """A catalogue price as one tier charges it (markup folded in): an estimate costs two products.

    `estimate(body)` equals `charged(estimate_cost(price, body, default), tier)`."""

    __slots__ = ("price", "request", "prompt", "completion", "default")

    def __init__(self, price: ModelPrice | None, tier: TierConfig, default: Decimal) -> None:
        def charge(amount: Decimal) -> Decimal:
            return charged(amount, tier, free=False)

        self.price = price
        self.default = charge(default)
        self.request, self.prompt, self.completion = (
            (charge(price.request), charge(price.prompt), charge(price.completion)) if price else (ZERO, ZERO, ZERO))

    def estimate(self, body: dict[str, Any]) -> Decimal:
        if self.price is None:
            return self.default
        cap = completion_tokens_cap(body)
        prompt = prompt_tokens_bound(body) * self.prompt
        return self.request + prompt + (self.default if cap is None else cap * self.completion)


# -- responses ------------------------------------------------------------------------


def _epoch_ms(ts: float) -> bytes:
    return str(int(math.ceil(ts * 1000))).encode()


@lru_cache(maxsize=256)
def _reset_bytes(oldest: int, bucket_s: float) -> bytes:
    """X-RateLimit-Reset for a window whose oldest bucket is `oldest` (one value per second or minute)."""
    return _epoch_ms(expiry(oldest, bucket_s))


@lru_cache(maxsize=1024)
def _limit_bytes(value: int) -> bytes:
    return str(value).encode()


def rate_headers(
    limits: Limits, minute_used: int, minute_oldest: int, hour_used: int, hour_oldest: int
) -> list[tuple[bytes, bytes]]:
    """X-RateLimit-* for the tighter of the request windows, counting this request.

    `*_used` are the windows' counts before this request; `*_oldest` their oldest bucket."""
    per_minute, per_hour = limits.requests_per_minute, limits.requests_per_hour
    if per_minute is not None and (per_hour is None or per_minute - minute_used <= per_hour - hour_used):
        value, remaining, reset = per_minute, per_minute - minute_used - 1, _reset_bytes(minute_oldest, MINUTE_BUCKET_S)
    elif per_hour is not None:
        value, remaining, reset = per_hour, per_hour - hour_used - 1, _reset_bytes(hour_oldest, HOUR_BUCKET_S)
    else:
        return []
    return [
        (b"x-ratelimit-limit", _limit_bytes(value)),
        (b"x-ratelimit-remaining", str(remaining if remaining > 0 else 0).encode()),
        (b"x-ratelimit-reset", reset),
    ]


def success_headers(limits: Limits, before: Snapshot, now: float) -> list[tuple[bytes, bytes]]:
    """`rate_headers` from a snapshot taken before this request was counted."""
    return rate_headers(
        limits,
        int(before.used("requests_per_minute")), next(iter(before.minute), int(now // MINUTE_BUCKET_S)),
        int(before.used("requests_per_hour")), next(iter(before.hour), int(now // HOUR_BUCKET_S)),
    )


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
            f"{_money(used)} is used{in_flight}. It resets at {iso(at)} (start of the next UTC {period}); "
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
        "x-ratelimit-reset": _epoch_ms(at).decode(),
    }
    return RateLimited(
        f"Rate limit reached: {name} is {value} for your account ({what}). "
        f"It frees up at {iso(at)} (in {wait} s); retry after that.",
        param=name,
        headers=headers,
        metadata=metadata,
    )


# -- installation -----------------------------------------------------------------------


async def install_limits(gateway: "Gateway") -> Limiter:
    """Build the limiter over memory or Redis, load spend, hook into the ledger and the proxy."""
    config = gateway.config
    if config.redis.url:
        from gateway.limits_redis import RedisCounters

        counters: Counters = await RedisCounters.connect(config.redis.url, lease_s=config.server.request_timeout_s + 60)
    else:
        from gateway.limits_memory import MemoryCounters

        counters = MemoryCounters()
    limiter = Limiter(config, counters, gateway.catalog, clock=gateway.clock)
    store = gateway.store
    if hasattr(store, "usage"):
        await limiter.load_spend(store.usage)
    attach_ledger(limiter, getattr(gateway, "ledger", None))
    gateway.catalog.warm()
    gateway.admission = limiter
    gateway.limiter = limiter  # type: ignore[attr-defined]
    gateway.on_shutdown(counters.close)
    return limiter


def attach_ledger(limiter: Limiter, ledger: Any) -> None:
    """Count exactly what accounting records: each request's `charged`, and settlement's corrections."""
    if ledger is None or limiter.ledger_attached:
        return
    ledger.on_total_changed(limiter.on_total_changed)
    limiter.ledger_attached = True


__all__ = ["Limiter", "Limits", "Refusal", "Snapshot", "install_limits", "rate_headers"]
