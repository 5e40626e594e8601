"""Every connection a client opens is bounded, against a real `gateway serve` over raw sockets.

Header bytes and lines (431), the header and body timeouts (408, closed), the connection cap
(503, closed, served again once connections free up), bodies bounded while read on every
route, chunked included (413, the gateway's memory flat), and the keep-alive idle timeout.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import orjson
import pytest

from tests.conftest import (
    ADMIN_TOKEN,
    Emulator,
    GatewayProcess,
    free_port,
    start_gateway,
    stop_process,
    wait_http,
    write_config,
)

TIMEOUTS = {"header_timeout_s": 1, "body_timeout_s": 1, "keep_alive_timeout_s": 1, "max_connections": 60,
            "max_header_bytes": 8192, "max_headers": 30, "max_body_bytes": 1 << 20}


@pytest.fixture(scope="module")
def gw(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = start_gateway(tmp_path_factory.mktemp("connections"), emulator, {"server": TIMEOUTS})
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def user(gw: GatewayProcess, emulator: Emulator) -> dict[str, Any]:
    return gw.create_user(tier="starter", key=emulator.new_key())


def connect(gw: GatewayProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    return sock


def read_all(sock: socket.socket, deadline_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (fails past the deadline)."""
    sock.settimeout(deadline_s)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw[9:12])


def error_message(raw: bytes) -> str:
    return orjson.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["message"]


def rss_kb(gw: GatewayProcess) -> int:
    for line in Path(f"/proc/{gw.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def still_serves(gw: GatewayProcess) -> None:
    assert httpx.get(f"{gw.url}/health", timeout=5).status_code == 200


def test_a_header_block_over_the_limit_is_431_and_closed(gw: GatewayProcess) -> None:
    sock = connect(gw)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    raw = read_all(sock)
    assert status_of(raw) == 431 and "server.max_header_bytes" in error_message(raw)
    still_serves(gw)


def test_an_endless_header_is_refused_before_it_is_buffered(gw: GatewayProcess) -> None:
    sock = connect(gw)
    sock.sendall(b"GET /health HTTP/1.1\r\nX-Big: ")
    sent = 0
    with pytest.raises(OSError):  # closed under us (431 written, then reset) long before 64 MiB are sent
        while sent < 64 << 20:
            sock.sendall(b"a" * 65536)
            sent += 65536
    assert sent < 8 << 20
    still_serves(gw)


def test_a_long_url_counts_as_header_bytes(gw: GatewayProcess) -> None:
    sock = connect(gw)
    sock.sendall(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(read_all(sock)) == 431


def test_too_many_header_lines_is_431(gw: GatewayProcess) -> None:
    sock = connect(gw)
    sock.sendall(b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(40)) + b"\r\n")
    raw = read_all(sock)
    assert status_of(raw) == 431 and "server.max_headers" in error_message(raw)


def test_headers_within_the_limits_are_served(gw: GatewayProcess) -> None:
    headers = {f"X-{i}": "v" * 100 for i in range(20)}
    assert httpx.get(f"{gw.url}/health", headers=headers, timeout=5).status_code == 200


def test_a_slow_header_block_is_cut_at_the_header_timeout(gw: GatewayProcess) -> None:
    sock = connect(gw)
    started = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
    raw = read_all(sock)
    assert status_of(raw) == 408 and "server.header_timeout_s" in error_message(raw)
    assert 0.9 < time.monotonic() - started < 2.5


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(gw: GatewayProcess) -> None:
    sock = connect(gw)
    started = time.monotonic()
    assert read_all(sock) == b""
    assert 0.9 < time.monotonic() - started < 2.5


def test_a_trickling_header_is_cut_even_though_bytes_keep_coming(gw: GatewayProcess) -> None:
    sock = connect(gw)
    started = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\n")
    with pytest.raises(OSError):
        for _ in range(40):
            sock.sendall(b"X-A: b\r\n")
            time.sleep(0.1)  # the trickle itself, not a wait for a condition
    assert time.monotonic() - started < 2.5


def test_a_stalled_body_is_408(gw: GatewayProcess, user: dict[str, Any]) -> None:
    sock = connect(gw)
    started = time.monotonic()
    sock.sendall(b"PUT /v1/settings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + user["token"].encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"tempera")
    raw = read_all(sock)
    assert status_of(raw) == 408 and "server.body_timeout_s" in error_message(raw)
    assert time.monotonic() - started < 2.5
    assert gw.client(user["token"]).get("/v1/settings").json()["temperature"] is None  # nothing written


def test_a_body_trickled_a_byte_at_a_time_is_cut(gw: GatewayProcess) -> None:
    sock = connect(gw)
    started = time.monotonic()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(OSError):
        for _ in range(60):
            sock.sendall(b"1\r\n \r\n")
            time.sleep(0.1)  # the trickle itself, not a wait for a condition
    assert time.monotonic() - started < 3.5


def test_beyond_max_connections_is_503_and_serving_resumes_when_they_close(gw: GatewayProcess) -> None:
    idle = []
    try:
        for _ in range(TIMEOUTS["max_connections"] + 5):
            idle.append(connect(gw))
        refused = [s for s in idle[-5:] if status_of(read_all(s, 5)) == 503]
        assert len(refused) >= 4
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            if httpx.get(f"{gw.url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "not serving again after connections closed"


def test_an_idle_keep_alive_connection_is_closed(gw: GatewayProcess) -> None:
    sock = connect(gw)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    raw = read_all(sock)
    assert status_of(raw) == 200 and time.monotonic() - started < 3


def _chunked(sock: socket.socket, method: str, path: str, token: str, total: int) -> bytes:
    """Stream a chunked body of `total` bytes, stopping as soon as the gateway answers."""
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    piece = b"%x\r\n" % 65536 + b"[" * 65536 + b"\r\n"
    sent = 0
    sock.setblocking(False)
    try:
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break
            if writable:
                sent += sock.send(piece)
    except OSError:
        pass
    sock.setblocking(True)
    return read_response(sock)


def read_response(sock: socket.socket) -> bytes:
    """One response (headers and its Content-Length of body), not waiting for the connection to close."""
    sock.settimeout(10)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, raw
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, raw
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("method, path, admin", [
    ("PUT", "/v1/settings", False), ("POST", "/admin/v1/users", True), ("PATCH", "/admin/v1/users/nobody", True),
    ("POST", "/v1/chat/completions", False), ("POST", "/api/v1/embeddings", False),
    ("PUT", "/v1/account/openrouter-key", False), ("POST", "/admin/v1/users/x/managed-key", True),
])
def test_a_chunked_body_over_the_limit_is_413_without_buffering(
    gw: GatewayProcess, user: dict[str, Any], method: str, path: str, admin: bool,
) -> None:
    before = rss_kb(gw)
    sock = connect(gw)
    token = ADMIN_TOKEN if admin else user["token"]
    raw = _chunked(sock, method, path, token, 32 << 20)
    assert status_of(raw) == 413, raw[:300]
    assert "max_" in error_message(raw) and "body_bytes" in error_message(raw)
    assert rss_kb(gw) - before < 16_000  # buffering the 32 MiB would add twice that
    still_serves(gw)


def test_the_limits_hold_in_every_worker_process(emulator: Emulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, emulator, {"server": {**TIMEOUTS, "workers": 2}})
    port = free_port()
    log = tmp_path / "workers.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config), "serve", "--port", str(port)],
                                   cwd=tmp_path, env={**os.environ, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN},
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process, timeout=40, log=log)
        for _ in range(6):  # connections land on either worker
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
                assert status_of(read_all(sock)) == 431
        slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
        started = time.monotonic()
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
        for sock in slow:
            assert status_of(read_all(sock)) == 408
            sock.close()
        assert time.monotonic() - started < 2.5
    finally:
        assert stop_process(process) == 0
