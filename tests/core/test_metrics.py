"""Prometheus rendering: bounded labels, cumulative buckets, exact Decimal cost."""

from decimal import Decimal
from typing import Any

import orjson
import pytest

from gateway.core.metrics import GAUGES, UNMATCHED_ROUTE, Metrics, is_snapshot, route_label


def test_render_counts_requests_by_route_and_status_class() -> None:
    metrics = Metrics()
    metrics.observe_request("/v1/chat/completions", 200, 0.003)
    metrics.observe_request("/v1/chat/completions", 201, 0.02)
    metrics.observe_request("/v1/chat/completions", 429, 0.0005)
    text = metrics.render()
    assert 'gateway_requests_total{route="/v1/chat/completions",status="2xx"} 2' in text
    assert 'gateway_requests_total{route="/v1/chat/completions",status="4xx"} 1' in text
    assert 'gateway_request_duration_seconds_bucket{route="/v1/chat/completions",le="0.001"} 1' in text
    assert 'gateway_request_duration_seconds_bucket{route="/v1/chat/completions",le="0.005"} 2' in text
    assert 'gateway_request_duration_seconds_bucket{route="/v1/chat/completions",le="+Inf"} 3' in text
    assert 'gateway_request_duration_seconds_count{route="/v1/chat/completions"} 3' in text


def test_cost_is_rendered_exactly() -> None:
    metrics = Metrics()
    metrics.observe_generation("trial", 10, 5, Decimal("0.0000001"))
    metrics.observe_generation("trial", 1, 1, Decimal("0.0000002"))
    text = metrics.render()
    assert 'gateway_cost_usd_total{tier="trial"} 0.0000003' in text
    assert 'gateway_tokens_total{tier="trial",kind="prompt"} 11' in text


def test_gauges_are_read_at_render_time() -> None:
    metrics = Metrics()
    streams: dict[str, int] = {}
    metrics.gauge("gateway_streams_in_flight", lambda: len(streams))
    streams["a"] = 1
    assert "gateway_streams_in_flight 1" in metrics.render()


def test_route_labels_are_templates_never_raw_paths() -> None:
    proxies = {"/v1/chat/completions"}
    assert route_label("/v1/chat/completions", proxies) == "/v1/chat/completions"
    assert route_label("/admin/v1/users/alice/tokens", proxies, "/admin/v1/users/{user_id}/tokens") == (
        "/admin/v1/users/{user_id}/tokens")
    assert route_label("/v1/models/sk-or-v1-secret", proxies) == UNMATCHED_ROUTE
    assert route_label('/v1/"}\ninjected_metric 1', proxies) == UNMATCHED_ROUTE


def test_label_values_are_escaped_and_the_output_parses() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics()
    metrics.observe_request('/v1/"}\ninjected_metric 1\\', 200, 0.01)
    metrics.observe_upstream_error('x"y')
    metrics.observe_generation('tier\n"1', 3, 4, Decimal("0.5"))
    text = metrics.render()
    assert "\ninjected_metric" not in text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    [sample] = [s for s in families["gateway_requests"].samples]
    assert sample.labels["route"] == '/v1/"}\ninjected_metric 1\\'
    assert {s.labels["tier"] for s in families["gateway_cost_usd"].samples} == {'tier\n"1'}


# -- several workers: one scrape adds them up --------------------------------------------------------


def _families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.name: _series(family, sample.name) for family in text_string_to_metric_families(text)
            for sample in family.samples}


def _series(family: Any, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


def test_counters_and_histograms_of_several_workers_are_summed() -> None:
    first, second = Metrics(), Metrics()
    for seconds in (0.003, 0.02):
        first.observe_request("/v1/chat/completions", 200, seconds)
    second.observe_request("/v1/chat/completions", 200, 0.003)
    second.observe_request("/v1/chat/completions", 502, 2.0)
    second.observe_request("/v1/embeddings", 200, 0.5)
    first.observe_generation("starter", 10, 5, Decimal("0.1"))
    second.observe_generation("starter", 1, 2, Decimal("0.2"))
    second.observe_refusal("requests_per_minute", 0.0, 429, "u1", "")
    first.observe_proxy(0.01, 0.001)
    second.observe_proxy(0.01, 0.002)
    other = orjson.loads(orjson.dumps(second.snapshot()))  # as it travels: through a JSON file
    series = _families(first.render([other]))
    chat = (("route", "/v1/chat/completions"),)
    assert series["gateway_requests_total"][(*chat, ("status", "2xx"))] == 3
    assert series["gateway_requests_total"][(*chat, ("status", "5xx"))] == 1
    assert series["gateway_requests_total"][(("route", "/v1/embeddings"), ("status", "2xx"))] == 1
    assert series["gateway_request_duration_seconds_count"][chat] == 4
    assert series["gateway_request_duration_seconds_bucket"][(("le", "0.005"), *chat)] == 2
    assert series["gateway_request_duration_seconds_bucket"][(("le", "+Inf"), *chat)] == 4
    assert series["gateway_request_duration_seconds_sum"][chat] == pytest.approx(0.003 + 0.02 + 0.003 + 2.0)
    assert series["gateway_tokens_total"][(("kind", "prompt"), ("tier", "starter"))] == 11
    assert series["gateway_limit_refusals_total"][(("limit", "requests_per_minute"),)] == 1
    assert series["gateway_upstream_ttfb_seconds_count"][()] == 2


def test_money_summed_across_workers_stays_exact_decimal_text() -> None:
    first, second = Metrics(), Metrics()
    first.observe_generation("starter", 1, 1, Decimal("0.1"), markup=Decimal("0.000000000001"))
    second.observe_generation("starter", 1, 1, Decimal("0.2"), markup=Decimal("0.000000000002"))
    text = first.render([orjson.loads(orjson.dumps(second.snapshot()))])
    assert 'gateway_cost_usd_total{tier="starter"} 0.3\n' in text  # 0.1 + 0.2 in floats is 0.30000000000000004
    assert 'gateway_markup_usd_total{tier="starter"} 0.000000000003\n' in text


def test_per_process_gauges_are_summed_and_the_fallback_flag_is_any() -> None:
    def worker(streams: int, queue: int, pending: int, fallback: bool) -> Metrics:
        metrics = Metrics()
        metrics.gauge("gateway_streams_in_flight", lambda: streams)
        metrics.gauge("gateway_usage_queue_depth", lambda: queue)
        metrics.gauge("gateway_settlements_pending", lambda: pending)
        metrics.gauge("gateway_limits_fallback", lambda: float(fallback))
        return metrics

    first, second, third = worker(2, 5, 1, False), worker(3, 0, 4, True), worker(1, 1, 0, True)
    series = _families(first.render([second.snapshot(), third.snapshot()]))
    assert series["gateway_streams_in_flight"][()] == 6
    assert series["gateway_usage_queue_depth"][()] == 6
    assert series["gateway_settlements_pending"][()] == 5
    assert series["gateway_limits_fallback"][()] == 1
    assert set(GAUGES) == {"gateway_streams_in_flight", "gateway_usage_queue_depth", "gateway_settlements_pending",
                           "gateway_limits_fallback"}  # every gauge the app registers says how it is combined


def test_only_the_shape_a_snapshot_has_is_taken_for_one() -> None:
    metrics = Metrics()
    metrics.observe_request("/v1/chat/completions", 200, 0.01)
    metrics.observe_generation("starter", 1, 1, Decimal("0.5"))
    metrics.gauge("gateway_streams_in_flight", lambda: 1)
    good = orjson.loads(orjson.dumps(metrics.snapshot()))
    assert is_snapshot(good)
    broken = [
        None, [], "x", {}, {**good, "counters": []},
        {**good, "counters": {"gateway_invented_total": [[[], 1]]}},  # a family of its own
        {**good, "counters": {"gateway_requests_total": [[["/v1/chat/completions"], 1]]}},  # one label short
        {**good, "counters": {"gateway_requests_total": [[["/x", "2xx"], "1"]]}},  # money text, not a count
        {**good, "counters": {"gateway_cost_usd_total": [[["starter"], "1e999999999"]]}},  # no plain decimal
        {**good, "counters": {"gateway_cost_usd_total": [[["starter"], 0.5]]}},  # money as a float
        {**good, "counters": {"gateway_cost_usd_total": [[["starter"], "NaN"]]}},
        {**good, "counters": {"gateway_cost_usd_total": [[["starter"], "abc"]]}},
        {**good, "counters": {"gateway_requests_total": [[["/x", "2xx"], True]]}},
        {**good, "histograms": {"gateway_overhead_seconds": [[[], [1, 2], 0.1, 3]]}},  # buckets missing
        {**good, "gauges": {"gateway_streams_in_flight": "many"}},
        {**good, "gauges": {'x{y="1"}': 1}},
    ]
    for data in broken:
        assert not is_snapshot(data), data


@pytest.mark.anyio
async def test_the_live_view_combines_every_workers_gauges_and_recent_problems() -> None:
    other = Metrics()
    other.gauge("gateway_streams_in_flight", lambda: 2)
    other.observe_refusal("daily_budget", 20.0, 402, "usr_b", "over budget")
    other.observe_upstream_error("server_error", 5.0, "502 from /chat/completions")

    class Peers:
        def snapshots(self) -> list[dict[str, Any]]:
            return [orjson.loads(orjson.dumps(other.snapshot()))]  # as read back from its file

    mine = Metrics(peers=Peers())
    mine.gauge("gateway_streams_in_flight", lambda: 3)
    mine.observe_refusal("requests_per_minute", 10.0, 429, "usr_a", "too many")
    gauges, recent = await mine.live()
    assert gauges == {"gateway_streams_in_flight": 5}
    assert [(e["at"], e["kind"]) for e in recent] == [(20.0, "daily_budget"), (10.0, "requests_per_minute"),
                                                      (5.0, "server_error")]
    assert is_snapshot(other.snapshot())
    damaged = {**other.snapshot(), "recent": [{"at": "soon", "what": "refusal"}]}
    assert not is_snapshot(damaged)
