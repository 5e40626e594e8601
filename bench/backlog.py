"""The work a request leaves behind, read from the gateway's /metrics: parsing, waiting, judging.

A gateway answers first and settles later: the cost look-up (`gateway_settlements_pending`)
and the usage record's write (`gateway_usage_queue_depth`) happen after the response. The
bench counts that work as the request's: CPU is read until both are back to zero. Pure
functions here (the clock and the reader are passed in), so they are unit-tested.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

DEFERRED = ("gateway_settlements_pending", "gateway_usage_queue_depth")
# with several workers each scrape reaches one of them: zero must be seen this many times in a row
CONSECUTIVE_ZERO = 3
BOUNDED_RULE = ("bounded = the median of the samples over the last third of the load is at most 20% (plus 200) "
                "above their median over its middle third: the backlog has stopped growing (a backlog the "
                "gateway cannot keep up with climbs by the shortfall every second; medians, because a "
                "bounded one still swings by a flush or a burst of due look-ups from one second to the next)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition → {series: value}; a series is its name plus its labels as written
    (`gateway_settlements_pending`, `gateway_requests_total{route="/v1/chat/completions",status="2xx"}`)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "}" in line:
            labels, _, rest = line.rpartition("}")
            series, fields = labels + "}", rest.split()
        else:
            series, *fields = line.split()
        if not fields:
            continue
        try:
            values[series] = float(fields[0])
        except ValueError:
            continue
    return values


def deferred_from(text: str) -> float | None:
    """Pending look-ups plus unwritten usage records in one scrape; None when neither is exposed."""
    values = parse_metrics(text)
    found = [values[name] for name in DEFERRED if name in values]
    return sum(found) if found else None


def wait_until_settled(read: Callable[[], float | None], timeout_s: float, *, interval_s: float = 0.2,
                       consecutive: int = CONSECUTIVE_ZERO, clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> float | None:
    """Poll `read` until it gives 0 `consecutive` times in a row; the seconds that took (from the first
    poll to the first of those zeros), or None at `timeout_s` or when nothing is exposed (None read)."""
    began = clock()
    zeros, first_zero = 0, None
    while True:
        value = read()
        if value is None:
            return None
        now = clock()
        if value == 0:
            first_zero = now if zeros == 0 else first_zero
            zeros += 1
            if zeros >= consecutive:
                return round(first_zero - began, 2)
        else:
            zeros = 0
        if now - began > timeout_s:
            return None
        sleep(interval_s)


MIN_SAMPLES = 9  # three a third at least: a shorter run (the quick one) is too short to tell


def bounded(during: list[float]) -> bool | None:
    """BOUNDED_RULE over the samples taken during the load (one a second); None with fewer than MIN_SAMPLES."""
    if len(during) < MIN_SAMPLES:
        return None
    third = len(during) // 3
    middle, last = during[third:2 * third], during[2 * third:]
    return statistics.median(last) <= statistics.median(middle) * 1.2 + 200


def sustained_summary(during: list[float], after: list[float], interval_s: float,
                      settled_s: float | None) -> dict[str, object]:
    """What the sustained run's samples say: peak, the bounded verdict, and the drain after the load."""
    peak = max(during + after, default=0.0)
    return {"peak": peak, "bounded": bounded(during), "bounded_rule": BOUNDED_RULE,
            "at_load_end": during[-1] if during else None, "settled_s": settled_s,
            "samples_during": during, "samples_after": after, "interval_s": interval_s}
