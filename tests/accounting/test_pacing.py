"""Background work yields to traffic: through at once with spare CPU, at the floor rate when saturated."""

import pytest

from gateway.accounting.pacing import CpuMeter, Pacer


class Clocks:
    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0


def test_the_meter_reports_cpu_share_over_the_last_interval() -> None:
    clocks = Clocks()
    meter = CpuMeter(cpu_clock=lambda: clocks.cpu, wall_clock=lambda: clocks.wall)
    clocks.wall, clocks.cpu = 0.1, 0.09
    assert meter.sample() == pytest.approx(0.9)
    clocks.wall, clocks.cpu = 0.2, 0.10
    assert meter.sample() == pytest.approx(0.1)


@pytest.mark.anyio
async def test_spare_cpu_lets_work_through_without_waiting() -> None:
    clocks = Clocks()
    meter = CpuMeter(cpu_clock=lambda: clocks.cpu, wall_clock=lambda: clocks.wall)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    pacer = Pacer(meter, busy_share=0.6, floor_per_s=10, clock=lambda: clocks.wall, sleep=sleep)
    for _ in range(100):
        await pacer.acquire()
    assert slept == [] and pacer.throttled == 0


@pytest.mark.anyio
async def test_a_saturated_process_gets_the_floor_rate_and_catches_up_after() -> None:
    clocks = Clocks()
    meter = CpuMeter(cpu_clock=lambda: clocks.cpu, wall_clock=lambda: clocks.wall)
    clocks.wall, clocks.cpu = 1.0, 0.95
    meter.sample()  # 95% busy

    async def sleep(seconds: float) -> None:
        clocks.wall += seconds

    pacer = Pacer(meter, busy_share=0.6, floor_per_s=10, clock=lambda: clocks.wall, sleep=sleep)
    start = clocks.wall
    for _ in range(5):
        await pacer.acquire()
    assert clocks.wall - start == pytest.approx(0.4)  # 5 turns at 10/s: the first at once, then 0.1 s apart
    meter.share = 0.1  # the load eased
    before = clocks.wall
    for _ in range(50):
        await pacer.acquire()
    assert clocks.wall == before


def test_busy_without_traffic_is_not_saturated() -> None:
    """The look-ups' own CPU must not throttle them once requests stop (issue 14)."""
    clocks = Clocks()
    served = [0]
    meter = CpuMeter(cpu_clock=lambda: clocks.cpu, wall_clock=lambda: clocks.wall,
                     activity=lambda: served[0], traffic_window_s=1.0)
    pacer = Pacer(meter, busy_share=0.6, clock=lambda: clocks.wall)
    served[0] = 5
    clocks.wall, clocks.cpu = 0.1, 0.09
    meter.sample()
    assert pacer.saturated()  # busy while requests are being served
    clocks.wall, clocks.cpu = 1.5, 1.4  # still busy, but no request for 1.4 s: the background work itself
    meter.sample()
    assert meter.share > 0.9 and not pacer.saturated()


@pytest.mark.anyio
async def test_a_saturated_process_runs_a_backlog_over_the_bound_at_full_speed() -> None:
    """Deferred work stays bounded: past `max_backlog` waiting, the floor no longer applies."""
    clocks = Clocks()
    meter = CpuMeter(cpu_clock=lambda: clocks.cpu, wall_clock=lambda: clocks.wall)
    clocks.wall, clocks.cpu = 1.0, 0.95
    meter.sample()

    async def sleep(seconds: float) -> None:
        clocks.wall += seconds

    pacer = Pacer(meter, busy_share=0.6, floor_per_s=10, max_backlog=100, clock=lambda: clocks.wall, sleep=sleep)
    start = clocks.wall
    for _ in range(50):
        await pacer.acquire(backlog=101)
    assert clocks.wall == start and pacer.throttled == 0
    for _ in range(3):
        await pacer.acquire(backlog=100)  # back within the bound: the floor rate again
    assert clocks.wall - start == pytest.approx(0.2)
