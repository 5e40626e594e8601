"""The goals table from synthetic rows: ratios on the settled CPU figure, "did not settle" fails, a
target that could not start is N/A with a note."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ is a tool beside the package, not installed with it

from bench.__main__ import QUICK  # noqa: E402
from bench.report import render, summarise  # noqa: E402


def json_row(target: str, c: int, rps: float, p50: float, cpu: float, settled: float | None) -> dict:
    return {"target": target, "mode": "json", "concurrency": c, "rps": rps, "p50_ms": p50, "p99_ms": p50 * 2,
            "errors": 0, "requests": int(rps), "cpu_us_per_request": cpu, "cpu_us_settled": settled,
            "settle_s": None if settled is None else 1.0}


def stream_row(target: str, ttfb: float) -> dict:
    return {"target": target, "mode": "stream", "concurrency": 1, "rps": 100, "p50_ms": 1, "p99_ms": 2,
            "ttfb_p50_ms": ttfb, "errors": 0, "requests": 100}


def rows(gateway_settled: float | None) -> list[dict]:
    return [
        json_row("direct", 1, 8000, 0.10, 50, 50), json_row("direct", 32, 20000, 1.5, 40, 40),
        json_row("minimal", 32, 2000, 15, 400, 400), json_row("relay", 32, 10000, 4, 100, 100),
        json_row("gateway", 1, 3000, 0.35, 300, 350), json_row("gateway", 32, 3200, 10, 300, gateway_settled),
        stream_row("direct", 0.3), stream_row("gateway", 0.7),
    ]


TARGETS = {"gateway": {"server": "uvicorn", "loop": "uvloop"},
           "gateway-missing": {"server": "?", "loop": "?", "available": False, "note": "no such key"}}


def goal(results: dict, ident: str) -> dict:
    return next(t for t in results["targets"] if t["id"] == ident)


def test_goals_use_the_settled_cpu_and_report_each_verdict() -> None:
    results = summarise(rows(380), {}, QUICK, [], TARGETS)
    assert goal(results, "1")["status"] == "PASS" and goal(results, "1")["value"] == 0.95  # 380 / 400, settled
    assert goal(results, "6a")["status"] == "PASS"  # 3200 / 2000 = 1.6
    assert goal(results, "6b")["status"] == "FAIL" and goal(results, "6b")["value"] == 0.32  # below 0.35
    assert goal(results, "6c")["status"] == "PASS" and goal(results, "6c")["value"] == 0.25
    assert goal(results, "6d")["status"] == "PASS" and goal(results, "6d")["value"] == 0.4
    assert goal(results, "2")["status"] == "PASS"
    assert goal(results, "4")["status"] == "N/A" and "not available" in goal(results, "4")["measured"]
    assert goal(results, "7")["status"] == "N/A"
    table = {t["target"]: t for t in results["per_target"]}
    assert table["gateway"]["cpu_us_settled"] == 380 and not table["gateway-missing"]["available"]
    assert "not available (see notes)" in render(results)


def test_a_gateway_that_does_not_settle_fails_and_says_so() -> None:
    results = summarise(rows(None), {}, QUICK, [], TARGETS)
    assert goal(results, "1")["status"] == "FAIL" and "did not settle" in goal(results, "1")["measured"]
    assert "did not settle" in render(results)


def test_sustained_and_workers_goals() -> None:
    sustained = {"target": "gateway", "seconds": 60, "concurrency": 32, "peak": 5000, "bounded": False,
                 "bounded_rule": "rule", "at_load_end": 5000, "settled_s": None, "samples_during": [1] * 60,
                 "samples_after": [], "interval_s": 1.0}
    run = {"requests": 10000, "errors": 0, "dropped": 0, "late": 0, "cpu_us_settled": 200.0}
    extras = {"sustained:gateway": sustained,
              "workers": {"rate": 1000, "seconds": 10, "pinning": "both on core 1", "ratio": 1.05,
                          "1": run, "2": {**run, "cpu_us_settled": 210.0}}}
    results = summarise(rows(380), extras, QUICK, [], TARGETS)
    assert goal(results, "1b")["status"] == "FAIL" and "cannot keep up" in goal(results, "1b")["measured"]
    assert goal(results, "1c")["status"] == "FAIL" and "did not settle" in goal(results, "1c")["measured"]
    assert goal(results, "4b")["status"] == "N/A"
    assert goal(results, "7")["status"] == "PASS" and goal(results, "7")["value"] == 1.05
