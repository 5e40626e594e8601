"""`make bench-peers` / `python -m bench.peers`: the gateway against the LiteLLM proxy, same box, same load.

Why a separate module and venv: LiteLLM is a heavy, optional peer (hundreds of packages,
~350 MB resident), so it never goes into the project's `.venv` nor into `make test`.
`make bench-peers` installs it into `.venv-peers` and this module runs it from there as
its own process, next to the gateway and the same fake upstream `make bench` uses.

Like `make bench`: one worker each, the server under load pinned to core 1, the wrk load
generator and the upstream on core 0, the same non-streaming body at c=1 and c=32. The
issue target is "json c=32: the full gateway >= 25x LiteLLM"; c=1 latency is reported as
p50 added over the upstream measured directly. Results also go to `bench/results/peers.json`.

LiteLLM is set up to run standalone and offline: no database (so no spend logs and no
virtual keys; a master key, which it insists on, is the only auth), no callbacks, no
telemetry, the bundled model-cost map instead of fetching one at import. When LiteLLM is
missing or will not start, this says why and exits 2 — it never reports made-up numbers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench import load
from bench.__main__ import FULL, Bench, busy_cores, choose_generator
from bench.servers import (
    BACK_CPU,
    BENCH_KEY,
    FRONT_CPU,
    ROOT,
    Server,
    free_port,
    start_gateway,
    start_upstream,
)
from bench.upstream import MODEL

PEERS_VENV = ROOT / ".venv-peers"
RESULTS = Path(__file__).resolve().parent / "results" / "peers.json"
LITELLM_MASTER_KEY = "sk-litellm-bench-" + "0" * 32  # LiteLLM refuses to start without one
TARGET_RATIO = 25.0
GATEWAY, LITELLM, DIRECT = "gateway", "litellm", "direct"
# Offline and quiet: bundled cost map (else it retries a download at import), no docs, no .env loading.
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "NO_DOCS": "True",
               "NO_REDOC": "True", "LITELLM_MODE": "PRODUCTION", "LITELLM_TELEMETRY": "False",
               "DISABLE_ADMIN_UI": "True"}


class NotRunnable(Exception):
    """A peer comparison cannot be made here; the message says why."""


def litellm_config(upstream_api: str, *, model: str = MODEL, api_key: str = BENCH_KEY,
                   master_key: str = LITELLM_MASTER_KEY) -> dict[str, Any]:
    """One model routed to the fake upstream as a generic OpenAI-compatible endpoint."""
    return {
        "model_list": [{"model_name": model,
                        "litellm_params": {"model": f"openai/{model}", "api_base": upstream_api, "api_key": api_key}}],
        "litellm_settings": {"telemetry": False, "callbacks": [], "success_callback": [], "failure_callback": [],
                             "set_verbose": False},
        "general_settings": {"master_key": master_key, "disable_spend_logs": True},
    }


def start_litellm(upstream: Server, tmp: Path, cpu: int | None) -> Server:
    binary = PEERS_VENV / "bin" / "litellm"
    if not binary.exists():
        raise NotRunnable(f"{binary} is missing: run `make bench-peers`, which installs litellm[proxy] there")
    config = tmp / "litellm.yaml"
    config.write_text(yaml.safe_dump(litellm_config(upstream.url + "/api/v1")))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_HOST", "REDIS_URL")}
    port = free_port()
    try:
        return _SlowStart("litellm", [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                                      "--num_workers", "1"], port=port, health="/health/liveliness", cpu=cpu,
                          cwd=tmp, env={**env, **LITELLM_ENV})
    except RuntimeError as exc:
        raise NotRunnable(f"the LiteLLM proxy did not start: {exc}") from exc


class _SlowStart(Server):
    """LiteLLM imports for 5-10 s on this box; give it longer than the 30 s the project's servers get."""

    def _wait(self, url: str, timeout: float = 120) -> None:
        super()._wait(url, timeout)


def litellm_version() -> str | None:
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, check=False)
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def summarise(rows: list[dict[str, Any]], idle_rss_kb: dict[str, int]) -> dict[str, Any]:
    """The c=32 ratio with PASS/FAIL against >= 25x, and c=1 p50 added over direct for each proxy."""
    def find(target: str, c: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["target"] == target and r["concurrency"] == c), None)

    g32, l32 = find(GATEWAY, 32), find(LITELLM, 32)
    ratio = round(g32["rps"] / l32["rps"], 1) if g32 and l32 and g32["rps"] and l32["rps"] else None
    d1 = find(DIRECT, 1)
    added = {}
    for target in (GATEWAY, LITELLM):
        row = find(target, 1)
        added[target] = round(row["p50_ms"] - d1["p50_ms"], 3) if row and d1 and row["p50_ms"] is not None else None
    status = "N/A" if ratio is None else ("PASS" if ratio >= TARGET_RATIO else "FAIL")
    return {"rows": rows, "idle_rss_kb": idle_rss_kb, "ratio_c32": ratio, "status": status,
            "target": f"json c=32: gateway >= {TARGET_RATIO:g}x LiteLLM", "added_p50_ms_c1": added}


def render(results: dict[str, Any]) -> str:
    lines = ["", f"{'target':<16} {'c':>3} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>6} {'idle RSS':>9}"]
    for r in results["rows"]:
        rss = results["idle_rss_kb"].get(r["target"])
        lines.append(f"{r['target']:<16} {r['concurrency']:>3} {r['rps']:>9.1f} {r['p50_ms']:>9.3f} "
                     f"{r['p99_ms']:>9.3f} {r['errors']:>6} {'-' if rss is None else f'{rss / 1024:.0f} MB':>9}")
    ratio = results["ratio_c32"]
    lines.append(f"\n{results['target']}: {results['status']} ({'-' if ratio is None else f'{ratio:g}x'})")
    for target, ms in results["added_p50_ms_c1"].items():
        lines.append(f"json c=1 p50 added over direct, {target}: {'-' if ms is None else f'{ms:.3f} ms'}")
    return "\n".join(lines)


def run(bench: Bench) -> dict[str, int]:
    """Direct, then the gateway, then LiteLLM, each at c=1 and c=32; returns idle RSS per target."""
    idle: dict[str, int] = {}
    cs = bench.settings.concurrencies
    upstream = start_upstream(bench.cpu(FRONT_CPU))  # the direct run: the upstream takes the load
    try:
        url = upstream.url + "/api/v1" + load.CHAT_PATH
        bench.warm(url, BENCH_KEY)
        idle[DIRECT] = upstream.rss_kb()
        for c in cs:
            bench.row(DIRECT, url, BENCH_KEY, stream=False, concurrency=c)
    finally:
        upstream.stop()
    upstream = start_upstream(bench.cpu(BACK_CPU))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
            for name in (GATEWAY, LITELLM):
                if name == GATEWAY:
                    server, token = start_gateway(upstream, None, Path(tmp) / "gateway", bench.cpu(FRONT_CPU))
                else:
                    server, token = start_litellm(upstream, Path(tmp), bench.cpu(FRONT_CPU)), LITELLM_MASTER_KEY
                try:
                    url = server.url + "/v1" + load.CHAT_PATH
                    bench.warm(url, token)
                    idle[name] = server.rss_kb()
                    for c in cs:
                        row = bench.row(name, url, token, stream=False, concurrency=c)
                        if not row["requests"]:
                            raise NotRunnable(f"{name} answered no request successfully at c={c} "
                                              f"(log: {server.log.name})")
                finally:
                    server.stop()
    finally:
        upstream.stop()
    return idle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=FULL.duration, help="seconds measured per run (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--strict", action="store_true", help="exit 1 if the ratio target fails")
    args = parser.parse_args(argv)

    version = litellm_version()
    if version is None:
        print(f"bench.peers: LiteLLM is not installed in {PEERS_VENV}; run `make bench-peers`", file=sys.stderr)
        return 2
    generator, notes = choose_generator("auto", install=True)
    pin = len(os.sched_getaffinity(0)) >= 2
    bench = Bench(replace(FULL, duration=args.duration), generator, pin)
    busy = busy_cores(1.0)
    if busy > 0.2:  # as in `make bench`: other processes compete with the servers, so numbers are low
        notes.append(f"the box was busy before the run ({busy:.1f} of {os.cpu_count()} cores in use by others)")
    print(f"bench.peers: LiteLLM {version}; json load from {generator}; "
          f"{'servers pinned to core 1, load and upstream on core 0' if pin else 'no pinning'}", flush=True)
    started = time.monotonic()
    try:
        idle = run(bench)
    except NotRunnable as exc:
        print(f"bench.peers: no comparison made: {exc}", file=sys.stderr)
        return 2
    results = summarise(bench.rows, idle)
    results.update({"litellm_version": version, "generator": generator, "pinned": pin, "notes": notes,
                    "busy_cores_before": round(busy, 2), "duration_s": args.duration,
                    "elapsed_s": round(time.monotonic() - started, 1)})
    print(render(results), flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(f"results written to {args.out}", flush=True)
    return 1 if args.strict and results["status"] == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
