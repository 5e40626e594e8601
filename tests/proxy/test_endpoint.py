"""The raw-ASGI proxy endpoint with its dependencies passed in: a fake authenticator, a
scripted upstream transport, recording hooks. Each test drives one request through
`ProxyEndpoint(scope, receive, send)` and checks what the client got, what went upstream
and what the hooks were told.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any, AsyncIterator

import orjson
import pytest

from gateway.accounting.pricing import Pricing
from gateway.auth.tokens import Principal, ProviderKey, bearer
from gateway.core.config import Config
from gateway.core.errors import RateLimited, Unauthorized
from gateway.proxy.body import read_body
from gateway.proxy.endpoint import ProxyEndpoint
from gateway.proxy.sse import Observation
from gateway.proxy.stop import EmergencyStop
from gateway.proxy.types import Charge, ProxyRequest
from gateway.upstream.client import UpstreamClient, UpstreamConnectionError
from tests.conftest import principal as shared_principal

BASE = "https://openrouter.test/api/v1"
USER_KEY = "sk-or-v1-" + "u" * 64
TOKEN = "gw-token-active"
CHAT = orjson.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
COMPLETION = (b'{"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion",'
              b'"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"Hi"}}],'
              b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4,"cost":0.0000015}}')
STREAM = [
    b": OPENROUTER PROCESSING\n\n",
    b'data: {"id":"gen-2","model":"openai/gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n',
    b'data: {"id":"gen-2","choices":[],"usage":{"total_tokens":4,"cost":0.0000015}}\n\ndata: [DONE]\n\n',
]


def principal(status: str = "active", key: ProviderKey | None = ProviderKey("byok", USER_KEY, last4="uuuu"),
              token_id: str = "tok-1") -> Principal:
    return shared_principal("user-1", status=status, key=key, token_id=token_id)


class FakeAuth:
    def __init__(self) -> None:
        self.principals = {
            TOKEN: principal(),
            "gw-token-suspended": principal(status="suspended"),
            "gw-token-keyless": principal(key=None),
            "gw-token-disabled": principal(key=ProviderKey("managed", USER_KEY, disabled=True)),
        }

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer(authorization)
        if token is None:
            raise Unauthorized("Missing platform token.")
        if token not in self.principals:
            raise Unauthorized("Invalid platform token.")
        return self.principals[token]


class FakeResponse:
    """An upstream response whose body is fed by the test through a queue."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: list[bytes] | None = None,
                 *, live: bool = False) -> None:
        self.status, self.headers = status, headers
        self.queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()
        self.closed = 0
        self.pulled = 0
        for part in body or []:
            self.queue.put_nowait(part)
        if not live:
            self.queue.put_nowait(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            part = await self.queue.get()
            if part is None:
                return
            if isinstance(part, Exception):
                raise part
            self.pulled += 1
            yield part

    async def read(self) -> bytes:
        return b"".join([part async for part in self.chunks()])

    async def close(self) -> None:
        self.closed += 1


class FakeTransport:
    def __init__(self, *responses: FakeResponse | Exception) -> None:
        self.responses = list(responses)
        self.sent: list[dict[str, Any]] = []

    async def send(self, method: str, url: str, headers: Any, body: bytes | None) -> FakeResponse:
        self.sent.append({"method": method, "url": url, "headers": dict(headers), "body": body})
        response = self.responses.pop(0)
        if isinstance(response, Exception):
            raise response
        return response

    async def close(self) -> None:
        return None


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[Principal, ProxyRequest, Observation]] = []
        self.charges: list[Charge] = []

    def record(self, principal: Principal, request: ProxyRequest, observation: Observation, charge: Charge) -> None:
        self.records.append((principal, request, observation))
        self.charges.append(charge)


class Ticket:
    def __init__(self) -> None:
        self.released: list[Charge | None] = []

    def release(self, charge: Charge | None) -> None:
        self.released.append(charge)


class State:
    """The emergency stop's shared value, in memory."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def get(self, name: str) -> str | None:
        return self.values.get(name)

    async def set(self, name: str, value: str) -> None:
        self.values[name] = value


class Admission:
    def __init__(self, refuse: Exception | None = None) -> None:
        self.refuse = refuse
        self.tickets: list[Ticket] = []

    async def admit(self, principal: Principal, request: ProxyRequest) -> Ticket:
        if self.refuse is not None:
            raise self.refuse
        ticket = Ticket()
        self.tickets.append(ticket)
        return ticket


class Client:
    """The ASGI side of one connection: the request body, then silence until it goes away."""

    def __init__(self, body: bytes | list[bytes]) -> None:
        parts = body if isinstance(body, list) else [body]
        self.pending = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
                        for i, p in enumerate(parts)]
        self.receives = 0
        self.gone = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self.on_send: Any = None

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        if self.pending:
            return self.pending.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if self.on_send is not None:
            self.on_send(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return self.sent[0]["headers"]

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    def error(self) -> dict[str, Any]:
        return orjson.loads(self.body)["error"]


class Harness:
    def __init__(self, *responses: FakeResponse | Exception, admission: Admission | None = None,
                 attribution: dict[str, str] | None = None, max_body_bytes: int = 4096,
                 request_timeout_s: float = 600, stream_idle_timeout_s: float = 120) -> None:
        self.transport = FakeTransport(*responses)
        self.sleeps: list[float] = []
        self.recorder = Recorder()
        self.admission = admission or Admission()
        self.stop = EmergencyStop(State())  # type: ignore[arg-type]
        self.streams: dict[str, Any] = {}

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        self.endpoint = ProxyEndpoint(
            "/chat/completions",
            auth=FakeAuth(),  # type: ignore[arg-type]
            upstream=UpstreamClient(self.transport, BASE, retries=2, sleep=sleep, jitter=lambda: 0.0),
            stop=self.stop,
            max_body_bytes=max_body_bytes,
            attribution=attribution if attribution is not None else {
                "HTTP-Referer": "https://platform.example", "X-OpenRouter-Title": "Platform"},
            pricing=Pricing(Config(), lambda requested, served: False),
            admission=self.admission,
            recorder=self.recorder,
            streams=self.streams,
            request_timeout_s=request_timeout_s,
            stream_idle_timeout_s=stream_idle_timeout_s,
        )

    async def request(self, body: bytes | list[bytes] = CHAT, *, token: str | None = TOKEN,
                      content_type: bytes | None = b"application/json", headers: list[tuple[bytes, bytes]] = (),
                      client: Client | None = None) -> Client:
        client = client or Client(body)
        scope_headers = list(headers)
        if token is not None:
            scope_headers.append((b"authorization", b"Bearer " + token.encode()))
        if content_type is not None:
            scope_headers.append((b"content-type", content_type))
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": scope_headers,
                 "state": {"request_id": "req_test"}}
        await self.endpoint(scope, client.receive, client.send)
        return client


def ok(body: bytes = COMPLETION, **extra: str) -> FakeResponse:
    headers = [("content-type", "application/json"), ("x-generation-id", "gen-1"), *extra.items()]
    return FakeResponse(200, headers, [body])


def sse(parts: list[bytes] = STREAM, *, live: bool = False) -> FakeResponse:
    return FakeResponse(200, [("content-type", "text/event-stream"), ("x-generation-id", "gen-2")], parts, live=live)


# ---------------------------------------------------------------- refused before forwarding


REFUSED = [
    pytest.param({"token": None}, 401, "Missing platform token", None, id="no-token"),
    pytest.param({"token": "gw-nobody"}, 401, "Invalid platform token", None, id="unknown-token"),
    pytest.param({"token": "gw-nobody", "content_type": b"text/plain"}, 401, "Invalid", None, id="auth-first"),
    pytest.param({"token": "gw-token-suspended"}, 403, "suspended", None, id="suspended"),
    pytest.param({"token": "gw-token-keyless"}, 402, "PUT /v1/account/openrouter-key", None, id="no-key"),
    pytest.param({"token": "gw-token-disabled"}, 402, "disabled", None, id="key-disabled"),
    pytest.param({"content_type": b"text/plain"}, 415, "application/json (got text/plain)", None, id="text-plain"),
    pytest.param({"content_type": None}, 415, "(got none)", None, id="no-content-type"),
    pytest.param({"content_type": b"application/jsonx"}, 415, "application/json", None, id="json-lookalike"),
    pytest.param({"body": b"{"}, 400, "not valid JSON", None, id="malformed"),
    pytest.param({"body": b'{"model": "a"} trailing'}, 400, "not valid JSON", None, id="trailing-garbage"),
    pytest.param({"body": b"\xff\xfe{}"}, 400, "not valid JSON", None, id="not-utf8"),
    pytest.param({"body": b"null"}, 400, "JSON object", None, id="null"),
    pytest.param({"body": b'{"model": ["a"]}'}, 400, "`model` must be a string", "model", id="model-list"),
    pytest.param({"body": b'{"model": "a", "stream": 1}'}, 400, "`stream` must be true or false", "stream",
                 id="stream-number"),
    pytest.param({"headers": [(b"content-length", b"lots")]}, 400, "Content-Length", None, id="bad-length"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("options", "status", "says", "param"), REFUSED)
async def test_refused_requests_name_the_problem_and_touch_nothing(options, status, says, param):
    harness = Harness(ok())
    client = await harness.request(**options)
    assert client.status == status
    error = client.error()
    assert says in error["message"] and error["code"] == status and error["param"] == param
    assert client.header(b"x-request-id") == b"req_test"
    assert harness.transport.sent == [] and harness.recorder.records == []


@pytest.mark.anyio
async def test_emergency_stop_comes_before_everything_but_the_token():
    harness = Harness(ok())
    harness.stop.enabled, harness.stop.reason = True, "maintenance"
    client = await harness.request(token="gw-token-keyless", content_type=b"text/plain")
    assert client.status == 503 and client.header(b"retry-after") == b"30"
    assert "(reason: maintenance)" in client.error()["message"] and harness.transport.sent == []


@pytest.mark.anyio
async def test_declared_oversize_body_is_refused_without_reading_it():
    harness = Harness(ok(), max_body_bytes=1024)
    client = Client(b"x" * 5000)
    await harness.request(client=client, headers=[(b"content-length", b"5000")])
    assert client.status == 413 and "limit is 1024 (server.max_body_bytes)" in client.error()["message"]
    assert client.receives == 0 and harness.transport.sent == []


@pytest.mark.anyio
async def test_undeclared_oversize_body_stops_at_the_limit():
    harness = Harness(ok(), max_body_bytes=1024)
    client = Client([b"{" + b" " * 599] + [b" " * 600] * 20)
    await harness.request(client=client)
    assert client.status == 413 and client.receives == 2 and harness.transport.sent == []


@pytest.mark.anyio
async def test_body_in_pieces_is_forwarded_whole():
    harness = Harness(ok())
    await harness.request([CHAT[:10], CHAT[10:11], b"", CHAT[11:]])
    assert harness.transport.sent[0]["body"] == CHAT


@pytest.mark.anyio
async def test_client_leaving_mid_body_is_a_400_with_nothing_sent():
    harness = Harness(ok())
    client = Client([CHAT[:10]])
    client.pending[0]["more_body"] = True
    client.gone.set()
    await harness.request(client=client)
    assert client.status == 400 and "went away" in client.error()["message"] and harness.transport.sent == []


@pytest.mark.anyio
async def test_admission_refusal_passes_its_status_and_headers():
    harness = Harness(ok(), admission=Admission(RateLimited("Too many requests.", headers={"Retry-After": "12"})))
    client = await harness.request()
    assert client.status == 429 and client.header(b"retry-after") == b"12"
    assert harness.transport.sent == [] and harness.recorder.records == []


# ---------------------------------------------------------------- what goes upstream


@pytest.mark.anyio
async def test_upstream_gets_the_body_as_sent_the_users_key_and_only_allowed_headers():
    raw = b'{ "model":"openai/gpt-4o-mini" ,"messages":[], "x": 1.000000000000000001 }'
    harness = Harness(ok())
    await harness.request(raw, headers=[
        (b"user-agent", b"OpenAI/Python 1.0"), (b"x-session-id", b"s-1"), (b"cookie", b"session=secret"),
        (b"x-forwarded-for", b"10.0.0.1"), (b"accept-encoding", b"gzip"), (b"accept", b"application/json")])
    sent = harness.transport.sent[0]
    assert sent["method"] == "POST" and sent["url"] == f"{BASE}/chat/completions" and sent["body"] == raw
    assert sent["headers"] == {
        "content-type": "application/json", "accept-encoding": "identity", "user-agent": "OpenAI/Python 1.0",
        "x-session-id": "s-1", "accept": "application/json", "http-referer": "https://platform.example",
        "x-openrouter-title": "Platform", "authorization": f"Bearer {USER_KEY}"}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("client_headers", "expected"),
    [
        ([(b"x-title", b"Legacy")], {"x-title": "Legacy", "http-referer": "https://platform.example"}),
        ([(b"x-openrouter-title", b"New"), (b"http-referer", b"https://app.example")],
         {"x-openrouter-title": "New", "http-referer": "https://app.example"}),
    ],
)
async def test_client_attribution_wins_over_config(client_headers, expected):
    harness = Harness(ok())
    await harness.request(headers=client_headers)
    headers = harness.transport.sent[0]["headers"]
    assert {k: headers.get(k) for k in ("x-title", "x-openrouter-title", "http-referer") if k in headers} == expected


@pytest.mark.anyio
async def test_no_attribution_configured_sends_none():
    harness = Harness(ok(), attribution={"HTTP-Referer": "", "X-OpenRouter-Title": ""})
    await harness.request()
    assert not {"http-referer", "x-openrouter-title", "x-title"} & set(harness.transport.sent[0]["headers"])


# ---------------------------------------------------------------- what comes back


@pytest.mark.anyio
async def test_json_response_passes_through_with_clean_headers_and_is_observed():
    upstream = ok(**{"set-cookie": "__cf_bm=abc", "connection": "keep-alive", "transfer-encoding": "chunked",
                     "content-length": "9999", "x-request-id": "upstream-id", "authorization": "Bearer x",
                     "cf-ray": "8a1b"})
    harness = Harness(upstream)
    client = await harness.request()
    assert client.status == 200 and client.body == COMPLETION
    names = [n for n, _ in client.headers]
    assert names.count(b"x-request-id") == 1 and client.header(b"x-request-id") == b"req_test"
    assert client.header(b"content-length") == str(len(COMPLETION)).encode()
    assert client.header(b"x-generation-id") == b"gen-1" and client.header(b"cf-ray") == b"8a1b"
    assert not {b"set-cookie", b"connection", b"transfer-encoding", b"authorization"} & set(names)
    assert upstream.closed == 1
    [(_, request, observation)] = harness.recorder.records
    assert request.status == 200 and not request.stream and not request.cancelled
    assert observation.generation_id == "gen-1" and observation.usage["cost"] == Decimal("0.0000015")
    assert harness.admission.tickets[0].released == harness.recorder.charges  # one charge, counted by both
    assert harness.recorder.charges[0].provider_cost == Decimal("0.0000015")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "upstream_message", "hint"),
    [
        (400, "No models provided", "https://openrouter.ai/settings/preferences"),
        (404, "No endpoints found matching your data policy (Paid model training).", "settings/privacy"),
        (404, "No endpoints for x/y match your data policy (zero data retention).", "settings/privacy"),
    ],
)
async def test_upstream_errors_keep_status_and_get_the_settings_hint(status, upstream_message, hint):
    body = orjson.dumps({"error": {"code": status, "message": upstream_message, "metadata": {"error_type": "x"}}})
    harness = Harness(FakeResponse(status, [("content-type", "text/plain")], [body]))
    client = await harness.request()
    assert client.status == status and client.header(b"content-type") == b"application/json"
    error = client.error()
    assert error["message"].startswith(upstream_message) and hint in error["message"]
    assert error["code"] == status and error["metadata"] == {"error_type": "x"}
    assert harness.recorder.records == []  # no generation id: nothing to account


@pytest.mark.anyio
async def test_non_json_upstream_error_still_gets_the_envelope():
    harness = Harness(*(FakeResponse(502, [("content-type", "text/html")], [b"<html>bad gateway</html>"])
                        for _ in range(3)))
    client = await harness.request()
    assert client.status == 502 and client.error() == {
        "message": "upstream returned HTTP 502: <html>bad gateway</html>", "type": "upstream_error",
        "code": 502, "param": None}
    assert len(harness.transport.sent) == 3 and harness.sleeps == [1.0, 2.0]  # the first try and 2 retries


@pytest.mark.anyio
async def test_retryable_statuses_are_retried_before_anything_reaches_the_client():
    busy = FakeResponse(503, [("retry-after", "2")], [b"{}"])
    harness = Harness(busy, FakeResponse(429, [], [b"{}"]), ok())
    client = await harness.request()
    assert client.status == 200 and len(harness.transport.sent) == 3 and harness.sleeps == [2.0, 2.0]
    assert busy.closed == 1


@pytest.mark.anyio
async def test_unreachable_upstream_is_a_502_without_secrets():
    harness = Harness(*(UpstreamConnectionError("cannot reach upstream: ClientConnectorError", sent=False),) * 3)
    client = await harness.request()
    assert client.status == 502 and "OpenRouter could not be reached" in client.error()["message"]
    assert USER_KEY not in client.body.decode() and TOKEN not in client.body.decode()
    assert len(harness.transport.sent) == 3 and harness.sleeps == [1.0, 2.0]
    assert harness.recorder.records == [] and harness.admission.tickets[0].released == [None]


@pytest.mark.anyio
@pytest.mark.parametrize("timed_out", [True, False])
async def test_a_request_that_may_have_reached_the_upstream_is_not_sent_again(timed_out):
    harness = Harness(UpstreamConnectionError("upstream did not answer: X", timeout=timed_out), ok())
    client = await harness.request()
    assert client.status == (504 if timed_out else 502)
    assert "the generation may still have run" in client.error()["message"]
    assert len(harness.transport.sent) == 1 and harness.sleeps == []


@pytest.mark.anyio
async def test_body_breaking_off_is_a_502():
    broken = FakeResponse(200, [("content-type", "application/json")], [b'{"id":', UpstreamConnectionError("reset")])
    harness = Harness(broken)
    client = await harness.request()
    assert client.status == 502 and "may still have run" in client.error()["message"] and broken.closed == 1


# ---------------------------------------------------------------- streams


@pytest.mark.anyio
async def test_stream_chunks_pass_unchanged_and_in_order():
    harness = Harness(sse())
    seen_in_flight = []
    client = Client(orjson.dumps({"model": "m", "stream": True}))
    client.on_send = lambda message: seen_in_flight.append(len(harness.streams))
    await harness.request(client=client)
    assert client.status == 200 and client.header(b"content-type") == b"text/event-stream"
    assert client.header(b"content-length") is None
    bodies = client.sent[1:]
    assert [m["body"] for m in bodies[:-1]] == STREAM and all(m["more_body"] for m in bodies[:-1])
    assert bodies[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert seen_in_flight[1:-1] == [1] * len(STREAM) and harness.streams == {}
    [(_, request, observation)] = harness.recorder.records
    assert request.stream and not request.cancelled
    assert observation.usage == {"total_tokens": 4, "cost": Decimal("0.0000015")}
    assert observation.bytes == sum(map(len, STREAM)) and observation.generation_id == "gen-2"


@pytest.mark.anyio
async def test_client_disconnect_closes_the_upstream_at_once():
    upstream = sse(STREAM[:2], live=True)  # more would come, but never does
    harness = Harness(upstream)
    client = Client(orjson.dumps({"model": "m", "stream": True}))

    def leave_after_two(message: dict[str, Any]) -> None:
        if len(client.sent) == 3:
            client.gone.set()

    client.on_send = leave_after_two
    await asyncio.wait_for(harness.request(client=client), 5)
    assert upstream.closed == 1 and [m["body"] for m in client.sent[1:]] == STREAM[:2]
    [(_, request, observation)] = harness.recorder.records
    assert request.cancelled and observation.generation_id == "gen-2"
    assert harness.streams == {} and harness.admission.tickets[0].released == harness.recorder.charges


@pytest.mark.anyio
async def test_stream_breaking_mid_way_ends_the_response_and_is_not_retried():
    upstream = sse([STREAM[0], STREAM[1], UpstreamConnectionError("reset")])
    harness = Harness(upstream, ok())
    client = await harness.request(orjson.dumps({"model": "m", "stream": True}))
    assert client.body == STREAM[0] + STREAM[1] and client.sent[-1]["more_body"] is False
    assert len(harness.transport.sent) == 1 and upstream.closed == 1
    [(_, request, observation)] = harness.recorder.records
    assert not request.cancelled and observation.usage is None


class SlowTransport(FakeTransport):
    """Headers only after `delay` seconds (an upstream still generating a non-streamed answer)."""

    def __init__(self, delay: float, *responses: FakeResponse) -> None:
        super().__init__(*responses)
        self.delay, self.cancelled = delay, 0

    async def send(self, method: str, url: str, headers: Any, body: bytes | None) -> FakeResponse:
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return await super().send(method, url, headers, body)


def cut_event(client: Client) -> dict[str, Any]:
    last = client.sent[-2]["body"]
    assert last.startswith(b"data: ") and last.endswith(b"\n\n") and client.sent[-1]["more_body"] is False
    return orjson.loads(last[6:])


@pytest.mark.anyio
async def test_a_stream_idle_past_its_bound_ends_with_openrouters_mid_stream_error():
    upstream = sse(STREAM[:2], live=True)  # the upstream stalls after two chunks
    harness = Harness(upstream, stream_idle_timeout_s=0.05)
    client = await asyncio.wait_for(harness.request(orjson.dumps({"model": "m", "stream": True})), 5)
    event = cut_event(client)
    assert event["error"]["code"] == 504 and "upstream.stream_idle_timeout_s" in event["error"]["message"]
    assert event["error"]["metadata"] == {"error_type": "timeout"} and event["id"] == "gen-2"
    assert event["choices"] == [{"index": 0, "finish_reason": "error", "delta": {"content": ""}}]
    assert event["object"] == "chat.completion.chunk" and event["model"] == "openai/gpt-4o-mini"
    assert upstream.closed == 1 and harness.streams == {}
    [(_, request, observation)] = harness.recorder.records
    assert request.cancelled and observation.finish_reason == "error" and observation.generation_id == "gen-2"


@pytest.mark.anyio
async def test_a_stream_whose_chunks_keep_coming_is_cut_at_the_request_timeout():
    upstream = sse([STREAM[0]], live=True)
    harness = Harness(upstream, request_timeout_s=0.3, stream_idle_timeout_s=0.1)

    async def trickle() -> None:  # a chunk every 20 ms, never idle, never done
        while True:
            await asyncio.sleep(0.02)
            upstream.queue.put_nowait(STREAM[0])

    feeding = asyncio.create_task(trickle())
    try:
        client = await asyncio.wait_for(harness.request(orjson.dumps({"model": "m", "stream": True})), 5)
    finally:
        feeding.cancel()
    event = cut_event(client)
    assert event["error"]["code"] == 504 and "server.request_timeout_s" in event["error"]["message"]
    assert upstream.closed == 1 and len(client.sent) > 8  # it streamed until the total bound
    [(_, request, observation)] = harness.recorder.records
    assert request.cancelled and observation.finish_reason == "error"


@pytest.mark.anyio
async def test_a_half_sent_event_is_closed_before_the_error_event():
    upstream = sse([STREAM[0], b'data: {"id":"gen-2","choices":[{"ind'], live=True)
    harness = Harness(upstream, stream_idle_timeout_s=0.05)
    client = await asyncio.wait_for(harness.request(orjson.dumps({"model": "m", "stream": True})), 5)
    assert client.sent[-2]["body"].startswith(b"\n\ndata: {")


@pytest.mark.anyio
async def test_a_non_streamed_request_past_the_request_timeout_is_a_504_and_closes_the_upstream():
    transport = SlowTransport(10, ok())
    harness = Harness(request_timeout_s=0.05)
    harness.endpoint.upstream.transport = transport
    client = await asyncio.wait_for(harness.request(), 5)
    assert client.status == 504 and "server.request_timeout_s" in client.error()["message"]
    assert "may still have run" in client.error()["message"]
    assert transport.cancelled == 1 and harness.recorder.records == []
    assert harness.admission.tickets[0].released == [None]


@pytest.mark.anyio
async def test_a_client_leaving_a_non_streamed_request_cancels_the_upstream_call_at_once():
    transport = SlowTransport(10, ok())
    harness = Harness()
    harness.endpoint.upstream.transport = transport
    client = Client(CHAT)
    asyncio.get_running_loop().call_later(0.05, client.gone.set)
    await asyncio.wait_for(harness.request(client=client), 1)
    assert transport.cancelled == 1 and client.sent == []  # nobody to answer
    assert harness.admission.tickets[0].released == [None]


@pytest.mark.anyio
async def test_a_client_leaving_after_the_headers_still_has_the_generation_recorded():
    upstream = FakeResponse(200, [("content-type", "application/json"), ("x-generation-id", "gen-9")],
                            [b'{"id":'], live=True)  # the body never completes
    harness = Harness(upstream)
    client = Client(CHAT)
    asyncio.get_running_loop().call_later(0.05, client.gone.set)
    await asyncio.wait_for(harness.request(client=client), 1)
    assert upstream.closed == 1 and client.sent == []
    [(_, request, observation)] = harness.recorder.records
    assert request.cancelled and observation.generation_id == "gen-9"
    assert harness.admission.tickets[0].released == harness.recorder.charges


@pytest.mark.anyio
async def test_read_body_refuses_a_declared_size_before_reading():
    async def receive() -> dict[str, Any]:
        raise AssertionError("must not read")

    with pytest.raises(Exception) as refused:
        await read_body(receive, b"2049", 2048)
    assert getattr(refused.value, "status", None) == 413
