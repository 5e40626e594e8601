"""Usage reports: one aggregation behind `/v1/usage`, `/admin/v1/usage` and `gateway usage report`.

All three call `usage_report`, which sums the stored records in `Decimal`, so they show
the same figures to the last digit.

Periods are the *current* calendar period in UTC, from its start up to now:
- `day`: since 00:00 UTC today;
- `week`: since Monday 00:00 UTC of this week (ISO weeks, as OpenRouter's `limit_reset`);
- `month`: since 00:00 UTC on the 1st of this month.
A record belongs to the period in which its request was made (`created_at`); its cost
is the provisional one until it settles.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Iterable

from gateway.core import windows
from gateway.core.clock import iso
from gateway.core.errors import BadRequest
from gateway.store import Store
from gateway.store.usage import FINAL, UsageRecord

PERIODS = ("day", "week", "month")
GROUPS = ("user", "model", "tier", "day")
API_FORMATS = ("json", "csv")
CLI_FORMATS = ("table", "csv", "json")
GROUP_FIELD = {"user": "user_id", "model": "model", "tier": "tier", "day": "day"}
FIGURES = (
    "requests", "prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "total_tokens",
    "provider_cost", "markup", "total_cost", "unsettled_requests",
)


def choice(name: str, value: str | None, allowed: tuple[str, ...], default: str) -> str:
    """A validated option; a bad value is a 400 naming the parameter and the allowed values."""
    if value is None or value == "":
        return default
    if value not in allowed:
        raise BadRequest(f"Unknown {name} {value!r}; use one of: {', '.join(allowed)}.", param=name)
    return value


def period_start(period: str, now: float) -> datetime:
    """The start (UTC) of the current day, week (Monday) or month containing `now`."""
    if period not in PERIODS:
        raise BadRequest(f"Unknown period {period!r}; use one of: {', '.join(PERIODS)}.", param="period")
    return windows.period_start(period, now)


@dataclass(slots=True)
class Figures:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    provider_cost: Decimal = field(default_factory=Decimal)
    markup: Decimal = field(default_factory=Decimal)
    total_cost: Decimal = field(default_factory=Decimal)
    unsettled_requests: int = 0

    def add(self, record: UsageRecord) -> None:
        self.requests += 1
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.reasoning_tokens += record.reasoning_tokens
        self.cached_tokens += record.cached_tokens
        self.provider_cost += record.provider_cost
        self.markup += record.markup
        self.total_cost += record.total_cost
        if record.settle_status not in FINAL:
            self.unsettled_requests += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_tokens": self.cached_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "provider_cost": self.provider_cost,
            "markup": self.markup,
            "total_cost": self.total_cost,
            "unsettled_requests": self.unsettled_requests,
        }


def group_key(record: UsageRecord, group_by: str) -> str:
    if group_by == "user":
        return record.user_id
    if group_by == "tier":
        return record.tier
    if group_by == "day":
        return record.created_at[:10]
    return record.model or record.model_requested or "(unknown)"


def aggregate(records: Iterable[UsageRecord], group_by: str) -> tuple[Figures, list[tuple[str, Figures]]]:
    """Totals and one row per group, summed exactly; rows by cost (days in date order)."""
    totals = Figures()
    groups: dict[str, Figures] = {}
    for record in records:
        totals.add(record)
        groups.setdefault(group_key(record, group_by), Figures()).add(record)
    if group_by == "day":
        rows = sorted(groups.items())
    else:
        rows = sorted(groups.items(), key=lambda item: (-item[1].total_cost, item[0]))
    return totals, rows


async def usage_report(
    store: Store, *, period: str, group_by: str = "model", user_id: str | None = None, now: float
) -> dict[str, Any]:
    """The report every surface serves: period bounds, totals and per-group rows (Decimals)."""
    since = iso(period_start(period, now).timestamp())
    records = await store.usage.between(since, user_id=user_id)
    totals, rows = aggregate(records, group_by)
    column = GROUP_FIELD[group_by]
    return {
        "object": "usage_report",
        "period": period,
        "since": since,
        "until": iso(now),
        "group_by": group_by,
        "user_id": user_id,
        "totals": totals.as_dict(),
        "rows": [{column: key, **figures.as_dict()} for key, figures in rows],
    }


def report_csv(report: dict[str, Any]) -> str:
    """One header line, one line per group, then a `total` line; money as exact decimals."""
    column = GROUP_FIELD[report["group_by"]]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([column, *FIGURES])
    for row in report["rows"]:
        writer.writerow([row[column], *(_text(row[name]) for name in FIGURES)])
    writer.writerow(["total", *(_text(report["totals"][name]) for name in FIGURES)])
    return out.getvalue()


def report_table(report: dict[str, Any]) -> str:
    column = GROUP_FIELD[report["group_by"]]
    names = [column, "requests", "total_tokens", "provider_cost", "markup", "total_cost"]
    lines = [[row[column], *(_text(row[n]) for n in names[1:])] for row in report["rows"]]
    lines.append(["total", *(_text(report["totals"][n]) for n in names[1:])])
    widths = [max(len(str(x)) for x in column_values) for column_values in zip(names, *lines)]
    header = f"usage {report['period']} since {report['since']}" + (
        f" for {report['user_id']}" if report["user_id"] else ""
    )
    rendered = [header, "  ".join(n.ljust(w) for n, w in zip(names, widths))]
    for line in lines:
        rendered.append("  ".join(
            (str(v).ljust(w) if i == 0 else str(v).rjust(w)) for i, (v, w) in enumerate(zip(line, widths))
        ))
    return "\n".join(rendered) + "\n"


def _text(value: Any) -> str:
    return format(value, "f") if isinstance(value, Decimal) else str(value)
