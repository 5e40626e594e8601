"""Time windows for limits: sliding request/token windows and calendar budget periods.

Rate windows slide, so "60 a minute" means at most 60 in any minute, not 120 across a
minute boundary, and a test that sends N requests sees the (N+1)th refused no matter
when it runs. They are kept as a short row of buckets (60 per window: one-second buckets
for a minute, one-minute buckets for an hour), so memory per user is constant while the
window edge is exact to one bucket. The Redis backend keeps the same buckets in a hash
and applies the same rules in Lua (`limits_redis.py`), so both backends agree.

Budget periods are calendar periods in UTC, as OpenRouter's key limits reset: days at
midnight, weeks on Monday, months on the 1st.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache

BUCKETS = 60


class SlidingWindow:
    """Counts (requests or tokens) in the last `span_s` seconds, in `BUCKETS` buckets.

    The running `total` is kept with the buckets and old buckets are dropped only when
    the current bucket changes, so counting a request is O(1) on the hot path.
    """

    __slots__ = ("span_s", "bucket_s", "counts", "current", "total")

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self.bucket_s = span_s / BUCKETS
        self.counts: dict[int, int] = {}
        self.current = -1  # the bucket the window was last advanced to
        self.total = 0

    def advance(self, now: float) -> int:
        """Move the window to `now` (dropping buckets that left it); returns the current bucket."""
        current = int(now // self.bucket_s)
        if current != self.current:
            self.current = current
            oldest = current - BUCKETS + 1
            if self.counts and min(self.counts) < oldest:
                self.counts = {k: v for k, v in self.counts.items() if k >= oldest}
                self.total = sum(self.counts.values())
        return current

    def count(self, now: float) -> int:
        self.advance(now)
        return self.total

    def add(self, now: float, amount: int = 1) -> None:
        self.bump(self.advance(now), amount)

    def bump(self, bucket: int, amount: int = 1) -> None:
        """Count into a bucket that is in the window (as `advance` returns the current one)."""
        buckets = self.counts
        buckets[bucket] = buckets.get(bucket, 0) + amount
        self.total += amount

    def view(self, now: float) -> dict[int, int]:
        """The live buckets (not a copy): read it before changing the window again."""
        self.advance(now)
        return self.counts

    def buckets(self, now: float) -> dict[int, int]:
        return dict(self.view(now))

    def frees_at(self, now: float, limit: int) -> float:
        """When the count falls below `limit` again (now, if it already is)."""
        return frees_at(self.buckets(now), self.bucket_s, limit, now)

    def next_expiry(self, now: float) -> float:
        """When the oldest counted item leaves the window (now, if the window is empty)."""
        buckets = self.view(now)
        return expiry(min(buckets), self.bucket_s) if buckets else now


def expiry(bucket: int, bucket_s: float) -> float:
    return (bucket + BUCKETS) * bucket_s


def frees_at(buckets: dict[int, int], bucket_s: float, limit: int, now: float) -> float:
    """Shared by both backends: walk the buckets oldest first until the count drops under `limit`."""
    remaining = sum(buckets.values())
    if remaining < limit:
        return now
    for bucket in sorted(buckets):
        remaining -= buckets[bucket]
        if remaining < limit:
            return expiry(bucket, bucket_s)
    return now


# -- calendar periods (budgets, usage_daily/weekly/monthly) -----------------------

PERIODS = ("day", "week", "month")


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def period_start(period: str, ts: float) -> datetime:
    moment = _utc(ts)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown period {period!r}")


def period_end(period: str, ts: float) -> datetime:
    start = period_start(period, ts)
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    return (start + timedelta(days=32)).replace(day=1)


def period_ids(ts: float) -> tuple[str, ...]:
    """`period_id` of every period in `PERIODS` order, as one cached tuple per UTC hour."""
    return _period_ids_in_hour(int(ts // 3600))


@lru_cache(maxsize=16)
def _period_ids_in_hour(hour: int) -> tuple[str, ...]:
    return tuple(_period_id_in_hour(period, hour) for period in PERIODS)


def period_id(period: str, ts: float) -> str:
    """A stable name for the period containing `ts` (e.g. `2025-01-31`, `2025-01`).

    Periods change only on UTC hour boundaries, so the answer is cached per hour: this is
    asked several times per request on the hot path.
    """
    return _period_id_in_hour(period, int(ts // 3600))


@lru_cache(maxsize=64)
def _period_id_in_hour(period: str, hour: int) -> str:
    start = period_start(period, hour * 3600.0)
    return start.strftime("%Y-%m") if period == "month" else start.strftime("%Y-%m-%d")
