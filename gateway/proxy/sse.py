"""Read what a response says about its generation without changing a byte of it.

`StreamObserver.feed` is handed every chunk on its way to the client. It keeps only the
unfinished last line between chunks and parses just the events it needs: the first
(generation id, model, provider), any carrying `usage` (the final one, with cost) or a
top-level `error`. Money is parsed as Decimal.

The Responses API (`/responses`) streams typed events instead of chunks: the response
object rides in `response.created` (model) and in the final `response.completed`,
`response.incomplete` or `response.failed` (usage with cost, status, error). Those final
events are read whole; `finish_reason` becomes what the status means in chat terms.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from gateway.core.money import number_after

_MAX_TAIL = 1 << 20  # a single SSE line longer than this is not observed (still passed through)
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([^"]+)"')
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_RESPONSE_EVENT = b'"type":"response.'
# A Responses status in chat terms; `incomplete` takes its reason (max_output_tokens → length).
_RESPONSE_FINISH = {"completed": "stop", "failed": "error", "cancelled": "cancelled"}
_INCOMPLETE_FINISH = {"max_output_tokens": "length", "content_filter": "content_filter"}
_DECODER = json.JSONDecoder(parse_float=Decimal)


@dataclass(slots=True)
class Observation:
    """What one proxied generation told us; accounting turns it into a usage record."""

    generation_id: str | None = None
    model: str | None = None
    provider: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _data_lines(block: bytes) -> list[bytes]:
    return [line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")]


def parse_usage(raw: bytes) -> dict[str, Any] | None:
    """The last `"usage": {...}` object in `raw`, Decimal-exact; None if absent or not JSON.

    An unescaped `"usage":` can only be an object key (inside a JSON string its quotes
    would be escaped), so searching the bytes is safe. Only the bytes from its `{` on are
    decoded: a byte offset is not a character offset once non-ASCII text comes before it.
    """
    match = None
    for match in _USAGE.finditer(raw):  # noqa: B007 (the last match is the one wanted)
        pass
    if match is None:
        return None
    try:
        value, _ = _DECODER.raw_decode(raw[match.end() - 1 :].decode("utf-8", "replace"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def exact_usage(raw: bytes, usage: dict[str, Any]) -> dict[str, Any] | None:
    """`usage` as orjson parsed it from `raw`, with each number that is not an integer (`cost`,
    `cost_details.*`) made an exact Decimal from its own text; when a text is not plainly that
    number (or a list holds one), the stdlib's Decimal parse of the whole object decides."""
    match = None
    for match in _USAGE.finditer(raw):  # noqa: B007 (the last match is the one wanted)
        pass
    if match is None or not _exact_numbers(usage, raw, match.end()):
        return parse_usage(raw)
    return usage


def _exact_numbers(obj: dict[str, Any], raw: bytes, start: int) -> bool:
    for key, value in obj.items():
        if isinstance(value, float):
            found = number_after(key).search(raw, start)
            if found is None:
                return False
            exact = Decimal(found.group(1).decode())
            if float(exact) != value:
                return False
            obj[key] = exact
        elif isinstance(value, dict):
            if not _exact_numbers(value, raw, start):
                return False
        elif isinstance(value, list) and any(isinstance(v, (float, dict, list)) for v in value):
            return False
    return True


class StreamObserver:
    __slots__ = ("observation", "_tail", "_seen_first")

    def __init__(self, observation: Observation | None = None) -> None:
        self.observation = observation or Observation()
        self._tail = b""
        self._seen_first = False

    def feed(self, chunk: bytes) -> None:
        obs = self.observation
        obs.bytes += len(chunk)
        data = self._tail + chunk if self._tail else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            self._tail = data if len(data) <= _MAX_TAIL else b""
            return
        block, self._tail = data[: cut + 1], data[cut + 1 :]
        if len(self._tail) > _MAX_TAIL:
            self._tail = b""
        if not self._seen_first and b"data:" in block:
            self._first_event(block)
        if b'"finish_reason"' in block:
            reasons = _FINISH.findall(block)
            if reasons:
                obs.finish_reason = reasons[-1].decode()
        if b'"usage"' in block:
            for line in _data_lines(block):
                if b'"usage"' in line:
                    if _RESPONSE_EVENT in line:
                        self._response_event(line)
                        continue
                    usage = parse_usage(line)
                    if usage is not None:
                        obs.usage = usage
        if b'"error"' in block:
            for line in _data_lines(block):
                if b'"error"' in line and not (_RESPONSE_EVENT in line and b'"usage"' in line):
                    self._error_event(line)

    def finish(self) -> Observation:
        """Read a last line that had no newline; its bytes were already counted when fed."""
        if self._tail:
            tail, self._tail = self._tail, b""
            counted = self.observation.bytes
            self.feed(tail + b"\n")
            self.observation.bytes = counted
        return self.observation

    def _first_event(self, block: bytes) -> None:
        for line in _data_lines(block):
            if not line or line == b"[DONE]":
                continue
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self._seen_first = True
                if isinstance(event.get("response"), dict):  # a Responses event: the object is inside
                    event = event["response"]
                obs = self.observation
                obs.generation_id = obs.generation_id or _str(event.get("id"))
                obs.model = _str(event.get("model")) or obs.model
                obs.provider = _str(event.get("provider")) or obs.provider
                return

    def _response_event(self, line: bytes) -> None:
        """A Responses event carrying the response object: its usage, status and error."""
        try:
            event = _DECODER.decode(line.decode("utf-8", "replace"))
        except ValueError:
            return
        response = event.get("response") if isinstance(event, dict) else None
        if isinstance(response, dict):
            read_response(response, self.observation)
        elif (usage := parse_usage(line)) is not None:
            self.observation.usage = usage

    def _error_event(self, line: bytes) -> None:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        error = event.get("error")
        if event.get("type") == "error" and not isinstance(error, dict):  # a Responses `error` event
            error = {"code": event.get("code"), "message": event.get("message")}
        elif isinstance(event.get("response"), dict):  # `response.failed` without usage
            read_response(event["response"], self.observation)
            return
        if isinstance(error, dict):
            self.observation.error = error
            self.observation.finish_reason = self.observation.finish_reason or "error"


def read_response(response: dict[str, Any], obs: Observation) -> None:
    """What a Responses API `response` object says: id, model, usage, outcome (streamed or not)."""
    obs.generation_id = obs.generation_id or _str(response.get("id"))
    obs.model = _str(response.get("model")) or obs.model
    obs.provider = _str(response.get("provider")) or obs.provider
    if isinstance(response.get("usage"), dict):
        obs.usage = response["usage"]
    status = response.get("status")
    if status == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        reason = reason if isinstance(reason, str) and reason else "incomplete"
        obs.finish_reason = _INCOMPLETE_FINISH.get(reason, reason)
    elif isinstance(status, str) and status in _RESPONSE_FINISH:
        obs.finish_reason = _RESPONSE_FINISH[status]
    if isinstance(response.get("error"), dict):
        obs.error = response["error"]
        obs.finish_reason = "error"


def observe_body(raw: bytes, observation: Observation | None = None) -> Observation:
    """The same facts from a complete (non-streamed) JSON response body."""
    obs = observation or Observation()
    obs.bytes = len(raw)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return obs
    if not isinstance(body, dict):
        return obs
    if body.get("object") == "response":
        read_response(body, obs)
        if isinstance(obs.usage, dict):
            obs.usage = exact_usage(raw, obs.usage)  # Decimal-exact cost
        return obs
    obs.generation_id = obs.generation_id or _str(body.get("id"))
    obs.model = _str(body.get("model")) or obs.model
    obs.provider = _str(body.get("provider")) or obs.provider
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        obs.finish_reason = _str(choices[0].get("finish_reason"))
        if isinstance(choices[0].get("error"), dict):
            obs.error = choices[0]["error"]
    if isinstance(body.get("error"), dict):
        obs.error = body["error"]
    usage = body.get("usage")
    if isinstance(usage, dict):
        obs.usage = exact_usage(raw, usage)
    return obs


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def error_event(observation: Observation, endpoint: str, code: int, message: str, error_type: str,
                now: float) -> bytes:
    """The event that ends a stream the gateway cuts (a timeout, shutdown), in OpenRouter's mid-stream error
    shape (a top-level `error` beside the chunk fields and a terminating choice), so SDKs that understand
    OpenRouter's own mid-stream errors understand ours."""
    chat = endpoint != "/completions"
    choice: dict[str, Any] = {"index": 0, "finish_reason": "error"}
    choice.update({"delta": {"content": ""}} if chat else {"text": ""})
    event: dict[str, Any] = {
        "id": observation.generation_id, "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(now), "model": observation.model, "provider": observation.provider,
        "error": {"code": code, "message": message, "metadata": {"error_type": error_type}},
        "choices": [choice],
    }
    return b"data: " + orjson.dumps({k: v for k, v in event.items() if v is not None}) + b"\n\n"
