"""A burst's settlement, measured: `python -m bench.settle` (`make soak` runs it; not `make test`).

One gateway in its default shape (one worker, SQLite, limits and accounting on) in front of the
emulator. `--requests` (default 16,000) chat completions as fast as `--concurrency` clients send them,
which leaves a backlog of pending cost look-ups (the pacer holds them back while traffic keeps the
process busy). Once the burst ends: how fast that backlog drains (look-ups/s, from the emulator's count
of `GET /generation` calls and the gateway's `gateway_settlements_pending`), then the gateway's CPU
share over an idle interval. Issue 14's targets: ≥ 500 look-ups/s, then < 5% of a core.

It reports; `--strict` makes a missed target exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from cryptography.fernet import Fernet

from bench.load import process_cpu_s
from bench.servers import BENCH_ADMIN_TOKEN, Server, free_port

CHAT = orjson.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello!"}]})
TARGET_RATE, TARGET_IDLE = 500.0, 0.05


def start_emulator() -> Server:
    port = free_port()
    return Server("settle-emulator", [sys.executable, "-m", "gateway", "emulator", "--port", str(port)],
                  port=port, health="/api/v1/models?limit=1", cpu=None)


def start_gateway(emulator: Server, tmp: Path) -> tuple[Server, str]:
    """The gateway and a user with an emulator key and no limit that could trigger; returns its token."""
    (tmp / "master.key").write_text(Fernet.generate_key().decode() + "\n")
    config = {
        "server": {"data_dir": str(tmp)},
        "database": {"url": f"sqlite:///{tmp}/gateway.db"},
        "security": {"master_key_file": str(tmp / "master.key"), "admin_token_file": str(tmp / "admin.sha256")},
        "upstream": {"base_url": emulator.url + "/api/v1"},
        "logging": {"access_log": False, "level": "warning"},
        "tiers": {"bench": {"markup_pct": "5"}},
        "default_tier": "bench",
    }
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    gateway = Server("settle-gateway", [sys.executable, "-m", "gateway", "--config", str(tmp / "gateway.yaml"),
                                        "serve", "--port", str(port)],
                     port=port, health="/health", cpu=None, cwd=tmp,
                     env={**os.environ, "GATEWAY_ADMIN_TOKEN": BENCH_ADMIN_TOKEN})
    key = httpx.post(emulator.url + "/_emulator/keys", json={}, timeout=5).json()["key"]
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {BENCH_ADMIN_TOKEN}"},
                      timeout=30) as admin:
        user = admin.post("/admin/v1/users", json={"tier": "bench"})
        user.raise_for_status()
        user_id = user.json()["id"]
        admin.put(f"/admin/v1/users/{user_id}/openrouter-key", json={"api_key": key}).raise_for_status()
        token = admin.post(f"/admin/v1/users/{user_id}/tokens", json={"name": "settle"})
        token.raise_for_status()
    return gateway, token.json()["token"]


async def burst(url: str, token: str, total: int, concurrency: int) -> tuple[int, int]:
    """`total` requests from `concurrency` clients back to back; (answered 200, other outcomes)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    left, ok, failed = total, 0, 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client() -> None:
            nonlocal left, ok, failed
            while left > 0:
                left -= 1
                try:
                    async with session.post(url, data=CHAT, headers=headers) as response:
                        await response.read()
                        ok, failed = (ok + 1, failed) if response.status == 200 else (ok, failed + 1)
                except (TimeoutError, aiohttp.ClientError, OSError):
                    failed += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return ok, failed


def gauge(gateway: Server, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", httpx.get(gateway.url + "/metrics", timeout=10).text, re.M)
    if found is None:
        raise RuntimeError(f"/metrics has no {name}")
    return float(found.group(1))


def lookups(emulator: Server) -> int:
    return int(httpx.get(emulator.url + "/_emulator/stats", timeout=10).json()["generation_lookups"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--idle-s", type=float, default=5.0, help="the idle interval whose CPU is measured")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="give up on the drain after this")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    emulator = start_emulator()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            gateway, token = start_gateway(emulator, Path(tmp))
            try:
                return measure(args, emulator, gateway, token)
            finally:
                gateway.stop()
    finally:
        emulator.stop()


def measure(args: Any, emulator: Server, gateway: Server, token: str) -> int:
    pid = gateway.process.pid
    began, cpu_began = time.monotonic(), process_cpu_s(pid)
    ok, failed = asyncio.run(burst(gateway.url + "/v1/chat/completions", token, args.requests, args.concurrency))
    ended, cpu_ended = time.monotonic(), process_cpu_s(pid)
    print(f"burst: {ok} answered 200, {failed} not, in {ended - began:.1f} s ({ok / (ended - began):.0f} req/s,"
          f" gateway CPU {(cpu_ended - cpu_began) / (ended - began):.0%} of a core)")
    looked_at_end, pending_at_end = lookups(emulator), gauge(gateway, "gateway_settlements_pending")
    print(f"at the burst's end: {pending_at_end:.0f} look-ups pending, {looked_at_end} made during the burst")
    # drained: nothing pending and every record written (polled every 0.1 s; the figure is the poll's time)
    deadline = ended + args.timeout_s
    samples: list[tuple[float, int]] = [(ended, looked_at_end)]
    while (gauge(gateway, "gateway_settlements_pending") > 0 or gauge(gateway, "gateway_usage_queue_depth") > 0):
        if time.monotonic() > deadline:
            print(f"not drained within {args.timeout_s:.0f} s")
            return 1
        time.sleep(0.1)
        samples.append((time.monotonic(), lookups(emulator)))
    drained, looked = time.monotonic(), lookups(emulator)
    drain_s = drained - ended
    rate = (looked - looked_at_end) / drain_s if drain_s > 0 else float("inf")
    peak = max(((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(samples, samples[10:])), default=rate)  # over ~1 s
    print(f"drain: {looked - looked_at_end} look-ups in {drain_s:.1f} s after the burst: {rate:.0f} look-ups/s"
          f" (peak {peak:.0f}/s over ~1 s); {looked} in all for {ok} generations")
    time.sleep(1.0)  # the last flush and the meter's sample settle first; then the idle interval itself
    cpu, wall = process_cpu_s(pid), time.monotonic()
    time.sleep(args.idle_s)
    idle = (process_cpu_s(pid) - cpu) / (time.monotonic() - wall)
    print(f"idle after: {idle:.1%} of a core over {args.idle_s:.0f} s")
    verdict = rate >= TARGET_RATE and idle < TARGET_IDLE and failed == 0
    print(f"targets (≥ {TARGET_RATE:.0f} look-ups/s, idle < {TARGET_IDLE:.0%}, every request answered): "
          + ("PASS" if verdict else "FAIL"))
    return 1 if args.strict and not verdict else 0


if __name__ == "__main__":
    raise SystemExit(main())
