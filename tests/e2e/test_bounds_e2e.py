"""Timeouts that hold and clients that leave (issue 14, points 3 and 8), with real processes.

A real `gateway serve` in front of the real emulator, told to stall a stream, trickle one, or take
longer than the request may: the client gets OpenRouter's mid-stream error event (or a 504), the
upstream call is closed, and the ledger keeps the generation as cancelled with finish_reason error.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import httpx
import orjson
import pytest

from tests.conftest import Emulator, start_gateway
from tests.e2e.test_faults_e2e import CHAT, UNLIMITED, poll, sqlite_rows

BOUNDS = {"server": {"request_timeout_s": 2}, "upstream": {"stream_idle_timeout_s": 0.5},
          "accounting": {"flush_interval_ms": 50, "generation_lookup": {"first_delay_s": 0.2}}, "tiers": UNLIMITED}


@pytest.fixture(scope="module")
def bounded(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    gw = start_gateway(tmp_path_factory.mktemp("bounds"), emulator, BOUNDS)
    gw.db = gw.config_file.parent / "gateway.db"
    yield gw
    gw.stop()


@pytest.fixture
def account(bounded: Any, emulator: Emulator) -> dict[str, Any]:
    return bounded.create_user(tier="starter", key=emulator.new_key())


@pytest.fixture
def chunk_delay(emulator: Emulator) -> Iterator[Any]:
    yield lambda ms: emulator.control("stream", {"chunk_delay_ms": ms})
    emulator.control("stream", {"chunk_delay_ms": 0})


def stream_events(gw: Any, token: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """The data events a client receives, and how long the stream took."""
    started = time.monotonic()
    events = []
    with gw.client(token) as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(orjson.loads(line[6:]))
    return events, time.monotonic() - started


def record_of(gw: Any, generation_id: str) -> tuple[Any, ...]:
    rows = poll(lambda: sqlite_rows(gw.db, "SELECT cancelled, finish_reason, settle_status, total_cost FROM"
                                           " usage_records WHERE generation_id = ?", (generation_id,)))
    return rows[0]


def test_a_stalled_stream_ends_with_an_sse_error_after_the_idle_gap(bounded, account, chunk_delay):
    chunk_delay(1500)  # the first token would come 1.5 s after the role chunk: past the 0.5 s idle bound
    events, took = stream_events(bounded, account["token"], {**CHAT, "stream": True})
    last = events[-1]
    print(f"\na stream idle for 0.5 s receives, after {took:.2f} s: {orjson.dumps(last).decode()}")
    assert 0.5 <= took < 1.4
    assert last["error"]["code"] == 504 and "upstream.stream_idle_timeout_s" in last["error"]["message"]
    assert last["choices"] == [{"index": 0, "finish_reason": "error", "delta": {"content": ""}}]
    assert last["id"] == events[0]["id"] and last["object"] == "chat.completion.chunk"
    # kept as cancelled with finish_reason error; its cost looked up (the emulator billed the cancelled part)
    poll(lambda: record_of(bounded, last["id"])[2] == "settled", timeout=10)
    cancelled, finish, _, _ = record_of(bounded, last["id"])
    assert (cancelled, finish) == (1, "error")


def test_a_trickling_stream_is_cut_at_the_request_timeout(bounded, account, chunk_delay):
    chunk_delay(200)  # never idle for 0.5 s, but 50 tokens would take 10 s
    events, took = stream_events(bounded, account["token"], {**CHAT, "stream": True, "max_tokens": 50})
    last = events[-1]
    assert 2 <= took < 3 and len(events) > 5
    assert last["error"]["code"] == 504 and "server.request_timeout_s" in last["error"]["message"]
    cancelled, finish, _, _ = record_of(bounded, last["id"])
    assert (cancelled, finish) == (1, "error")


def test_a_non_streamed_request_past_the_request_timeout_is_a_504_and_the_upstream_is_closed(
        bounded, account, emulator):
    emulator.control("delay", {"path": "/chat/completions", "delay_ms": 4000, "times": 1})
    left_before = len(emulator.stats()["left_during_delay"])
    started = time.monotonic()
    with bounded.client(account["token"]) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    took = time.monotonic() - started
    assert response.status_code == 504 and 2 <= took < 3, (response.text, took)
    assert "server.request_timeout_s" in response.json()["error"]["message"]
    poll(lambda: len(emulator.stats()["left_during_delay"]) > left_before, timeout=2)


def test_a_client_leaving_a_non_streamed_request_closes_the_upstream_call_at_once(bounded, account, emulator):
    emulator.control("delay", {"path": "/chat/completions", "delay_ms": 3000, "times": 1})
    before = emulator.stats()
    with bounded.client(account["token"]) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json=CHAT, timeout=0.5)
    left = time.time()
    stats = poll(lambda: (s := emulator.stats())["left_during_delay"][len(before["left_during_delay"]):] and s,
                 timeout=2)
    lag = stats["left_during_delay"][-1] - left
    print(f"\nthe upstream call was closed {lag * 1000:.0f} ms after the client left")
    assert lag < 0.3  # at once, not when the 3 s generation ends
    assert stats["requests"]["/chat/completions"] - before["requests"].get("/chat/completions", 0) == 1
