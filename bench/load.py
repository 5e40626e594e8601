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


def _cpu_now(pid: int | None) -> float:
    return process_cpu_s(pid) if pid is not None else 0.0


async def python_throughput(url: str, token: str, body: bytes, concurrency: int, duration: float,
                            warmup: float, cpu_pid: int | None = None) -> dict[str, Any]:
    """Closed loop: `concurrency` clients send back to back; only requests ending in the window count.

    With `cpu_pid`, also the CPU that process used in the window (`server_cpu_s`)."""
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
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    ok = False
                    await asyncio.sleep(0.01)
                if window["recording"]:
                    if ok:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1

        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        window["recording"] = True
        began, cpu_began = time.perf_counter(), _cpu_now(cpu_pid)
        await asyncio.sleep(duration)
        window["recording"] = False
        elapsed, cpu = time.perf_counter() - began, _cpu_now(cpu_pid) - cpu_began
        window["stop"] = True
        await asyncio.gather(*tasks, return_exceptions=True)
    latencies.sort()
    return {"generator": "python", "requests": len(latencies), "errors": errors, "seconds": round(elapsed, 3),
            "rps": round(len(latencies) / elapsed, 1), "p50_ms": _ms(percentile(latencies, 50)),
            "p99_ms": _ms(percentile(latencies, 99)), "server_cpu_s": cpu}


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
                   warmup: float, cpu_pid: int | None = None) -> dict[str, Any]:
    """One wrk thread (the servers need the cores more); a separate warm-up run is discarded.

    With `cpu_pid`, also the CPU that process used during the measured run (`server_cpu_s`)."""
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
        cpu_began = _cpu_now(cpu_pid)
        result = run(duration)
        cpu = _cpu_now(cpu_pid) - cpu_began
    finally:
        os.unlink(script.name)
    seconds = result["duration_us"] / 1e6
    ok = result["requests"] - result["errors"]
    return {"generator": "wrk", "requests": ok, "errors": result["errors"], "seconds": round(seconds, 3),
            "rps": round(ok / seconds, 1), "p50_ms": result["p50_us"] / 1000, "p99_ms": result["p99_us"] / 1000,
            "server_cpu_s": cpu}


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
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
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
                              spec["duration"], spec["warmup"], spec.get("cpu_pid"))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if kind == "python":
        return asyncio.run(python_throughput(spec["url"], spec["token"], spec["body"].encode(),
                                             spec["concurrency"], spec["duration"], spec["warmup"],
                                             spec.get("cpu_pid")))
    if kind == "streams":
        return asyncio.run(python_streams(
            spec["url"], spec["token"], concurrency=spec["concurrency"], chunks=spec["chunks"], seed=spec["seed"],
            count=spec.get("count"), duration=spec.get("duration"), warmup=spec.get("warmup", 0)))
    raise SystemExit(f"unknown load kind {kind!r}")


if __name__ == "__main__":
    print(orjson.dumps(run(orjson.loads(sys.stdin.buffer.read()))).decode(), flush=True)
