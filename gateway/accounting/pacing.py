"""Background work that yields to traffic: spare CPU at full speed, a floor rate when saturated.

Settling a generation costs about as much CPU as proxying one (a second upstream call),
so doing it eagerly would halve throughput under load. `CpuMeter` samples this process's
CPU share a few times a second (one `time.process_time()` call, nothing per request);
`Pacer.acquire` lets background work through at once while the process has spare CPU,
and at `floor_per_s` while it is saturated, so deferred work never starves and drains
as soon as the load eases.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable


class CpuMeter:
    """This process's CPU use as a share of one core, over the last sampling interval."""

    def __init__(
        self,
        *,
        interval_s: float = 0.1,
        cpu_clock: Callable[[], float] = time.process_time,
        wall_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self._cpu = cpu_clock
        self._wall = wall_clock
        self._last = (self._cpu(), self._wall())
        self.share = 0.0

    def sample(self) -> float:
        cpu, wall = self._cpu(), self._wall()
        last_cpu, last_wall = self._last
        if wall > last_wall:
            self.share = (cpu - last_cpu) / (wall - last_wall)
            self._last = (cpu, wall)
        return self.share

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample()


class Pacer:
    def __init__(
        self,
        meter: CpuMeter | None,
        *,
        busy_share: float = 0.6,
        floor_per_s: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], "asyncio.Future[None] | object"] = asyncio.sleep,
    ) -> None:
        self.meter = meter
        self.busy_share = busy_share
        self.floor_interval_s = 1.0 / floor_per_s
        self._clock = clock
        self._sleep = sleep
        self._next_slot = 0.0
        self.throttled = 0

    def saturated(self) -> bool:
        return self.meter is not None and self.meter.share >= self.busy_share

    async def acquire(self) -> None:
        """Wait for a turn: none while there is spare CPU, one per floor interval while saturated."""
        while self.saturated():
            now = self._clock()
            if now >= self._next_slot:
                self._next_slot = now + self.floor_interval_s
                return
            self.throttled += 1
            await self._sleep(self._next_slot - now)  # type: ignore[misc]
