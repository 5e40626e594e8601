"""`make bench` / `python -m bench [--quick]`: direct vs minimal pass-through vs the gateway.

Each target runs as its own one-worker process against the same fast fake upstream
(`bench/upstream.py`): (a) the upstream directly, (b) a minimal Starlette + aiohttp
pass-through, (c) the gateway with `upstream.client: aiohttp` and (d) with `httpx`, both
in their default shape (auth, limits, accounting) with a user, a key and a tier whose
limits never trigger. For each: non-streaming and streaming at c=1 and c=32, then the
issue-8 targets with PASS/FAIL. Then each priced service (limits, accounting) is
measured by pairing the gateway with a copy that leaves it out (`bench/variant.py`):
alternating json c=32 runs, compared by req/s and by the server's CPU per request.
Results also go to `bench/results/latest.json`.

The bench reports; it does not judge the build: it exits 0 when every run completed,
whatever the targets say (`--strict` makes a FAIL exit 1).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from bench import load, report
from bench.servers import (
    BACK_CPU,
    BENCH_KEY,
    FRONT_CPU,
    ROOT,
    Server,
    configure_upstream,
    pinning,
    start_gateway,
    start_minimal,
    start_upstream,
)

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True)
class Settings:
    duration: float  # seconds measured per run
    warmup: float  # seconds of discarded load before each run
    chunks: int  # content chunks per stream in the stream rows
    concurrent_streams: int  # streams held open at once for the byte-exact and memory test
    concurrent_chunks: int
    chunk_delay_ms: float  # upstream pause between chunks during that test, so streams overlap
    warm_requests: int = 20  # of each kind before measuring a target
    concurrencies: tuple[int, ...] = (1, 32)
    # Pricing a service: alternating runs per side, each this long. Many short rounds: the verdict is
    # their median, and a burst from another tenant of the box spoils one round, not the answer.
    pair_rounds: int = 12
    pair_duration: float = 3


FULL = Settings(duration=5, warmup=1, chunks=200, concurrent_streams=1000, concurrent_chunks=200, chunk_delay_ms=50)
QUICK = Settings(duration=1.0, warmup=0, chunks=20, concurrent_streams=50, concurrent_chunks=20, chunk_delay_ms=5,
               warm_requests=5, pair_rounds=1, pair_duration=1)
PRICED = ("limits", "accounting")  # services the bench prices by leaving them out


class Bench:
    def __init__(self, settings: Settings, generator: str, pin: bool) -> None:
        self.settings = settings
        self.generator = generator
        self.pin = pin
        self.rows: list[dict[str, Any]] = []
        self.extras: dict[str, Any] = {}
        self.notes: list[str] = []

    def cpu(self, which: int) -> int | None:
        return which if self.pin else None

    # -- one load run, in its own pinned process, sampling the server's memory ------------

    def load(self, spec: dict[str, Any], watch: Server | None = None) -> tuple[dict[str, Any], int]:
        # the spec (with its token) goes through stdin, never onto a command line others can list
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen([sys.executable, "-m", "bench.load"], stdin=subprocess.PIPE, stdout=stdout,
                                       stderr=stderr, cwd=ROOT, preexec_fn=pinning(self.cpu(BACK_CPU)))
            assert process.stdin is not None
            process.stdin.write(orjson.dumps(spec))
            process.stdin.close()
            peak = 0
            while process.poll() is None:
                if watch is not None:
                    peak = max(peak, watch.rss_kb())
                time.sleep(0.02)
            stdout.seek(0)
            stderr.seek(0)
            out, err = stdout.read(), stderr.read()
        if process.returncode != 0:
            raise RuntimeError(f"load generator failed ({spec['kind']}): {err.decode(errors='replace')[-2000:]}")
        return orjson.loads(out.splitlines()[-1]), peak

    def row(self, target: str, url: str, token: str, *, stream: bool, concurrency: int) -> dict[str, Any]:
        s = self.settings
        if stream:
            spec = {"kind": "streams", "url": url, "token": token, "concurrency": concurrency, "chunks": s.chunks,
                    "seed": f"{target}-c{concurrency}", "duration": s.duration, "warmup": s.warmup}
        else:
            spec = {"kind": self.generator, "url": url, "token": token, "concurrency": concurrency,
                    "body": load.request_body(stream=False).decode(), "duration": s.duration, "warmup": s.warmup}
        result, _ = self.load(spec)
        row = {"target": target, "mode": "stream" if stream else "json", "concurrency": concurrency, **result}
        self.rows.append(row)
        print(report.row_line(row), flush=True)
        return row

    def rows_for(self, target: str, url: str, token: str) -> None:
        for stream in (False, True):
            for concurrency in self.settings.concurrencies:
                self.row(target, url, token, stream=stream, concurrency=concurrency)

    def warm(self, url: str, token: str) -> None:
        """A few requests of each kind so lazy imports and caches are in place before measuring."""
        import httpx

        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        with httpx.Client(timeout=30) as client:
            for i in range(self.settings.warm_requests):
                client.post(url, content=load.request_body(stream=False), headers=headers).raise_for_status()
                client.post(url, content=load.request_body(stream=True, chunks=5, seed=f"warm-{i}"),
                            headers=headers).raise_for_status()
        time.sleep(0.5)

    def concurrent_streams(self, target: str, server: Server, upstream: Server, url: str, token: str) -> None:
        """N streams open at once through one worker: all byte-exact, and RSS per stream in flight."""
        s = self.settings
        idle = server.rss_kb()
        configure_upstream(upstream, s.chunk_delay_ms)
        try:
            result, peak = self.load({"kind": "streams", "url": url, "token": token,
                                      "concurrency": s.concurrent_streams, "count": s.concurrent_streams,
                                      "chunks": s.concurrent_chunks, "seed": f"{target}-many"}, watch=server)
        finally:
            configure_upstream(upstream, 0)
        per_stream = (peak - idle) / s.concurrent_streams
        self.extras[target] = {"idle_rss_kb": idle, "peak_rss_kb": peak, "rss_per_stream_kb": round(per_stream, 1),
                               "streams": s.concurrent_streams, "chunks": s.concurrent_chunks,
                               "chunk_delay_ms": s.chunk_delay_ms, **result}
        print(report.streams_line(target, self.extras[target]), flush=True)

    # -- the targets ---------------------------------------------------------------------

    def run(self, *, price_only: bool = False) -> None:
        if price_only:
            upstream = start_upstream(self.cpu(BACK_CPU))
            try:
                for service in PRICED:
                    self.price(service, upstream)
            finally:
                upstream.stop()
            return
        upstream = start_upstream(self.cpu(FRONT_CPU))  # the direct run: the upstream is the front
        try:
            url = upstream.url + "/api/v1" + load.CHAT_PATH
            self.warm(url, BENCH_KEY)
            self.rows_for("direct", url, BENCH_KEY)
        finally:
            upstream.stop()

        upstream = start_upstream(self.cpu(BACK_CPU))
        try:
            minimal = start_minimal(upstream, self.cpu(FRONT_CPU))
            try:
                url = minimal.url + "/v1" + load.CHAT_PATH
                self.warm(url, BENCH_KEY)
                self.extras["minimal_idle_rss_kb"] = minimal.rss_kb()
                self.concurrent_streams("minimal", minimal, upstream, url, BENCH_KEY)
                self.rows_for("minimal", url, BENCH_KEY)
            finally:
                minimal.stop()
            for client in ("aiohttp", "httpx"):
                target = f"gateway-{client}"
                with tempfile.TemporaryDirectory(prefix=f"bench-{client}-") as tmp:
                    gateway, token = start_gateway(upstream, client, Path(tmp), self.cpu(FRONT_CPU))
                    try:
                        url = gateway.url + "/v1" + load.CHAT_PATH
                        self.warm(url, token)
                        self.extras[f"{target}_idle_rss_kb"] = gateway.rss_kb()
                        if client == "aiohttp":
                            self.concurrent_streams(target, gateway, upstream, url, token)
                        self.rows_for(target, url, token)
                    finally:
                        gateway.stop()
            for service in PRICED:
                self.price(service, upstream)
        finally:
            upstream.stop()

    def price(self, service: str, upstream: Server) -> None:
        """The gateway with and without `service`, json c=32, in alternating runs (ABBA order, so a
        drift in the box's speed falls on both sides); req/s medians, and the median over rounds
        of the CPU-per-request ratio (single runs move ±5% on a shared 2-core box).

        The side not under load is paused (SIGSTOP) meanwhile: idle, it would settle its backlog
        at full speed on the same core. Each keeps its backlog, as a gateway under load does. CPU
        is counted over each measured run only (the load generator reads the server's CPU around
        it), after a warm-up run: resumed from idle, the gateway's paced background work runs at
        full speed until its CPU meter sees the load again, and that burst is not the request's."""
        s = self.settings
        sides: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory(prefix="bench-with-") as with_dir, \
                tempfile.TemporaryDirectory(prefix="bench-without-") as without_dir:
            servers: dict[str, tuple[Server, str]] = {}
            try:
                servers["with"] = start_gateway(upstream, "aiohttp", Path(with_dir), self.cpu(FRONT_CPU))
                servers["without"] = start_gateway(upstream, "aiohttp", Path(without_dir), self.cpu(FRONT_CPU),
                                                   without=service)
                body = load.request_body(stream=False).decode()
                for side, (server, token) in servers.items():
                    self.warm(server.url + "/v1" + load.CHAT_PATH, token)
                    sides[side] = {"rps": [], "cpu_us": [], "requests": 0, "cpu_s": 0.0}
                order = [("with", "without"), ("without", "with")]
                for round_ in range(s.pair_rounds):
                    for side in order[round_ % 2]:
                        server, token = servers[side]
                        other = servers["without" if side == "with" else "with"][0]
                        other.pause()  # its paced backlog of look-ups would otherwise take the core
                        try:  # CPU of the measured window only: not the warm-up, not the load's start-up
                            result, _ = self.load({"kind": self.generator, "token": token, "concurrency": 32,
                                                   "url": server.url + "/v1" + load.CHAT_PATH, "body": body,
                                                   "duration": s.pair_duration, "warmup": s.warmup,
                                                   "cpu_pid": server.process.pid})
                            cpu = result["server_cpu_s"]
                        finally:
                            other.resume()
                        sides[side]["cpu_s"] += cpu
                        sides[side]["requests"] += result["requests"]
                        sides[side]["rps"].append(result["rps"])
                        sides[side]["cpu_us"].append(round(cpu / max(result["requests"], 1) * 1e6, 1))
            finally:
                for server, _ in servers.values():
                    server.stop()
        priced: dict[str, Any] = {
            side: {"rps_runs": v["rps"], "rps_median": statistics.median(v["rps"]), "cpu_us_runs": v["cpu_us"],
                   "cpu_us_per_request": round(v["cpu_s"] / max(v["requests"], 1) * 1e6, 1)}
            for side, v in sides.items()}
        # each round's with/without runs are adjacent, so their ratio cancels most of the box's drift
        priced["round_ratios"] = [round(w / o, 4) for w, o in zip(sides["with"]["cpu_us"], sides["without"]["cpu_us"]) if o]
        self.extras[f"price:{service}"] = priced
        print(report.price_line(service, priced), flush=True)


def busy_cores(seconds: float) -> float:
    """How many cores other processes kept busy just before the run (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return 0.0
    if total1 == total0:
        return 0.0
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def choose_generator(requested: str, install: bool) -> tuple[str, list[str]]:
    """wrk if present (installed with apt-get when missing and we are root), else the Python client."""
    if requested == "python":
        return "python", []
    if load.wrk_available():
        return "wrk", []
    notes = []
    if install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: wrk is missing; installing it with apt-get ...", flush=True)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        if subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], **quiet).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], **quiet)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], **quiet)
        if load.wrk_available():
            return "wrk", ["wrk was installed with apt-get"]
    if requested == "wrk":
        raise SystemExit("bench: --load wrk asked for, but wrk is not installed and could not be installed")
    notes.append("wrk not available: non-streaming load comes from the Python client, which tops out well "
                 "below the upstream's rate on 2 cores, so the direct row is client-bound and the others may be")
    print("bench: note: " + notes[-1], flush=True)
    return "python", notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 1 s per run, small stream counts (smoke test)")
    parser.add_argument("--duration", type=float,
                        help="seconds measured per run (default 5; quick 1)")
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto",
                        help="non-streaming load generator (default: wrk when available)")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--price-only", action="store_true",
                        help="only price the services (limits, accounting): the paired with/without runs")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any issue-8 target fails")
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.duration:
        settings = Settings(**{**asdict(settings), "duration": args.duration})
    generator, notes = choose_generator(args.load, install=not args.no_install)
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    bench = Bench(settings, generator, pin)
    bench.notes.extend(notes)
    busy = busy_cores(0.2 if args.quick else 1.0)
    if busy > 0.2:
        bench.notes.append(f"the box was busy before the run ({busy:.1f} of {os.cpu_count()} cores in use by "
                           "other processes): they compete with the servers, so the numbers are low")
    started = time.monotonic()
    print(report.header(generator, pin, settings), flush=True)
    bench.run(price_only=args.price_only)
    results = report.summarise(bench.rows, bench.extras, settings, bench.notes)
    results.update({
        "settings": asdict(settings), "generator": generator, "pinned": pin, "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "elapsed_s": round(time.monotonic() - started, 1),
        "busy_cores_before": round(busy, 2),
    })
    print(report.render(results), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(f"results written to {args.out}", flush=True)
    failed = any(t["status"] == "FAIL" for t in results["targets"])
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
