"""Prometheus rendering: bounded labels, cumulative buckets, exact Decimal cost."""

from decimal import Decimal

from gateway.core.metrics import UNMATCHED_ROUTE, Metrics, route_label


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
