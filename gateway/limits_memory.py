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
    __slots__ = ("minute", "hour", "tokens", "second", "admitted", "used_tokens", "inflight", "reserved", "total", "ids",
                 "floor", "counted_from", "counted_until")

    def __init__(self) -> None:
        self.minute = SlidingWindow(MINUTE)
        self.hour = SlidingWindow(HOUR)
        self.tokens = SlidingWindow(HOUR)
        # The admissions of the current `second`, and the tokens reported in it, wait in `admitted`
        # and `used_tokens` and join the windows as the next second begins (`settle`): one addition
        # per request on the hot path.
        self.second = -1
        self.admitted = 0
        self.used_tokens = 0
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

    def settle(self, now: float) -> None:
        """Count `second`'s admissions and tokens into the windows, then move every window to `now`."""
        if self.admitted:
            self.minute.bump(self.second, self.admitted)
            self.hour.bump(self.second // 60, self.admitted)
            self.admitted = 0
        if self.used_tokens:
            self.tokens.bump(self.second // 60, self.used_tokens)
            self.used_tokens = 0
        self.second = int(now)
        self.minute.advance(now)
        self.hour.advance(now)
        self.tokens.advance(now)

    def snapshot(self, now: float) -> Snapshot:
        self.settle(now)
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
        name and explain a refusal, and counts the request in `admitted` (see `settle`)."""
        user = self._users.get(user_id) or self._user(user_id)
        if int(now) != user.second:
            user.settle(now)  # once a second per user
        admitted = user.admitted
        refused = (user.minute.total + admitted >= limits.rpm_cap or user.hour.total + admitted >= limits.rph_cap
                   or user.inflight >= limits.concurrent_cap or user.tokens.total + user.used_tokens >= limits.tokens_cap)
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
        user.admitted = admitted + 1
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
        if tokens:
            if int(now) != user.second:
                user.settle(now)
            user.used_tokens += tokens

    def spend(self, user_id: str, at: float, amount: int, tokens: int, now: float) -> None:
        user = self._users.get(user_id) or self._user(user_id)
        if amount:
            user.add_spend(at, amount)
        if tokens:
            user.settle(now)
            user.used_tokens += tokens

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
