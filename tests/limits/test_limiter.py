"""Limits on an injected clock: each limit refuses at the right count, windows reset, budgets reserve."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, AsyncIterator

import orjson
import pytest

from gateway.auth.tokens import Principal
from gateway.catalog import ModelPrice
from gateway.core.config import Config
from gateway.core.errors import PaymentRequired, RateLimited
from gateway.core.money import PICO, charged, markup_for, to_pico
from gateway.core.windows import SlidingWindow, period_end, period_id
from gateway.limits.estimates import (
    SMALL_BODY_BYTES,
    Quote,
    completion_tokens_cap,
    estimate_cost,
    prompt_tokens_bound,
)
from gateway.limits.in_memory import MemoryCounters
from gateway.limits.in_redis import RedisCounters
from gateway.limits.limiter import Limiter
from gateway.limits.policy import Limits, Refusal, first_refusal
from gateway.proxy.types import Charge, ProxyRequest
from tests.conftest import FakeClock, redis_url_or_skip
from tests.conftest import principal as shared_principal

# 2025-03-10 is a Monday; 12:00:30 UTC leaves room before every boundary the tests cross on purpose.
T0 = datetime(2025, 3, 10, 12, 0, 30, tzinfo=UTC).timestamp()
PAID = "acme/paid"  # $1 per prompt token, $2 per completion token: easy arithmetic
FREE = "acme/model:free"




class FakeCatalog:
    prices = {PAID: ModelPrice(Decimal(1), Decimal(2)), FREE: ModelPrice(Decimal(0), Decimal(0))}
    fresh_until = 0.0  # never fresh: every admission looks its model up (the limiter keeps nothing)

    def price(self, model: str | None) -> ModelPrice | None:
        return self.prices.get(model or "")

    def is_free(self, model: str | None) -> bool:
        return bool(model) and (model.endswith(":free") or (p := self.price(model)) is not None and p.free)


def make(counters: Any, markup: str = "0", **tier: Any) -> tuple[Limiter, FakeClock]:
    config = Config.model_validate(
        {"tiers": {"t": {"markup_pct": markup, **tier}}, "default_tier": "t",
         "accounting": {"default_estimate_usd": "0.5"}}
    )
    clock = FakeClock(T0)
    return Limiter(config, counters, FakeCatalog(), clock=clock), clock




@pytest.fixture(params=["memory", "redis"])
async def counters(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Every test runs on both backends: this process's memory, and Redis (db 15, emptied first)."""
    if request.param == "memory":
        yield MemoryCounters()
        return
    url = redis_url_or_skip(db=15)
    backend = await RedisCounters.connect(url, lease_s=660)
    await backend._redis.flushdb()
    try:
        yield backend
    finally:
        await backend.close()


def principal(user: str = "u1", **overrides: Any) -> Principal:
    return shared_principal(user, tier="t", overrides=overrides)


def request(model: str | None = PAID, started: float = T0, **body: Any) -> ProxyRequest:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
    return ProxyRequest(endpoint="/chat/completions", body=body, raw=b"{}", model=model, stream=False,
                        started=started, request_id="req")


def used(cost: str, prompt: int = 1, completion: int = 1, *, markup: str = "0", free: bool = False) -> Charge:
    """The charge of a generation as pricing makes it (accounting records the same one)."""
    provider = Decimal(cost)
    pct = Decimal(0) if free else Decimal(markup)
    fee, reason = markup_for(provider, "t", pct, free=free)
    return Charge(provider, fee, provider + fee, to_pico(provider + fee), pct, reason, free, prompt, completion, 0, 0)


def headers(error: Exception) -> dict[str, str]:
    assert isinstance(error, (RateLimited, PaymentRequired))
    return error.headers


# -- request windows -----------------------------------------------------------------


@pytest.mark.anyio
async def test_requests_per_minute_refuses_the_next_one_and_frees_after_a_minute(counters: Any) -> None:
    limiter, clock = make(counters, requests_per_minute=3)
    p = principal()
    for _ in range(3):
        (await limiter.admit(p, request(max_tokens=1))).release(None)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(p, request())
    err = refused.value
    assert err.status == 429 and err.param == "requests_per_minute"
    assert "requests_per_minute is 3" in err.message and "3 requests in the last minute" in err.message
    h = headers(err)
    assert h["x-ratelimit-limit"] == "3" and h["x-ratelimit-remaining"] == "0"
    frees = (int(T0) + 60) * 1000  # the one-second bucket of T0 leaves the window a minute later
    assert h["x-ratelimit-reset"] == str(frees)
    assert h["retry-after"] == "60"
    assert err.metadata["resets_at"].startswith("2025-03-10T12:01:30")
    clock.now += 59
    with pytest.raises(RateLimited):
        await limiter.admit(p, request())
    clock.now += 1
    (await limiter.admit(p, request(max_tokens=1))).release(None)


@pytest.mark.anyio
async def test_refused_requests_are_not_counted(counters: Any) -> None:
    limiter, clock = make(counters, requests_per_minute=1, requests_per_hour=2)
    p = principal()
    (await limiter.admit(p, request(max_tokens=1))).release(None)
    for _ in range(5):
        with pytest.raises(RateLimited):
            await limiter.admit(p, request())
    clock.now += 60
    (await limiter.admit(p, request(max_tokens=1))).release(None)  # the refusals took no hourly slot
    clock.now += 60
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(p, request())
    assert refused.value.param == "requests_per_hour"
    assert "2 requests in the last hour" in refused.value.message


@pytest.mark.anyio
async def test_requests_per_hour_slides(counters: Any) -> None:
    limiter, clock = make(counters, requests_per_hour=2)
    p = principal()
    (await limiter.admit(p, request(max_tokens=1))).release(None)
    clock.now += 1800
    (await limiter.admit(p, request(max_tokens=1))).release(None)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(p, request())
    assert refused.value.headers["retry-after"] == str(1800 - 30)  # the first leaves with its minute bucket
    clock.now += 1800
    (await limiter.admit(p, request(max_tokens=1))).release(None)  # the first has left the window
    with pytest.raises(RateLimited):
        await limiter.admit(p, request())


@pytest.mark.anyio
async def test_max_concurrent_counts_requests_in_flight(counters: Any) -> None:
    limiter, _ = make(counters, max_concurrent=2)
    p = principal()
    first = await limiter.admit(p, request(max_tokens=1))
    second = await limiter.admit(p, request(max_tokens=1))
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(p, request())
    assert refused.value.param == "max_concurrent" and refused.value.headers["retry-after"] == "1"
    first.release(used("0.1"))
    first.release(used("0.1"))  # a second release changes nothing
    third = await limiter.admit(p, request(max_tokens=1))
    with pytest.raises(RateLimited):
        await limiter.admit(p, request())
    second.release(None)
    third.release(None)


@pytest.mark.anyio
async def test_limits_are_per_user_and_overrides_win(counters: Any) -> None:
    limiter, _ = make(counters, requests_per_minute=1)
    (await limiter.admit(principal("a"), request(max_tokens=1))).release(None)
    (await limiter.admit(principal("b"), request(max_tokens=1))).release(None)
    lifted = principal("a", requests_per_minute=5)
    (await limiter.admit(lifted, request(max_tokens=1))).release(None)
    assert Limits.of(limiter.config.tier("t"), {"monthly_budget_usd": "2.5"}).monthly_budget_usd == Decimal("2.5")


# -- tokens ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_tokens_per_hour_counts_usage_and_refuses_once_reached(counters: Any) -> None:
    limiter, clock = make(counters, tokens_per_hour=100)
    p = principal()
    (await limiter.admit(p, request(max_tokens=1))).release(used("0", prompt=40, completion=59))
    (await limiter.admit(p, request(max_tokens=1))).release(used("0", prompt=1, completion=0))
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(p, request())
    assert refused.value.param == "tokens_per_hour" and "100 tokens in the last hour" in refused.value.message
    assert refused.value.headers["retry-after"] == "3570"  # its minute bucket (12:00) leaves at 13:00
    clock.now += 3600
    (await limiter.admit(p, request(max_tokens=1))).release(None)


# -- budgets ---------------------------------------------------------------------------


def test_estimate_is_prompt_and_max_tokens_at_catalogue_prices() -> None:
    price = ModelPrice(Decimal("0.001"), Decimal("0.002"), Decimal("0.5"))
    body = {"messages": [{"content": "x" * 9}, {"content": [{"type": "text", "text": "y" * 3}]}], "max_tokens": 10}
    assert prompt_tokens_bound(body) == 5  # 12 characters / 3 + 1
    assert estimate_cost(price, body, Decimal("7")) == Decimal("0.5") + Decimal("0.005") + Decimal("0.020")
    assert estimate_cost(price, {"prompt": "ab"}, Decimal("7")) == Decimal("0.5") + Decimal("0.001") + 7
    assert estimate_cost(None, body, Decimal("7")) == Decimal("7")


def test_a_quote_is_the_estimate_charged_at_the_tier_markup_in_picodollars() -> None:
    """The hot path's `Quote` folds the markup into the prices, in whole picodollars rounded up: it
    equals charging the estimate where prices are whole picodollars, and otherwise is never below
    it and above it by less than a picodollar per token."""
    tier = Config.model_validate({"tiers": {"t": {"markup_pct": "12.5"}}, "default_tier": "t"}).tier("t")
    price = ModelPrice(Decimal("0.000003"), Decimal("0.000015"), Decimal("0.0004"))
    odd = ModelPrice(Decimal("0.000000000333333333333"), Decimal("0.00000000111111111111"), Decimal("0.0000000000005"))
    for body in ({"messages": [{"role": "user", "content": "x" * 100}], "max_tokens": 256},
                 {"prompt": "abc", "max_completion_tokens": 7}, {"input": ["a", "b"]}, {"max_tokens": True},
                 {"messages": [{"content": "abcd"}, {"content": [{"type": "text", "text": "ef"}]}]},
                 {"messages": [{"content": "ab", "text": "cdefg"}, "hij"], "prompt": "k"}, {"messages": []}):
        tokens = prompt_tokens_bound(body) + (completion_tokens_cap(body) or 0)
        for p in (price, odd, None):
            exact = charged(estimate_cost(p, body, Decimal("0.5")), tier.markup_pct) * PICO
            quoted = Quote(p, tier, Decimal("0.5")).estimate(body)
            assert isinstance(quoted, int) and exact <= quoted < exact + tokens + 2, (body, p)
            if p is not odd:
                assert quoted == exact, (body, p)


@pytest.mark.anyio
async def test_daily_budget_refuses_with_402_until_midnight(counters: Any) -> None:
    limiter, clock = make(counters, markup="50", daily_budget_usd="10")
    p = principal()
    # each request: 1 prompt token ($1) + 2 completion tokens ($4) = $5 reserved; charged $3 × 1.5 = $4.5
    for _ in range(2):
        ticket = await limiter.admit(p, request(max_tokens=2))
        ticket.release(used("3", markup="50"))
    (await limiter.admit(p, request(max_tokens=2))).release(used("1", markup="50"))  # $9 < $10: still admitted
    with pytest.raises(PaymentRequired) as refused:
        await limiter.admit(p, request(max_tokens=2))
    err = refused.value
    assert err.status == 402 and err.param == "daily_budget_usd"
    assert "is $10 and $10.5 is used" in err.message and "2025-03-11T00:00:00" in err.message
    assert err.metadata["used"] == "10.5" and err.metadata["limit"] == "daily_budget_usd"
    clock.now = datetime(2025, 3, 11, tzinfo=UTC).timestamp()
    (await limiter.admit(p, request(max_tokens=2))).release(None)


@pytest.mark.anyio
async def test_monthly_budget_resets_on_the_first(counters: Any) -> None:
    limiter, clock = make(counters, monthly_budget_usd="1")
    p = principal()
    (await limiter.admit(p, request(max_tokens=0))).release(used("1"))
    with pytest.raises(PaymentRequired) as refused:
        await limiter.admit(p, request(max_tokens=0))
    assert "2025-04-01T00:00:00" in refused.value.message
    clock.now = datetime(2025, 3, 31, 23, 59, tzinfo=UTC).timestamp()
    with pytest.raises(PaymentRequired):
        await limiter.admit(p, request(max_tokens=0))
    clock.now += 60
    (await limiter.admit(p, request(max_tokens=0))).release(None)


@pytest.mark.anyio
async def test_reservations_hold_budget_and_settle_to_the_real_charge(counters: Any) -> None:
    limiter, _ = make(counters, daily_budget_usd="12")
    p = principal()
    a = await limiter.admit(p, request(max_tokens=2))  # reserves $5
    b = await limiter.admit(p, request(max_tokens=2))  # $5 → $10 held
    c = await limiter.admit(p, request(max_tokens=2))  # $10 < $12: admitted, $15 held
    with pytest.raises(PaymentRequired) as refused:
        await limiter.admit(p, request(max_tokens=2))
    assert "$15 is used ($15 of it held by requests in flight)" in refused.value.message
    a.release(None)  # the upstream never answered: the reservation goes, nothing is spent
    b.release(used("1"))  # real charge $1 replaces $5
    _, snapshot, _ = await limiter.standing(p)
    assert snapshot.reserved == Decimal(5) and snapshot.spend["day"] == Decimal(1) and snapshot.inflight == 1
    c.release(used("2"))
    _, snapshot, _ = await limiter.standing(p)
    assert snapshot.reserved == 0 and snapshot.spend == {"day": 3, "week": 3, "month": 3, "all": 3}


@pytest.mark.anyio
async def test_fifty_concurrent_requests_overrun_a_budget_by_at_most_one(counters: Any) -> None:
    limiter, _ = make(counters, monthly_budget_usd="16")
    p = principal()
    (await limiter.admit(p, request(max_tokens=2))).release(used("5"))  # $11 left: room for 3 at $5 (with $4 over)

    async def one() -> Any:
        try:
            ticket = await limiter.admit(p, request(max_tokens=2))
        except PaymentRequired:
            return None
        await asyncio.sleep(0)
        return ticket

    tickets = [t for t in await asyncio.gather(*(one() for _ in range(50))) if t is not None]
    assert len(tickets) == 3
    for ticket in tickets:
        ticket.release(used("5"))
    _, snapshot, _ = await limiter.standing(p)
    assert snapshot.spend["month"] == Decimal(20)  # $16 budget overrun by less than one request ($5)


@pytest.mark.anyio
async def test_unknown_price_reserves_the_configured_default(counters: Any) -> None:
    limiter, _ = make(counters, daily_budget_usd="1")
    p = principal()
    tickets = [await limiter.admit(p, request("acme/unlisted")) for _ in range(2)]  # $0.5 each
    with pytest.raises(PaymentRequired):
        await limiter.admit(p, request("acme/unlisted"))
    for ticket in tickets:
        ticket.release(None)
    assert (await limiter.standing(p))[1].reserved == 0


@pytest.mark.anyio
async def test_free_models_cost_nothing_but_count_against_request_limits(counters: Any) -> None:
    limiter, _ = make(counters, daily_budget_usd="0", requests_per_minute=2)
    p = principal()
    with pytest.raises(PaymentRequired):
        await limiter.admit(p, request(max_tokens=1))
    for _ in range(2):
        ticket = await limiter.admit(p, request(FREE, max_tokens=1000))
        ticket.release(used("0", free=True))  # a free model reserves nothing and carries no markup
    with pytest.raises(RateLimited):
        await limiter.admit(p, request(FREE))
    _, snapshot, _ = await limiter.standing(p)
    assert snapshot.spend["day"] == 0 and snapshot.reserved == 0


@pytest.mark.anyio
async def test_a_free_model_with_paid_fallbacks_is_not_free(counters: Any) -> None:
    limiter, _ = make(counters, daily_budget_usd="0")
    with pytest.raises(PaymentRequired):
        await limiter.admit(principal(), request(FREE, models=[FREE, PAID]))


@pytest.mark.anyio
async def test_request_limits_are_checked_before_budgets(counters: Any) -> None:
    limiter, _ = make(counters, daily_budget_usd="0", requests_per_minute=0)
    with pytest.raises(RateLimited):
        await limiter.admit(principal(), request(max_tokens=1))


# -- the ledger and start-up -------------------------------------------------------------


@pytest.mark.anyio
async def test_spend_is_the_charge_released_then_the_ledgers_corrections(counters: Any) -> None:
    limiter, clock = make(counters, daily_budget_usd="10", tokens_per_hour=1000)
    p = principal()
    ticket = await limiter.admit(p, request(max_tokens=2))
    ticket.release(used("4", prompt=10, completion=20))  # the very charge accounting recorded (markup in)
    ticket.release(used("4", prompt=10, completion=20))  # a second release changes nothing
    (await limiter.admit(p, request(max_tokens=2))).release(None)  # never reached the upstream: nothing charged
    limiter.on_total_changed("u1", clock.now, Decimal("4"), Decimal("4.25"))  # settlement's correction
    limiter.on_total_changed("u1", clock.now - 86400, Decimal("1"), Decimal("2"))  # yesterday: not today's budget
    _, snapshot, _ = await limiter.standing(p)
    assert snapshot.spend["day"] == Decimal("4.25") and snapshot.spend["all"] == Decimal("5.25")
    assert sum(snapshot.tokens.values()) == 30 and snapshot.reserved == 0


@pytest.mark.anyio
async def test_spend_is_loaded_once_at_start_up(counters: Any) -> None:
    limiter, _ = make(counters, monthly_budget_usd="5")
    calls: list[str] = []

    class Usage:
        async def spend_since(self, since_iso: str, *, user_id: str | None = None) -> dict[str, Decimal]:
            calls.append(since_iso)
            return {"u1": Decimal("5")} if since_iso >= "2025-03-01" else {"u1": Decimal("7")}

    await limiter.load_spend(Usage())
    assert calls == ["2025-03-10T00:00:00.000000Z", "2025-03-10T00:00:00.000000Z",
                     "2025-03-01T00:00:00.000000Z", "1970-01-01T00:00:00.000000Z"]
    with pytest.raises(PaymentRequired):
        await limiter.admit(principal(), request(max_tokens=0))
    assert (await limiter.standing(principal()))[1].spend["all"] == Decimal(7)


# -- the memory backend's hot path keeps first_refusal's rules ------------------------


def _random_limits(rng: random.Random) -> Limits:
    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.3 else value

    return Limits(
        requests_per_minute=maybe(rng.randint(0, 6)), requests_per_hour=maybe(rng.randint(0, 12)),
        max_concurrent=maybe(rng.randint(0, 4)), tokens_per_hour=maybe(rng.randint(0, 40)),
        daily_budget_usd=maybe(Decimal(rng.randint(0, 20)) / 4), monthly_budget_usd=maybe(Decimal(rng.randint(0, 40)) / 4),
    )


def test_the_memory_fast_path_refuses_exactly_as_first_refusal() -> None:
    """`MemoryCounters.user(…).acquire` (written out for speed) and `first_refusal` (a snapshot; Redis's
    rules) agree on random counters, limits and clocks crossing second, minute, hour and day
    edges, with admissions and tokens of the current second still waiting to join the windows;
    a refusal changes nothing and an admission counts exactly one request."""
    rng = random.Random(5)
    for _ in range(400):
        counters, now = MemoryCounters(), T0 + rng.uniform(-90_000, 90_000)
        user = counters.user("u")
        for _ in range(rng.randint(0, 30)):
            now += rng.choice((0.0, 0.2, 0.2, 1.5, 20.0, 700.0, 3000.0))
            step = rng.random()
            if step < 0.2:
                user.minute.add(now)
                user.hour.add(now)
            elif step < 0.45:  # admitted in this second: waits in `admitted`
                with contextlib.suppress(Refusal):
                    user.acquire(_random_limits(rng), rng.randint(0, 200) * 10**10, False, now)
            elif step < 0.6:
                user.add_spend(now - rng.choice((0, 0, 5000)), rng.randint(1, 300) * 10**10)  # $0.01–3
            elif step < 0.8:  # tokens reported in this second: wait in `used_tokens`
                counters.spend("u", now, 0, rng.randint(1, 9), now)
            else:
                user.inflight += 1
                user.reserved += rng.randint(0, 200) * 10**10
            limits, free = _random_limits(rng), rng.random() < 0.2
            before = copy.deepcopy(user).snapshot(now)  # a copy: a snapshot settles what waits
            expected = first_refusal(limits, before, free=free)
            try:
                user.acquire(limits, 25 * 10**10, free, now)
            except Refusal as refused:
                assert refused.name == expected and user.snapshot(now) == before
            else:
                assert expected is None
                after = user.snapshot(now)
                assert sum(after.minute.values()) == sum(before.minute.values()) + 1
                assert sum(after.hour.values()) == sum(before.hour.values()) + 1
                assert after.inflight == before.inflight + 1


@pytest.mark.anyio
async def test_a_refusal_leaves_the_memory_counters_untouched() -> None:
    counters = MemoryCounters()
    limits = Limits(requests_per_minute=1, daily_budget_usd=Decimal(1))
    await counters.acquire("u", limits, to_pico(Decimal("0.5")), False, T0)
    before = await counters.snapshot("u", T0)
    with pytest.raises(Refusal) as refused:
        await counters.acquire("u", limits, to_pico(Decimal("0.5")), False, T0 + 1)
    assert refused.value.name == "requests_per_minute" and refused.value.snapshot.inflight == 1
    assert await counters.snapshot("u", T0 + 1) == before


# -- windows ---------------------------------------------------------------------------


def test_sliding_window_counts_the_last_span_only() -> None:
    window = SlidingWindow(60)
    window.add(100.2)
    window.add(130.0, 2)
    assert window.count(159.9) == 3
    assert window.frees_at(159.9, 3) == 160.0 and window.frees_at(159.9, 1) == 190.0
    assert window.count(160.0) == 2 and window.next_expiry(160.0) == 190.0
    assert window.count(190.0) == 0 and window.frees_at(190.0, 1) == 190.0


def test_calendar_periods() -> None:
    ts = datetime(2024, 12, 31, 23, 0, tzinfo=UTC).timestamp()
    assert period_end("month", ts) == datetime(2025, 1, 1, tzinfo=UTC)
    assert period_end("week", ts) == datetime(2025, 1, 6, tzinfo=UTC)  # weeks start on Monday
    assert period_id("month", ts) == "2024-12" and period_id("week", ts) == "2024-12-30"


def test_prompt_bound_reads_every_shape_of_prompt() -> None:
    parts = [{"type": "text", "text": "abc"}, {"type": "image_url", "image_url": {"url": "data:" + "A" * 999}}]
    assert prompt_tokens_bound({"messages": [{"role": "user", "content": parts}, {"role": "system", "content": "xyz"}]}) == 3
    assert prompt_tokens_bound({"messages": ["abcdef", {"text": "gh", "content": "i"}, None, 7]}) == 4
    assert prompt_tokens_bound({"prompt": ["abc", "def"], "input": "ghi"}) == 4
    assert prompt_tokens_bound({"messages": "abcdef"}) == 3 and prompt_tokens_bound({}) == 1


def test_a_small_body_is_bounded_by_its_size_and_a_large_one_by_its_text() -> None:
    """Up to `SMALL_BODY_BYTES` the prompt bound is the body's size / 3, never below the text's
    (every character is at least one byte of the body); above it the text is walked, so an
    image's base64 does not inflate the reservation."""
    for text in ("hi", "héllo wörld ✓ 日本語", "x" * 4000, "x" * 5000):
        body = {"model": "m", "messages": [{"role": "user", "content": text}]}
        size = len(orjson.dumps(body))
        bound = prompt_tokens_bound(body, size)
        if size <= SMALL_BODY_BYTES:
            assert bound == size // 3 + 1 >= prompt_tokens_bound(body)
        else:
            assert bound == prompt_tokens_bound(body) == 5000 // 3 + 1
    image = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:," + "A" * 99_999}}]}]}
    size = len(orjson.dumps(image))
    assert size > SMALL_BODY_BYTES and prompt_tokens_bound(image, size) == prompt_tokens_bound(image) == 13 // 3 + 1


@pytest.mark.anyio
async def test_a_users_model_is_priced_once_while_the_catalogue_stays_fresh(counters: Any) -> None:
    """The plan keeps the last model's price until the catalogue's `fresh_until`; a new model, or a
    catalogue past it, is looked up again (and a refreshed price is what the next request reserves)."""
    limiter, clock = make(counters, daily_budget_usd="1000")
    catalog = FakeCatalog()
    catalog.prices = dict(FakeCatalog.prices)
    catalog.fresh_until = clock.now + 100
    looked_up: list[str | None] = []
    price = catalog.price
    catalog.price = lambda model: looked_up.append(model) or price(model)  # type: ignore[method-assign]
    limiter.catalog = catalog
    p = principal()

    async def reserved() -> Decimal:
        ticket = await limiter.admit(p, request(max_tokens=1))
        held = (await limiter.standing(p))[1].reserved
        ticket.release(None)
        return held

    first = await reserved()
    assert await reserved() == first and looked_up == [PAID]  # kept
    catalog.prices[PAID] = ModelPrice(Decimal(10), Decimal(20))  # a refresh brings a new price …
    clock.now += 100
    catalog.fresh_until = clock.now + 100  # … and a new freshness
    assert await reserved() > first and looked_up == [PAID, PAID]
    await limiter.admit(p, request(model=FREE))
    assert looked_up == [PAID, PAID, FREE]  # another model: looked up


# -- redis.on_error: local --------------------------------------------------------------


class FlakyShared:
    """Stands in for `RedisCounters`: admits while `up`, raises `CountersUnreachable` while not, and notes
    what the fallback hands it (tickets released, charges queued for when it answers)."""

    def __init__(self) -> None:
        self.up = True
        self.admitted = 0
        self.finished: list[tuple[str, int]] = []
        self.queued: list[int] = []

    def switch(self, up: bool) -> None:
        self.up = up

    async def acquire(self, user_id: str, limits: Limits, reserve: int, free: bool, now: float) -> str:
        from gateway.limits.in_redis import CountersUnreachable

        if not self.up:
            raise CountersUnreachable()
        self.admitted += 1
        return f"ticket-{self.admitted}"

    def finish(self, user_id: str, hold: str, at: float, amount: int, tokens: int, now: float) -> None:
        self.finished.append((hold, amount))

    def spend(self, user_id: str, at: float, amount: int, tokens: int, now: float) -> None:
        self.queued.append(amount)

    spend_if_seeded = spend

    async def answers(self) -> bool:
        return self.up

    async def drain(self) -> bool:
        return True

    async def snapshot(self, user_id: str, now: float) -> Any:
        raise AssertionError("not read in this test")

    async def seed(self, spend: Any, now: float) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest.mark.anyio
async def test_on_error_local_admits_on_local_counters_seeded_from_the_database_then_goes_back() -> None:
    from gateway.core.errors import ServiceUnavailable
    from gateway.limits.fallback import LocalFallback

    class Usage:
        async def spend_since(self, since_iso: str, *, user_id: str | None = None) -> dict[str, Decimal]:
            return {"u1": Decimal("2")}  # spent before the outage, as the database has it

    shared, counted = FlakyShared(), []
    limiter, clock = make(shared, monthly_budget_usd="5")
    fallback = LocalFallback(shared, Usage(), settle_wait_s=0, clock=clock,  # type: ignore[arg-type]
                             on_admitted=lambda: counted.append(1), probe_every_s=0.01)
    limiter = Limiter(limiter.config, shared, FakeCatalog(), clock=clock, fallback=fallback)  # type: ignore[arg-type]
    p = principal()
    in_flight = await limiter.admit(p, request("acme/unlisted"))  # on Redis, still running when it goes
    shared.switch(up=False)
    local = [await limiter.admit(p, request("acme/unlisted")) for _ in range(2)]  # $0.5 reserved each
    assert fallback.active and limiter.counters is fallback and len(counted) == 2
    in_flight.release(used("1"))  # Redis's ticket released there, its charge counted here too: $3 spent
    assert shared.finished == [("ticket-1", to_pico(Decimal(1)))]
    local[0].release(used("1"))  # $4 spent, $0.5 reserved
    local.append(await limiter.admit(p, request("acme/unlisted")))  # 4 + 0.5 < 5
    with pytest.raises(PaymentRequired):
        await limiter.admit(p, request("acme/unlisted"))  # 4 + 1.0 ≥ 5: refused, never past the budget
    assert len(counted) == 3 and shared.queued == [to_pico(Decimal(1))]  # the local charge, queued for Redis

    shared.switch(up=True)
    for _ in range(200):
        if limiter.counters is shared:
            break
        await asyncio.sleep(0.01)
    assert limiter.counters is shared and not fallback.active
    await limiter.admit(p, request("acme/unlisted"))  # decided on Redis again
    assert shared.admitted == 2 and len(counted) == 3
    local[1].release(used("1"))  # admitted locally, ends after the switch: queued for Redis all the same
    assert shared.queued == [to_pico(Decimal(1))] * 2
    await fallback.close()

    down = FlakyShared()
    down.switch(up=False)
    closed_limiter, _ = make(down, monthly_budget_usd="5")  # no fallback: on_error closed
    with pytest.raises(ServiceUnavailable, match="shared counter store is unreachable"):
        await closed_limiter.admit(p, request("acme/unlisted"))
