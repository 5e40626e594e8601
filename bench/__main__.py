"""`make bench` / `python -m bench [--quick]`: the gateway against pass-throughs, counting all its work.

Each target is its own process tree against the same fast fake upstream (`bench/upstream.py`):
(a) the upstream directly, (b) a minimal Starlette + aiohttp pass-through, (c) the speed-of-light
relay (`bench/relay.py`: uvloop + asyncio protocols + httptools, no framework), (d) the gateway as
`gateway serve` runs it (auth, limits, accounting; a user, a key and a tier whose limits never
trigger) with `accounting.generation_lookup.policy` `all` and (e) `missing`, and (f) the gateway
served by granian (ASGI, uvloop). For each: non-streaming and streaming at c=1 and c=32, the loop
and server it ran on, and its CPU per request, during the load and settled: until the gateway's
deferred work (pending cost look-ups, unwritten usage records: `bench/backlog.py`) is back to zero.
Then a sustained run (60 s at c=32) watching that backlog, a paced run at a fixed offered rate
against `--workers 1` and `--workers 2`, and the price of limits and accounting (each paired with
a copy that leaves it out, `bench/variant.py`). It ends with the goals with PASS/FAIL, the server
stack table (uvicorn vs granian) and `bench/results/latest.json`.

The bench reports; it does not judge the build: it exits 0 when every run completed,
whatever the goals say (`--strict` makes a FAIL exit 1).
"""

from __future__ import annotations

import argparse
import importlib.util
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

from bench import backlog, load, report
from bench.servers import (
    BACK_CPU,
    BENCH_KEY,
    FRONT_CPU,
    ROOT,
    Server,
    configure_upstream,
    deferred_work,
    pinning,
    start_gateway,
    start_minimal,
    start_relay,
    start_upstream,
    tree_cpu_s,
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
    pair_rounds: int = 8
    pair_duration: float = 3
    sustained_s: float = 60  # the sustained run at c=32 that watches the settlement backlog
    settle_timeout_s: float = 120  # deferred work not done by then: "did not settle"
    # offered req/s of the workers comparison: both configurations share core 1, and at ~700 us per request
    # (paced, settled) 700 req/s keeps it about half busy, so neither saturates and the client stays on time
    paced_rate: float = 700
    paced_s: float = 10
    paced_warmup_s: float = 2


FULL = Settings(duration=5, warmup=1, chunks=200, concurrent_streams=1000, concurrent_chunks=200, chunk_delay_ms=50)
QUICK = Settings(duration=1.0, warmup=0.5, chunks=20, concurrent_streams=50, concurrent_chunks=20, chunk_delay_ms=5,
                 warm_requests=5, pair_rounds=1, pair_duration=1, sustained_s=5, settle_timeout_s=60,
                 paced_rate=200, paced_s=2, paced_warmup_s=0.5)
PRICED = ("limits", "accounting")  # services the bench prices by leaving them out
GATEWAYS = {  # target → how start_gateway starts it; the first is the product's default, the goals' gateway
    report.GATEWAY: {"server": "uvicorn", "policy": None},
    report.MISSING: {"server": "uvicorn", "policy": "missing"},
    report.GRANIAN: {"server": "granian", "policy": None},
}
# what the bench's own servers run on (they are started that way; the gateway's /health says its own)
OWN_STACK = {report.DIRECT: ("uvicorn", "uvloop"), report.MINIMAL: ("uvicorn", "uvloop"),
             report.RELAY: ("relay", "uvloop")}


class Bench:
    def __init__(self, settings: Settings, generator: str, pin: bool) -> None:
        self.settings = settings
        self.generator = generator
        self.pin = pin
        self.rows: list[dict[str, Any]] = []
        self.extras: dict[str, Any] = {}
        self.targets: dict[str, dict[str, Any]] = {}  # per target: stack, CPU per request, availability
        self.notes: list[str] = []

    def cpu(self, which: int) -> int | None:
        return which if self.pin else None

    # -- one load run, in its own pinned process, sampling the server's memory ------------

    def load(self, spec: dict[str, Any], watch: Server | None = None,
             every: tuple[float, Any] | None = None) -> tuple[dict[str, Any], int]:
        """Run one load process; `watch`: sample that server's RSS meanwhile (the peak is returned);
        `every` = (seconds, callback): call it that often while the load runs."""
        # the spec (with its token) goes through stdin, never onto a command line others can list
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen([sys.executable, "-m", "bench.load"], stdin=subprocess.PIPE, stdout=stdout,
                                       stderr=stderr, cwd=ROOT, preexec_fn=pinning(self.cpu(BACK_CPU)))
            assert process.stdin is not None
            process.stdin.write(orjson.dumps(spec))
            process.stdin.close()
            peak, next_call = 0, time.monotonic() + (every[0] if every else 0)
            while process.poll() is None:
                if watch is not None:
                    peak = max(peak, watch.rss_kb())
                if every is not None and time.monotonic() >= next_call:
                    next_call += every[0]
                    every[1]()
                time.sleep(0.02)
            stdout.seek(0)
            stderr.seek(0)
            out, err = stdout.read(), stderr.read()
        if process.returncode != 0:
            raise RuntimeError(f"load generator failed ({spec['kind']}): {err.decode(errors='replace')[-2000:]}")
        return orjson.loads(out.splitlines()[-1]), peak

    def row(self, target: str, url: str, token: str, *, stream: bool, concurrency: int,
            server: Server | None = None, deferred: bool = False) -> dict[str, Any]:
        s = self.settings
        if stream:
            spec = {"kind": "streams", "url": url, "token": token, "concurrency": concurrency, "chunks": s.chunks,
                    "seed": f"{target}-c{concurrency}", "duration": s.duration, "warmup": s.warmup}
        else:
            spec = {"kind": self.generator, "url": url, "token": token, "concurrency": concurrency,
                    "body": load.request_body(stream=False).decode(), "duration": s.duration, "warmup": s.warmup}
            if server is not None:
                spec["cpu_pids"] = server.pids()
                if deferred:  # the warm-up's backlog is settled before the measured run begins
                    spec["metrics_url"] = server.url + "/metrics"
        result, _ = self.load(spec)
        row = {"target": target, "mode": "stream" if stream else "json", "concurrency": concurrency, **result}
        if not stream and server is not None:
            row["cpu_us_per_request"] = _per_request(result["server_cpu_s"], result["requests"])
            if deferred:
                row.update(self.settled_cpu(server, spec["cpu_pids"], result))
            else:
                row["cpu_us_settled"], row["settle_s"] = row["cpu_us_per_request"], 0.0
        self.rows.append(row)
        print(report.row_line(row), flush=True)
        return row

    def settled_cpu(self, server: Server, pids: list[int], result: dict[str, Any],
                    workers: int = 1) -> dict[str, Any]:
        """CPU from the measured run's start until the deferred work is back to zero, per request.

        With several workers a scrape reaches one of them (and the kernel may favour one): zero must
        then be seen more often in a row, and the process tree be idle (< 5% of a core) for a second."""
        began = time.monotonic()
        settle_s = None
        while time.monotonic() - began < self.settings.settle_timeout_s:
            settle_s = backlog.wait_until_settled(lambda: deferred_work(server), self.settings.settle_timeout_s,
                                                  consecutive=backlog.CONSECUTIVE_ZERO * workers)
            if settle_s is None or workers == 1:
                break
            cpu = tree_cpu_s(pids)
            time.sleep(1.0)
            if tree_cpu_s(pids) - cpu < 0.05:
                settle_s = round(time.monotonic() - began - 1.0, 2)
                break
            settle_s = None
        if settle_s is None:
            return {"cpu_us_settled": None, "settle_s": None}
        cpu = tree_cpu_s(pids) - result["server_cpu_start_s"]
        return {"cpu_us_settled": _per_request(cpu, result["requests"]), "settle_s": settle_s}

    def rows_for(self, target: str, url: str, token: str, server: Server | None = None,
                 deferred: bool = False) -> None:
        for stream in (False, True):
            for concurrency in self.settings.concurrencies:
                self.row(target, url, token, stream=stream, concurrency=concurrency, server=server,
                         deferred=deferred)

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

    def describe(self, target: str, server: Server, *, available: bool = True, note: str = "") -> None:
        """Which server and loop the target ran on: the gateway's /health says; the bench's own know."""
        if target in OWN_STACK:
            stack, loop = OWN_STACK[target]
        else:
            health = server.health()
            stack, loop = str(health.get("server", "?")), str(health.get("loop", "?"))
        started = GATEWAYS.get(target, {}).get("server", stack)  # what the bench started it with
        self.targets[target] = {"server": stack, "loop": loop, "started_on": started, "available": available,
                                "note": note}
        print(f"{target}: server {stack}, loop {loop}", flush=True)

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
            self.describe(report.DIRECT, upstream)
            self.rows_for(report.DIRECT, url, BENCH_KEY, server=upstream)
        finally:
            upstream.stop()

        upstream = start_upstream(self.cpu(BACK_CPU))
        try:
            for target, start in ((report.MINIMAL, start_minimal), (report.RELAY, start_relay)):
                proxy = start(upstream, self.cpu(FRONT_CPU))
                try:
                    url = proxy.url + "/v1" + load.CHAT_PATH
                    self.warm(url, BENCH_KEY)
                    self.describe(target, proxy)
                    self.extras[f"{target}_idle_rss_kb"] = proxy.rss_kb()
                    self.concurrent_streams(target, proxy, upstream, url, BENCH_KEY)
                    self.rows_for(target, url, BENCH_KEY, server=proxy)
                finally:
                    proxy.stop()
            for target, how in GATEWAYS.items():
                self.gateway_target(target, upstream, **how)
            for target in (report.GATEWAY, report.MISSING):
                if self.targets.get(target, {}).get("available"):
                    self.sustained(target, upstream)
            self.workers(upstream)
            for service in PRICED:
                self.price(service, upstream)
        finally:
            upstream.stop()

    def start(self, target: str, upstream: Server, tmp: Path, **how: Any) -> tuple[Server, str] | None:
        """The gateway for `target`; None (noted) when a variant cannot start: a build without
        `accounting.generation_lookup.policy` refuses the key at start-up, granian may be missing
        something. The product's default (`gateway serve`, policy all) must start."""
        try:
            return start_gateway(upstream, None, tmp, self.cpu(FRONT_CPU), name=target, **how)
        except RuntimeError as exc:
            if target == report.GATEWAY:
                raise
            shape = (f"accounting.generation_lookup.policy: {how['policy']}" if how.get("policy")
                     else f"server {how['server']}")
            note = (f"{target}: not available, the gateway did not start with {shape} "
                    f"({str(exc).strip().splitlines()[-1]})")
            self.targets.setdefault(target, {"server": "?", "loop": "?", "available": False, "note": note})
            if note not in self.notes:
                self.notes.append(note)
                print("bench: note: " + note, flush=True)
            return None

    def gateway_target(self, target: str, upstream: Server, **how: Any) -> None:
        if how["server"] == "granian" and importlib.util.find_spec("granian") is None:
            note = f"{target}: not available, granian is not installed (make bench installs the bench extra)"
            self.targets[target] = {"server": "granian", "loop": "?", "available": False, "note": note}
            self.notes.append(note)
            print("bench: note: " + note, flush=True)
            return
        with tempfile.TemporaryDirectory(prefix=f"bench-{target}-") as tmp:
            started = self.start(target, upstream, Path(tmp), **how)
            if started is None:
                return
            gateway, token = started
            try:
                url = gateway.url + "/v1" + load.CHAT_PATH
                self.warm(url, token)
                self.describe(target, gateway)
                self.extras[f"{target}_idle_rss_kb"] = gateway.rss_kb()
                if target == report.GATEWAY:
                    self.concurrent_streams(target, gateway, upstream, url, token)
                self.rows_for(target, url, token, server=gateway, deferred=True)
            finally:
                gateway.stop()

    def sustained(self, target: str, upstream: Server) -> None:
        """`sustained_s` at c=32 against a fresh gateway, its backlog sampled every second during the load
        and after it until it is back to zero; plus CPU per request with all of it settled."""
        s = self.settings
        with tempfile.TemporaryDirectory(prefix=f"bench-sustained-{target}-") as tmp:
            started = self.start(target, upstream, Path(tmp), **GATEWAYS[target])
            if started is None:
                return
            gateway, token = started
            try:
                url = gateway.url + "/v1" + load.CHAT_PATH
                self.warm(url, token)
                backlog.wait_until_settled(lambda: deferred_work(gateway), s.settle_timeout_s)
                during: list[float] = []

                def sample() -> None:
                    value = deferred_work(gateway)
                    if value is not None:
                        during.append(value)

                pids = gateway.pids()
                result, _ = self.load({"kind": self.generator, "url": url, "token": token, "concurrency": 32,
                                       "body": load.request_body(stream=False).decode(), "duration": s.sustained_s,
                                       "warmup": 0, "cpu_pids": pids}, every=(1.0, sample))
                after: list[float] = []

                def read() -> float | None:
                    value = deferred_work(gateway)
                    if value is not None:
                        after.append(value)
                    return value

                settled_s = backlog.wait_until_settled(read, s.settle_timeout_s, interval_s=1.0)
                summary = backlog.sustained_summary(during, after, 1.0, settled_s)
                summary.update({"target": target, "seconds": s.sustained_s, "concurrency": 32,
                                "rps": result["rps"], "requests": result["requests"], "errors": result["errors"],
                                "cpu_us_per_request": _per_request(result["server_cpu_s"], result["requests"])})
                if settled_s is not None:
                    summary["cpu_us_settled"] = _per_request(tree_cpu_s(pids) - result["server_cpu_start_s"],
                                                             result["requests"])
            finally:
                gateway.stop()
        self.extras[f"sustained:{target}"] = summary
        print(report.sustained_line(summary), flush=True)

    def workers(self, upstream: Server) -> None:
        """A paced client (a fixed offered rate, open loop) against `--workers 1` and `--workers 2`, both
        pinned the same way (to the server core; unpinned without pinning): CPU per request over the whole
        process tree (supervisor + workers), deferred settlement included."""
        s = self.settings
        result: dict[str, Any] = {"rate": s.paced_rate, "seconds": s.paced_s,
                                  "pinning": f"both on core {FRONT_CPU}" if self.pin else "neither pinned"}
        for workers in (1, 2):
            target = f"gateway-workers-{workers}"
            with tempfile.TemporaryDirectory(prefix=f"bench-{target}-") as tmp:
                gateway, token = start_gateway(upstream, None, Path(tmp), self.cpu(FRONT_CPU), workers=workers,
                                               name=target)
                try:
                    url = gateway.url + "/v1" + load.CHAT_PATH
                    self.warm(url, token)
                    pids = gateway.pids()
                    run, _ = self.load({"kind": "paced", "url": url, "token": token, "rate": s.paced_rate,
                                        "duration": s.paced_s, "warmup": s.paced_warmup_s,
                                        "body": load.request_body(stream=False).decode(), "cpu_pids": pids,
                                        "metrics_url": gateway.url + "/metrics",
                                        "settle_consecutive": backlog.CONSECUTIVE_ZERO * workers})
                    run.update(self.settled_cpu(gateway, pids, run, workers))
                    run["cpu_us_per_request"] = _per_request(run["server_cpu_s"], run["requests"])
                    run["processes"] = len(pids)
                finally:
                    gateway.stop()
            result[str(workers)] = run
            print(report.paced_line(workers, run), flush=True)
        one, two = result["1"].get("cpu_us_settled"), result["2"].get("cpu_us_settled")
        result["ratio"] = round(two / one, 3) if one and two else None
        self.extras["workers"] = result

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
                servers["with"] = start_gateway(upstream, None, Path(with_dir), self.cpu(FRONT_CPU))
                servers["without"] = start_gateway(upstream, None, Path(without_dir), self.cpu(FRONT_CPU),
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
                                                   "cpu_pids": server.pids()})
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


def _per_request(cpu_s: float, requests: int) -> float | None:
    return round(cpu_s / requests * 1e6, 1) if requests else None


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
    parser.add_argument("--strict", action="store_true", help="exit 1 if any goal fails")
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
    results = report.summarise(bench.rows, bench.extras, settings, bench.notes, bench.targets)
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
