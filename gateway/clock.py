"""Time in one place, so tests can hand in a clock instead of patching."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable

Clock = Callable[[], float]  # seconds since the epoch, like time.time


def system_clock() -> float:
    return time.time()


def iso(ts: float) -> str:
    """UTC ISO-8601 with microseconds and a Z: sorts as text in time order."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
