"""A fast, deterministic fake OpenRouter for the benchmark (`python -m bench.upstream --port P`).

Why not the emulator: the byte-exact streaming check needs the client to know, before it
asks, every byte the upstream will send. Here a stream is a pure function of the request
(`user` = seed, `max_tokens` = content chunks, `model`), so `expected_stream()` gives the
client the exact bytes to compare with. It is also cheaper per request than the emulator
(no key store, no per-generation state), so the "direct" row measures the upstream, not
bookkeeping.

It answers what a gateway with auth, limits and accounting asks of OpenRouter: chat
completions (streamed or not), `GET /key` (any `sk-or-` bearer is valid), `/generation`
(cost derived from the id, equal to the `usage.cost` the response reported), `/models`
(one priced model) and `/credits`. Shapes follow shared/OPENROUTER.md §2–§7.

`POST /_bench/config {"chunk_delay_ms": N}` sets a pause between stream chunks so that
many streams overlap (the memory-per-stream measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
from decimal import Decimal
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

import orjson

MODEL = "bench/fast"
PROMPT_TOKENS = 10
NON_STREAM_TOKENS = 5
PROMPT_PRICE = Decimal("0.000001")  # USD per token, as in the catalogue below
COMPLETION_PRICE = Decimal("0.000002")
CREATED = 1700000000
API = "/api/v1"
_SEED = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_GEN_ID = re.compile(r"^gen-b(\d+)-[A-Za-z0-9_.-]+$")

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


def cost_of(completion_tokens: int) -> Decimal:
    return PROMPT_TOKENS * PROMPT_PRICE + completion_tokens * COMPLETION_PRICE


def generation_id(seed: str, chunks: int) -> str:
    """The cost is recoverable from the id alone, so `/generation` needs no state."""
    return f"gen-b{chunks}-{seed}"


def _usage(completion_tokens: int) -> bytes:
    cost = cost_of(completion_tokens)
    return (
        b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,'
        b'"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0},'
        b'"cost":%s,"is_byok":false,"cost_details":{"upstream_inference_cost":null,'
        b'"upstream_inference_prompt_cost":%s,"upstream_inference_completions_cost":%s}}'
        % (
            PROMPT_TOKENS, completion_tokens, PROMPT_TOKENS + completion_tokens, str(cost).encode(),
            str(PROMPT_TOKENS * PROMPT_PRICE).encode(), str(completion_tokens * COMPLETION_PRICE).encode(),
        )
    )


def expected_stream(seed: str, chunks: int, model: str = MODEL) -> list[bytes]:
    """Every body chunk the upstream sends for this request, in order (join them to compare)."""
    gen_id = generation_id(seed, chunks).encode()
    base = b'{"id":"%s","provider":"Bench","model":%s,"object":"chat.completion.chunk","created":%d,' % (
        gen_id, orjson.dumps(model), CREATED)

    def event(choices: bytes, extra: bytes = b"") -> bytes:
        return b"data: " + base + b'"choices":' + choices + extra + b"}\n\n"

    def choice(delta: bytes, finish: bytes) -> bytes:
        return b'[{"index":0,"delta":%s,"finish_reason":%s,"native_finish_reason":%s}]' % (delta, finish, finish)

    events = [b": OPENROUTER PROCESSING\n\n", event(choice(b'{"role":"assistant","content":""}', b"null"))]
    for i in range(chunks):
        events.append(event(choice(b'{"content":%s}' % orjson.dumps(f" {seed}:{i}"), b"null")))
    events.append(event(choice(b'{"content":""}', b'"stop"')))
    events.append(event(b"[]", b',"usage":' + _usage(chunks)) + b"data: [DONE]\n\n")
    return events


def _completion_body(gen_id: str, model: str) -> bytes:
    return (
        b'{"id":"%s","provider":"Bench","model":%s,"object":"chat.completion","created":%d,'
        b'"system_fingerprint":null,"choices":[{"index":0,"logprobs":null,"finish_reason":"stop",'
        b'"native_finish_reason":"stop","message":{"role":"assistant","content":"Hello from the bench.",'
        b'"refusal":null,"reasoning":null}}],"usage":%s}'
        % (gen_id.encode(), orjson.dumps(model), CREATED, _usage(NON_STREAM_TOKENS))
    )


def _models() -> bytes:
    model = {
        "id": MODEL, "canonical_slug": MODEL, "name": "Bench: fast", "created": CREATED, "description": "",
        "context_length": 128000,
        "architecture": {"modality": "text->text", "input_modalities": ["text"], "output_modalities": ["text"],
                         "tokenizer": "Other", "instruct_type": None},
        "pricing": {"prompt": str(PROMPT_PRICE), "completion": str(COMPLETION_PRICE), "request": "0"},
        "top_provider": {"context_length": 128000, "max_completion_tokens": 16384, "is_moderated": False},
        "per_request_limits": None, "supported_parameters": ["max_tokens", "stream"], "default_parameters": None,
        "expiration_date": None, "knowledge_cutoff": None,
    }
    return orjson.dumps({"data": [model], "total_count": 1, "links": {"next": None}})


def _key_info() -> bytes:
    return orjson.dumps({"data": {
        "label": "sk-or-v1-ben...ench", "limit": None, "limit_remaining": None, "limit_reset": None,
        "include_byok_in_limit": False, "usage": 0, "usage_daily": 0, "usage_weekly": 0, "usage_monthly": 0,
        "byok_usage": 0, "byok_usage_daily": 0, "byok_usage_weekly": 0, "byok_usage_monthly": 0,
        "is_free_tier": False, "is_management_key": False, "is_provisioning_key": False, "expires_at": None,
        "creator_user_id": None, "rate_limit": {"requests": -1, "interval": "10s"}, "budgets": [],
        "effective_budget": None,
    }})


def _generation(gen_id: str) -> bytes | None:
    match = _GEN_ID.match(gen_id)
    if match is None:
        return None
    tokens = int(match.group(1))
    cost = cost_of(tokens)
    return b'{"data":{"id":"%s","model":"%s","provider_name":"Bench","api_type":"completions",' \
           b'"total_cost":%s,"usage":%s,"tokens_prompt":%d,"tokens_completion":%d,"native_tokens_prompt":%d,' \
           b'"native_tokens_completion":%d,"native_tokens_reasoning":0,"native_tokens_cached":0,' \
           b'"streamed":null,"cancelled":false,"finish_reason":"stop","native_finish_reason":"stop",' \
           b'"is_byok":false,"upstream_inference_cost":null,"cache_discount":null,' \
           b'"created_at":"2023-11-14T22:13:20Z","latency":1,"generation_time":1}}' % (
               gen_id.encode(), MODEL.encode(), str(cost).encode(), str(cost).encode(),
               PROMPT_TOKENS, tokens, PROMPT_TOKENS, tokens)


def _error(status: int, message: str) -> bytes:
    return orjson.dumps({"error": {"code": status, "message": message}})


class FakeUpstream:
    """Raw ASGI: no framework on the path, so it stays far faster than anything in front of it."""

    def __init__(self) -> None:
        self.chunk_delay_s = 0.0
        self._counter = itertools.count()
        self._prefix = f"n{os.getpid()}x"
        self._models = _models()
        self._key = _key_info()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if method == "POST" and path in (API + "/chat/completions", "/v1/chat/completions"):
            await self._chat(scope, receive, send)
        elif method == "GET" and path == API + "/generation":
            query = parse_qs(scope["query_string"].decode("latin-1"))
            body = _generation((query.get("id") or [""])[0])
            await _respond(send, 200 if body else 404, body or _error(404, "Generation not found"))
        elif method == "GET" and path == API + "/models":
            await _respond(send, 200, self._models)
        elif method == "GET" and path in (API + "/key", API + "/auth/key"):
            ok = _bearer(scope).startswith("sk-or-")
            await _respond(send, 200 if ok else 401, self._key if ok else _error(401, "No auth credentials found"))
        elif method == "GET" and path == API + "/credits":
            await _respond(send, 200, b'{"data":{"total_credits":1000000,"total_usage":0}}')
        elif method == "POST" and path == "/_bench/config":
            config = orjson.loads(await _read(receive) or b"{}")
            self.chunk_delay_s = float(config.get("chunk_delay_ms", 0)) / 1000
            await _respond(send, 200, orjson.dumps({"chunk_delay_ms": self.chunk_delay_s * 1000}))
        elif method == "GET" and path == "/_bench/health":
            await _respond(send, 200, b'{"ok":true}')
        else:
            await _respond(send, 404, _error(404, f"No route {method} {path}"))

    async def _chat(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        try:
            body = orjson.loads(await _read(receive))
        except orjson.JSONDecodeError:
            await _respond(send, 400, _error(400, "Invalid JSON"))
            return
        if not _bearer(scope).startswith("sk-or-"):
            await _respond(send, 401, _error(401, "No auth credentials found"))
            return
        model = body.get("model") if isinstance(body.get("model"), str) else MODEL
        seed = body.get("user")
        if not isinstance(seed, str) or not _SEED.match(seed):
            seed = f"{self._prefix}{next(self._counter)}"
        if body.get("stream") is not True:
            gen_id = generation_id(seed, NON_STREAM_TOKENS)
            await _respond(send, 200, _completion_body(gen_id, model), [(b"x-generation-id", gen_id.encode())])
            return
        chunks = body.get("max_tokens")
        chunks = chunks if isinstance(chunks, int) and 0 <= chunks <= 100_000 else NON_STREAM_TOKENS
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
            (b"x-generation-id", generation_id(seed, chunks).encode())]})
        delay = self.chunk_delay_s
        events = expected_stream(seed, chunks, model)
        for index, event in enumerate(events[:-1]):
            await send({"type": "http.response.body", "body": event, "more_body": True})
            if delay and 1 <= index <= chunks:
                await asyncio.sleep(delay)
            elif index % 64 == 63:
                await asyncio.sleep(0)  # let other requests run during long streams
        await send({"type": "http.response.body", "body": events[-1], "more_body": False})


def _bearer(scope: dict[str, Any]) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            text = value.decode("latin-1")
            return text[7:] if text.startswith("Bearer ") else ""
    return ""


async def _read(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Fast deterministic fake OpenRouter for `make bench`.")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # keep-alive longer than the pauses between runs (uvicorn's default is 5 s): a proxy reusing a pooled
    # connection the upstream has just closed answers 500, which is the bench's doing, not the proxy's
    uvicorn.run(FakeUpstream(), host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=120)


if __name__ == "__main__":
    main()
