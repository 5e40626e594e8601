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

Redis unreachable: a 503 naming it (`redis.on_error: closed`), or, with `local`, admission on
this process's own counters seeded from the database until Redis answers (`fallback`): the
limiter then swaps which counters it calls, so the healthy path does no extra work.
"""

from __future__ import annotations

import functools
import logging
import math
from decimal import Decimal
from typing import Any, Callable, Protocol

from gateway.auth.tokens import Principal
from gateway.catalog import ModelPrice, is_free_model
from gateway.core.clock import Clock, system_clock
from gateway.core.config import Config
from gateway.core.money import to_pico
from gateway.limits.estimates import Quote
from gateway.limits.fallback import LocalFallback, database_spend
from gateway.limits.in_memory import MemoryCounters
from gateway.limits.in_redis import CountersUnreachable, RedisCounters
from gateway.limits.policy import Counters, Limits, Refusal, Snapshot, refusal
from gateway.proxy.types import Charge, ProxyRequest

log = logging.getLogger("gateway.limits.limiter")


class PriceList(Protocol):
    """What limits read of the catalogue (`gateway.catalog.Catalog`): prices, the free-model rule, freshness."""

    fresh_until: float

    def price(self, model: str | None) -> ModelPrice | None: ...

    def is_free(self, model: str | None) -> bool: ...


class LimitTicket:
    """An admitted request's hold on its limits, let go of once (`release`)."""

    __slots__ = ("_plan", "_request", "_hold")

    def __init__(self, plan: "_Plan", request: ProxyRequest, hold: Any) -> None:
        self._plan: _Plan | None = plan  # None once released
        self._request = request
        self._hold = hold

    def release(self, charge: Charge | None) -> None:
        """Let go of the hold and count the charge and tokens (the very `Charge` accounting records)."""
        plan = self._plan
        if plan is None:
            return
        self._plan = None
        request = self._request
        if charge is None:
            amount = tokens = 0
        else:
            amount, tokens = charge.total_pico, charge.prompt_tokens + charge.completion_tokens
        try:
            plan.finish(self._hold, request.started, amount, tokens, request.ended or request.started)
        except Exception:
            log.exception("releasing the limits of user %s failed", plan.principal.user_id)


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

    def __init__(self, config: Config, counters: Counters, catalog: PriceList, *, clock: Clock = system_clock,
                 fallback: LocalFallback | None = None) -> None:
        self.config = config
        self.backend = counters  # the configured counters (the readiness check asks Redis through them)
        self.counters = counters  # those admission uses now: `fallback` while Redis is unreachable
        self._fallback = fallback
        if fallback is not None:
            fallback.when_recovered(self._back_to_shared)
        self.catalog = catalog
        self.clock = clock
        self.default_estimate = config.accounting.default_estimate_usd
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
        except CountersUnreachable:
            if self._fallback is None:
                raise
            await self._to_fallback(self._fallback)
            return await self.admit(principal, request)  # on the local counters now
        return LimitTicket(plan, request, hold)

    async def _to_fallback(self, fallback: LocalFallback) -> None:
        """Redis is unreachable (`redis.on_error: local`): admit on `fallback` until it answers. The plans
        cached now (those of the requests in flight) finish through it too, so their charges count locally."""
        await fallback.enter()
        if fallback.active and self.counters is not fallback:  # (not active: Redis came back meanwhile)
            self.counters = fallback
            for user_id, plan in self._plans.items():
                plan.finish = functools.partial(fallback.finish, user_id)

    def _back_to_shared(self) -> None:
        """Redis answers again: new plans finish on it (requests admitted locally still finish locally)."""
        self.counters = self.backend
        self._plans.clear()

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
        return LimitTicket(plan, request, hold)

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
        try:
            snapshot = await self.counters.snapshot(principal.user_id, now)
        except CountersUnreachable:
            if self._fallback is None:
                raise
            await self._to_fallback(self._fallback)
            snapshot = await self.counters.snapshot(principal.user_id, now)
        return self.limits_of(principal), snapshot, now

    async def load_spend(self, usage_repository: Any) -> None:
        """One query per period for every user at start-up; after that, memory only (or Redis,
        which rebuilds a user's spend from these records if it loses it: `in_redis`)."""
        now = self.clock()
        await self.counters.seed(await database_spend(usage_repository, now), now)


# -- estimates ---------------------------------------------------------------------


def _fallback_models(body: dict[str, Any]) -> list[str]:
    models = body.get("models")
    return [m for m in models if isinstance(m, str)] if isinstance(models, list) else []


# -- responses ------------------------------------------------------------------------


# -- installation -----------------------------------------------------------------------


def local_fallback(config: Config, counters: Counters, usage: Any, *, clock: Clock = system_clock,
                   on_admitted: Callable[[], None] = lambda: None) -> LocalFallback | None:
    """With Redis and `redis.on_error: local`, the counters to admit on while Redis is unreachable."""
    if config.redis.on_error != "local" or not isinstance(counters, RedisCounters):
        return None
    return LocalFallback(counters, usage, settle_wait_s=config.accounting.flush_interval_ms / 1000 + 0.3,
                         clock=clock, on_admitted=on_admitted)


async def open_counters(config: Config, usage: Any) -> Counters:
    """The limit counters: shared in Redis when `redis.url` is set (rebuilding a user's spend from `usage`,
    the database's records, if Redis loses it), else this process's memory."""
    if config.redis.url:
        counters = await RedisCounters.connect(config.redis.url, lease_s=config.server.request_timeout_s + 60)
        counters.use_store(usage, settle_wait_s=config.accounting.flush_interval_ms / 1000 + 0.3)
        return counters
    return MemoryCounters()


__all__ = ["Limiter", "LimitTicket", "local_fallback", "open_counters"]
