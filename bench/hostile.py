"""Hostile clients against a running gateway, measured: `python -m bench.hostile` (default config).

- 300 MiB chunked to each JSON route and to the proxy: the status and the gateway's RSS growth (peak);
- 200 MiB of header bytes: how much was taken before the refusal, and the RSS growth;
- 1,000 slow-loris connections (a header line every second, never finished): when the last was
  closed, against `server.header_timeout_s`, and how another client was served meanwhile;
- 20,000 unknown paths: the size of `/metrics` before and after;
- the bad budget values of issue 15: each answer, and whether anything was stored.
"""

from __future__ import annotations

import argparse
import select
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.servers import BENCH_ADMIN_TOKEN, Server, start_gateway, start_upstream

MIB = 1 << 20
BAD_BUDGETS = ["1e999999999", "1e-999999999", "1e-99999999", "1_000", "\u0663", " 5 "]


class PeakRss:
    """The server's peak RSS while a block runs, sampled every 10 ms."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak, self._stop = server, 0, threading.Event()

    def __enter__(self) -> "PeakRss":
        self.before = self.server.rss_kb()
        self.peak = self.before
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.server.rss_kb())

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.rss_kb())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 1024


def stream_at(port: int, head: bytes, piece: bytes, total: int) -> tuple[bytes, int]:
    """Send `head` then `piece` until `total` bytes or the server stops us; returns (its answer, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    answer = b""
    sent = 0
    try:
        sock.sendall(head)
        sock.setblocking(False)
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            if writable:
                sent += sock.send(piece)
        sock.setblocking(True)
        sock.settimeout(5)
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    finally:
        sock.close()
    return answer, sent


def status_of(answer: bytes) -> str:
    return answer[9:12].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"


def big_bodies(gateway: Server, token: str, total: int) -> None:
    routes = [("PUT", "/v1/settings", token), ("PUT", "/v1/account/openrouter-key", token),
              ("POST", "/admin/v1/users", BENCH_ADMIN_TOKEN), ("PATCH", "/admin/v1/users/nobody", BENCH_ADMIN_TOKEN),
              ("PUT", "/admin/v1/emergency-stop", BENCH_ADMIN_TOKEN),
              ("POST", "/v1/chat/completions", token), ("POST", "/v1/embeddings", token)]
    piece = b"%x\r\n" % 65536 + b"[" * 65536 + b"\r\n"
    for method, path, bearer in routes:
        head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        started = time.monotonic()
        with PeakRss(gateway) as rss:
            answer, sent = stream_at(gateway.port, head, piece, total)
        print(f"  {total // MIB} MiB chunked {method} {path}: {status_of(answer)} after {sent / MIB:.1f} MiB "
              f"accepted by the socket, {time.monotonic() - started:.1f} s, RSS +{rss.growth_mb:.1f} MB (peak)")


def big_headers(gateway: Server, total: int) -> None:
    with PeakRss(gateway) as rss:
        answer, sent = stream_at(gateway.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ", b"a" * 65536, total)
    print(f"  {total // MIB} MiB of one header: {status_of(answer)} after {sent / MIB:.2f} MiB sent, "
          f"RSS +{rss.growth_mb:.1f} MB (peak)")
    many = b"".join(b"X-%d: v\r\n" % i for i in range(100_000))
    with PeakRss(gateway) as rss:
        answer, sent = stream_at(gateway.port, b"GET /health HTTP/1.1\r\n", many, total)
    print(f"  {total // MIB} MiB of header lines: {status_of(answer)} after {sent / MIB:.2f} MiB sent, "
          f"RSS +{rss.growth_mb:.1f} MB (peak)")


def slow_loris(gateway: Server, count: int, header_timeout_s: float) -> None:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        sock.setblocking(False)
        sockets.append(sock)
    opened = time.monotonic()
    closed_at: dict[int, float] = {}
    served, latencies, failures = 0, [], 0
    next_line = opened + 1
    next_probe = opened
    with httpx.Client(base_url=gateway.url, timeout=5) as other:
        while len(closed_at) < count and time.monotonic() - opened < header_timeout_s + 10:
            now = time.monotonic()
            if now >= next_probe:  # another client, served meanwhile
                started = time.monotonic()
                try:
                    ok = other.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                served += ok
                failures += not ok
                latencies.append(time.monotonic() - started)
                next_probe = now + 0.1
            open_ones = [s for s in sockets if s.fileno() not in closed_at]
            readable, _, _ = select.select(open_ones, [], [], 0.05)
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data or b"408" in data[:12]:
                    closed_at[sock.fileno()] = time.monotonic() - opened
            if time.monotonic() >= next_line:  # the loris keeps the header going, one line a second
                for sock in open_ones:
                    try:
                        sock.send(b"X-Loris: 1\r\n")
                    except OSError:
                        closed_at.setdefault(sock.fileno(), time.monotonic() - opened)
                next_line += 1
    for sock in sockets:
        sock.close()
    last = max(closed_at.values()) if closed_at else float("nan")
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan")
    print(f"  {count} slow-loris connections: {len(closed_at)} closed, the last {last:.2f} s after opening "
          f"(header_timeout_s = {header_timeout_s:g}); meanwhile another client: {served} served, "
          f"{failures} failed, p99 {p99:.1f} ms")


def metrics_flood(gateway: Server, count: int) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        client.get("/nothing-here")
        client.get("/metrics")
        before = client.get("/metrics").text
        for i in range(count):
            client.get(f"/x{i}/{i * 7919}")
        after = client.get("/metrics").text
    print(f"  {count} unknown paths: /metrics {len(before)} bytes, {before.count(chr(10))} lines before; "
          f"{len(after)} bytes, {after.count(chr(10))} lines after")


def bad_budgets(gateway: Server) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10, headers={"Authorization": f"Bearer {BENCH_ADMIN_TOKEN}"}) as a:
        user = a.post("/admin/v1/users", json={}).json()["id"]
        for value in BAD_BUDGETS:
            answer = a.patch(f"/admin/v1/users/{user}", json={"limits": {"monthly_budget_usd": value}})
            stored = a.get(f"/admin/v1/users/{user}").json()["limits"]
            print(f"  monthly_budget_usd {value!r}: {answer.status_code} "
                  f"({answer.json()['error']['message'][:90]}…); stored limits {stored}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--body-mib", type=int, default=300)
    parser.add_argument("--header-mib", type=int, default=200)
    parser.add_argument("--loris", type=int, default=1000)
    parser.add_argument("--paths", type=int, default=20_000)
    args = parser.parse_args()
    upstream = start_upstream(None)
    with tempfile.TemporaryDirectory() as tmp:
        gateway, token = start_gateway(upstream, None, Path(tmp), None)
        try:
            print(f"gateway pid {gateway.process.pid}, idle RSS {gateway.rss_kb() / 1024:.1f} MB")
            big_bodies(gateway, token, args.body_mib * MIB)
            big_headers(gateway, args.header_mib * MIB)
            slow_loris(gateway, args.loris, header_timeout_s=10)
            metrics_flood(gateway, args.paths)
            bad_budgets(gateway)
            print(f"gateway still serving: {httpx.get(gateway.url + '/health', timeout=5).status_code}")
        finally:
            gateway.stop()
            upstream.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
