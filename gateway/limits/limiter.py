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
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Callable

from gateway.accounting.record import usage_tokens
from gateway.auth.tokens import Principal
from gateway.catalog import ModelPrice, is_free_model
from gateway.core.clock import Clock, iso, system_clock
from gateway.core.config import Config
from gateway.core.money import ZERO, charged, to_decimal, to_pico
from gateway.core.windows import (
    PERIODS,
    period_start,
)
from gateway.proxy.sse import Observation
from gateway.proxy.types import ProxyRequest

if TYPE_CHECKING:
    from gateway.app import Gateway
from gateway.limits.estimates import Quote
from gateway.limits.policy import Counters, Limits, Refusal, Snapshot, refusal

log = logging.getLogger("gateway.limits.limiter")


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
        """One query per period for every user at start-up; after that, memory only (or Redis,
        which rebuilds a user's spend from these records if it loses it: `in_redis`)."""
        use_store = getattr(self.counters, "use_store", None)
        if use_store is not None:
            use_store(usage_repository, settle_wait_s=self.config.accounting.flush_interval_ms / 1000 + 0.3)
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


# -- responses ------------------------------------------------------------------------


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
