"""Prometheus metrics, kept as plain counters: the request path only adds to a dict.

Rendered in the text exposition format at `GET /metrics`. Labels are bounded (route
templates, never raw paths; status classes, tier names, limit names, fixed kinds) so the series count
cannot grow with traffic, and every label value is escaped, so no client text can forge a line.
`snapshot()` / `render(others)` let a scrape add up what several worker processes counted (the other
workers' snapshots come from `peers`, `gateway.core.metrics_share` with `--workers N`): counters and
histograms are summed, each gauge as `GAUGES` says.
"""

from __future__ import annotations

import asyncio
import math
import re
from bisect import bisect_left
from collections import defaultdict, deque
from decimal import Decimal
from typing import Any, Callable, Iterable, Protocol

UNMATCHED_ROUTE = "unmatched"  # every path no route serves shares this one label
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# `gateway_upstream_errors_total{kind}`: what went wrong talking to OpenRouter (a fixed set)
UPSTREAM_ERROR_KINDS = ("connection", "broken", "rate_limited", "client_error", "server_error")
# `gateway_catalog_requests_total{result}`
CATALOG_RESULTS = ("hit", "miss", "stale")
RECENT_PROBLEMS = 50

COUNTERS = {  # family → its label names, in order
    "gateway_requests_total": ("route", "status"),
    "gateway_upstream_errors_total": ("kind",),
    "gateway_tokens_total": ("tier", "kind"),
    "gateway_cost_usd_total": ("tier",),
    "gateway_markup_usd_total": ("tier",),
    "gateway_limit_refusals_total": ("limit",),
    "gateway_catalog_requests_total": ("result",),
    # admissions decided on an instance's own counters while Redis was unreachable (`redis.on_error: local`)
    "gateway_limits_fallback_total": (),
    # look-ups of a generation whose response had reported its cost: did /generation say the same?
    "gateway_settlement_audits_total": ("result",),
}
MONEY_COUNTERS = ("gateway_cost_usd_total", "gateway_markup_usd_total")  # exact: Decimal text in a snapshot
HISTOGRAMS = {
    "gateway_request_duration_seconds": ("route",),
    "gateway_upstream_ttfb_seconds": (),
    "gateway_overhead_seconds": (),
}
# How one scrape combines the workers' values of a gauge. None of them is read from the shared database:
# each is a quantity of one process, so those that count things are summed. (A gauge not named here is
# summed too.)
GAUGES: dict[str, Callable[[Iterable[float]], float]] = {
    "gateway_streams_in_flight": sum,  # the streams each worker is relaying
    "gateway_usage_queue_depth": sum,  # the records each worker has not written yet
    # the look-ups each worker has scheduled: a pending record is leased to one worker, so none counts twice
    "gateway_settlements_pending": sum,
    # 1 while admissions run on a process's own counters (`redis.on_error: local`): 1 if any worker does
    "gateway_limits_fallback": max,
}


class Peers(Protocol):
    """The latest snapshots of the other worker processes (read from files: may block briefly)."""

    def snapshots(self) -> list[dict[str, Any]]: ...


class Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS_S, value)] += 1
        self.total += value
        self.count += 1


class Metrics:
    def __init__(self, peers: Peers | None = None) -> None:
        self._peers = peers  # None: this process is the only one (no `--workers N`)
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.latency: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.ttfb = Histogram()
        self.overhead = Histogram()
        self.upstream_errors: defaultdict[str, int] = defaultdict(int)
        self.tokens: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.cost: defaultdict[str, Decimal] = defaultdict(lambda: Decimal(0))
        self.markup: defaultdict[str, Decimal] = defaultdict(lambda: Decimal(0))
        self.refusals: defaultdict[str, int] = defaultdict(int)
        self.catalog: defaultdict[str, int] = defaultdict(int)
        self.limits_fallback = 0
        self.audits: defaultdict[str, int] = defaultdict(int)
        self.gauges: dict[str, Callable[[], float]] = {}
        # the last refusals and upstream errors of this process, newest last (the dashboard lists them)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_PROBLEMS)

    # -- observations -----------------------------------------------------------

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, f"{status // 100}xx")] += 1
        self.latency[route].observe(seconds)

    def observe_proxy(self, ttfb_s: float, overhead_s: float) -> None:
        """One forwarded request: the upstream's time to its first byte, and the gateway's own time."""
        self.ttfb.observe(ttfb_s)
        self.overhead.observe(overhead_s)

    def observe_upstream_error(self, kind: str, at: float | None = None, detail: str = "") -> None:
        self.upstream_errors[kind] += 1
        if at is not None:
            self.recent.append({"at": at, "what": "upstream_error", "kind": kind, "detail": detail[:300]})

    def observe_refusal(self, limit: str, at: float, status: int, user_id: str | None, detail: str) -> None:
        self.refusals[limit] += 1
        self.recent.append({"at": at, "what": "refusal", "kind": limit, "status": status, "user_id": user_id,
                            "detail": detail[:300]})

    def observe_generation(self, tier: str, prompt_tokens: int, completion_tokens: int, total_cost: Decimal,
                           markup: Decimal = Decimal(0)) -> None:
        self.tokens[(tier, "prompt")] += prompt_tokens
        self.tokens[(tier, "completion")] += completion_tokens
        self.cost[tier] += total_cost
        self.markup[tier] += markup

    def observe_catalog(self, result: str) -> None:
        self.catalog[result] += 1

    def observe_audit(self, matched: bool) -> None:
        self.audits["match" if matched else "differ"] += 1

    def observe_limits_fallback(self) -> None:
        self.limits_fallback += 1

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self.gauges[name] = read

    # -- exposition -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything counted so far as plain JSON-able data (money as exact strings)."""
        counters: dict[str, list[list[Any]]] = {
            "gateway_requests_total": [[list(k), v] for k, v in self.requests.items()],
            "gateway_upstream_errors_total": [[[k], v] for k, v in self.upstream_errors.items()],
            "gateway_tokens_total": [[list(k), v] for k, v in self.tokens.items()],
            "gateway_cost_usd_total": [[[k], format(v, "f")] for k, v in self.cost.items()],
            "gateway_markup_usd_total": [[[k], format(v, "f")] for k, v in self.markup.items()],
            "gateway_limit_refusals_total": [[[k], v] for k, v in self.refusals.items()],
            "gateway_catalog_requests_total": [[[k], v] for k, v in self.catalog.items()],
            "gateway_limits_fallback_total": [[[], self.limits_fallback]] if self.limits_fallback else [],
            "gateway_settlement_audits_total": [[[k], v] for k, v in self.audits.items()],
        }
        histograms = {
            "gateway_request_duration_seconds": [[[r], h.counts, h.total, h.count] for r, h in self.latency.items()],
            "gateway_upstream_ttfb_seconds": [[[], self.ttfb.counts, self.ttfb.total, self.ttfb.count]],
            "gateway_overhead_seconds": [[[], self.overhead.counts, self.overhead.total, self.overhead.count]],
        }
        gauges = {name: read() for name, read in self.gauges.items()}
        return {"counters": counters, "histograms": histograms, "gauges": gauges, "recent": list(self.recent)}

    def render(self, others: Iterable[dict[str, Any]] = ()) -> str:
        """This process's figures, plus those of `others` (other workers' snapshots), summed."""
        return render_snapshots([self.snapshot(), *others])

    async def live(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The gauges combined over every worker (as `GAUGES` says) and the recent problems of all of them,
        newest first (at most `RECENT_PROBLEMS`): what the dashboard's overview shows."""
        others = await asyncio.to_thread(self._peers.snapshots) if self._peers is not None else []
        snaps = [self.snapshot(), *others]
        values: dict[str, list[float]] = {}
        for snap in snaps:
            for name, value in snap["gauges"].items():
                values.setdefault(name, []).append(value)
        gauges = {name: GAUGES.get(name, sum)(v) for name, v in values.items()}
        recent = sorted((e for snap in snaps for e in snap.get("recent", ())), key=lambda e: e["at"], reverse=True)
        return gauges, recent[:RECENT_PROBLEMS]

    async def scrape(self) -> str:
        """What `GET /metrics` answers: this process's live figures plus the other workers' latest
        snapshots (read off the event loop), so any one worker's scrape covers them all."""
        others = await asyncio.to_thread(self._peers.snapshots) if self._peers is not None else []
        return self.render(others)


def _number(value: Any) -> Decimal | int:
    return Decimal(value) if isinstance(value, str) else value


def render_snapshots(snapshots: list[dict[str, Any]]) -> str:
    """Sum snapshots series by series and write the text format: counters, histograms, gauges (each
    combined as `GAUGES` says)."""
    counters: dict[str, dict[tuple[str, ...], Any]] = {name: {} for name in COUNTERS}
    histograms: dict[str, dict[tuple[str, ...], list[Any]]] = {name: {} for name in HISTOGRAMS}
    gauges: dict[str, list[float]] = {}
    for snap in snapshots:
        for name, series in snap.get("counters", {}).items():
            into = counters.setdefault(name, {})
            for labels, value in series:
                key = tuple(labels)
                into[key] = into.get(key, 0) + _number(value)
        for name, series in snap.get("histograms", {}).items():
            into_h = histograms.setdefault(name, {})
            for labels, counts, total, count in series:
                have = into_h.setdefault(tuple(labels), [[0] * len(counts), 0.0, 0])
                have[0] = [a + b for a, b in zip(have[0], counts)]
                have[1] += total
                have[2] += count
        for name, value in snap.get("gauges", {}).items():
            gauges.setdefault(name, []).append(value)
    lines: list[str] = []
    add = lines.append
    for name, label_names in COUNTERS.items():
        add(f"# TYPE {name} counter")
        for labels, value in sorted(counters.get(name, {}).items()):
            text = format(value, "f") if isinstance(value, Decimal) else str(value)
            add(f"{name}{_labels(label_names, labels)} {text}")
    for name, label_names in HISTOGRAMS.items():
        add(f"# TYPE {name} histogram")
        for labels, (counts, total, count) in sorted(histograms.get(name, {}).items()):
            cumulative = 0
            for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), counts):
                cumulative += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                add(f"{name}_bucket{_labels((*label_names, 'le'), (*labels, le))} {cumulative}")
            add(f"{name}_sum{_labels(label_names, labels)} {total}")
            add(f"{name}_count{_labels(label_names, labels)} {count}")
    for name, values in sorted(gauges.items()):
        add(f"# TYPE {name} gauge")
        add(f"{name} {GAUGES.get(name, sum)(values)}")
    return "\n".join(lines) + "\n"


def is_snapshot(data: Any) -> bool:
    """Whether `data` has the shape `Metrics.snapshot()` writes, with known families and their label
    counts, so merging it can neither fail nor add a series of its own (another worker's file could be
    anything: damaged, or written by another version)."""
    try:
        counters, histograms, gauges = data["counters"], data["histograms"], data["gauges"]
        return (all(_counter_series(COUNTERS[name], series, name in MONEY_COUNTERS)
                    for name, series in counters.items())
                and all(_histogram_series(HISTOGRAMS[name], series) for name, series in histograms.items())
                and all(isinstance(name, str) and name.isidentifier() and _finite(value)
                        for name, value in gauges.items())
                and _recent(data.get("recent", [])))
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


_PLAIN_DECIMAL = re.compile(r"-?[0-9]{1,40}(\.[0-9]{1,40})?")  # as format(Decimal, "f") writes money


def _counter_series(label_names: tuple[str, ...], series: Any, money: bool) -> bool:
    for labels, value in series:
        if not _label_values(label_names, labels):
            return False
        if not (isinstance(value, str) and _PLAIN_DECIMAL.fullmatch(value) if money else _whole(value)):
            return False
    return True


def _histogram_series(label_names: tuple[str, ...], series: Any) -> bool:
    for labels, counts, total, count in series:
        if not (_label_values(label_names, labels) and isinstance(counts, list)
                and len(counts) == len(LATENCY_BUCKETS_S) + 1 and all(_whole(n) for n in counts)
                and _finite(total) and _whole(count)):
            return False
    return True


def _label_values(label_names: tuple[str, ...], labels: Any) -> bool:
    return isinstance(labels, list) and len(labels) == len(label_names) and all(isinstance(v, str) for v in labels)


def _recent(events: Any) -> bool:
    """Recent problems as `observe_refusal` / `observe_upstream_error` write them (bounded, plain values)."""
    return isinstance(events, list) and len(events) <= RECENT_PROBLEMS and all(
        isinstance(e, dict) and _finite(e.get("at")) and e.get("what") in ("refusal", "upstream_error")
        and all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float))) for k, v in e.items())
        for e in events)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _labels(names: Iterable[str], values: Iterable[str]) -> str:
    pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values))
    return "{" + pairs + "}" if pairs else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def route_label(path: str, proxies: Iterable[str], template: str | None = None) -> str:
    """A bounded label: a proxy path as it is, another route by its template (`/admin/v1/users/{user_id}`),
    anything no route serves as `UNMATCHED_ROUTE`; never the raw path (ids, tokens, junk)."""
    if path in proxies:
        return path
    return template or UNMATCHED_ROUTE
