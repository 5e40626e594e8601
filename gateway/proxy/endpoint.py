"""The completions path: admit → forward → pass the response through, observing it.

Written as a raw ASGI endpoint because it is the hot path: one JSON parse of the request
body, none of a streamed response, no per-request objects a cached one can serve. The
checks run cheapest first (SPEC §6). Limits and accounting plug in through two small
protocols (`Admission`, `Recorder`) so this module never imports them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Callable

import orjson

from gateway.auth.tokens import Authenticator, Principal
from gateway.core.errors import (
    BadGateway,
    BadRequest,
    Forbidden,
    GatewayError,
    GatewayTimeout,
    PaymentRequired,
    ServiceUnavailable,
    UnsupportedMediaType,
    upstream_error_body,
)
from gateway.core.metrics import Metrics
from gateway.proxy.body import read_body
from gateway.proxy.sse import Observation, StreamObserver, observe_body
from gateway.proxy.stop import EmergencyStop
from gateway.proxy.types import (
    Admission,
    AsSent,
    BodyPreparer,
    Charge,
    DiscardRecorder,
    OpenAdmission,
    Pricing,
    ProxyRequest,
    Receive,
    Recorder,
    Scope,
    Send,
    StreamInFlight,
    Ticket,
)
from gateway.upstream.client import (
    UpstreamClient,
    UpstreamConnectionError,
    UpstreamResponse,
)

log = logging.getLogger("gateway.proxy.endpoint")


# Request headers a client may pass on to OpenRouter; everything else (its platform token
# above all) stays here.
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        b"accept",
        b"http-referer",
        b"x-title",
        b"x-openrouter-title",
        b"x-openrouter-categories",
        b"x-openrouter-metadata",
        b"x-openrouter-experimental-metadata",
        b"x-session-id",
        b"user-agent",
    }
)
# Response headers never passed back: hop-by-hop, framing we redo, and anything with a key.
DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "set-cookie",
        "authorization",
        "x-api-key",
        "server",
        "date",
        "x-request-id",  # ours identifies the request; a second one would confuse the client
    }
)
NO_KEY_MESSAGE = (
    "No OpenRouter key is connected to your account. Add yours with "
    "`PUT /v1/account/openrouter-key {\"api_key\": \"sk-or-...\"}`, or ask your admin to provision one."
)


# What `_admit` checks of a proxied body before forwarding it as sent (the OpenAPI description uses it).
REQUEST_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string", "description": "e.g. openai/gpt-4o-mini; absent = the user's default_model"},
        "stream": {"type": "boolean"},
        "messages": {"type": "array", "items": {"type": "object"}},
        "max_tokens": {"type": "integer", "minimum": 1},
    },
    "additionalProperties": True,
}


class ProxyEndpoint:
    def __init__(
        self,
        endpoint: str,
        *,
        auth: Authenticator,
        upstream: UpstreamClient,
        stop: EmergencyStop,
        max_body_bytes: int,
        attribution: dict[str, str],
        pricing: Pricing,
        admission: Admission | None = None,
        recorder: Recorder | None = None,
        preparer: BodyPreparer | None = None,
        streams: dict[str, StreamInFlight] | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.metrics = metrics or Metrics()
        self.auth = auth
        self.upstream = upstream
        self.stop = stop
        self.max_body_bytes = max_body_bytes
        self.attribution = {k.lower(): v for k, v in attribution.items() if v}
        self.admission = admission or OpenAdmission()
        self._admit_now: Callable[[Principal, ProxyRequest], Ticket] | None = getattr(
            self.admission, "admit_now", None)
        self.pricing = pricing
        self.recorder = recorder or DiscardRecorder()
        self.preparer = preparer or AsSent()
        self.streams = streams if streams is not None else {}
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = _request_id(scope)
        started = self.clock()
        try:
            principal, request, ticket = await self._admit(scope, receive, request_id, started)
        except GatewayError as error:
            limit = refused_limit(error)
            if limit is not None:
                self.metrics.observe_refusal(limit, started, error.status, None, error.message)
            await send_error(send, error, request_id)
            return
        await self._forward(scope, receive, send, principal, request, ticket)

    # -- admission ------------------------------------------------------------

    async def _admit(
        self, scope: Scope, receive: Receive, request_id: str, started: float
    ) -> tuple[Principal, ProxyRequest, Ticket]:
        headers = scope["headers"]
        authorization = content_type = content_length = None
        for name, value in headers:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length":
                content_length = value
        principal = await self.auth.authenticate(authorization)
        if self.stop.enabled:
            raise ServiceUnavailable(
                "The gateway is in emergency stop: no requests are forwarded"
                + (f" (reason: {self.stop.reason})." if self.stop.reason else ".")
                + " Try again later.",
                headers={"retry-after": "30"},
            )
        if principal.status != "active":
            raise Forbidden("Your account is suspended; contact the platform's admin.")
        if principal.key is None:
            raise PaymentRequired(NO_KEY_MESSAGE)
        if principal.key.disabled:
            raise PaymentRequired("Your OpenRouter key is disabled by the admin; ask them to enable it.")
        if content_type is None or not content_type.split(b";", 1)[0].strip().lower() == b"application/json":
            raise UnsupportedMediaType(
                "Content-Type must be application/json "
                f"(got {content_type.decode('latin-1') if content_type else 'none'})."
            )
        raw = await read_body(receive, content_length, self.max_body_bytes)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"The request body is not valid JSON: {exc}.") from None
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise BadRequest("`model` must be a string such as \"openai/gpt-4o-mini\".", param="model")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            # A truthy non-boolean would make OpenRouter stream what we would treat as JSON.
            raise BadRequest("`stream` must be true or false (a JSON boolean).", param="stream")
        request = ProxyRequest(
            endpoint=self.endpoint,
            body=body,
            raw=raw,
            model=model,
            stream=stream is True,
            started=started,
            request_id=request_id,
        )
        # The user's defaults fill absent fields before limits see the request (model, max_tokens).
        request.raw = self.preparer.prepare(principal, request)
        if self._admit_now is not None:
            return principal, request, self._admit_now(principal, request)
        return principal, request, await self.admission.admit(principal, request)

    # -- forwarding -----------------------------------------------------------

    def _upstream_headers(self, scope: Scope) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        for name, value in scope["headers"]:
            if name in FORWARDED_REQUEST_HEADERS:
                headers[name.decode("latin-1")] = value.decode("latin-1")
        for name, value in self.attribution.items():
            if name == "x-openrouter-title" and ("x-title" in headers or name in headers):
                continue
            headers.setdefault(name, value)
        return headers

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, principal: Principal, request: ProxyRequest, ticket: Ticket
    ) -> None:
        """Forward, pass the answer through, then price what reached the upstream once: the recorder and the
        ticket get the same charge (the ticket lets go with None when nothing was generated)."""
        assert principal.key is not None
        observation = Observation()
        charge: Charge | None = None
        metrics = self.metrics
        try:
            sent = self.clock()
            try:
                response = await self.upstream.open(
                    "POST", self.endpoint, key=principal.key.secret, body=request.raw,
                    headers=self._upstream_headers(scope),
                )
            except UpstreamConnectionError as exc:
                metrics.observe_upstream_error("connection", sent, str(exc))
                await send_error(send, upstream_failure(exc), request.request_id)
                return
            request.status = response.status
            request.first_byte = self.clock()
            if response.status >= 400:
                metrics.observe_upstream_error(_error_kind(response.status), sent,
                                               f"{response.status} from {self.endpoint}")
            generation_id = None
            out_headers = [(b"x-request-id", request.request_id.encode())]
            for name, value in response.headers:
                if name not in DROPPED_RESPONSE_HEADERS:
                    out_headers.append((name.encode("latin-1"), value.encode("latin-1")))
                if name == "x-generation-id":
                    generation_id = value
            observation.generation_id = generation_id
            is_sse = any(n == "content-type" and v.startswith("text/event-stream") for n, v in response.headers)
            try:
                if response.status == 200 and is_sse:
                    await self._pass_stream(receive, send, principal, request, response, out_headers, observation)
                else:
                    await self._pass_body(send, request, response, out_headers, observation)
            finally:
                await response.close()
                request.ended = self.clock()
                if response.status == 200 or observation.generation_id:
                    charge = self.pricing.charge(principal, request, observation)
                    self.recorder.record(principal, request, observation, charge)
                # overhead: the whole request less the time spent waiting on the upstream
                metrics.observe_proxy(request.first_byte - sent, (sent - request.started) + (self.clock() - request.ended))
        finally:
            ticket.release(charge)

    async def _pass_body(
        self,
        send: Send,
        request: ProxyRequest,
        response: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        observation: Observation,
    ) -> None:
        try:
            raw = await response.read()
        except UpstreamConnectionError as exc:
            error = upstream_failure(exc)
            request.status = error.status
            self.metrics.observe_upstream_error("broken", self.clock(), str(exc))
            await send_error(send, error, request.request_id)
            return
        if response.status >= 400:
            raw = upstream_error_body(response.status, raw)
            headers = [(n, v) for n, v in headers if n != b"content-type"]
            headers.append((b"content-type", b"application/json"))
        else:
            observe_body(raw, observation)
        headers.append((b"content-length", str(len(raw)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": raw})

    async def _pass_stream(
        self,
        receive: Receive,
        send: Send,
        principal: Principal,
        request: ProxyRequest,
        response: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        observation: Observation,
    ) -> None:
        """Write each chunk as it arrives; a client that goes away closes the upstream at once."""
        observer = StreamObserver(observation)
        stream_id = request.request_id
        self.streams[stream_id] = StreamInFlight(principal.user_id, request.model, request.started, observation)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        pump = asyncio.create_task(_pump(send, response, observer, self.metrics, self.clock))
        watcher = asyncio.create_task(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait((pump, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watcher):
                if not task.done():
                    task.cancel()
            await asyncio.gather(pump, watcher, return_exceptions=True)
            self.streams.pop(stream_id, None)
            observer.finish()
        if pump not in done:
            request.cancelled = True
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _pump(send: Send, response: UpstreamResponse, observer: StreamObserver, metrics: Metrics,
                clock: Callable[[], float]) -> None:
    try:
        async for chunk in response.chunks():
            observer.feed(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except UpstreamConnectionError as exc:
        # Bytes already reached the client: the stream just ends; accounting still sees it.
        log.warning("upstream stream broke mid-way: %s", exc)
        metrics.observe_upstream_error("broken", clock(), str(exc))


def _error_kind(status: int) -> str:
    if status == 429:
        return "rate_limited"
    return "server_error" if status >= 500 else "client_error"


def refused_limit(error: GatewayError) -> str | None:
    """The `limit` label of a refusal before forwarding (SPEC §6 order), None for a bad request."""
    if error.metadata and "limit" in error.metadata:
        return str(error.metadata["limit"])
    if isinstance(error, ServiceUnavailable):
        return "emergency_stop"
    if isinstance(error, Forbidden):
        return "suspended"
    if isinstance(error, PaymentRequired):
        return "no_key"
    return None


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


MAY_HAVE_RUN = (
    " The request had been sent, so the generation may still have run and be billed: check "
    "GET /v1/usage (or /v1/generation with the X-Generation-Id, when one was returned) before retrying."
)


def upstream_failure(exc: UpstreamConnectionError) -> GatewayError:
    """504 for a timeout, 502 otherwise; saying so when the generation may have run anyway."""
    if not exc.sent:
        return BadGateway(f"OpenRouter could not be reached ({exc}); nothing was sent. Try again.")
    if exc.timeout:
        return GatewayTimeout(f"OpenRouter did not answer in time ({exc})." + MAY_HAVE_RUN)
    return BadGateway(f"The connection to OpenRouter broke ({exc})." + MAY_HAVE_RUN)


def _request_id(scope: Scope) -> str:
    state = scope.get("state")
    if isinstance(state, dict) and "request_id" in state:
        return state["request_id"]
    return "req_" + secrets.token_hex(8)


async def send_error(send: Send, error: GatewayError, request_id: str) -> None:
    body = error.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    headers.extend((k.lower().encode(), str(v).encode()) for k, v in error.headers.items())
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
