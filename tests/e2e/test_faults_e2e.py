"""Money and availability when things fail (issue 14), with real processes.

A real `gateway serve` in front of the real emulator (its failure injection) or of a
socket that never answers; a Redis the test starts, kills with -9 and restarts; SIGTERM
and kill -9 sent to the gateway. Each test asserts what the ledger and the client see.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator

import pytest
from conftest import Emulator, free_port, start_gateway

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello, please!"}]}
UNLIMITED = {name: {"markup_pct": "0"} for name in ("trial", "starter", "professional", "enterprise")}


def poll(condition: Any, timeout: float = 10.0, every: float = 0.02) -> Any:
    """Wait for `condition()` to be truthy (returned), failing at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(every)


class SilentUpstream:
    """A TCP server that reads requests and never answers: counts the POSTs it received."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.posts = 0
        self.connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.posts += data.count(b"POST /")

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


# ---------------------------------------------------------------- (2) never a generation made twice


@pytest.fixture(scope="module")
def slow_gw(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Retries on (3 of them, fast) and a 1 s read timeout: the emulator is told to take 2 s."""
    gw = start_gateway(tmp_path_factory.mktemp("faults-slow"), emulator, {
        "upstream": {"retries": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "read_timeout_s": 1},
        "tiers": UNLIMITED,
    })
    yield gw
    gw.stop()


def test_a_read_timeout_after_sending_makes_one_generation_and_says_so(slow_gw, emulator):
    account = slow_gw.create_user(tier="starter", key=emulator.new_key())
    before = emulator.stats()
    emulator.control("delay", {"path": "/chat/completions", "delay_ms": 2000, "times": 1})
    with slow_gw.client(account["token"]) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 504, response.text
    assert "generation may still have run" in response.json()["error"]["message"]
    # the delayed request still completes upstream: exactly one generation, never a second
    poll(lambda: emulator.stats()["generations"] > before["generations"], timeout=5)
    after = emulator.stats()
    assert after["requests"].get("/chat/completions", 0) - before["requests"].get("/chat/completions", 0) == 1
    assert after["generations"] - before["generations"] == 1


def user_on_another_upstream(tmp, emulator: Emulator, base_url: str) -> tuple[Any, dict[str, Any]]:
    """A user with a verified key (set through the emulator), then the gateway restarted on `base_url`."""
    gw = start_gateway(tmp, emulator, {"tiers": UNLIMITED})
    account = gw.create_user(tier="starter", key=emulator.new_key())
    gw.stop()
    gw = start_gateway(tmp, emulator, {
        "upstream": {"base_url": base_url, "retries": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                     "read_timeout_s": 1},
        "tiers": UNLIMITED,
    })
    return gw, account


def test_an_upstream_that_never_answers_gets_one_post(tmp_path, emulator):
    silent = SilentUpstream()
    try:
        gw, account = user_on_another_upstream(tmp_path, emulator, f"http://127.0.0.1:{silent.port}/api/v1")
        try:
            with gw.client(account["token"]) as client:
                response = client.post("/v1/chat/completions", json=CHAT)
        finally:
            gw.stop()
    finally:
        silent.close()
    assert response.status_code == 504, response.text
    assert "generation may still have run" in response.json()["error"]["message"]
    assert silent.posts == 1


def test_connection_refused_is_a_502_saying_nothing_was_sent(tmp_path, emulator):
    gw, account = user_on_another_upstream(tmp_path, emulator, f"http://127.0.0.1:{free_port()}/api/v1")
    try:
        with gw.client(account["token"]) as client:
            response = client.post("/v1/chat/completions", json=CHAT)
    finally:
        gw.stop()
    assert response.status_code == 502, response.text
    assert "nothing was sent" in response.json()["error"]["message"]
