"""Limit counters in this process's memory: one instance, no Redis.

`acquire` never awaits between reading the counters and updating them, so on the single
event loop it is atomic: concurrent requests cannot both see the last free slot. It and
`finish` run for every request, so they are written out in one piece each: in the limiter's
measured cost (`make bench`, "price of limits") every function call and every object
touched shows. Money is counted in whole picodollars (ints, as in Redis); snapshots
give it back as Decimal.
"""

from __future__ import annotations

from decimal import Decimal

from gateway.limits import (
    HOUR, HOUR_BUCKET_S, MINUTE, MINUTE_BUCKET_S, Limits, Refusal, Snapshot, first_refusal,
)
from gateway.money import ZERO, from_pico, to_pico
from gateway.windows import PERIODS, SlidingWindow, period_ids

DAY, MONTH = PERIODS.index("day"), PERIODS.index("month")
assert MINUTE_BUCKET_S == 1 and HOUR_BUCKET_S == 60, "the hot path computes buckets with integer arithmetic"


class _UserCounters:
    __slots__ = ("minute", "hour", "tokens", "inflight", "reserved", "total", "ids", "floor", "counted_from",
                 "counted_until")

    def __init__(self) -> None:
        self.minute = SlidingWindow(MINUTE)
        self.hour = SlidingWindow(HOUR)
        self.tokens = SlidingWindow(HOUR)
        self.inflight = 0  # admitted requests not finished yet
        self.reserved = 0  # the reservations they hold (picodollars, as all money here)
        self.total = 0  # everything charged
        # Per period (`PERIODS` order): the period counted, and the part of `total` charged before
        # it began (or for an earlier one), so its spend is `total - floor[i]` and a charge in the
        # current periods is one addition to `total`.
        self.ids = [""] * len(PERIODS)
        self.floor = [0] * len(PERIODS)
        # `ids` are the current periods from `counted_from` until `counted_until` (one UTC hour:
        # periods change only on the hour), so the hot path tests a time, not the periods
        self.counted_from = self.counted_until = 0.0

    def spend_now(self, now: float) -> list[int]:
        """Charged so far in the current day, week and month (a period that is over counts zero)."""
        total = self.total
        if not self.counted_from <= now < self.counted_until:
            ids = period_ids(now)
            for i, current in enumerate(ids):
                if self.ids[i] < current:  # a new period began: nothing charged in it yet
                    self.ids[i], self.floor[i] = current, total
            if self.ids != list(ids):
                # the clock is behind a charge already counted: report only what falls in `now`'s periods
                return [total - floor if held == current else 0
                        for held, current, floor in zip(self.ids, ids, self.floor)]
            self.counted_from = now // 3600 * 3600
            self.counted_until = self.counted_from + 3600
        return [total - floor for floor in self.floor]

    def add_spend(self, at: float, amount: int) -> None:
        if not self.counted_from <= at < self.counted_until:  # else it falls in the periods counted now
            for i, pid in enumerate(period_ids(at)):
                held = self.ids[i]
                if held < pid:  # the charge opens period i
                    self.ids[i], self.floor[i] = pid, self.total
                    self.counted_from = self.counted_until = 0.0
                elif held > pid:  # a charge for a period already over: not in the one counted
                    self.floor[i] += amount
        self.total += amount

    def snapshot(self, now: float) -> Snapshot:
        spend = {period: from_pico(amount) for period, amount in zip(PERIODS, self.spend_now(now))}
        spend["all"] = from_pico(self.total)
        return Snapshot(
            minute=self.minute.buckets(now),
            hour=self.hour.buckets(now),
            tokens=self.tokens.buckets(now),
            inflight=self.inflight,
            reserved=from_pico(self.reserved),
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

    async def acquire(self, user_id: str, limits: Limits, reserve: int, free: bool, now: float) -> int:
        return self.acquire_now(user_id, limits, reserve, free, now)

    def acquire_now(self, user_id: str, limits: Limits, reserve: int, free: bool, now: float) -> int:
        """`acquire` without a coroutine (the limiter calls this one), written out in one piece.

        It runs for every request, so it decides on the live counters in place with `Limits`'
        int caps (a test holds it to `first_refusal`'s answers), builds a `Snapshot` only to
        name and explain a refusal, and counts the request straight into the windows."""
        user = self._users.get(user_id) or self._user(user_id)
        minute, hour, tokens = user.minute, user.hour, user.tokens
        second = int(now)  # the minute window's bucket (1 s); the hour and token windows' is the minute
        bucket = second // 60
        if second != minute.current:
            minute.advance(now)
        if bucket != hour.current:
            hour.advance(now)
        if bucket != tokens.current:
            tokens.advance(now)
        in_minute, in_hour = minute.total, hour.total
        refused = (in_minute >= limits.rpm_cap or in_hour >= limits.rph_cap or user.inflight >= limits.concurrent_cap
                   or tokens.total >= limits.tokens_cap)
        if not refused and limits.budgeted and not free:
            if user.counted_from <= now < user.counted_until:
                committed, floor = user.total + user.reserved, user.floor
                day, month = committed - floor[DAY], committed - floor[MONTH]
            else:
                spend = user.spend_now(now)
                day, month = spend[DAY] + user.reserved, spend[MONTH] + user.reserved
            refused = day >= limits.daily_cap_pico or month >= limits.monthly_cap_pico
        if refused:
            snapshot = user.snapshot(now)
            name = first_refusal(limits, snapshot, free=free)
            assert name is not None, "acquire_now and first_refusal disagree"
            raise Refusal(name, snapshot)
        counts = minute.counts
        counts[second] = counts.get(second, 0) + 1
        minute.total = in_minute + 1
        counts = hour.counts
        counts[bucket] = counts.get(bucket, 0) + 1
        hour.total = in_hour + 1
        user.inflight += 1
        user.reserved += reserve
        return reserve  # the hold is the reservation itself

    def finish(self, user_id: str, hold: int, at: float, amount: int, tokens: int, now: float) -> None:
        user = self._users.get(user_id) or self._user(user_id)
        user.inflight -= 1
        user.reserved -= hold
        if amount:
            if user.counted_from <= at < user.counted_until:  # `add_spend`'s first step
                user.total += amount
            else:
                user.add_spend(at, amount)
        if tokens:  # `tokens.add(now, tokens)` in place
            window = user.tokens
            bucket = int(now) // 60
            if bucket != window.current:
                window.advance(now)
            counts = window.counts
            counts[bucket] = counts.get(bucket, 0) + tokens
            window.total += tokens

    def spend(self, user_id: str, at: float, amount: int, tokens: int, now: float) -> None:
        user = self._users.get(user_id) or self._user(user_id)
        if amount:
            user.add_spend(at, amount)
        if tokens:
            user.tokens.add(now, tokens)

    async def snapshot(self, user_id: str, now: float) -> Snapshot:
        user = self._users.get(user_id)
        return user.snapshot(now) if user is not None else Snapshot(spend={p: ZERO for p in (*PERIODS, "all")})

    async def seed(self, spend: dict[str, dict[str, Decimal]], now: float) -> None:
        ids = period_ids(now)
        for user_id, amount in spend.get("all", {}).items():
            self._user(user_id).total = to_pico(amount)
        for i, period in enumerate(PERIODS):
            for user_id, amount in spend.get(period, {}).items():
                user = self._user(user_id)
                user.ids[i], user.floor[i] = ids[i], user.total - to_pico(amount)
                user.counted_from = user.counted_until = 0.0

    async def close(self) -> None:
        return None
