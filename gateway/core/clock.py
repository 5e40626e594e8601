"""Time in one place, so tests can hand in a clock instead of patching."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from functools import lru_cache
from typing import Callable

Clock = Callable[[], float]  # seconds since the epoch, like time.time


# The builtin itself, not a function around it: the request path reads the clock several
# times per request, and a wrapper would add a Python call to each read.
system_clock: Clock = time.time


def iso(ts: float) -> str:
    """UTC ISO-8601 with microseconds and a Z: sorts as text in time order.

    Called per request (usage records); the date-time part is formatted once per second.
    """
    if ts < 0:  # before 1970: not worth a fast path
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fraction, whole = math.modf(ts)  # rounded as datetime.fromtimestamp rounds (half-even)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return f"{_second(int(whole))}.{micros:06d}Z"


@lru_cache(maxsize=4)
def _second(whole: int) -> str:
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
