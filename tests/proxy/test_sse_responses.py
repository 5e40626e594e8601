"""The observer reads a Responses API stream or body: model, exact usage and cost, outcome, errors."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from gateway.proxy.sse import StreamObserver, observe_body

USAGE = (b'{"input_tokens":7,"input_tokens_details":{"cached_tokens":2},"output_tokens":5,'
         b'"output_tokens_details":{"reasoning_tokens":1},"total_tokens":12,"cost":0.0000040500000000001}')


def event(kind: str, **fields: object) -> bytes:
    return b"data: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"


def response(status: str, usage: bytes = b"null", **extra: object) -> bytes:
    head = orjson.dumps({"id": "gen-1", "object": "response", "model": "openai/gpt-4o-mini", "status": status,
                         "error": None, **extra})
    return head[:-1] + b',"usage":' + usage + b"}"


def stream(final: bytes) -> bytes:
    created = b'data: {"type":"response.created","sequence_number":0,"response":' + response("in_progress") + b"}\n\n"
    deltas = b"".join(event("response.output_text.delta", delta=t, sequence_number=i + 1)
                      for i, t in enumerate(["Hello", ' "usage": {', " there"]))
    return b": OPENROUTER PROCESSING\n\n" + created + deltas + final + b"data: [DONE]\n\n"


COMPLETED = b'data: {"type":"response.completed","sequence_number":9,"response":' + response("completed", USAGE) \
    + b"}\n\n"


@pytest.mark.parametrize("piece", [1, 7, 64, 10_000])
def test_stream_in_any_pieces_gives_model_exact_usage_and_stop(piece: int) -> None:
    raw = stream(COMPLETED)
    observer = StreamObserver()
    for i in range(0, len(raw), piece):
        observer.feed(raw[i:i + piece])
    obs = observer.finish()
    assert obs.model == "openai/gpt-4o-mini" and obs.generation_id == "gen-1"
    assert obs.usage is not None and obs.usage["cost"] == Decimal("0.0000040500000000001")
    assert obs.usage["input_tokens"] == 7 and obs.finish_reason == "stop" and obs.error is None
    assert obs.bytes == len(raw)


def test_header_generation_id_wins_over_the_response_id() -> None:
    observer = StreamObserver()
    observer.observation.generation_id = "gen-from-header"
    observer.feed(stream(COMPLETED))
    assert observer.finish().generation_id == "gen-from-header"


def test_incomplete_stream_maps_its_reason() -> None:
    final = b'data: {"type":"response.incomplete","response":' + response(
        "incomplete", USAGE, incomplete_details={"reason": "max_output_tokens"}) + b"}\n\n"
    observer = StreamObserver()
    observer.feed(stream(final))
    assert observer.finish().finish_reason == "length"


def test_failed_stream_records_the_error() -> None:
    final = b'data: {"type":"response.failed","response":' + response(
        "failed", error={"code": "server_error", "message": "Provider disconnected"}) + b"}\n\n"
    observer = StreamObserver()
    observer.feed(stream(final))
    obs = observer.finish()
    assert obs.finish_reason == "error" and obs.error == {"code": "server_error", "message": "Provider disconnected"}


def test_error_event_records_the_error() -> None:
    observer = StreamObserver()
    observer.feed(stream(event("error", code="rate_limit_exceeded", message="Slow down")))
    obs = observer.finish()
    assert obs.error == {"code": "rate_limit_exceeded", "message": "Slow down"} and obs.finish_reason == "error"


def test_body_gives_exact_usage_and_outcome() -> None:
    obs = observe_body(response("completed", USAGE))
    assert obs.generation_id == "gen-1" and obs.model == "openai/gpt-4o-mini" and obs.finish_reason == "stop"
    assert obs.usage is not None and obs.usage["cost"] == Decimal("0.0000040500000000001")
