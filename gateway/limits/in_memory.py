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

from gateway.core.money import ZERO, from_pico, to_pico
from gateway.core.windows import PERIODS, SlidingWindow, period_ids
from gateway.limits.policy import (
    HOUR,
    HOUR_BUCKET_S,
    MINUTE,
    MINUTE_BUCKET_S,
    Limits,
    Refusal,
    Snapshot,
    first_refusal,
)

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

    def acquire(self, limits: Limits, reserve: int, free: bool, now: float) -> int:
        """`MemoryCounters.acquire` for this user, without a coroutine or a look-up, in one piece.

        It runs for every request, so it decides on the live counters in place with `Limits`'
        int caps (a test holds it to `first_refusal`'s answers), builds a `Snapshot` only to
        name and explain a refusal, and counts the request in `admitted` (see `settle`)."""
        if int(now) != self.second:
            self.settle(now)  # once a second per user
        admitted = self.admitted
        refused = (self.minute.total + admitted >= limits.rpm_cap or self.hour.total + admitted >= limits.rph_cap
                   or self.inflight >= limits.concurrent_cap or self.tokens.total + self.used_tokens >= limits.tokens_cap)
        if not refused and limits.budgeted and not free:
            if self.counted_from <= now < self.counted_until:
                committed, floor = self.total + self.reserved, self.floor
                day, month = committed - floor[DAY], committed - floor[MONTH]
            else:
                spend = self.spend_now(now)
                day, month = spend[DAY] + self.reserved, spend[MONTH] + self.reserved
            refused = day >= limits.daily_cap_pico or month >= limits.monthly_cap_pico
        if refused:
            snapshot = self.snapshot(now)
            name = first_refusal(limits, snapshot, free=free)
            assert name is not None, "acquire and first_refusal disagree"
            raise Refusal(name, snapshot)
        self.admitted = admitted + 1
        self.inflight += 1
        self.reserved += reserve
        return reserve  # the hold is the reservation itself

    def finish(self, hold: int, at: float, amount: int, tokens: int, now: float) -> None:
        """`MemoryCounters.finish` for this self."""
        self.inflight -= 1
        self.reserved -= hold
        if amount:
            if self.counted_from <= at < self.counted_until:  # `add_spend`'s first step
                self.total += amount
            else:
                self.add_spend(at, amount)
        if tokens:
            if int(now) != self.second:
                self.settle(now)
            self.used_tokens += tokens


class MemoryCounters:
    def __init__(self) -> None:
        self._users: dict[str, _UserCounters] = {}

    def user(self, user_id: str) -> _UserCounters:
        """The user's counters, with `acquire` and `finish` as plain methods: the limiter keeps them
        on the user's plan, so the request path neither waits nor looks the user up."""
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = _UserCounters()
        return user

    async def acquire(self, user_id: str, limits: Limits, reserve: int, free: bool, now: float) -> int:
        return self.user(user_id).acquire(limits, reserve, free, now)

    def finish(self, user_id: str, hold: int, at: float, amount: int, tokens: int, now: float) -> None:
        self.user(user_id).finish(hold, at, amount, tokens, now)

    def spend(self, user_id: str, at: float, amount: int, tokens: int, now: float) -> None:
        user = self.user(user_id)
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
            self.user(user_id).total = to_pico(amount)
        for i, period in enumerate(PERIODS):
            for user_id, amount in spend.get(period, {}).items():
                user = self.user(user_id)
                user.ids[i], user.floor[i] = ids[i], user.total - to_pico(amount)
                user.counted_from = user.counted_until = 0.0

    async def close(self) -> None:
        return None
