"""`gateway serve --workers 2`, real processes: one scrape of `/metrics` reports the sum over both workers
(checked against the admin usage API), and with Redis configured the limits hold across the workers.

Every request goes over a fresh connection, so either worker may accept it; which worker served what is
read from the workers' own metrics files (`<server.data_dir>/metrics/worker-<pid>.json`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.core.metrics import Metrics
from gateway.core.metrics_share import WorkerFiles, metrics_directory
from tests.conftest import Emulator, GatewayProcess, redis_url_or_skip, start_gateway, wait_for

CHAT_ROUTE = "/v1/chat/completions"
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
BATCH = 8  # requests sent at once, each on its own connection
ATTEMPTS = 5  # batches until both workers have served some (the kernel chooses the worker)


def start_workers(tmp: Path, emulator: Emulator, overrides: dict[str, Any]) -> GatewayProcess:
    return start_gateway(tmp, emulator, {"server": {"workers": 2, "data_dir": str(tmp / "data")}, **overrides})


def served_by_worker(tmp: Path) -> dict[int, int]:
    """Per worker pid (of this run), the proxied chat requests it counted, as its file last said."""
    served = {}
    for path in metrics_directory(tmp / "data").glob("worker-*.json"):
        content = orjson.loads(path.read_bytes())
        if content["group"] == "an-earlier-run":
            continue
        series = content["snapshot"]["counters"]["gateway_requests_total"]
        served[content["pid"]] = sum(count for (route, _), count in series if route == CHAT_ROUTE)
    return served


def once_counted(tmp: Path, sent: int) -> dict[int, int]:
    """`served_by_worker` once the files account for all `sent` requests (each is rewritten every second)."""
    return wait_for(lambda: (served := served_by_worker(tmp)) and sum(served.values()) == sent and served,
                    f"the workers' files to count the {sent} requests sent")


def send_at_once(url: str, token: str, count: int) -> list[int]:
    """`count` chat requests in parallel, each on a fresh connection; their statuses."""
    def one(_: int) -> int:
        return httpx.post(url + CHAT_ROUTE, json=CHAT, headers={"Authorization": f"Bearer {token}"},
                          timeout=30).status_code

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def scrape(url: str) -> tuple[str, dict[str, dict[tuple[tuple[str, str], ...], float]]]:
    """One `/metrics` answer (on a fresh connection: either worker's), as text and parsed."""
    text = httpx.get(url + "/metrics", timeout=10).text
    series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return text, series


def chat_requests(series: dict[str, Any]) -> float:
    return sum(v for labels, v in series.get("gateway_requests_total", {}).items() if ("route", CHAT_ROUTE) in labels)


def money_json(response: Any) -> Any:
    """An API answer with its decimals as Decimal, as the gateway wrote them (`.json()` would read floats)."""
    return json.loads(response.text, parse_float=Decimal)


def exact(text: str, sample: str) -> Decimal:
    """A sample's value as the exposition wrote it (money is exact text there; the parser reads floats)."""
    [line] = [line for line in text.splitlines() if line.startswith(sample + " ")]
    return Decimal(line.split(" ")[1])


def leave_an_earlier_runs_files(tmp: Path) -> Path:
    """Files a previous run in the same data_dir left: one of a process still alive (this test's, as if
    its pid had been reused), one of a process gone. Neither may be counted."""
    earlier = Metrics()
    for _ in range(1000):
        earlier.observe_request(CHAT_ROUTE, 200, 0.01)
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    for pid in (os.getpid(), exited.pid):
        files = WorkerFiles(metrics_directory(tmp / "data"), "an-earlier-run", pid=pid)
        files.write(files.encode(earlier.snapshot()))
    return metrics_directory(tmp / "data") / f"worker-{exited.pid}.json"


def test_one_scrape_reports_the_sum_over_both_workers(emulator: Emulator, tmp_path: Path) -> None:
    tiers = {"starter": {"markup_pct": "10"}}
    gone = leave_an_earlier_runs_files(tmp_path)
    gw = start_workers(tmp_path, emulator, {"tiers": tiers, "default_tier": "starter"})
    try:
        user = gw.create_user(tier="starter", key=emulator.new_key())
        sent = 0
        for _ in range(ATTEMPTS):
            assert send_at_once(gw.url, user["token"], BATCH) == [200] * BATCH
            sent += BATCH
            served = once_counted(tmp_path, sent)
            if len(served) == 2 and all(served.values()):
                break
        assert len(served) == 2 and all(served.values()), f"one worker served all {sent} requests: {served}"

        usage = wait_for(lambda: (u := money_json(gw.admin.get("/admin/v1/usage?group_by=tier")))["totals"][
            "requests"] == sent and u["totals"]["unsettled_requests"] == 0 and u, "the ledger to hold every request")
        [starter] = [row for row in usage["rows"] if row["tier"] == "starter"]

        def summed() -> Any:  # the cost families count a generation once it settled: wait for the last one
            text, series = scrape(gw.url)
            costs = [line for line in text.splitlines() if line.startswith('gateway_cost_usd_total{tier="starter"} ')]
            return chat_requests(series) == sent and costs and exact(text, costs[0].split(" ")[0]) == starter["total_cost"] and (
                text, series)

        text, series = wait_for(summed, f"a scrape summing to {sent} requests and their cost")
        assert not gone.exists()  # the earlier run's file of a process that has exited is deleted

        # a worker that dies takes its counts out of the sum (a counter reset), and its file goes
        killed, survivor = served
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: chat_requests(scrape(gw.url)[1]) == served[survivor],
                 f"a scrape without the killed worker's {served[killed]} requests")
        assert not (metrics_directory(tmp_path / "data") / f"worker-{killed}.json").exists()
    finally:
        assert gw.stop() == 0

    tokens = series["gateway_tokens_total"]
    assert tokens[(("kind", "prompt"), ("tier", "starter"))] == starter["prompt_tokens"] > 0
    assert tokens[(("kind", "completion"), ("tier", "starter"))] == starter["completion_tokens"] > 0
    assert exact(text, 'gateway_cost_usd_total{tier="starter"}') == starter["total_cost"] > 0
    assert exact(text, 'gateway_markup_usd_total{tier="starter"}') == starter["markup"] > 0
    assert series["gateway_request_duration_seconds_count"][(("route", CHAT_ROUTE),)] == sent
    assert series["gateway_upstream_ttfb_seconds_count"][()] == sent
    assert series["gateway_streams_in_flight"][()] == 0
    assert "Traceback" not in gw.output()


@pytest.mark.services
def test_with_redis_a_request_limit_holds_across_both_workers(emulator: Emulator, tmp_path: Path) -> None:
    url = redis_url_or_skip(db=13)  # keys are per user, and every user here is new
    tiers = {"starter": {"markup_pct": "10", "requests_per_minute": 5}}
    gw = start_workers(tmp_path, emulator, {"tiers": tiers, "default_tier": "starter", "redis": {"url": url}})
    try:
        sent, before, both = 0, served_by_worker(tmp_path), False
        for _ in range(ATTEMPTS):  # until both workers served one batch; a new user each time (a fresh window)
            user = gw.create_user(tier="starter", key=emulator.new_key())
            statuses = send_at_once(gw.url, user["token"], 10)
            sent += 10
            assert sorted(statuses) == [200] * 5 + [429] * 5, statuses
            served = once_counted(tmp_path, sent)
            both = len(served) == 2 and all(n > before.get(pid, 0) for pid, n in served.items())
            if both:
                break
            before = served
        assert both, f"one worker served each batch of 10: {served}"
    finally:
        assert gw.stop() == 0
    assert "Traceback" not in gw.output()
