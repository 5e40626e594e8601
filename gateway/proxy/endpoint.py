"""The completions path: admit → forward → pass the response through, observing it.

Written as a raw ASGI endpoint because it is the hot path: one JSON parse of the request
body, none of a streamed response, no per-request objects a cached one can serve. The
checks run cheapest first (SPEC §6). Limits and accounting plug in through two small
protocols (`Admission`, `Recorder`) so this module never imports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable, Iterator

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
from gateway.core.ids import new_request_id
from gateway.core.metrics import Metrics
from gateway.proxy.body import read_body
from gateway.proxy.sse import Observation, StreamObserver, error_event, observe_body
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
    header,
)

log = logging.getLogger("gateway.proxy.endpoint")
# A request still waiting on the upstream after this long gets a task watching for its client leaving
WATCH_AFTER_S = 0.05


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
        request_timeout_s: float = 600,
        stream_idle_timeout_s: float = 120,
        metrics: Metrics | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.metrics = metrics or Metrics()
        self.request_timeout_s = request_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
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
        ticket get the same charge (the ticket lets go with None when nothing was generated).

        Bounded: the whole request by `request_timeout_s`, the gaps of a stream by `stream_idle_timeout_s`.
        A client that leaves closes the upstream call at once (`_Departure`: ASGI tells of it only through
        `receive()`, watched by a task once the wait lasts). A generation the upstream may bill is recorded
        whenever its id is known."""
        assert principal.key is not None
        observation = Observation()
        charge: Charge | None = None
        deadline = asyncio.get_running_loop().time() + self.request_timeout_s
        departure = _Departure(receive)
        response: UpstreamResponse | None = None
        metrics = self.metrics
        sent = self.clock()
        try:
            try:
                with departure.cancelling():
                    async with asyncio.timeout_at(deadline):
                        response = await self.upstream.open(
                            "POST", self.endpoint, key=principal.key.secret, body=request.raw,
                            headers=self._upstream_headers(scope),
                        )
                        request.status = response.status
                        request.first_byte = self.clock()
                        if response.status >= 400:
                            metrics.observe_upstream_error(_error_kind(response.status), sent,
                                                           f"{response.status} from {self.endpoint}")
                        observation.generation_id = header(response, "x-generation-id")
                        is_sse = request.status == 200 and (header(response, "content-type") or "").startswith(
                            "text/event-stream")
                        raw = None if is_sse else await response.read()
            except (UpstreamConnectionError, TimeoutError, asyncio.CancelledError) as exc:
                if isinstance(exc, UpstreamConnectionError):
                    metrics.observe_upstream_error("broken" if request.status else "connection", sent, str(exc))
                error = self._ended_early(exc, departure, request, observation)
                if error is not None:
                    await send_error(send, error, request.request_id)
                return
            out_headers = [(b"x-request-id", request.request_id.encode())]
            out_headers.extend((name.encode("latin-1"), value.encode("latin-1"))
                               for name, value in response.headers if name not in DROPPED_RESPONSE_HEADERS)
            if raw is None:
                await self._pass_stream(send, principal, request, response, out_headers, observation, departure,
                                        deadline)
            else:
                await self._pass_body(send, request, response, raw, out_headers, observation)
        finally:
            departure.close()
            if response is not None:
                await response.close()
            request.ended = self.clock()
            if request.status == 200 or observation.generation_id:
                charge = self.pricing.charge(principal, request, observation)
                self.recorder.record(principal, request, observation, charge)
            if request.first_byte is not None:  # overhead: the whole request less the wait on the upstream
                metrics.observe_proxy(request.first_byte - sent, (sent - request.started) + (self.clock() - request.ended))
            ticket.release(charge)

    def _ended_early(self, exc: BaseException, departure: "_Departure", request: ProxyRequest,
                     observation: Observation) -> GatewayError | None:
        """Before a byte reached the client: the error to answer with (None when the client has left)."""
        if isinstance(exc, UpstreamConnectionError):
            error = upstream_failure(exc)
        elif isinstance(exc, TimeoutError):
            error = GatewayTimeout(f"OpenRouter did not finish within {self.request_timeout_s:g} s "
                                   "(server.request_timeout_s)." + MAY_HAVE_RUN)
        else:  # cancelled: the client left, or the server's shutdown grace ran out
            _uncancel()
            if departure.gone:
                request.cancelled = True
                return None
            error = ServiceUnavailable("The gateway is shutting down." + MAY_HAVE_RUN, headers={"retry-after": "1"})
        if request.status == 200:  # headers came but not the whole body: a generation to look up
            request.cancelled, observation.finish_reason = True, "error"
        request.status = error.status
        return error

    async def _pass_body(
        self,
        send: Send,
        request: ProxyRequest,
        response: UpstreamResponse,
        raw: bytes,
        headers: list[tuple[bytes, bytes]],
        observation: Observation,
    ) -> None:
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
        send: Send,
        principal: Principal,
        request: ProxyRequest,
        response: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        observation: Observation,
        departure: "_Departure",
        deadline: float,
    ) -> None:
        """Write each chunk as it arrives. A client that goes away closes the upstream at once; a stream the
        gateway cuts (an idle gap, the total time, the shutdown grace) ends with an SSE error event."""
        observer = StreamObserver(observation)
        stream_id = request.request_id
        self.streams[stream_id] = StreamInFlight(principal.user_id, request.model, request.started, observation)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        pump = _Pump(send, response, observer, self.metrics)
        watcher = departure.watch()  # a stream is watched for its whole length
        pumping = asyncio.create_task(pump.run())
        cut: tuple[int, str, str] | None = None
        client_left = False
        try:
            cut = await self._watch(pumping, watcher, pump, deadline)
            client_left = cut is None and not pumping.done()
        except asyncio.CancelledError:  # the server's shutdown grace ran out: end the stream properly
            _uncancel()
            cut = (503, "The gateway is shutting down; the stream was ended.", "server_shutdown")
        finally:
            for task in (pumping, watcher):
                if not task.done():
                    task.cancel()
            await asyncio.gather(pumping, watcher, return_exceptions=True)
            self.streams.pop(stream_id, None)
            observer.finish()
        if client_left:
            request.cancelled = True
            return
        if cut is not None:
            code, message, kind = cut
            request.cancelled = True
            observation.finish_reason = "error"
            observation.error = {"code": code, "message": message}
            event = error_event(observation, self.endpoint, code, message, kind, self.clock())
            await send({"type": "http.response.body", "body": pump.event_break() + event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _watch(self, pumping: asyncio.Task[None], watcher: asyncio.Task[None], pump: _Pump,
                     deadline: float) -> tuple[int, str, str] | None:
        """Wait for the stream to end or the client to leave; the bounds are checked only when a wait runs
        out (one timer per idle period, none per chunk): the error to end the stream with, if cut."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            idle_at = pump.last + self.stream_idle_timeout_s
            if now >= deadline:
                return 504, (f"The stream ran longer than {self.request_timeout_s:g} s "
                             "(server.request_timeout_s); the gateway ended it."), "timeout"
            if now >= idle_at:
                return 504, (f"OpenRouter sent nothing for {self.stream_idle_timeout_s:g} s "
                             "(upstream.stream_idle_timeout_s); the gateway ended the stream."), "timeout"
            done, _ = await asyncio.wait((pumping, watcher), timeout=min(idle_at, deadline) - now,
                                         return_when=asyncio.FIRST_COMPLETED)
            if done:
                return None


class _Pump:
    """Copies the upstream stream to the client, noting when it last waited for the upstream."""

    __slots__ = ("send", "response", "observer", "metrics", "last", "_tail")

    def __init__(self, send: Send, response: UpstreamResponse, observer: StreamObserver, metrics: Metrics) -> None:
        self.send, self.response, self.observer, self.metrics = send, response, observer, metrics
        self.last = asyncio.get_running_loop().time()
        self._tail = b"\n\n"

    async def run(self) -> None:
        now = asyncio.get_running_loop().time
        try:
            async for chunk in self.response.chunks():
                self.observer.feed(chunk)
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
                self.last, self._tail = now(), chunk
        except UpstreamConnectionError as exc:
            # Bytes already reached the client: the stream just ends; accounting still sees it.
            log.warning("upstream stream broke mid-way: %s", exc)
            self.metrics.observe_upstream_error("broken", time.time(), str(exc))

    def event_break(self) -> bytes:
        """What ends the event the client has half received, so an appended event parses on its own."""
        return b"" if self._tail.endswith(b"\n\n") else b"\n\n"


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


class _Departure:
    """Whether the client has left, and, while the request waits on the upstream, cancelling its task when
    it does, so the upstream call it awaits is closed at once.

    ASGI tells of a departure only through `receive()`, so a task must await it; most answers come
    sooner than `WATCH_AFTER_S`, and for those no task is ever made: only a timer, cancelled with
    the answer. A client that leaves earlier is noticed when the watch starts (its `receive()`
    answers at once)."""

    __slots__ = ("_receive", "_task", "_timer", "_cancels", "watcher")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task = asyncio.current_task()
        self._cancels = False
        self.watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self.watch)

    def watch(self) -> asyncio.Task[None]:
        """The watcher, started now if it is not yet."""
        if self.watcher is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.watcher = asyncio.ensure_future(_wait_disconnect(self._receive))
            self.watcher.add_done_callback(self._left)
        return self.watcher

    def _left(self, watcher: "asyncio.Task[None]") -> None:
        if self._cancels and not watcher.cancelled() and self._task is not None:
            self._task.cancel()

    @property
    def gone(self) -> bool:
        return self.watcher is not None and self.watcher.done() and not self.watcher.cancelled()

    @contextlib.contextmanager
    def cancelling(self) -> Iterator[None]:
        """Inside, the client leaving cancels the request's task."""
        self._cancels = True
        try:
            yield
        finally:
            self._cancels = False

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()


def _uncancel() -> None:
    """A cancellation the proxy handled (it answered the client): the task carries on as not cancelled."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


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
    return new_request_id()


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
