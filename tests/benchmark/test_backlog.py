"""The pure pieces of the bench's deferred-work accounting: /metrics parsing, the wait, the bounded rule."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ is a tool beside the package, not installed with it

from bench.backlog import bounded, deferred_from, parse_metrics, sustained_summary, wait_until_settled  # noqa: E402
from bench.load import schedule  # noqa: E402

METRICS = """# HELP gateway_settlements_pending Cost look-ups not yet settled
# TYPE gateway_settlements_pending gauge
gateway_settlements_pending 12
gateway_usage_queue_depth 3.0
gateway_requests_total{route="/v1/chat/completions",status="2xx"} 1500
gateway_requests_total{route="/a b}",status="4xx"} 2 1700000000000
gateway_broken_line
"""


def test_parse_metrics_reads_series_with_and_without_labels() -> None:
    values = parse_metrics(METRICS)
    assert values["gateway_settlements_pending"] == 12
    assert values['gateway_requests_total{route="/v1/chat/completions",status="2xx"}'] == 1500
    assert values['gateway_requests_total{route="/a b}",status="4xx"}'] == 2  # a timestamp follows; a brace inside
    assert "gateway_broken_line" not in values


def test_deferred_work_is_pending_look_ups_plus_unwritten_records() -> None:
    assert deferred_from(METRICS) == 15
    assert deferred_from("gateway_settlements_pending 0\n") == 0
    assert deferred_from("other_metric 4\n") is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_settled_once_zero_is_read_several_times_in_a_row() -> None:
    readings = iter([5, 3, 0, 2, 0, 0, 0, 9])
    clock = FakeClock()
    took = wait_until_settled(lambda: next(readings), 60, interval_s=1, consecutive=3, clock=clock, sleep=clock.sleep)
    assert took == 4  # the first of the three zeros in a row came at the fifth read (t = 4 s); the lone one is ignored


def test_not_settled_by_the_deadline_or_not_exposed() -> None:
    clock = FakeClock()
    assert wait_until_settled(lambda: 7, 10, interval_s=1, clock=clock, sleep=clock.sleep) is None
    assert clock.now <= 11
    assert wait_until_settled(lambda: None, 10, clock=clock, sleep=clock.sleep) is None


def test_bounded_means_the_last_third_no_longer_grows() -> None:
    assert bounded([100, 2000, 3000, 3100, 3000, 2900, 3050, 3000, 2950]) is True  # a plateau
    assert bounded([0, 0, 0, 0, 0, 0, 50, 80, 90]) is True  # small and growing: within the +200 slack
    assert bounded([2000, 2500, 2100, 2600, 2200, 2500, 2300, 4600, 2400]) is True  # swings, one spike: level
    assert bounded([1000 * i for i in range(1, 10)]) is False  # still climbing at the end
    assert bounded([1, 2, 3, 4, 5]) is None  # too short to tell (the quick run's 5 s)
    summary = sustained_summary([10, 20, 30] * 3, [5, 0, 0, 0], 1.0, 1.0)
    assert summary["peak"] == 30 and summary["at_load_end"] == 30 and summary["bounded"] is True


def test_paced_schedule_keeps_a_fixed_rate() -> None:
    due = schedule(1000, 2)
    assert len(due) == 2000 and due[0] == 0 and due[-1] == 1.999
    assert all(abs((b - a) - 0.001) < 1e-12 for a, b in zip(due, due[1:]))
    assert schedule(100, 0) == []
