"""Background work that yields to traffic: spare CPU at full speed, a floor rate when saturated.

Settling a generation costs about as much CPU as proxying one (a second upstream call),
so doing it eagerly would halve throughput under load. `CpuMeter` samples this process's
CPU share a few times a second (one `time.process_time()` call, nothing per request);
`Pacer.acquire` lets background work through at once while the process has spare CPU,
and at `floor_per_s` while it is saturated, so deferred work never starves and drains
as soon as the load eases.

Saturated means busy *and serving traffic* (the `activity` count moved within the last
`traffic_window_s`): the background work's own CPU must not count as load, or a
backlog draining at full speed would throttle itself to the floor once traffic stops.
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
        activity: Callable[[], int] | None = None,
        traffic_window_s: float = 1.0,
    ) -> None:
        self.interval_s = interval_s
        self._cpu = cpu_clock
        self._wall = wall_clock
        self._last = (self._cpu(), self._wall())
        self.share = 0.0
        self.activity = activity  # a count that grows with traffic (requests recorded)
        self.traffic_window_s = traffic_window_s
        self._last_activity: int | None = None
        self._activity_at = self._wall()

    def sample(self) -> float:
        cpu, wall = self._cpu(), self._wall()
        last_cpu, last_wall = self._last
        if wall > last_wall:
            self.share = (cpu - last_cpu) / (wall - last_wall)
            self._last = (cpu, wall)
        if self.activity is not None:
            count = self.activity()
            if count != self._last_activity:
                self._last_activity, self._activity_at = count, wall
        return self.share

    @property
    def traffic(self) -> bool:
        """Whether requests are being served (always True when nobody counts them)."""
        return self.activity is None or self._wall() - self._activity_at <= self.traffic_window_s

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
        max_backlog: int = 2000,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], "asyncio.Future[None] | object"] = asyncio.sleep,
    ) -> None:
        self.meter = meter
        self.busy_share = busy_share
        self.floor_interval_s = 1.0 / floor_per_s
        self.max_backlog = max_backlog
        self._clock = clock
        self._sleep = sleep
        self._next_slot = 0.0
        self.throttled = 0

    def saturated(self) -> bool:
        return self.meter is not None and self.meter.share >= self.busy_share and self.meter.traffic

    async def acquire(self, backlog: int = 0) -> None:
        """Wait for a turn: none while there is spare CPU or `backlog` (the work waiting) is over
        `max_backlog`, one per floor interval while saturated: deferred work stays bounded."""
        while self.saturated() and backlog <= self.max_backlog:
            now = self._clock()
            if now >= self._next_slot:
                self._next_slot = now + self.floor_interval_s
                return
            self.throttled += 1
            await self._sleep(self._next_slot - now)  # type: ignore[misc]
