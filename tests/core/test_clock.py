"""`iso` is on the hot path (usage records): its fast path must format exactly as datetime does."""

import random
from datetime import UTC, datetime

from gateway.core.clock import iso, parse_iso


def _reference(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_iso_matches_datetime_to_the_microsecond() -> None:
    rng = random.Random(7)
    samples = [rng.uniform(0, 4e9) for _ in range(20_000)] + [1_800_000_000 + rng.random() for _ in range(20_000)]
    samples += [0.0, 0.9999995, 1.0000005, 1_799_999_999.9999996, -1.5]
    for ts in samples:
        assert iso(ts) == _reference(ts), ts


def test_iso_round_trips_and_sorts_as_text() -> None:
    stamps = [1_800_000_000.25, 1_800_000_000.5, 1_800_000_001.0, 1_900_000_000.0]
    texts = [iso(ts) for ts in stamps]
    assert texts == sorted(texts)
    assert [parse_iso(t) for t in texts] == stamps
