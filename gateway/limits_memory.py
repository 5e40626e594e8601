"""Limit counters in this process's memory: one instance, no Redis.

`acquire` never awaits between reading the counters and updating them, so on the single
event loop it is atomic: concurrent requests cannot both see the last free slot. It is
the hot path of every request, so it reads the live counters in place (`_UserCounters.
refusal` applies `limits.first_refusal`'s rules without building a `Snapshot`; a test
holds the two to the same answers) and builds a snapshot only to explain a refusal.
Money stays Decimal throughout.
"""

from __future__ import annotations

from decimal import Decimal

from gateway.limits import HOUR, MINUTE, Limits, Refusal, Snapshot, rate_headers
from gateway.money import ZERO
from gateway.windows import PERIODS, SlidingWindow, period_ids

DAY, MONTH = PERIODS.index("day"), PERIODS.index("month")
PERIOD_INDEXES = range(len(PERIODS))


class _UserCounters:
    __slots__ = ("minute", "hour", "tokens", "inflight", "reserved", "ids", "spend", "current", "total")

    def __init__(self) -> None:
        self.minute = SlidingWindow(MINUTE)
        self.hour = SlidingWindow(HOUR)
        self.tokens = SlidingWindow(HOUR)
        self.inflight = 0  # admitted requests not finished yet
        self.reserved = ZERO  # the reservations they hold
        self.ids = [""] * len(PERIODS)  # per period (`PERIODS` order): the period `spend` counts …
        self.spend = [ZERO] * len(PERIODS)  # … and the charges made in it
        self.current: tuple[str, ...] | None = None  # `period_ids` when `ids` last matched it
        self.total = ZERO

    def spend_now(self, now: float) -> list[Decimal]:
        """Charged so far in the current day, week and month (a period that is over counts zero)."""
        ids = period_ids(now)
        if ids is self.current:  # one cached tuple per hour: the usual case is this identity check
            return self.spend
        for i, current in enumerate(ids):
            if self.ids[i] < current:  # a new period began: its spend starts at zero
                self.ids[i], self.spend[i] = current, ZERO
        if self.ids == list(ids):
            self.current = ids
            return self.spend
        # the clock is behind a charge already counted: report only what falls in `now`'s periods
        return [amount if held == current else ZERO for held, current, amount in zip(self.ids, ids, self.spend)]

    def add_spend(self, at: float, amount: Decimal) -> None:
        ids = period_ids(at)
        if ids is self.current:  # the charge falls in the periods counted now (nearly always)
            spend = self.spend
            for i in PERIOD_INDEXES:
                spend[i] += amount
            self.total += amount
            return
        for i, pid in enumerate(ids):
            held = self.ids[i]
            if held < pid:
                self.ids[i], self.spend[i] = pid, amount
                self.current = None
            elif held == pid:
                self.spend[i] += amount
            # a charge for a period already over changes nothing that is still counted
        self.total += amount

    def refusal(self, limits: Limits, free: bool, now: float) -> str | None:
        """`first_refusal` on the live counters (the request windows advanced to `now` already)."""
        value = limits.requests_per_minute
        if value is not None and self.minute.total >= value:
            return "requests_per_minute"
        value = limits.requests_per_hour
        if value is not None and self.hour.total >= value:
            return "requests_per_hour"
        value = limits.max_concurrent
        if value is not None and self.inflight >= value:
            return "max_concurrent"
        value = limits.tokens_per_hour
        if value is not None and self.tokens.count(now) >= value:
            return "tokens_per_hour"
        daily, monthly = limits.daily_budget_usd, limits.monthly_budget_usd
        if free or (daily is None and monthly is None):
            return None
        spend = self.spend_now(now)
        if daily is not None and spend[DAY] + self.reserved >= daily:
            return "daily_budget_usd"
        if monthly is not None and spend[MONTH] + self.reserved >= monthly:
            return "monthly_budget_usd"
        return None

    def snapshot(self, now: float) -> Snapshot:
        spend = dict(zip(PERIODS, self.spend_now(now)))
        spend["all"] = self.total
        return Snapshot(
            minute=self.minute.buckets(now),
            hour=self.hour.buckets(now),
            tokens=self.tokens.buckets(now),
            inflight=self.inflight,
            reserved=self.reserved,
            spend=spend,
        )


class MemoryCounters:
    def __init__(self) -> None:
        self._users: dict[str, _UserCounters] = {}

    def _user(self, user_id: str) -> _UserCounters:
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = _UserCounters()
        return user

    async def acquire(
        self, user_id: str, limits: Limits, reserve: Decimal, free: bool, now: float
    ) -> tuple[Decimal, list[tuple[bytes, bytes]]]:
        return self.acquire_now(user_id, limits, reserve, free, now)

    def acquire_now(
        self, user_id: str, limits: Limits, reserve: Decimal, free: bool, now: float
    ) -> tuple[Decimal, list[tuple[bytes, bytes]]]:
        """`acquire` without a coroutine: it never waits (the limiter calls this one)."""
        user = self._users.get(user_id) or self._user(user_id)
        minute, hour = user.minute, user.hour
        minute_now, hour_now = minute.advance(now), hour.advance(now)
        refused = user.refusal(limits, free, now)
        if refused is not None:
            raise Refusal(refused, user.snapshot(now))
        headers = rate_headers(limits, minute.total, minute.oldest(minute_now), hour.total, hour.oldest(hour_now))
        minute.bump(minute_now)
        hour.bump(hour_now)
        user.inflight += 1
        if reserve:
            user.reserved += reserve
        return reserve, headers  # the hold is the reservation itself

    def finish(self, user_id: str, hold: Decimal) -> None:
        user = self._users.get(user_id)
        if user is not None:
            user.inflight -= 1
            if hold:
                user.reserved -= hold

    def spend(self, user_id: str, at: float, amount: Decimal, tokens: int, now: float) -> None:
        user = self._users.get(user_id) or self._user(user_id)
        if amount:
            user.add_spend(at, amount)
        if tokens:
            tokens_window = user.tokens
            tokens_window.bump(tokens_window.advance(now), tokens)

    async def snapshot(self, user_id: str, now: float) -> Snapshot:
        user = self._users.get(user_id)
        return user.snapshot(now) if user is not None else Snapshot(spend={p: ZERO for p in (*PERIODS, "all")})

    async def seed(self, spend: dict[str, dict[str, Decimal]], now: float) -> None:
        ids = period_ids(now)
        for i, period in enumerate(PERIODS):
            for user_id, amount in spend.get(period, {}).items():
                user = self._user(user_id)
                user.ids[i], user.spend[i], user.current = ids[i], amount, None
        for user_id, amount in spend.get("all", {}).items():
            self._user(user_id).total = amount

    async def close(self) -> None:
        return None
