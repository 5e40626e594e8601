"""OpenAI's Responses API as OpenRouter serves it (``POST /responses``): stateless, streamed or not.

Why a module of its own: the shapes differ from chat completions throughout. The input is
``input`` (a string or message items) plus ``instructions``; the reply is a ``response``
object whose ``output`` holds message items; usage says ``input_tokens``/``output_tokens``
(plus OpenRouter's ``cost``); a stream is a sequence of typed events (``response.created`` …
``response.completed``), each a ``data:`` line, ending with ``data: [DONE]`` as OpenRouter
ends its streams. The ``id`` is the generation id, also sent in ``X-Generation-Id``, so
``GET /generation`` settles it like any other generation.

Objects carry every field of OpenAI's ``Response`` (nulls where unused), a superset the
openai and OpenRouter SDKs both accept.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from openrouter_emulator.catalogue import dumps
from openrouter_emulator.replies import reply_tokens
from openrouter_emulator.state import EmulatorError, Generation, KeyRecord, StreamRecord, new_id

if TYPE_CHECKING:
    from openrouter_emulator.state import EmulatorState


class Host(Protocol):
    """What a Responses call needs of the emulator app: its state and how a generation starts."""

    state: EmulatorState

    def _start_generation(self, request: Any, body: dict[str, Any], api_type: str) -> tuple[KeyRecord, Generation]: ...


def _text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(item) for item in value)
    if isinstance(value, dict):
        return _text_chars(value.get("content")) + _text_chars(value.get("text"))
    return 0


def input_tokens(body: dict[str, Any]) -> int:
    """The emulator's stand-in tokenizer (characters // 4 + 1) over ``input`` and ``instructions``."""
    return (_text_chars(body.get("input")) + _text_chars(body.get("instructions"))) // 4 + 1


def check_request(body: dict[str, Any]) -> None:
    """OpenRouter's Responses API is stateless: no stored responses to continue from."""
    if body.get("input") is None:
        raise EmulatorError(400, 'Input required: specify "input"')
    if body.get("store") is True:
        raise EmulatorError(400, "store: true is not supported: the Responses API here is stateless")
    if body.get("previous_response_id") is not None:
        raise EmulatorError(400, "previous_response_id is not supported: send the whole conversation in input")
    cap = body.get("max_output_tokens")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise EmulatorError(400, "max_output_tokens must be a positive integer")


def usage(prompt: int, completion: int, costs: tuple[Decimal, Decimal, Decimal]) -> dict[str, Any]:
    return {
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
        "cost": costs[0], "is_byok": False,
        "cost_details": {"upstream_inference_cost": None, "upstream_inference_input_cost": costs[1],
                         "upstream_inference_output_cost": costs[2]},
    }


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text or status != \
        "in_progress" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def response_object(body: dict[str, Any], gen: Generation, *, status: str, output: list[dict[str, Any]],
                    usage_: dict[str, Any] | None, error: dict[str, Any] | None = None,
                    incomplete: str | None = None) -> dict[str, Any]:
    done = status in ("completed", "incomplete", "failed")
    return {
        "id": gen.id, "object": "response", "created_at": int(gen.started),
        "completed_at": int(time.time()) if done else None,
        "model": gen.model.id, "provider": gen.model.provider, "status": status,
        "background": False, "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": body.get("instructions"), "metadata": body.get("metadata") or {},
        "max_output_tokens": body.get("max_output_tokens"), "max_tool_calls": None,
        "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None, "prompt_cache_key": None, "reasoning": None,
        "safety_identifier": None, "service_tier": "default", "store": False,
        "temperature": body.get("temperature"), "top_p": body.get("top_p"), "top_logprobs": 0,
        "presence_penalty": body.get("presence_penalty", 0), "frequency_penalty": body.get("frequency_penalty", 0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
        "truncation": "disabled", "user": body.get("user"), "usage": usage_,
    }


async def create_response(app: Host, request: Any) -> Any:

    body = request.json()
    check_request(body)
    key, gen = app._start_generation(request, body, "completions")
    gen.tokens_prompt = input_tokens(body)
    cap = body.get("max_output_tokens")
    tokens = reply_tokens({"max_tokens": cap} if cap is not None else {})
    if gen.streamed:
        await _stream(app, request, body, key, gen, tokens)
        return None
    costs = gen.finish(len(tokens), "stop")
    app.state.record(gen, key)
    item = message_item(new_id("msg"), "".join(tokens), "completed")
    payload = response_object(body, gen, status="completed", output=[item],
                              usage_=usage(gen.tokens_prompt, len(tokens), costs))
    return 200, payload, [(b"x-generation-id", gen.id.encode())]


async def _stream(app: Host, request: Any, body: dict[str, Any], key: KeyRecord, gen: Generation,
                  tokens: list[str]) -> None:
    """The event sequence OpenAI documents; a disconnect records a cancelled generation."""
    state = app.state
    record = state.last_stream = StreamRecord(gen.id)
    sequence = 0
    item_id = new_id("msg")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            record.body.extend(message.get("body", b""))
            record.complete = not message.get("more_body", False)
        await request.send(message)

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal sequence
        sequence += 1
        return b"data: " + dumps({"type": kind, "sequence_number": sequence - 1, **fields}) + b"\n\n"

    def snapshot(status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return response_object(body, gen, status=status, output=output, usage_=extra.pop("usage_", None), **extra)

    async def chunk(data: bytes, more: bool = True) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": more})

    midstream = state.take_midstream()
    stop_at = len(tokens) if midstream is None else min(midstream.after_chunks, len(tokens))
    delay = state.chunk_delay_ms / 1000
    gone = asyncio.Event()

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch_disconnect())
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    try:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
            (b"x-generation-id", gen.id.encode())]})
        await chunk(b": OPENROUTER PROCESSING\n\n")
        await chunk(event("response.created", response=snapshot("in_progress", []))
                    + event("response.in_progress", response=snapshot("in_progress", [])))
        await chunk(event("response.output_item.added", output_index=0,
                          item=message_item(item_id, "", "in_progress"))
                    + event("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        sent = 0
        for token in tokens[:stop_at]:
            if delay:
                await asyncio.sleep(delay)
            if gone.is_set():
                break
            await chunk(event("response.output_text.delta", **where, delta=token, logprobs=[]))
            if sent == 0:
                gen.latency_ms = int((time.time() - gen.started) * 1000)
            sent += 1
        text = "".join(tokens[:sent])
        if gone.is_set():
            gen.finish(sent, None, cancelled=True)
            state.record(gen, key)
            return
        if midstream is not None:
            gen.finish(sent, "error", status=midstream.status)
            state.record(gen, key)
            error = {"code": "server_error", "message": midstream.message or "Provider disconnected"}
            failed = snapshot("failed", [message_item(item_id, text, "incomplete")], error=error)
            await chunk(event("response.failed", response=failed), more=False)
            return
        costs = gen.finish(sent, "stop")
        state.record(gen, key)  # the record exists before the usage event reaches the client
        item = message_item(item_id, text, "completed")
        await chunk(event("response.output_text.done", **where, text=text, logprobs=[])
                    + event("response.content_part.done", **where, part=item["content"][0])
                    + event("response.output_item.done", output_index=0, item=item))
        done = snapshot("completed", [item], usage_=usage(gen.tokens_prompt, sent, costs))
        await chunk(event("response.completed", response=done) + b"data: [DONE]\n\n", more=False)
    finally:
        watcher.cancel()
