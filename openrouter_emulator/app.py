"""A local stand-in for OpenRouter (``https://openrouter.ai/api/v1``).

Why it exists: ``gateway serve --demo``, the end-to-end tests and the benchmark need an
upstream that answers with OpenRouter's real shapes (chat and legacy completions,
streamed or not, embeddings, ``/generation``, ``/models``, ``/key``, ``/credits`` and the
``/keys`` management API), validates the keys it issued, and can be told to misbehave
(error statuses, delays, mid-stream errors, generation records that lag). The facts it
imitates are in ``shared/OPENROUTER.md``; the official ``openai`` and ``openrouter``
SDKs validate its answers without complaint.

Guarantees:
- Costs are exact: catalogue price (a Decimal) × tokens, written as plain JSON numbers,
  and ``/generation`` ``total_cost`` equals the ``usage.cost`` the response reported.
- All mutable state lives in one ``EmulatorState`` (``gateway/emulator_state.py``) held by
  the app; nothing global. Models and prices are in ``gateway/emulator_catalogue.py``.
- The whole thing is one raw ASGI callable (no framework on the request path), because it
  is also the fast upstream for the benchmark.
- Test control lives under ``/_emulator/`` (no auth), so tests in other processes can
  drive it over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
import time
from collections import deque
from decimal import Decimal
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

import orjson

from openrouter_emulator import models as model_pages
from openrouter_emulator import responses
from openrouter_emulator.catalogue import dumps
from openrouter_emulator.replies import reply_tokens
from openrouter_emulator.state import (
    EmulatorError,
    EmulatorState,
    Generation,
    KeyRecord,
    Plan,
    StreamRecord,
    key_fields,
    new_id,
    parse_money,
)

DEMO_KEY = "sk-or-v1-emulator-demo-key-0000000000000000"
DEMO_MANAGEMENT_KEY = "sk-or-v1-emulator-management-key-000000000000"
API_PREFIX = "/api/v1"
CONTROL_PREFIX = "/_emulator"
KEYS_PAGE_SIZE = 100
DEFAULT_FAILURE_MESSAGES = {
    429: "Rate limit exceeded", 500: "Internal Server Error", 502: "Provider returned error",
    503: "No available providers support the requested parameters", 504: "Upstream timed out",
}


# ---------------------------------------------------------------- completions


def _text_len(value: Any) -> int:
    """Characters of text in a content value, walked with a stack (a client's nesting is no recursion)."""
    chars = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, list):
            stack.extend(part.get("text") if isinstance(part, dict) else part for part in item)
    return chars


def prompt_tokens(body: dict[str, Any]) -> int:
    """A deterministic stand-in for a tokenizer: characters of all text // 4 + 1."""
    chars = _text_len(body.get("prompt"))
    messages = body.get("messages")
    if isinstance(messages, list):
        chars += sum(_text_len(m.get("content")) for m in messages if isinstance(m, dict))
    return chars // 4 + 1


def usage_payload(prompt: int, completion: int, costs: tuple[Decimal, Decimal, Decimal]) -> dict[str, Any]:
    """OPENROUTER.md §2.4: token counts plus the exact cost."""
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0, "audio_tokens": 0, "video_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "image_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        "cost": costs[0], "is_byok": False,
        "cost_details": {"upstream_inference_cost": None, "upstream_inference_prompt_cost": costs[1],
                         "upstream_inference_completions_cost": costs[2]},
        "server_tool_use_details": {"web_search_requests": 0, "tool_calls_requested": 0, "tool_calls_executed": 0},
    }


def embedding_vector(text: str, dims: int = 16) -> list[float]:
    """A deterministic unit-ish vector derived from the text."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 127.5 - 1.0, 6) for b in (digest * 2)[:dims]]


# ---------------------------------------------------------------- HTTP

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Headers = list[tuple[bytes, bytes]]
_SLOT = "\x00slot\x00"
_SLOT_JSON = orjson.dumps(_SLOT)


class Request:
    """The little a handler needs: method, path, query, headers, raw body, and the ASGI channels."""

    __slots__ = ("method", "path", "query_string", "headers", "body", "send", "receive", "_query")

    def __init__(self, method: str, path: str, query_string: bytes, headers: dict[str, str], body: bytes,
                 send: Send, receive: Receive) -> None:
        self.method, self.path, self.query_string = method, path, query_string
        self.headers, self.body, self.send, self.receive = headers, body, send, receive
        self._query: dict[str, list[str]] | None = None

    def param(self, name: str) -> str | None:
        if self._query is None:
            self._query = parse_qs(self.query_string.decode("latin-1"))
        values = self._query.get(name)
        return values[0] if values else None

    def int_param(self, name: str, default: int | None) -> int | None:
        raw = self.param(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise EmulatorError(400, f"{name} must be an integer") from None
        if value < 0:
            raise EmulatorError(400, f"{name} must be >= 0")
        return value

    def json(self, *, empty_ok: bool = False) -> dict[str, Any]:
        if not self.body.strip() and empty_ok:
            return {}
        try:
            data = orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise EmulatorError(400, f"Invalid JSON in request body: {exc}") from None
        if not isinstance(data, dict):
            raise EmulatorError(400, "Request body must be a JSON object")
        return data


async def send_json(send: Send, status: int, payload: Any, headers: Headers | None = None) -> None:
    body = dumps(payload)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or ())]})
    await send({"type": "http.response.body", "body": body})


class EmulatorApp:
    """The ASGI app. ``state`` is public so in-process tests can inspect or seed it."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self.routes: dict[tuple[str, str], Callable[[Request], Awaitable[Any]]] = {
            ("POST", "/chat/completions"): self.chat_completions,
            ("POST", "/completions"): self.text_completions,
            ("POST", "/embeddings"): self.embeddings,
            ("POST", "/responses"): self.responses,
            ("GET", "/models"): self.models,
            ("GET", "/models/count"): self.models_count,
            ("GET", "/models/user"): self.user_models,
            ("GET", "/model/{author}/{slug}"): self.model,
            ("GET", "/models/{author}/{slug}/endpoints"): self.model_endpoints,
            ("GET", "/embeddings/models"): self.embedding_models,
            ("GET", "/generation"): self.generation,
            ("GET", "/key"): self.current_key,
            ("GET", "/auth/key"): self.current_key,
            ("GET", "/credits"): self.credits,
            ("GET", "/keys"): self.list_keys,
            ("POST", "/keys"): self.create_key,
            ("GET", "/keys/{hash}"): self.get_key,
            ("PATCH", "/keys/{hash}"): self.update_key,
            ("DELETE", "/keys/{hash}"): self.delete_key,
        }
        self.control: dict[str, Callable[[dict[str, Any]], Any]] = {
            "fail": self._control_fail, "delay": self._control_delay, "midstream-error": self._control_midstream,
            "generation-not-ready": self._control_not_ready, "keys": self._control_keys,
            "models": self._control_models, "stream": self._control_stream, "reset": self._control_reset,
        }

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away before sending its body
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        raw_path = scope["path"].rstrip("/") or "/"
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        request = Request(scope["method"], raw_path, scope.get("query_string", b""), headers, body, send, receive)
        try:
            if raw_path.startswith(CONTROL_PREFIX + "/"):
                reply = await self._handle_control(request, raw_path[len(CONTROL_PREFIX) + 1:])
            elif raw_path.startswith(API_PREFIX + "/"):
                request.path = raw_path[len(API_PREFIX):]
                reply = await self._handle_api(request)
            else:
                raise EmulatorError(404, "Not Found")
        except EmulatorError as exc:
            await send_json(send, exc.status, exc.payload(), exc.headers)
            return
        if reply is not None:
            status, payload, extra = reply
            await send_json(send, status, payload, extra)

    async def _handle_api(self, request: Request) -> Any:
        """Count and record the request, apply injected delays/failures, then route it."""
        state, path = self.state, request.path
        state.requests[path] = state.requests.get(path, 0) + 1
        shown = dict(request.headers)
        if "authorization" in shown:
            shown["authorization"] = shown["authorization"][-4:]
        state.last_request = (API_PREFIX + path, shown, request.body)
        delay = state.take_delay(path)
        if delay is not None and delay.delay_ms:
            await self._delay(request, delay.delay_ms / 1000)
        failure = state.take_failure(path)
        if failure is not None:
            if failure.delay_ms:
                await asyncio.sleep(failure.delay_ms / 1000)
            raise self._injected_error(failure)
        route = model_pages.route_of(path)
        if path.startswith("/keys/") and path.count("/") == 2:
            route = "/keys/{hash}"
        handler = self.routes.get((request.method, route))
        if handler is None:
            known = any(r == route for _, r in self.routes)
            raise EmulatorError(405 if known else 404, "Method Not Allowed" if known else "Not Found")
        return await handler(request)

    async def _delay(self, request: Request, seconds: float) -> None:
        """An injected delay. A caller that hangs up meanwhile is noted (``left_during_delay``) and the work
        goes on: OpenRouter bills a non-streamed generation whose caller left (OPENROUTER.md §3)."""
        hung_up = asyncio.ensure_future(request.receive())
        started = time.monotonic()
        try:
            done, _ = await asyncio.wait({hung_up}, timeout=seconds)
            if done and hung_up.result().get("type") == "http.disconnect":
                self.state.left_during_delay.append(time.time())
                await asyncio.sleep(max(0.0, seconds - (time.monotonic() - started)))
        finally:
            hung_up.cancel()

    @staticmethod
    def _injected_error(plan: Plan) -> EmulatorError:
        headers: Headers = []
        if plan.retry_after is not None:
            headers.append((b"retry-after", str(plan.retry_after).encode()))
        if plan.status == 429:
            reset = int((time.time() + (plan.retry_after or 1)) * 1000)
            headers += [(b"x-ratelimit-limit", b"20"), (b"x-ratelimit-remaining", b"0"),
                        (b"x-ratelimit-reset", str(reset).encode())]
        message = plan.message or DEFAULT_FAILURE_MESSAGES.get(plan.status, "Emulated failure")
        return EmulatorError(plan.status, message, headers=headers)

    # inference -------------------------------------------------------------

    def _start_generation(self, request: Request, body: dict[str, Any], api_type: str) -> tuple[
            KeyRecord, Generation]:
        key = self.state.authenticate(request.headers.get("authorization"), management=False)
        model = self.state.route(body, key)
        self.state.check_spend(key, model)
        user = body.get("user")
        session = body.get("session_id") or request.headers.get("x-session-id")
        gen = Generation(
            id=new_id("gen"), key_hash=key.hash, model=model, api_type=api_type,
            streamed=bool(body.get("stream")), tokens_prompt=prompt_tokens(body), started=time.time(),
            http_referer=request.headers.get("http-referer"), user_agent=request.headers.get("user-agent"),
            external_user=user if isinstance(user, str) else None,
            session_id=session if isinstance(session, str) else None,
        )
        return key, gen

    async def chat_completions(self, request: Request) -> Any:
        return await self._complete(request, chat=True)

    async def text_completions(self, request: Request) -> Any:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, *, chat: bool) -> Any:
        body = request.json()
        key, gen = self._start_generation(request, body, "completions")
        if chat and not isinstance(body.get("messages"), list) and body.get("prompt") is None:
            raise EmulatorError(400, 'Input required: specify "prompt" or "messages"')
        if not chat and body.get("prompt") is None:
            raise EmulatorError(400, 'Input required: specify "prompt"')
        tokens = reply_tokens(body)
        if gen.streamed:
            await self._stream(request, key, gen, tokens, chat=chat)
            return None
        costs = gen.finish(len(tokens), "stop")
        self.state.record(gen, key)
        text = "".join(tokens)
        if chat:
            choice = {"index": 0, "logprobs": None, "finish_reason": "stop", "native_finish_reason": "stop",
                      "message": {"role": "assistant", "content": text, "refusal": None, "reasoning": None}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop",
                      "native_finish_reason": "stop"}
        payload = {
            "id": gen.id, "provider": gen.model.provider, "model": gen.model.id,
            "object": "chat.completion" if chat else "text_completion", "created": int(gen.started),
            "system_fingerprint": None, "choices": [choice],
            "usage": usage_payload(gen.tokens_prompt, len(tokens), costs),
        }
        return 200, payload, [(b"x-generation-id", gen.id.encode())]

    async def _stream(self, request: Request, key: KeyRecord, gen: Generation, tokens: list[str], *,
                      chat: bool) -> None:
        """SSE per OPENROUTER.md §3; a client disconnect records a cancelled generation.

        Every body byte is also kept in ``state.last_stream`` (``GET /_emulator/last-stream``)
        so a test can check that a proxy passed the stream on unchanged.
        """
        state = self.state
        record = state.last_stream = StreamRecord(gen.id)

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                record.body.extend(message.get("body", b""))
                record.complete = not message.get("more_body", False)
            await request.send(message)

        base = {"id": gen.id, "provider": gen.model.provider, "model": gen.model.id,
                "object": "chat.completion.chunk" if chat else "text_completion", "created": int(gen.started)}

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + dumps({**base, "choices": choices, **extra}) + b"\n\n"

        def choice(content: str, finish: str | None) -> dict[str, Any]:
            part = {"delta": {"content": content}} if chat else {"text": content, "logprobs": None}
            return {"index": 0, **part, "finish_reason": finish, "native_finish_reason": finish}

        head, tail = event([choice(_SLOT, None)]).split(_SLOT_JSON)
        midstream = state.take_midstream()
        stop_at = len(tokens) if midstream is None else min(midstream.after_chunks, len(tokens))
        delay = state.chunk_delay_ms / 1000
        gone = asyncio.Event()

        async def watch_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-generation-id", gen.id.encode())]})
            await send({"type": "http.response.body", "body": b": OPENROUTER PROCESSING\n\n", "more_body": True})
            if chat:
                role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                        "native_finish_reason": None}
                await send({"type": "http.response.body", "body": event([role]), "more_body": True})
            sent = 0
            for token in tokens[:stop_at]:
                if delay:
                    await asyncio.sleep(delay)
                elif sent % 64 == 63:
                    await asyncio.sleep(0)  # let other requests run during long streams
                if gone.is_set():
                    break
                await send({"type": "http.response.body", "body": head + orjson.dumps(token) + tail,
                            "more_body": True})
                if sent == 0:
                    gen.latency_ms = int((time.time() - gen.started) * 1000)
                sent += 1
            if gone.is_set():
                gen.finish(sent, None, cancelled=True)
                state.record(gen, key)
                return
            if midstream is not None:
                gen.finish(sent, "error", status=midstream.status)
                state.record(gen, key)
                error = EmulatorError(midstream.status, midstream.message or "Provider disconnected").payload()
                await send({"type": "http.response.body", "body": event([choice("", "error")], **error),
                            "more_body": False})
                return
            costs = gen.finish(sent, "stop")
            state.record(gen, key)  # the record exists before the usage chunk reaches the client
            await send({"type": "http.response.body", "body": event([choice("", "stop")]), "more_body": True})
            usage = usage_payload(gen.tokens_prompt, sent, costs)
            await send({"type": "http.response.body", "body": event([], usage=usage) + b"data: [DONE]\n\n",
                        "more_body": False})
        finally:
            watcher.cancel()

    async def embeddings(self, request: Request) -> Any:
        body = request.json()
        raw = body.get("input")
        if raw is None or raw == [] or raw == "":
            raise EmulatorError(400, "Input required: specify \"input\"")
        items = [raw] if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)) \
            else raw
        if not isinstance(items, list):
            raise EmulatorError(400, "input must be a string or an array")
        texts = [item if isinstance(item, str) else " ".join(map(str, item)) for item in items]
        tokens = sum(len(item) if isinstance(item, list) else len(item) // 4 + 1 for item in items)
        key, gen = self._start_generation(request, {**body, "stream": False}, "embeddings")
        gen.tokens_prompt = tokens
        costs = gen.finish(0, None)
        self.state.record(gen, key)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector: Any = embedding_vector(text)
            if as_base64:
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        payload = {"id": gen.id, "object": "list", "data": data, "model": gen.model.id,
                   "provider": gen.model.provider,
                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "cost": costs[0]}}
        return 200, payload, [(b"x-generation-id", gen.id.encode())]

    # catalogue, generation, key, credits -------------------------------------

    async def responses(self, request: Request) -> Any:
        return await responses.create_response(self, request)

    async def models(self, request: Request, *, modalities: str | None = None,
                     rows: list[dict[str, Any]] | None = None) -> Any:
        """Paging like OpenRouter: no params = everything; else limit 500 by default, at most 1000."""
        self.state.models_fetches += 1
        if rows is None:
            rows = self.state.catalogue.rows(modalities or request.param("output_modalities"))
        offset = request.int_param("offset", None)
        limit = request.int_param("limit", None)
        next_link = None
        if offset is not None or limit is not None:
            if limit == 0:
                raise EmulatorError(400, "limit must be between 1 and 1000")
            offset, limit = offset or 0, min(limit or 500, 1000)
            if offset + limit < len(rows):
                next_link = f"{API_PREFIX}{request.path}?offset={offset + limit}&limit={limit}"
            page = rows[offset:offset + limit]
        else:
            page = rows
        return 200, {"data": page, "total_count": len(rows), "links": {"next": next_link}}, []

    async def embedding_models(self, request: Request) -> Any:
        return await self.models(request, modalities="embeddings")

    async def models_count(self, request: Request) -> Any:
        return 200, {"data": {"count": len(self.state.catalogue.rows(request.param("output_modalities")))}}, []

    async def user_models(self, request: Request) -> Any:
        self.state.authenticate(request.headers.get("authorization"), management=False)
        rows = model_pages.user_rows(self.state.catalogue, request.param("output_modalities"))
        return await self.models(request, rows=rows)

    async def model(self, request: Request) -> Any:
        return 200, {"data": model_pages.find(self.state.catalogue, request.path, endpoints=False).row}, []

    async def model_endpoints(self, request: Request) -> Any:
        return 200, model_pages.endpoints_payload(self.state.catalogue, request.path), []

    async def generation(self, request: Request) -> Any:
        key = self.state.authenticate(request.headers.get("authorization"), management=None)
        gen_id = request.param("id")
        if not gen_id:
            raise EmulatorError(400, "id is required")
        return 200, {"data": self.state.lookup_generation(gen_id, key).data()}, []

    async def current_key(self, request: Request) -> Any:
        key = self.state.authenticate(request.headers.get("authorization"), management=None)
        return 200, {"data": key.info(self.state.account_credits)}, []

    async def credits(self, request: Request) -> Any:
        """Account totals for the management key; the key's own credits and spend for an inference key."""
        key = self.state.authenticate(request.headers.get("authorization"), management=None)
        if key.is_management:
            data = {"total_credits": self.state.account_credits, "total_usage": self.state.account_usage}
        else:
            data = {"total_credits": key.credits, "total_usage": key.usage}
        return 200, {"data": data}, []

    # key management ------------------------------------------------------------

    def _managed_key(self, request: Request) -> KeyRecord:
        self.state.authenticate(request.headers.get("authorization"), management=True)
        record = self.state.by_hash.get(request.path.rsplit("/", 1)[1])
        if record is None or record.is_management:
            raise EmulatorError(404, "Key not found")
        return record

    async def list_keys(self, request: Request) -> Any:
        self.state.authenticate(request.headers.get("authorization"), management=True)
        offset = request.int_param("offset", 0) or 0
        include_disabled = request.param("include_disabled") == "true"
        include_expired = request.param("include_expired") == "true"
        now = time.time()
        rows = [k for k in reversed(self.state.inference_keys())  # dicts keep insertion order: newest last
                if (include_disabled or not k.disabled)
                and (include_expired or k.expires_at is None or k.expires_at > now)]
        return 200, {"data": [k.row() for k in rows[offset:offset + KEYS_PAGE_SIZE]]}, []

    async def create_key(self, request: Request) -> Any:
        self.state.authenticate(request.headers.get("authorization"), management=True)
        body = request.json()
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise EmulatorError(400, "name is required")
        fields = key_fields(body)
        if isinstance(body.get("creator_user_id"), str):
            fields["creator_user_id"] = body["creator_user_id"]
        if isinstance(body.get("workspace_id"), str):
            fields["workspace_id"] = body["workspace_id"]
        record = self.state.add_key(name=name, **fields)
        return 201, {"data": record.row(), "key": record.key}, []

    async def get_key(self, request: Request) -> Any:
        return 200, {"data": self._managed_key(request).row()}, []

    async def update_key(self, request: Request) -> Any:
        record = self._managed_key(request)
        body = request.json()
        fields = key_fields({k: v for k, v in body.items() if k != "expires_at"})
        if "name" in body:
            if not isinstance(body["name"], str) or not body["name"].strip():
                raise EmulatorError(400, "name must be a non-empty string")
            fields["name"] = body["name"]
        if "disabled" in body:
            if not isinstance(body["disabled"], bool):
                raise EmulatorError(400, "disabled must be a boolean")
            fields["disabled"] = body["disabled"]
        for attr, value in fields.items():
            setattr(record, attr, value)
        record.updated_at = time.time()
        return 200, {"data": record.row()}, []

    async def delete_key(self, request: Request) -> Any:
        self.state.delete_key(self._managed_key(request))
        return 200, {"deleted": True}, []

    # control (/_emulator/...) ----------------------------------------------------

    async def _handle_control(self, request: Request, name: str) -> Any:
        if request.method == "GET" and name == "stats":
            return 200, self.state.stats(), []
        if request.method == "GET" and name == "last-stream":
            if self.state.last_stream is None:
                raise EmulatorError(404, "No streamed response yet")
            return 200, self.state.last_stream.data(), []
        action = self.control.get(name)
        if request.method != "POST" or action is None:
            raise EmulatorError(404, "Not Found")
        return 200, action(request.json(empty_ok=True)), []

    @staticmethod
    def _int(body: dict[str, Any], name: str, default: int, minimum: int = 0) -> int:
        value = body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise EmulatorError(400, f"{name} must be a number >= {minimum}")
        return int(value)

    @staticmethod
    def _path(body: dict[str, Any]) -> str:
        path = body.get("path", "/chat/completions")
        if not isinstance(path, str) or not path:
            raise EmulatorError(400, "path must be a string")
        if path.startswith(API_PREFIX):
            path = path[len(API_PREFIX):]
        return "*" if path == "*" else "/" + path.strip("/")

    def _control_fail(self, body: dict[str, Any]) -> dict[str, Any]:
        status = self._int(body, "status", 0)
        if not 400 <= status <= 599:
            raise EmulatorError(400, "status must be an HTTP error status (400-599)")
        retry_after = None if body.get("retry_after") is None else self._int(body, "retry_after", 0)
        plan = Plan(times=self._int(body, "times", 1, minimum=1), status=status, retry_after=retry_after,
                    delay_ms=self._int(body, "delay_ms", 0), message=body.get("message"))
        self.state.failures.setdefault(self._path(body), deque()).append(plan)
        return {"ok": True}

    def _control_delay(self, body: dict[str, Any]) -> dict[str, Any]:
        plan = Plan(times=self._int(body, "times", 1, minimum=1), delay_ms=self._int(body, "delay_ms", 0))
        self.state.delays.setdefault(self._path(body), deque()).append(plan)
        return {"ok": True}

    def _control_midstream(self, body: dict[str, Any]) -> dict[str, Any]:
        self.state.midstream.append(Plan(
            times=self._int(body, "times", 1, minimum=1), after_chunks=self._int(body, "after_chunks", 2),
            status=self._int(body, "code", 502), message=body.get("message") or "Provider disconnected"))
        return {"ok": True}

    def _control_not_ready(self, body: dict[str, Any]) -> dict[str, Any]:
        self.state.generation_not_ready_lookups = self._int(body, "lookups", 0)
        return {"ok": True}

    def _control_keys(self, body: dict[str, Any]) -> dict[str, Any]:
        fields = key_fields({k: v for k, v in body.items() if k in ("limit", "limit_reset")})
        if "credits" in body:
            fields["credits"] = parse_money(body["credits"], "credits")
        for name in ("default_model", "name", "disabled"):
            if name in body:
                fields[name] = body[name]
        record = self.state.add_key(body.get("key"), management=bool(body.get("management")), **fields)
        return {"key": record.key, "hash": record.hash}

    def _control_models(self, body: dict[str, Any]) -> dict[str, Any]:
        self.state.catalogue.set_extra(self._int(body, "extra", 0))
        return {"ok": True, "total": len(self.state.catalogue.models)}

    def _control_stream(self, body: dict[str, Any]) -> dict[str, Any]:
        self.state.chunk_delay_ms = self._int(body, "chunk_delay_ms", 0)
        return {"ok": True}

    def _control_reset(self, body: dict[str, Any]) -> dict[str, Any]:
        self.state.reset()
        return {"ok": True}


def create_emulator_app(state: EmulatorState | None = None, *, seed_keys: list[str] | tuple[str, ...] = (),
                        management_key: str | None = None, generation_not_ready_lookups: int = 0) -> EmulatorApp:
    """An emulator app; with no keys given it accepts ``DEMO_KEY`` and ``DEMO_MANAGEMENT_KEY``."""
    if state is None:
        state = EmulatorState()
    if generation_not_ready_lookups:
        state.generation_not_ready_lookups = state.default_generation_not_ready_lookups = generation_not_ready_lookups
    for key in seed_keys or ([] if state.inference_keys() else [DEMO_KEY]):
        state.add_key(key, name="seeded key")
    if management_key or not any(k.is_management for k in state.keys.values()):
        state.add_key(management_key or DEMO_MANAGEMENT_KEY, name="management key", management=True)
    return EmulatorApp(state)


def run_emulator(host: str = "127.0.0.1", port: int = 8090, **kwargs: Any) -> None:
    """Serve the emulator under uvicorn; ``EMULATOR_KEYS`` / ``EMULATOR_MANAGEMENT_KEY`` seed keys."""
    import uvicorn

    if "seed_keys" not in kwargs and os.environ.get("EMULATOR_KEYS"):
        kwargs["seed_keys"] = [k.strip() for k in os.environ["EMULATOR_KEYS"].split(",") if k.strip()]
    if "management_key" not in kwargs and os.environ.get("EMULATOR_MANAGEMENT_KEY"):
        kwargs["management_key"] = os.environ["EMULATOR_MANAGEMENT_KEY"]
    uvicorn.run(create_emulator_app(**kwargs), host=host, port=port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning")
