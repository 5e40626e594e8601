"""Prometheus metrics, kept as plain counters: the request path only adds to a dict.

Rendered in the text exposition format at `GET /metrics`. Labels are bounded (route
templates, never raw paths; status classes; tier names) so the series count cannot grow with
traffic, and every label value is escaped, so no client text can forge a line.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from decimal import Decimal
from typing import Callable, Iterable

UNMATCHED_ROUTE = "unmatched"  # every path no route serves shares this one label
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


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
    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.latency: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.upstream_errors: defaultdict[str, int] = defaultdict(int)
        self.tokens: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.cost: defaultdict[str, Decimal] = defaultdict(Decimal)
        self.gauges: dict[str, Callable[[], float]] = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, f"{status // 100}xx")] += 1
        self.latency[route].observe(seconds)

    def observe_upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] += 1

    def observe_generation(self, tier: str, prompt_tokens: int, completion_tokens: int, total_cost: Decimal) -> None:
        self.tokens[(tier, "prompt")] += prompt_tokens
        self.tokens[(tier, "completion")] += completion_tokens
        self.cost[tier] += total_cost

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self.gauges[name] = read

    def render(self) -> str:
        lines: list[str] = []
        add = lines.append
        add("# TYPE gateway_requests_total counter")
        for (route, status), value in sorted(self.requests.items()):
            add(f"gateway_requests_total{{route={_q(route)},status={_q(status)}}} {value}")
        add("# TYPE gateway_request_duration_seconds histogram")
        for route, hist in sorted(self.latency.items()):
            cumulative = 0
            label = _q(route)
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), hist.counts):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                add(f'gateway_request_duration_seconds_bucket{{route={label},le="{le}"}} {cumulative}')
            add(f"gateway_request_duration_seconds_sum{{route={label}}} {hist.total}")
            add(f"gateway_request_duration_seconds_count{{route={label}}} {hist.count}")
        add("# TYPE gateway_upstream_errors_total counter")
        for kind, value in sorted(self.upstream_errors.items()):
            add(f"gateway_upstream_errors_total{{kind={_q(kind)}}} {value}")
        add("# TYPE gateway_tokens_total counter")
        for (tier, kind), value in sorted(self.tokens.items()):
            add(f"gateway_tokens_total{{tier={_q(tier)},kind={_q(kind)}}} {value}")
        add("# TYPE gateway_cost_usd_total counter")
        for tier, value in sorted(self.cost.items()):
            add(f"gateway_cost_usd_total{{tier={_q(tier)}}} {value:f}")
        for name, read in sorted(self.gauges.items()):
            add(f"# TYPE {name} gauge")
            add(f"{name} {read()}")
        return "\n".join(lines) + "\n"


def _q(value: str) -> str:
    """A label value quoted and escaped as the text exposition format requires (\\, \", \n)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def route_label(path: str, proxies: Iterable[str], template: str | None = None) -> str:
    """A bounded label: a proxy path as it is, another route by its template (`/admin/v1/users/{user_id}`),
    anything no route serves as `UNMATCHED_ROUTE`; never the raw path (ids, tokens, junk)."""
    if path in proxies:
        return path
    return template or UNMATCHED_ROUTE
