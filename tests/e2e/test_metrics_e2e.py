"""`/metrics` tells the truth: traffic through a real gateway, every family checked against the ledger,
parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Emulator, start_gateway, wait_for

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
FAMILIES = {
    "gateway_requests", "gateway_request_duration_seconds", "gateway_upstream_ttfb_seconds", "gateway_overhead_seconds",
    "gateway_upstream_errors", "gateway_tokens", "gateway_cost_usd", "gateway_markup_usd", "gateway_limit_refusals",
    "gateway_settlements_pending", "gateway_usage_queue_depth", "gateway_streams_in_flight", "gateway_catalog_requests",
}


def scrape(url: str) -> tuple[str, dict[str, dict[tuple[tuple[str, str], ...], float]]]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        series.setdefault(family.name, {})
    return text, series


def exact(text: str, sample: str) -> Decimal:
    """A sample's value as the exposition wrote it (money is exact text there; the parser reads floats)."""
    [line] = [line for line in text.splitlines() if line.startswith(sample + " ")]
    return Decimal(line.split(" ")[1])


def value(series: dict[str, Any], name: str, **labels: str) -> float:
    return series.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_every_family_is_fed_by_traffic(emulator: Emulator, tmp_path: Path) -> None:
    tiers = {"starter": {"markup_pct": "10", "requests_per_minute": 3}, "trial": {"markup_pct": "15"}}
    gateway = start_gateway(tmp_path, emulator, {"tiers": tiers, "default_tier": "starter"})
    try:
        user = gateway.create_user(tier="starter", key=emulator.new_key())
        with gateway.client(user["token"]) as client:
            statuses = [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(4)]
            assert statuses == [200, 200, 200, 429]  # the fourth is refused by requests_per_minute
            assert client.get("/v1/models").status_code == 200
            assert client.get("/v1/models").status_code == 200
        emulator.control("fail", {"status": 400, "times": 1})  # a 400 is not retried
        other = gateway.create_user(tier="trial", key=emulator.new_key())
        with gateway.client(other["token"]) as client:
            failed = client.post("/v1/chat/completions", json=CHAT)
        # the cost families count each generation at its final figure: once its look-up has settled
        wait_for(lambda: (totals := gateway.admin.get("/admin/v1/usage").json()["totals"])["requests"] >= 3
                 and totals["unsettled_requests"] == 0, "every generation recorded and settled", timeout=20)
        ledger = json.loads(gateway.admin.get("/admin/v1/usage?group_by=tier").text, parse_float=Decimal)
        text, series = scrape(gateway.url)
    finally:
        gateway.stop()

    assert FAMILIES <= set(series), FAMILIES - set(series)
    starter = next(r for r in ledger["rows"] if r["tier"] == "starter")
    assert exact(text, 'gateway_cost_usd_total{tier="starter"}') == starter["total_cost"] > 0
    assert exact(text, 'gateway_markup_usd_total{tier="starter"}') == starter["markup"] > 0
    assert value(series, "gateway_tokens_total", tier="starter", kind="prompt") == starter["prompt_tokens"]
    assert value(series, "gateway_tokens_total", tier="starter", kind="completion") == starter["completion_tokens"]
    chat = "/v1/chat/completions"
    assert value(series, "gateway_requests_total", route=chat, status="2xx") == 3
    assert failed.status_code == 400
    assert value(series, "gateway_requests_total", route=chat, status="4xx") == 2
    assert value(series, "gateway_request_duration_seconds_count", route=chat) == 3 + 1 + 1
    assert value(series, "gateway_limit_refusals_total", limit="requests_per_minute") == 1
    forwarded = 3 + 1
    assert value(series, "gateway_upstream_ttfb_seconds_count") == forwarded
    assert value(series, "gateway_overhead_seconds_count") == forwarded
    assert value(series, "gateway_upstream_errors_total", kind="client_error") == 1
    assert value(series, "gateway_catalog_requests_total", result="miss") + value(
        series, "gateway_catalog_requests_total", result="hit") == 2
    assert value(series, "gateway_catalog_requests_total", result="hit") >= 1
    for gauge in ("gateway_settlements_pending", "gateway_usage_queue_depth", "gateway_streams_in_flight"):
        assert () in series[gauge]
