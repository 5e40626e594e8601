"""What the operator's dashboard plots: daily series, per-model figures, the top spenders against budget.

Built from the same stored records as `reports.usage_report`, summed in `Decimal`, so the dashboard's
numbers are the usage report's numbers. Days are UTC calendar days (`created_at[:10]`). A split by user
or model keeps the `SERIES_CAP` largest by cost and folds the rest into one `(other)` series, so a page
never draws an unbounded number of lines.
"""

from __future__ import annotations

import math
from datetime import timedelta
from decimal import Decimal
from typing import Any, Callable

import orjson

from gateway.core import windows
from gateway.core.clock import iso
from gateway.core.money import ZERO
from gateway.store import Store
from gateway.store.usage import UsageRecord

SPLITS = ("tier", "model", "user")
SERIES_CAP = 8
OTHER = "(other)"


def _split_key(record: UsageRecord, split: str) -> str:
    if split == "user":
        return record.user_id
    if split == "tier":
        return record.tier
    return record.model or record.model_requested or "(unknown)"


async def daily_series(store: Store, *, days: int, split: str, now: float) -> dict[str, Any]:
    """Cost and requests per UTC day for the last `days` days (today included), one series per group."""
    first = windows.period_start("day", now) - timedelta(days=days - 1)
    labels = [(first + timedelta(days=i)).date().isoformat() for i in range(days)]
    index = {day: i for i, day in enumerate(labels)}
    records = await store.usage.between(iso(first.timestamp()))
    cost: dict[str, list[Decimal]] = {}
    requests: dict[str, list[int]] = {}
    for record in records:
        slot = index.get(record.created_at[:10])
        if slot is None:
            continue
        key = _split_key(record, split)
        if key not in cost:
            cost[key], requests[key] = [ZERO] * days, [0] * days
        cost[key][slot] += record.total_cost
        requests[key][slot] += 1
    ranked = sorted(cost, key=lambda k: (-sum(cost[k], ZERO), k))
    kept, folded = ranked[:SERIES_CAP], ranked[SERIES_CAP:]
    if folded:
        cost[OTHER] = [sum((cost[k][i] for k in folded), ZERO) for i in range(days)]
        requests[OTHER] = [sum(requests[k][i] for k in folded) for i in range(days)]
        kept.append(OTHER)
    return {
        "object": "usage_daily",
        "split": split,
        "since": iso(first.timestamp()),
        "until": iso(now),
        "days": labels,
        "series": [{"key": k, "total_cost": cost[k], "requests": requests[k]} for k in kept],
        "totals": {
            "total_cost": [sum((cost[k][i] for k in kept), ZERO) for i in range(days)],
            "requests": [sum(requests[k][i] for k in kept) for i in range(days)],
        },
    }


def percentile(values: list[int], fraction: float) -> int | None:
    """Nearest-rank percentile (no interpolation): a value that was really observed."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _ttfb_ms(record: UsageRecord) -> int | None:
    """OpenRouter's `latency` of the settled generation: its time to the first token, in ms."""
    if not record.upstream:
        return None
    try:
        latency = orjson.loads(record.upstream).get("latency")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return int(latency) if isinstance(latency, (int, float)) and not isinstance(latency, bool) else None


async def model_stats(store: Store, *, period: str, now: float) -> dict[str, Any]:
    """Per model served this period: requests, cost, gateway latency and upstream TTFB p50/p95 (ms)."""
    since = iso(windows.period_start(period, now).timestamp())
    rows: dict[str, dict[str, Any]] = {}
    for record in await store.usage.between(since):
        model = record.model or record.model_requested or "(unknown)"
        row = rows.setdefault(model, {"requests": 0, "total_cost": ZERO, "latency": [], "ttfb": []})
        row["requests"] += 1
        row["total_cost"] += record.total_cost
        if record.latency_ms is not None:
            row["latency"].append(record.latency_ms)
        ttfb = _ttfb_ms(record)
        if ttfb is not None:
            row["ttfb"].append(ttfb)
    data = [
        {
            "model": model,
            "requests": row["requests"],
            "total_cost": row["total_cost"],
            "latency_ms_p50": percentile(row["latency"], 0.5),
            "latency_ms_p95": percentile(row["latency"], 0.95),
            "ttfb_ms_p50": percentile(row["ttfb"], 0.5),
            "ttfb_ms_p95": percentile(row["ttfb"], 0.95),
        }
        for model, row in sorted(rows.items(), key=lambda item: (-item[1]["total_cost"], item[0]))
    ]
    return {"object": "model_stats", "period": period, "since": since, "until": iso(now), "data": data}


async def top_spenders(
    store: Store, *, limit: int, now: float, monthly_budget: Callable[[dict[str, Any]], Decimal | None]
) -> dict[str, Any]:
    """The users who spent most this month, each with their monthly budget (None = unlimited) and its share."""
    since = iso(windows.period_start("month", now).timestamp())
    spend = await store.usage.spend_since(since)
    ranked = sorted(spend.items(), key=lambda item: (-item[1], item[0]))[:limit]
    data = []
    for user_id, spent in ranked:
        user = await store.users.get(user_id)
        budget = monthly_budget(user) if user is not None else None
        data.append({
            "user_id": user_id,
            "tier": user["tier"] if user is not None else None,
            "spent": spent,
            "monthly_budget_usd": budget,
            "used_fraction": (spent / budget).quantize(Decimal("0.0001")) if budget else None,
        })
    return {"object": "top_spenders", "since": since, "until": iso(now), "data": data}
