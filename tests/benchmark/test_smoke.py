"""`make bench` must not rot: the harness runs end to end in its quick mode and reports numbers.

No performance target is asserted (timed assertions would be flaky on a shared 2-core box);
what is asserted is that every target and mode was measured, every stream arrived byte for
byte, CPU per request was counted with the deferred work settled, and the report and JSON
carry the goals.
"""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ is a tool beside the package, not installed with it

from bench.load import request_body  # noqa: E402
from bench.report import summarise  # noqa: E402
from bench.upstream import _generation, cost_of, expected_stream, generation_id  # noqa: E402

# always measured; gateway-missing needs `accounting.generation_lookup.policy`, gateway-granian needs granian
ALWAYS = ("direct", "minimal", "relay", "gateway")
GOALS = {"1", "4", "6a", "6b", "6c", "6d", "6e", "2", "1b", "1c", "4b", "4c", "7", "s1", "s2", "s3"}


def test_expected_stream_is_a_pure_function_of_the_request() -> None:
    first = expected_stream("seed-1", 3)
    assert first == expected_stream("seed-1", 3)
    assert first != expected_stream("seed-2", 3)
    assert len(first) == 3 + 4  # comment, role, 3 contents, stop, usage + [DONE]
    assert first[0].startswith(b": ") and first[-1].endswith(b"data: [DONE]\n\n")
    assert b'"id":"gen-b3-seed-1"' in first[1]


def test_generation_cost_equals_the_streamed_usage_cost() -> None:
    usage_event = expected_stream("abc", 7)[-1].split(b"\n\n")[0][len(b"data: "):]
    streamed = json.loads(usage_event, parse_float=Decimal)["usage"]["cost"]
    record = json.loads(_generation(generation_id("abc", 7)), parse_float=Decimal)["data"]
    assert streamed == record["total_cost"] == cost_of(7)
    assert _generation("gen-unknown") is None


def test_summary_marks_missing_measurements_not_applicable() -> None:
    from bench.__main__ import QUICK

    results = summarise([], {}, QUICK, [])
    assert {t["status"] for t in results["targets"]} == {"N/A"}
    assert {t["id"] for t in results["targets"]} == GOALS - {"s3"}  # s3 only once limits were priced
    assert json.loads(request_body(stream=True, chunks=4, seed="s"))["max_tokens"] == 4


@pytest.mark.timeout(400)
def test_quick_bench_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-install", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=380,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "goals (one run, same machine):" in run.stdout and "server stack" in run.stdout
    assert "price of limits:" in run.stdout and "price of accounting:" in run.stdout
    results = json.loads(out.read_text())
    available = {t["target"] for t in results["per_target"] if t["available"]}
    assert set(ALWAYS) <= available
    measured = {(r["target"], r["mode"], r["concurrency"]) for r in results["rows"]}
    assert measured == {(t, m, c) for t in available for m in ("json", "stream") for c in (1, 32)}
    for row in results["rows"]:
        assert row["errors"] == 0 and row["requests"] > 0 and row["rps"] > 0 and row["p50_ms"] > 0, row
        if row["mode"] == "stream":
            assert row["byte_exact"] == row["requests"] and row["ttfb_p50_ms"] > 0, row
        else:  # CPU per request, and with the deferred work settled (the pass-throughs have none)
            assert row["cpu_us_per_request"] > 0 and row["cpu_us_settled"] >= row["cpu_us_per_request"] * 0.9, row
    for target in results["per_target"]:
        if target["available"]:
            assert target["loop"] and target["server"], target
    many = results["concurrent_streams"]["gateway"]
    assert many["byte_exact"] == many["streams"] and many["peak_rss_kb"] > 0
    assert {t["id"] for t in results["targets"]} == GOALS
    assert all(t["status"] in ("PASS", "FAIL", "N/A") for t in results["targets"])
    sustained = results["sustained"]["gateway"]
    assert sustained["samples_during"] and sustained["bounded_rule"] and sustained["requests"] > 0
    workers = results["workers"]
    for n in ("1", "2"):
        assert workers[n]["requests"] > 0 and workers[n]["cpu_us_settled"] > 0, workers
    assert workers["2"]["processes"] > workers["1"]["processes"]
    for service in ("limits", "accounting"):  # each priced by a paired run with the service left out
        cost = results["service_costs"][service]
        for side in ("with", "without"):
            assert cost[side]["rps_median"] > 0 and cost[side]["cpu_us_per_request"] > 0, cost
        assert cost["cpu_pct"] is not None and cost["rps_pct"] is not None
