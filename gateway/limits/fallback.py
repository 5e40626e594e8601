"""`redis.on_error: local`: while Redis is unreachable, admit on this process's own counters.

The trade (README, "When things fail"): requests keep flowing through a Redis outage, but each
instance then counts only what it admits itself, so with N instances a user can spend up to N
budgets' worth (and make N times the request limits) until Redis answers again. On one instance
nothing is admitted past a budget. `closed` (the default) refuses with a 503 instead.

How: the first admission that finds Redis unreachable makes the limiter switch to this object (its
`Counters` while degraded). It waits the ledger's flush interval and a margin (so the records of the
requests that just ended are in the database), seeds fresh `MemoryCounters` with every user's spend
from the database (the start-up query, `database_spend`), logs it once and probes Redis every second;
once Redis answers the limiter switches back, and Redis rebuilds any spend it lost from the database
(`in_redis`); the charges queued for Redis meanwhile are written before the switch. Meanwhile:
- a request admitted on Redis before the outage and ending during it releases its Redis ticket
  (queued) and is counted locally too;
- a request admitted locally is counted locally and queued for Redis with `spend_if_seeded`, counted
  there only if Redis kept its data (else the rebuild from the database counts it, once).
Reservations of requests in flight across either switch are not carried over: concurrent requests at
that moment can overrun a budget by their own cost (as across a loss of Redis's data).
The healthy path pays nothing for any of this: the limiter only swaps which counters it calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal
from typing import Any, Callable

from gateway.core.clock import Clock, iso, system_clock
from gateway.core.errors import ServiceUnavailable
from gateway.core.money import ZERO
from gateway.core.windows import PERIODS, period_start
from gateway.limits.in_memory import MemoryCounters
from gateway.limits.in_redis import RedisCounters
from gateway.limits.policy import Limits, Snapshot

log = logging.getLogger("gateway.limits.limiter")


async def database_spend(usage: Any, now: float) -> dict[str, dict[str, Decimal]]:
    """Every user's charged spend per period ("day", "week", "month", "all") from the usage records
    (`store.usage.spend_since`): one query per period."""
    spend: dict[str, dict[str, Decimal]] = {}
    for period in PERIODS:
        spend[period] = await usage.spend_since(iso(period_start(period, now).timestamp()))
    spend["all"] = await usage.spend_since(iso(0))
    return spend


class LocalFallback:
    """The counters the limiter uses while Redis is unreachable (`redis.on_error: local`)."""

    def __init__(self, shared: RedisCounters, usage: Any, *, settle_wait_s: float, clock: Clock = system_clock,
                 on_admitted: Callable[[], None] = lambda: None, probe_every_s: float = 1.0,
                 log_every_s: float = 60.0) -> None:
        self.shared = shared
        self._usage = usage
        self.settle_wait_s = settle_wait_s
        self._clock = clock
        self._on_admitted = on_admitted  # the metric's count of admissions decided here
        self.probe_every_s = probe_every_s
        self.log_every_s = log_every_s
        self.memory = MemoryCounters()
        self.active = False  # degraded: admissions are decided here
        self.admitted = 0  # during the current (or last) outage
        self._entering: asyncio.Task[None] | None = None
        self._early: list[tuple[str, float, int, int, float]] | None = None  # charges while seeding
        self._probe: asyncio.Task[None] | None = None
        self._recovered: list[Callable[[], None]] = []

    def when_recovered(self, callback: Callable[[], None]) -> None:
        """Called once Redis answers again (the limiter switches back to it)."""
        self._recovered.append(callback)

    async def enter(self) -> None:
        """Redis just failed an admission: seed the local counters (once per outage, in a task of its own
        that a caller leaving cannot cancel) and start probing."""
        if self.active:
            return
        if self._entering is None or self._entering.done():
            self._entering = asyncio.get_running_loop().create_task(self._seed())
        await asyncio.shield(self._entering)

    async def _seed(self) -> None:
        early: list[tuple[str, float, int, int, float]] = []
        self.memory, self._early, self.admitted = MemoryCounters(), early, 0
        try:
            await asyncio.sleep(self.settle_wait_s)  # the requests that just ended reach the database
            now = self._clock()
            await self.memory.seed(await database_spend(self._usage, now), now)
        except Exception as exc:
            log.error("Redis (limits) is unreachable and the local counters could not be seeded from the"
                      " database (%s): refusing", exc)
            raise ServiceUnavailable("The gateway cannot check your limits right now; retry shortly.",
                                     headers={"retry-after": "2"}) from None
        finally:
            self._early = None
        for charge in early:
            self.memory.spend(*charge)
        self.active = True
        log.warning("Redis (limits) is unreachable: admitting on this process's own counters, seeded from the"
                    " database (redis.on_error: local); other instances count apart until it answers")
        self._probe = asyncio.get_running_loop().create_task(self._watch(time.monotonic()))

    async def _watch(self, since: float) -> None:
        """Probe Redis every `probe_every_s`; say so at most once a minute; switch back once it answers."""
        logged = since
        while not (await self.shared.answers() and await self.shared.drain()):
            now = time.monotonic()
            if now - logged >= self.log_every_s:
                logged = now
                log.warning("Redis (limits) still unreachable after %.0f s: %d admissions decided on local counters",
                            now - since, self.admitted)
            await asyncio.sleep(self.probe_every_s)
        self.active = False
        log.warning("Redis (limits) answers again after %.0f s: back to the shared counters (%d admissions were"
                    " decided on local counters)", time.monotonic() - since, self.admitted)
        for callback in self._recovered:
            callback()

    def _count_here(self, user_id: str, at: float, amount: int, tokens: int, now: float) -> None:
        if self._early is not None:
            self._early.append((user_id, at, amount, tokens, now))
        elif self.active:
            self.memory.spend(user_id, at, amount, tokens, now)

    # -- the Counters protocol, while degraded -------------------------------------

    async def acquire(self, user_id: str, limits: Limits, reserve: int, free: bool, now: float) -> tuple[Any, int]:
        memory = self.memory
        hold = memory.user(user_id).acquire(limits, reserve, free, now)
        self.admitted += 1
        self._on_admitted()
        return memory, hold  # which counters hold the reservation: a later outage's are new ones

    def finish(self, user_id: str, hold: Any, at: float, amount: int, tokens: int, now: float) -> None:
        if isinstance(hold, str):  # a Redis ticket: admitted before the outage
            self.shared.finish(user_id, hold, at, amount, tokens, now)
            self._count_here(user_id, at, amount, tokens, now)
            return
        memory, reserve = hold
        if memory is self.memory and self.active:
            memory.user(user_id).finish(reserve, at, amount, tokens, now)
        else:
            self._count_here(user_id, at, amount, tokens, now)
        self.shared.spend_if_seeded(user_id, at, amount, tokens, now)

    def spend(self, user_id: str, at: float, amount: int, tokens: int, now: float) -> None:
        self._count_here(user_id, at, amount, tokens, now)
        self.shared.spend_if_seeded(user_id, at, amount, tokens, now)

    async def snapshot(self, user_id: str, now: float) -> Snapshot:
        if self.active:
            return await self.memory.snapshot(user_id, now)
        return Snapshot(spend={p: ZERO for p in (*PERIODS, "all")})

    async def seed(self, spend: dict[str, dict[str, Decimal]], now: float) -> None:
        await self.memory.seed(spend, now)

    async def close(self) -> None:
        for task in (self._entering, self._probe):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
