"""Limit counters in this process's memory: one instance, no Redis.

`acquire` never awaits between reading the counters and updating them, so on the single
event loop it is atomic: concurrent requests cannot both see the last free slot. It and
`finish` run for every request, so they are written out in one piece each: in the limiter's
measured cost (`make bench`, "price of limits") every function call and every object
touched shows. Money stays Decimal throughout.
"""

from __future__ import annotations

from decimal import Decimal

from gateway.limits import HOUR, HOUR_BUCKET_S, MINUTE, MINUTE_BUCKET_S, Limits, Refusal, Snapshot, rate_headers
from gateway.money import ZERO
from gateway.windows import PERIODS, SlidingWindow, period_ids

DAY, MONTH = PERIODS.index("day"), PERIODS.index("month")
PERIOD_INDEXES = range(len(PERIODS))
assert MINUTE_BUCKET_S == 1 and HOUR_BUCKET_S == 60, "the hot path computes buckets with integer arithmetic"


class _UserCounters:
    __slots__ = ("minute", "hour", "tokens", "inflight", "reserved", "ids", "spend", "counted_from", "counted_until",
                 "total")

    def __init__(self) -> None:
        self.minute = SlidingWindow(MINUTE)
        self.hour = SlidingWindow(HOUR)
        self.tokens = SlidingWindow(HOUR)
        self.inflight = 0  # admitted requests not finished yet
        self.reserved = ZERO  # the reservations they hold
        self.ids = [""] * len(PERIODS)  # per period (`PERIODS` order): the period `spend` counts …
        self.spend = [ZERO] * len(PERIODS)  # … and the charges made in it
        # `ids` are the current periods from `counted_from` until `counted_until` (one UTC hour:
        # periods change only on the hour), so the hot path tests a time, not the periods
        self.counted_from = self.counted_until = 0.0
        self.total = ZERO

    def spend_now(self, now: float) -> list[Decimal]:
        """Charged so far in the current day, week and month (a period that is over counts zero)."""
        if self.counted_from <= now < self.counted_until:
            return self.spend
        ids = period_ids(now)
        for i, current in enumerate(ids):
            if self.ids[i] < current:  # a new period began: its spend starts at zero
                self.ids[i], self.spend[i] = current, ZERO
        if self.ids == list(ids):
            self.counted_from = now // 3600 * 3600
            self.counted_until = self.counted_from + 3600
            return self.spend
        # the clock is behind a charge already counted: report only what falls in `now`'s periods
        return [amount if held == current else ZERO for held, current, amount in zip(self.ids, ids, self.spend)]

    def add_spend(self, at: float, amount: Decimal) -> None:
        if self.counted_from <= at < self.counted_until:  # the charge falls in the periods counted now
            spend = self.spend
            for i in PERIOD_INDEXES:
                spend[i] += amount
            self.total += amount
            return
        for i, pid in enumerate(period_ids(at)):
            held = self.ids[i]
            if held < pid:
                self.ids[i], self.spend[i] = pid, amount
                self.counted_from = self.counted_until = 0.0
            elif held == pid:
                self.spend[i] += amount
            # a charge for a period already over changes nothing that is still counted
        self.total += amount

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
        """`acquire` without a coroutine (the limiter calls this one), written out in one piece.

        It runs for every request, so it applies `first_refusal`'s rules to the live counters
        in place (a test holds the two to the same answers), builds a `Snapshot` only to
        explain a refusal, and counts the request straight into the windows."""
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
        refused = None
        if (value := limits.requests_per_minute) is not None and in_minute >= value:
            refused = "requests_per_minute"
        elif (value := limits.requests_per_hour) is not None and in_hour >= value:
            refused = "requests_per_hour"
        elif (value := limits.max_concurrent) is not None and user.inflight >= value:
            refused = "max_concurrent"
        elif (value := limits.tokens_per_hour) is not None and tokens.total >= value:
            refused = "tokens_per_hour"
        elif not free and limits.budgeted:
            spend = user.spend if user.counted_from <= now < user.counted_until else user.spend_now(now)
            if (budget := limits.daily_budget_usd) is not None and spend[DAY] + user.reserved >= budget:
                refused = "daily_budget_usd"
            elif (budget := limits.monthly_budget_usd) is not None and spend[MONTH] + user.reserved >= budget:
                refused = "monthly_budget_usd"
        if refused is not None:
            raise Refusal(refused, user.snapshot(now))
        headers = rate_headers(limits, in_minute, minute.oldest(), in_hour, hour.oldest())
        counts = minute.counts
        counts[second] = counts.get(second, 0) + 1
        minute.total = in_minute + 1
        counts = hour.counts
        counts[bucket] = counts.get(bucket, 0) + 1
        hour.total = in_hour + 1
        user.inflight += 1
        if reserve:
            user.reserved += reserve
        return reserve, headers  # the hold is the reservation itself

    def finish(self, user_id: str, hold: Decimal, at: float, amount: Decimal, tokens: int, now: float) -> None:
        user = self._users.get(user_id) or self._user(user_id)
        user.inflight -= 1
        if hold:
            user.reserved -= hold
        if amount:
            user.add_spend(at, amount)
        if tokens:
            user.tokens.add(now, tokens)

    def spend(self, user_id: str, at: float, amount: Decimal, tokens: int, now: float) -> None:
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
        for i, period in enumerate(PERIODS):
            for user_id, amount in spend.get(period, {}).items():
                user = self._user(user_id)
                user.ids[i], user.spend[i] = ids[i], amount
                user.counted_from = user.counted_until = 0.0
        for user_id, amount in spend.get("all", {}).items():
            self._user(user_id).total = amount

    async def close(self) -> None:
        return None
