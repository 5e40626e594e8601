"""Limit counters in this process's memory: one instance, no Redis.

`acquire` never awaits between reading the counters and updating them, so on the single
event loop it is atomic: concurrent requests cannot both see the last free slot. Money
stays Decimal throughout.
"""

from __future__ import annotations

from decimal import Decimal

from gateway.limits import HOUR, MINUTE, Limits, Snapshot, first_refusal
from gateway.money import ZERO
from gateway.windows import PERIODS, SlidingWindow, period_id


class _UserCounters:
    __slots__ = ("minute", "hour", "tokens", "inflight", "reserved", "spend", "total")

    def __init__(self) -> None:
        self.minute = SlidingWindow(MINUTE)
        self.hour = SlidingWindow(HOUR)
        self.tokens = SlidingWindow(HOUR)
        self.inflight: dict[str, Decimal] = {}  # ticket → reserved charge
        self.reserved = ZERO  # the sum of `inflight`, kept as it changes
        self.spend: dict[str, tuple[str, Decimal]] = {}  # period → (period id, charged in it)
        self.total = ZERO

    def snapshot(self, now: float, *, live: bool = False) -> Snapshot:
        """The counters now; `live` shares the bucket dicts instead of copying them (admission only:
        it reads the snapshot before counting the request, and the totals are taken here)."""
        spend = {"all": self.total}
        held_spend = self.spend
        for period in PERIODS:
            held = held_spend.get(period)
            spend[period] = held[1] if held is not None and held[0] == period_id(period, now) else ZERO
        window = SlidingWindow.view if live else SlidingWindow.buckets
        return Snapshot(
            minute=window(self.minute, now),
            hour=window(self.hour, now),
            tokens=window(self.tokens, now),
            inflight=len(self.inflight),
            reserved=self.reserved,
            spend=spend,
            minute_total=self.minute.total,
            hour_total=self.hour.total,
            tokens_total=self.tokens.total,
        )

    def add_spend(self, at: float, amount: Decimal) -> None:
        for period in PERIODS:
            pid = period_id(period, at)
            held = self.spend.get(period)
            if held is None or held[0] < pid:
                self.spend[period] = (pid, amount)
            elif held[0] == pid:
                self.spend[period] = (pid, held[1] + amount)
            # a charge for a period already over changes nothing that is still counted
        self.total += amount


class MemoryCounters:
    def __init__(self) -> None:
        self._users: dict[str, _UserCounters] = {}

    def _user(self, user_id: str) -> _UserCounters:
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = _UserCounters()
        return user

    async def acquire(
        self, user_id: str, ticket_id: str, limits: Limits, reserve: Decimal, free: bool, now: float
    ) -> tuple[str | None, Snapshot]:
        user = self._user(user_id)
        before = user.snapshot(now, live=True)
        refused = first_refusal(limits, before, free=free)
        if refused is None:
            user.minute.add(now)
            user.hour.add(now)
            user.inflight[ticket_id] = reserve
            user.reserved += reserve
        return refused, before

    def finish(self, user_id: str, ticket_id: str, now: float) -> None:
        user = self._users.get(user_id)
        if user is not None:
            held = user.inflight.pop(ticket_id, None)
            if held is not None:
                user.reserved -= held

    def spend(self, user_id: str, at: float, amount: Decimal, tokens: int, now: float) -> None:
        user = self._user(user_id)
        if amount:
            user.add_spend(at, amount)
        if tokens:
            user.tokens.add(now, tokens)

    async def snapshot(self, user_id: str, now: float) -> Snapshot:
        user = self._users.get(user_id)
        return user.snapshot(now) if user is not None else Snapshot(spend={p: ZERO for p in (*PERIODS, "all")})

    async def seed(self, spend: dict[str, dict[str, Decimal]], now: float) -> None:
        for period in PERIODS:
            pid = period_id(period, now)
            for user_id, amount in spend.get(period, {}).items():
                self._user(user_id).spend[period] = (pid, amount)
        for user_id, amount in spend.get("all", {}).items():
            self._user(user_id).total = amount

    async def close(self) -> None:
        return None
