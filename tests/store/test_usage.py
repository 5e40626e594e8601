"""The usage repository on BOTH backends: batched writes, settlements, exact sums."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.store import Store
from gateway.store.usage import PENDING, SETTLED, Settlement, UsageRecord
from tests.store.test_store import clock, database_url, store  # noqa: F401  (fixtures: sqlite + postgres)


def record(generation_id: str, user_id: str, cost: str, created_at: str) -> UsageRecord:
    value = Decimal(cost)
    return UsageRecord(
        generation_id=generation_id, user_id=user_id, token_id="tok", request_id="req", endpoint="/chat/completions",
        model_requested="m/a", model="m/a", provider="P", streamed=True, cancelled=False, finish_reason="stop",
        error=None, status=200, prompt_tokens=3, completion_tokens=4, reasoning_tokens=0, cached_tokens=0,
        provisional_cost=value, provider_cost=value, markup=value / 10, total_cost=value + value / 10,
        markup_pct=Decimal(10), markup_reason="starter_tier_10pct", free=False, tier="starter", latency_ms=12,
        created_at=created_at, next_attempt_at=created_at,
    )


@pytest.mark.anyio
async def test_write_settle_and_sum_exactly(store: Store) -> None:  # noqa: F811
    day1, day2 = "2026-03-01T10:00:00.000000Z", "2026-03-02T10:00:00.000000Z"
    await store.usage.write([record("g1", "u1", "0.1", day1), record("g2", "u1", "0.2", day2),
                             record("g3", "u2", "0.0000001", day2)])
    await store.usage.write([record("g1", "u1", "9", day2)])  # replayed id: ignored
    await store.usage.write([], [Settlement(
        generation_id="g2", provider_cost=Decimal("0.3"), markup=Decimal("0.03"), total_cost=Decimal("0.33"),
        markup_reason="starter_tier_10pct", settle_status=SETTLED, settle_attempts=2,
        settled_at="2026-03-02T10:00:01.000000Z", tokens=(5, None, 1, None),
    )])
    assert await store.usage.count() == 3
    assert await store.usage.spend_since(day1) == {"u1": Decimal("0.11") + Decimal("0.33"), "u2": Decimal("1.1E-7")}
    assert await store.usage.spend_since(day2, user_id="u1") == {"u1": Decimal("0.33")}
    g2 = await store.usage.get("g2")
    assert g2 is not None and (g2.settle_status, g2.provisional_cost, g2.total_cost) == (
        SETTLED, Decimal("0.2"), Decimal("0.33"))
    assert (g2.prompt_tokens, g2.completion_tokens, g2.reasoning_tokens) == (5, 4, 1)  # None kept ours
    assert [r.generation_id for r in await store.usage.pending()] == ["g1", "g3"]
    assert {r.generation_id for r in await store.usage.between(day2)} == {"g2", "g3"}
    assert [r.generation_id for r in await store.usage.between(day1, day2, user_id="u1")] == ["g1"]
    assert (await store.usage.get("g3")).total_cost == Decimal("1.1E-7")  # type: ignore[union-attr]
    assert all(r.settle_status == PENDING for r in await store.usage.pending())


def test_params_follow_the_column_order() -> None:
    from gateway.store.usage import COLUMNS

    row = record("g1", "u1", "0.25", "2026-03-01T10:00:00.000000Z")
    expected = tuple(
        format(v, "f") if isinstance(v, Decimal) else int(v) if isinstance(v, bool) else v
        for v in (getattr(row, name) for name in COLUMNS)
    )
    assert row.as_params() == expected
