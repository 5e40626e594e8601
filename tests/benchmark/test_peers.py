"""`make bench-peers` helpers that need no LiteLLM: its config, and the ratio with PASS/FAIL.

LiteLLM itself is optional (its own venv, `make bench-peers`), so nothing here starts it.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ is a tool beside the package, not installed with it

from bench.peers import LITELLM_MASTER_KEY, litellm_config, render, summarise  # noqa: E402
from bench.servers import BENCH_KEY  # noqa: E402
from bench.upstream import MODEL  # noqa: E402


def row(target: str, c: int, rps: float, p50: float) -> dict:
    return {"target": target, "mode": "json", "concurrency": c, "rps": rps, "p50_ms": p50, "p99_ms": p50 * 2,
            "errors": 0, "requests": int(rps)}


def test_litellm_config_routes_the_bench_model_to_the_fake_upstream_standalone() -> None:
    config = litellm_config("http://127.0.0.1:9/api/v1")
    (entry,) = config["model_list"]
    assert entry["model_name"] == MODEL
    assert entry["litellm_params"] == {"model": f"openai/{MODEL}", "api_base": "http://127.0.0.1:9/api/v1",
                                       "api_key": BENCH_KEY}
    assert config["general_settings"]["master_key"] == LITELLM_MASTER_KEY
    assert "database_url" not in config["general_settings"]
    assert config["litellm_settings"]["telemetry"] is False


def test_summarise_ratio_status_and_added_latency() -> None:
    rows = [row("direct", 1, 5000, 0.2), row("direct", 32, 20000, 1.5), row("gateway", 1, 2000, 0.5),
            row("gateway", 32, 6000, 5.0), row("litellm", 1, 60, 16.2), row("litellm", 32, 60, 500.0)]
    results = summarise(rows, {"gateway": 60 * 1024, "litellm": 342 * 1024})
    assert results["ratio_c32"] == 100.0 and results["status"] == "PASS"
    assert results["added_p50_ms_c1"] == {"gateway": 0.3, "litellm": 16.0}
    assert "PASS (100x)" in render(results) and "342 MB" in render(results)
    rows[-1] = row("litellm", 32, 1000, 30.0)
    assert summarise(rows, {})["status"] == "FAIL"
    assert summarise(rows[:-1], {})["status"] == "N/A"
