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

import functools
import logging
import math
from dataclasses import dataclass, field, fields
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Callable, Protocol

from gateway.accounting.ledger import usage_tokens
from gateway.auth.tokens import Principal
from gateway.catalog import ModelPrice, is_free_model
from gateway.core.clock import Clock, iso, system_clock
from gateway.core.config import Config, TierConfig
from gateway.core.errors import PaymentRequired, RateLimited
from gateway.core.money import ZERO, charged, to_decimal, to_pico
from gateway.proxy.endpoint import ProxyRequest
from gateway.proxy.sse import Observation
from gateway.core.windows import PERIODS, SlidingWindow, frees_at, period_end, period_start

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.limits.limiter")

MINUTE, HOUR = 60.0, 3600.0
MINUTE_BUCKET_S, HOUR_BUCKET_S = SlidingWindow(MINUTE).bucket_s, SlidingWindow(HOUR).bucket_s
REQUEST_LIMITS = ("requests_per_minute", "requests_per_hour", "max_concurrent")
BUDGETS = {"daily_budget_usd": "day", "monthly_budget_usd": "month"}
COMPLETION_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")  # the first valid one counts
_CAP_NAMES = frozenset(COMPLETION_CAPS)
SMALL_BODY_BYTES = 4096  # `prompt_tokens_bound` bounds bodies up to this size by their size
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
            if value is not None and to_pico(snapshot.used(name)) >= to_pico(value):
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


class LimitTicket:
    """An admitted request's hold on its limits, let go of once (`release`)."""

    __slots__ = ("_limiter", "_plan", "_request", "_hold", "_free")

    def __init__(self, limiter: "Limiter", plan: "_Plan", request: ProxyRequest, hold: Any, free: bool) -> None:
        self._limiter: Limiter | None = limiter  # None once released
        self._plan = plan
        self._request = request
        self._hold = hold
        self._free = free

    def release(self, observation: Observation | None) -> None:
        """Let go of the hold and count the real charge and tokens: what accounting recorded on the
        request (`request.charged`, `request.tokens`) or, with no ledger, what the response's usage says."""
        limiter = self._limiter
        if limiter is None:
            return
        self._limiter = None
        request = self._request
        try:
            if limiter.ledger_attached:
                amount, tokens = request.charged, request.tokens
                amount = to_pico(amount) if amount else 0
            else:
                amount, tokens = self._from_usage(limiter, observation)
            self._plan.finish(self._hold, request.started, amount, tokens, request.ended or request.started)
        except Exception:
            log.exception("releasing the limits of user %s failed", self._plan.principal.user_id)

    def _from_usage(self, limiter: "Limiter", observation: Observation | None) -> tuple[int, int]:
        """(charge in picodollars, tokens) from the response's usage, when no ledger records them."""
        usage = observation.usage if observation is not None else None
        if usage is None:
            return 0, 0
        prompt, completion = usage_tokens(usage)[:2]
        cost = to_decimal(usage.get("cost")) or ZERO
        tier = limiter.config.tier(self._plan.principal.tier)
        amount = to_pico(charged(cost, tier, free=self._free)) if cost > 0 else 0
        return amount, prompt + completion


class _Plan:
    """What admission needs of one user, built once per cached principal (a change to the user
    replaces it): their limits, their tier's quotes, their counters' `acquire` and `finish` (plain
    methods where the backend never waits), and what their last model costs while the catalogue
    stays fresh (users mostly repeat their model)."""

    __slots__ = ("principal", "limits", "quotes", "acquire", "finish", "model", "model_until", "free", "quote")

    def __init__(self, principal: Principal, limits: Limits, quotes: dict[int, "Quote"],
                 acquire: Callable[..., Any] | None, finish: Callable[..., None]) -> None:
        self.principal = principal
        self.limits = limits
        self.quotes = quotes
        self.acquire = acquire
        self.finish = finish
        self.model: str | None = None  # the last model priced, …
        self.model_until = -math.inf  # … until when that holds (the catalogue's `fresh_until`), …
        self.free = False  # … whether it is free …
        self.quote: Quote | None = None  # … and its quote


class Limiter:
    """The `Admission` the proxy calls; never touches the database on the request path."""

    def __init__(self, config: Config, counters: Counters, catalog: Any, *, clock: Clock = system_clock) -> None:
        self.config = config
        self.counters = counters
        self.catalog = catalog
        self.clock = clock
        self.default_estimate = config.accounting.default_estimate_usd
        self.ledger_attached = False  # then a request's charge is what accounting recorded (`request.charged`)
        self._plans: dict[str, _Plan] = {}  # user id → their plan
        self._quotes: dict[str, dict[int, Quote]] = {}  # tier → id of a catalogue price → its quote
        self._user_counters = getattr(counters, "user", None)
        # Memory counters never wait, so admission needs no coroutine either: the proxy calls
        # `admit_now` when it is there (it is not with Redis).
        self.admit_now: Callable[[Principal, ProxyRequest], LimitTicket] | None = (
            self._admit_in_memory if self._user_counters is not None else None)

    def limits_of(self, principal: Principal) -> Limits:
        return self._plan(principal).limits

    def _plan(self, principal: Principal) -> _Plan:
        plan = self._plans.get(principal.user_id)
        if plan is not None and plan.principal is principal:
            return plan
        if len(self._plans) > 100_000:
            self._plans.clear()
        user_id = principal.user_id
        limits = Limits.of(self.config.tier(principal.tier), principal.overrides)
        quotes = self._quotes.setdefault(principal.tier, {})
        if self._user_counters is not None:
            user = self._user_counters(user_id)
            plan = _Plan(principal, limits, quotes, user.acquire, user.finish)
        else:
            plan = _Plan(principal, limits, quotes, None, functools.partial(self.counters.finish, user_id))
        self._plans[user_id] = plan
        return plan

    async def admit(self, principal: Principal, request: ProxyRequest) -> LimitTicket:
        if self.admit_now is not None:
            return self.admit_now(principal, request)
        plan = self._plan(principal)
        now = self.clock()
        reserve, free = self._reservation(plan, request, now)
        try:
            hold = await self.counters.acquire(principal.user_id, plan.limits, reserve, free, now)
        except Refusal as refused:
            raise refusal(refused.name, plan.limits, refused.snapshot, now) from None
        return LimitTicket(self, plan, request, hold, free)

    def _admit_in_memory(self, principal: Principal, request: ProxyRequest) -> LimitTicket:
        """`admit` over counters that never wait: no coroutine, no look-up of the user's counters."""
        plan = self._plans.get(principal.user_id)
        if plan is None or plan.principal is not principal:
            plan = self._plan(principal)
        now = self.clock()
        reserve, free = self._reservation(plan, request, now)
        try:
            hold = plan.acquire(plan.limits, reserve, free, now)  # type: ignore[misc]
        except Refusal as refused:
            raise refusal(refused.name, plan.limits, refused.snapshot, now) from None
        return LimitTicket(self, plan, request, hold, free)

    def _reservation(self, plan: _Plan, request: ProxyRequest, now: float) -> tuple[int, bool]:
        """What the request holds against the user's budgets (picodollars; 0 when it is free or they
        have none), and whether it is free."""
        body = request.body
        if request.model != plan.model or now >= plan.model_until or "models" in body:
            if "models" in body:
                return self._reservation_with_fallbacks(plan, request)
            self._price_model(plan, request.model)
        if plan.free or not plan.limits.budgeted:
            return 0, plan.free  # reservations only matter against a budget
        return plan.quote.estimate(body, len(request.raw)), False  # type: ignore[union-attr]

    def _price_model(self, plan: _Plan, model: str | None) -> None:
        """Look the model up in the catalogue; the plan keeps the answer while the catalogue is fresh."""
        until = self.catalog.fresh_until  # read first: `price` may start a refresh (which replaces it later)
        price = self.catalog.price(model)
        plan.model, plan.model_until = model, until
        plan.free = model is not None and is_free_model(model, price)
        plan.quote = self._quote(plan, price)

    def _reservation_with_fallbacks(self, plan: _Plan, request: ProxyRequest) -> tuple[int, bool]:
        """`_reservation` when `models` names fallbacks: free only if all are; the dearest one is reserved."""
        model, fallbacks = request.model, _fallback_models(request.body)
        price = self.catalog.price(model)
        free = model is not None and is_free_model(model, price)
        if free and fallbacks:
            free = all(self.catalog.is_free(m) for m in fallbacks)
        if free or not plan.limits.budgeted:
            return 0, free
        size = len(request.raw)
        reserve = max(self._quote(plan, p).estimate(request.body, size)
                      for p in (price, *(self.catalog.price(m) for m in fallbacks)))
        return reserve, False

    def _quote(self, plan: _Plan, price: ModelPrice | None) -> "Quote":
        """The plan's tier's quote for a price, kept per price object: catalogue refreshes bring new ones."""
        quotes = plan.quotes
        quote = quotes.get(id(price))
        if quote is None or quote.price is not price:
            if len(quotes) > 10_000:
                quotes.clear()
            quote = quotes[id(price)] = Quote(price, self.config.tier(plan.principal.tier), self.default_estimate)
        return quote

    # -- the ledger's corrections (accounting.py) ------------------------------

    def on_total_changed(self, user_id: str, created_at: float, old: Decimal, new: Decimal) -> None:
        change = to_pico(new) - to_pico(old)  # so the counted picodollars add up to the final charge's
        if change:
            self.counters.spend(user_id, created_at, change, 0, self.clock())

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


def prompt_tokens_bound(body: dict[str, Any], size: int | None = None) -> int:
    """A generous token count for the prompt: one token per three characters of text.

    Tokenizers average about four characters a token in English; three leaves room for
    code and other scripts. Over-estimating only holds a little more budget in flight.

    Given the body's `size` in bytes, a body of at most `SMALL_BODY_BYTES` is bounded by its
    size instead of walked: every character of its text is at least one byte of it, so the
    bound is never lower, and at most `SMALL_BODY_BYTES / 3` tokens higher (JSON syntax and
    roles count too). Larger bodies are walked, so images and other non-text parts do not
    inflate the hold."""
    if size is not None and size <= SMALL_BODY_BYTES:
        return size // 3 + 1
    messages = body.get("messages")
    if type(messages) is list:  # the usual shape (string contents) on a short path
        chars = 0
        for message in messages:
            content = message.get("content") if type(message) is dict else None
            chars += len(content) if type(content) is str and "text" not in message else _text_chars(message)
    else:
        chars = _text_chars(messages)
    if "prompt" in body:
        chars += _text_chars(body["prompt"])
    if "input" in body:
        chars += _text_chars(body["input"])
    return chars // 3 + 1


def completion_tokens_cap(body: dict[str, Any]) -> int | None:
    if _CAP_NAMES.isdisjoint(body):
        return None
    for name in COMPLETION_CAPS:
        value = body.get(name)
        if type(value) is int and value >= 0:  # `type`, not isinstance: True is not a cap
            return value
    return None


def estimate_cost(price: ModelPrice | None, body: dict[str, Any], default: Decimal, size: int | None = None) -> Decimal:
    """Provider cost bound: prompt at the prompt price plus `max_tokens` at the completion price.

    With no price (unknown model, cold catalogue) the configured default stands in; with no
    `max_tokens` the default stands in for the completion. `size`: see `prompt_tokens_bound`."""
    if price is None:
        return default
    cost = price.request + prompt_tokens_bound(body, size) * price.prompt
    cap = completion_tokens_cap(body)
    return cost + (cap * price.completion if cap is not None else default)


class Quote:
    """A catalogue price as one tier charges it, in whole picodollars: an estimate is integer work.

    Each price is the tier's charge rounded up, so `estimate(body, size)` is never below
    `to_pico(charged(estimate_cost(price, body, default, size), tier), ROUND_CEILING)` and above
    it by less than a picodollar per token."""

    __slots__ = ("price", "request", "prompt", "completion", "default")

    def __init__(self, price: ModelPrice | None, tier: TierConfig, default: Decimal) -> None:
        def charge(amount: Decimal) -> int:
            return to_pico(charged(amount, tier, free=False), ROUND_CEILING)

        self.price = price
        self.default = charge(default)
        self.request, self.prompt, self.completion = (
            (charge(price.request), charge(price.prompt), charge(price.completion)) if price else (0, 0, 0))

    def estimate(self, body: dict[str, Any], size: int | None = None) -> int:
        if self.price is None:
            return self.default
        cap = completion_tokens_cap(body)
        prompt = prompt_tokens_bound(body, size) * self.prompt
        return self.request + prompt + (self.default if cap is None else cap * self.completion)


# -- responses ------------------------------------------------------------------------


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
        "x-ratelimit-reset": _epoch_ms(at),
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
        from gateway.limits.in_redis import RedisCounters

        counters: Counters = await RedisCounters.connect(config.redis.url, lease_s=config.server.request_timeout_s + 60)
    else:
        from gateway.limits.in_memory import MemoryCounters

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


__all__ = ["Limiter", "Limits", "Refusal", "Snapshot", "install_limits"]
