"""Load generators: wrk for throughput when present, a Python aiohttp client otherwise and for streams.

The box has two cores shared by client and servers, so the client must be cheap: wrk (C)
drives the non-streaming runs. Streams need what wrk cannot do: compare every received
byte with what the upstream sent (`bench.upstream.expected_stream`) and time the first
body byte, so they use aiohttp on uvloop.

Each run is its own process (`python -m bench.load` < JSON spec, one JSON line out) so
the orchestrator can pin it to a core and keep sampling the server's memory meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import orjson

from bench.upstream import MODEL, expected_stream

CHAT_PATH = "/chat/completions"


def request_body(*, stream: bool, chunks: int = 5, seed: str | None = None, model: str = MODEL) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Say hello to the bench."}]}
    if stream:
        body["stream"] = True
        body["max_tokens"] = chunks
    if seed is not None:
        body["user"] = seed
    return orjson.dumps(body)


def percentile(sorted_values: list[float], pct: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


# ---------------------------------------------------------------- Python throughput


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_now(pids: list[int] | None) -> float:
    """CPU seconds of the server's processes (its whole tree, listed by the orchestrator)."""
    total = 0.0
    for pid in pids or ():
        try:
            total += process_cpu_s(pid)
        except OSError:  # a worker that exited meanwhile
            pass
    return total


def settle_first(metrics_url: str | None, timeout_s: float = 120, consecutive: int = 3) -> None:
    """Before a measured run: wait until the server's deferred work (from the warm-up) is done, so the
    run's CPU counts its own requests' settlement and no one else's."""
    if not metrics_url:
        return
    import urllib.request

    from bench.backlog import deferred_from, wait_until_settled

    def read() -> float | None:
        try:
            with urllib.request.urlopen(metrics_url, timeout=10) as response:
                return deferred_from(response.read().decode())
        except OSError:
            return None

    wait_until_settled(read, timeout_s, consecutive=consecutive)


async def python_throughput(url: str, token: str, body: bytes, concurrency: int, duration: float,
                            warmup: float, cpu_pids: list[int] | None = None) -> dict[str, Any]:
    """Closed loop: `concurrency` clients send back to back; only requests ending in the window count.

    With `cpu_pids`, also the CPU those processes used in the window (`server_cpu_s`)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    window = {"recording": False, "stop": False}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client() -> None:
            nonlocal errors
            while not window["stop"]:
                started = time.perf_counter()
                status = await _post(session, url, body, headers)
                ok = status == 200
                if not status:  # the connection failed: a moment before the next try
                    await asyncio.sleep(0.01)
                if window["recording"]:
                    if ok:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1

        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        window["recording"] = True
        began, cpu_began = time.perf_counter(), _cpu_now(cpu_pids)
        await asyncio.sleep(duration)
        window["recording"] = False
        elapsed, cpu = time.perf_counter() - began, _cpu_now(cpu_pids) - cpu_began
        window["stop"] = True
        await asyncio.gather(*tasks, return_exceptions=True)
    latencies.sort()
    return {"generator": "python", "requests": len(latencies), "errors": errors, "seconds": round(elapsed, 3),
            "rps": round(len(latencies) / elapsed, 1), "p50_ms": _ms(percentile(latencies, 50)),
            "p99_ms": _ms(percentile(latencies, 99)), "server_cpu_s": cpu, "server_cpu_start_s": cpu_began}


async def _post(session: Any, url: str, body: bytes, headers: dict[str, str]) -> int:
    """One POST read to its end: its status, 0 when the connection failed."""
    import aiohttp

    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            return response.status
    except (TimeoutError, aiohttp.ClientError, OSError):
        return 0


# ---------------------------------------------------------------- paced (open loop)


def schedule(rate: float, duration: float) -> list[float]:
    """When each request is due, in seconds from the start: a fixed rate, whatever the answers do."""
    return [i / rate for i in range(max(0, round(rate * duration)))]


async def paced(url: str, token: str, body: bytes, rate: float, duration: float, warmup: float,
                cpu_pids: list[int] | None = None, metrics_url: str | None = None,
                max_in_flight: int = 1024, settle_consecutive: int = 3) -> dict[str, Any]:
    """Open loop at a fixed offered rate (what wrk2 does): a request is sent when it is due, not when the
    previous one has come back, and its latency runs from when it was due, so a server that falls behind
    shows it in the latency instead of slowing the client down. More than `max_in_flight` outstanding:
    the request is counted as dropped (the server could not keep up with the rate)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    counts = {"errors": 0, "dropped": 0, "late": 0}
    in_flight: set[asyncio.Task[None]] = set()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(due: float, record: bool) -> None:
            ok = await _post(session, url, body, headers) == 200
            if record:
                if ok:
                    latencies.append(time.perf_counter() - due)
                else:
                    counts["errors"] += 1

        async def run(seconds: float, record: bool) -> float:
            start = time.perf_counter() + 0.01
            for offset in schedule(rate, seconds):
                due = start + offset
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif record and wait < -0.005:
                    counts["late"] += 1  # the client itself fell behind its schedule by > 5 ms
                if len(in_flight) >= max_in_flight:
                    counts["dropped"] += record
                    continue
                task = asyncio.create_task(one(due, record))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.gather(*in_flight)
            return start

        if warmup > 0:
            await run(warmup, record=False)
            await asyncio.to_thread(settle_first, metrics_url, 120, settle_consecutive)
            await asyncio.sleep(1.0)  # with several workers, a scrape may miss the one still busy
        cpu_began = _cpu_now(cpu_pids)
        start = await run(duration, record=True)
        elapsed, cpu = time.perf_counter() - start, _cpu_now(cpu_pids) - cpu_began
    latencies.sort()
    return {"generator": "paced", "offered_rps": rate, "requests": len(latencies), **counts,
            "seconds": round(elapsed, 3), "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(percentile(latencies, 99)),
            "server_cpu_s": cpu, "server_cpu_start_s": cpu_began}


# ---------------------------------------------------------------- wrk


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\\"requests\\":%%d,\\"duration_us\\":%%d,\\"errors\\":%%d,\\"p50_us\\":%%d,\\"p99_us\\":%%d}\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50.0), latency:percentile(99.0)))
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_throughput(url: str, token: str, body: bytes, concurrency: int, duration: float,
                   warmup: float, cpu_pids: list[int] | None = None, metrics_url: str | None = None) -> dict[str, Any]:
    """One wrk thread (the servers need the cores more); a separate warm-up run is discarded.

    With `cpu_pids`, also the CPU those processes used during the measured run (`server_cpu_s`);
    with `metrics_url`, the warm-up's deferred work is waited for before the measured run."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % {"body": body.decode(), "token": token})
    try:
        def run(seconds: float) -> dict[str, Any]:
            command = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
                       "-s", script.name, url]
            out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
            match = re.search(r"^BENCHJSON (\{.*\})$", out.stdout, re.M)
            if match is None:
                raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stderr.strip()[:300]}")
            return orjson.loads(match.group(1))

        if warmup > 0:
            run(warmup)
            settle_first(metrics_url)
        cpu_began = _cpu_now(cpu_pids)
        result = run(duration)
        cpu = _cpu_now(cpu_pids) - cpu_began
    finally:
        os.unlink(script.name)
    seconds = result["duration_us"] / 1e6
    ok = result["requests"] - result["errors"]
    return {"generator": "wrk", "requests": ok, "errors": result["errors"], "seconds": round(seconds, 3),
            "rps": round(ok / seconds, 1), "p50_ms": result["p50_us"] / 1000, "p99_ms": result["p99_us"] / 1000,
            "server_cpu_s": cpu, "server_cpu_start_s": cpu_began}


# ---------------------------------------------------------------- streams


async def python_streams(url: str, token: str, *, concurrency: int, chunks: int, seed: str,
                         count: int | None = None, duration: float | None = None,
                         warmup: float = 0) -> dict[str, Any]:
    """Streams that each must arrive byte for byte as the upstream sent them.

    With `count`, exactly that many streams are opened by `concurrency` clients (1,000 at
    once for the memory test); with `duration`, clients loop and streams ending in the
    window count. TTFB is request sent → first body byte received.
    """
    import aiohttp

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    durations: list[float] = []
    ttfbs: list[float] = []
    failures: list[str] = []
    state = {"recording": duration is None, "stop": False, "open": 0, "peak_open": 0, "left": count}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        async def one(stream_seed: str) -> None:
            expected = b"".join(expected_stream(stream_seed, chunks))
            body = request_body(stream=True, chunks=chunks, seed=stream_seed)
            started = time.perf_counter()
            state["open"] += 1
            state["peak_open"] = max(state["peak_open"], state["open"])
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    first = await response.content.readany()
                    first_at = time.perf_counter()
                    parts = [first]
                    async for part in response.content.iter_any():
                        parts.append(part)
                    status = response.status
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                if state["recording"]:
                    failures.append(f"{stream_seed}: {type(exc).__name__}")
                await asyncio.sleep(0.01)
                return
            finally:
                state["open"] -= 1
            ended = time.perf_counter()
            if not state["recording"]:
                return
            received = b"".join(parts)
            if status != 200 or received != expected:
                failures.append(_describe_mismatch(stream_seed, status, received, expected))
                return
            durations.append(ended - started)
            ttfbs.append(first_at - started)

        async def client(worker: int) -> None:
            n = 0
            while not state["stop"]:
                if state["left"] is not None:
                    if state["left"] <= 0:
                        return
                    state["left"] -= 1
                await one(f"{seed}-{worker}-{n}")
                n += 1

        tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
        began = time.perf_counter()
        if duration is not None:
            await asyncio.sleep(warmup)
            state["recording"] = True
            began = time.perf_counter()
            await asyncio.sleep(duration)
            state["recording"] = False
            state["stop"] = True
        await asyncio.gather(*tasks)
        elapsed = (time.perf_counter() - began) if duration is None else duration
    durations.sort()
    ttfbs.sort()
    return {"generator": "python", "requests": len(durations), "errors": len(failures),
            "byte_exact": len(durations), "failures": failures[:5], "seconds": round(elapsed, 3),
            "rps": round(len(durations) / elapsed, 1), "p50_ms": _ms(percentile(durations, 50)),
            "p99_ms": _ms(percentile(durations, 99)), "ttfb_p50_ms": _ms(percentile(ttfbs, 50)),
            "ttfb_p99_ms": _ms(percentile(ttfbs, 99)), "peak_open": state["peak_open"], "chunks": chunks}


def _describe_mismatch(seed: str, status: int, received: bytes, expected: bytes) -> str:
    if status != 200:
        return f"{seed}: HTTP {status}: {received[:200]!r}"
    at = next((i for i, (a, b) in enumerate(zip(received, expected)) if a != b), min(len(received), len(expected)))
    return (f"{seed}: {len(received)} bytes received, {len(expected)} expected, first difference at byte {at}: "
            f"{received[at:at + 60]!r} vs {expected[at:at + 60]!r}")


# ---------------------------------------------------------------- entry point


def run(spec: dict[str, Any]) -> dict[str, Any]:
    kind = spec["kind"]
    if kind == "wrk":
        return wrk_throughput(spec["url"], spec["token"], spec["body"].encode(), spec["concurrency"],
                              spec["duration"], spec["warmup"], spec.get("cpu_pids"), spec.get("metrics_url"))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if kind == "python":
        return asyncio.run(python_throughput(spec["url"], spec["token"], spec["body"].encode(),
                                             spec["concurrency"], spec["duration"], spec["warmup"],
                                             spec.get("cpu_pids")))
    if kind == "paced":
        return asyncio.run(paced(spec["url"], spec["token"], spec["body"].encode(), spec["rate"], spec["duration"],
                                 spec["warmup"], spec.get("cpu_pids"), spec.get("metrics_url"),
                                 settle_consecutive=spec.get("settle_consecutive", 3)))
    if kind == "streams":
        return asyncio.run(python_streams(
            spec["url"], spec["token"], concurrency=spec["concurrency"], chunks=spec["chunks"], seed=spec["seed"],
            count=spec.get("count"), duration=spec.get("duration"), warmup=spec.get("warmup", 0)))
    raise SystemExit(f"unknown load kind {kind!r}")


if __name__ == "__main__":
    print(orjson.dumps(run(orjson.loads(sys.stdin.buffer.read()))).decode(), flush=True)
