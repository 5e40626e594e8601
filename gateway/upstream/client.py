"""The OpenRouter client: one small transport interface, pooled connections, retries.

`Transport` is the seam: production uses aiohttp (measured fastest under concurrency,
see README "Design notes"), tests hand in `HttpxTransport` over respx or any fake that
implements `send`. Retries happen only before a response is handed to the caller, so
never after a byte reached the client, and a POST (a generation: billed) is retried only
when it provably never reached the upstream (`UpstreamConnectionError.sent` is False):
connection refused, a connect timeout, a pooled connection found closed before the
request was written. A read timeout or a disconnect after sending may have left a
generation running upstream; sending again would make (and bill) a second one.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol

from gateway.core.money import dumps

RETRYABLE_STATUSES = frozenset({429, 502, 503})
# Methods whose repetition changes nothing upstream: any connection failure may be retried.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class UpstreamConnectionError(Exception):
    """The upstream could not be reached or stopped answering (connect/read timeout, reset).

    `sent`: the request may have reached the upstream (False only when it provably did
    not); `timeout`: the upstream was reached but did not answer in time.
    """

    def __init__(self, message: str, *, sent: bool = True, timeout: bool = False) -> None:
        super().__init__(message)
        self.sent = sent
        self.timeout = timeout


def _aiohttp_error(exc: BaseException, where: str) -> UpstreamConnectionError:
    """Classify an aiohttp failure: was the request provably never written?"""
    import aiohttp

    name = type(exc).__name__
    if isinstance(exc, (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError)):
        return UpstreamConnectionError(f"cannot reach upstream: {name}", sent=False)
    if isinstance(exc, aiohttp.ClientConnectionResetError) and "closing transport" in str(exc):
        # aiohttp refuses to write to a transport already closing: no byte went out.
        return UpstreamConnectionError(f"pooled upstream connection was closed: {name}", sent=False)
    timeout = isinstance(exc, asyncio.TimeoutError)
    return UpstreamConnectionError(f"{where}: {name}", timeout=timeout)


def _httpx_error(exc: BaseException, where: str) -> UpstreamConnectionError:
    import httpx

    name = type(exc).__name__
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return UpstreamConnectionError(f"cannot reach upstream: {name}", sent=False)
    return UpstreamConnectionError(f"{where}: {name}", timeout=isinstance(exc, httpx.TimeoutException))


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in upstream order

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises UpstreamConnectionError if the connection breaks."""

    async def read(self) -> bytes: ...

    async def close(self) -> None:
        """Release the connection; safe to call twice and from another task mid-read."""


class Transport(Protocol):
    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> UpstreamResponse: ...

    async def close(self) -> None: ...


def header(response: UpstreamResponse, name: str) -> str | None:
    for key, value in response.headers:
        if key == name:
            return value
    return None


# ---------------------------------------------------------------- aiohttp


class _AiohttpResponse:
    __slots__ = ("_resp", "status", "headers", "_closed")

    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in resp.raw_headers]
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        import aiohttp

        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            raise _aiohttp_error(exc, "upstream connection broke mid-body") from None

    async def read(self) -> bytes:
        import aiohttp

        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            raise _aiohttp_error(exc, "upstream connection broke mid-body") from None

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._resp.content.at_eof():
                self._resp.release()
            else:
                self._resp.close()


class AiohttpTransport:
    def __init__(self, *, pool_size: int = 256, connect_timeout_s: float = 10, read_timeout_s: float = 600) -> None:
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._session: Any = None

    def _open(self) -> Any:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self._pool_size, ttl_dns_cache=300, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_timeout, sock_read=self._read_timeout)
        return aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> UpstreamResponse:
        import aiohttp

        if self._session is None:
            self._session = self._open()
        try:
            resp = await self._session.request(method, url, headers=headers, data=body, allow_redirects=False)
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            raise _aiohttp_error(exc, "upstream did not answer") from None
        return _AiohttpResponse(resp)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# ---------------------------------------------------------------- httpx


class _HttpxResponse:
    __slots__ = ("_resp", "status", "headers", "_closed")

    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self.status = resp.status_code
        self.headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in resp.headers.raw]
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        import httpx

        try:
            async for chunk in self._resp.aiter_raw():
                yield chunk
        except (httpx.TransportError, httpx.StreamClosed) as exc:
            raise _httpx_error(exc, "upstream connection broke mid-body") from None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._resp.aclose()


class HttpxTransport:
    """httpx-based transport: used by unit tests (respx) and selectable for comparison."""

    def __init__(
        self,
        *,
        pool_size: int = 256,
        connect_timeout_s: float = 10,
        read_timeout_s: float = 600,
        transport: Any = None,
    ) -> None:
        import httpx

        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s, pool=connect_timeout_s),
            limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
            transport=transport,
        )

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> UpstreamResponse:
        import httpx

        request = self._client.build_request(method, url, headers=headers, content=body)
        try:
            resp = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _httpx_error(exc, "upstream did not answer") from None
        return _HttpxResponse(resp)

    async def close(self) -> None:
        await self._client.aclose()


def make_transport(kind: str, *, pool_size: int, connect_timeout_s: float, read_timeout_s: float) -> Transport:
    """`upstream.client`: h1 (the gateway's own, `gateway.upstream.h1`), aiohttp or httpx."""
    cls: Any
    if kind == "h1":
        from gateway.upstream.h1 import H1Transport as cls
    else:
        cls = AiohttpTransport if kind == "aiohttp" else HttpxTransport
    return cls(pool_size=pool_size, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s)


# ---------------------------------------------------------------- client


def retry_after_seconds(value: str, now: float) -> float | None:
    """A `Retry-After` header (delta-seconds or an HTTP date) as seconds from `now`; None if unreadable."""
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def parse_json(raw: bytes) -> Any:
    """Upstream JSON with every non-integer number as Decimal: money never passes through float."""
    return json.loads(raw, parse_float=Decimal)


class UpstreamClient:
    def __init__(
        self,
        transport: Transport,
        base_url: str,
        *,
        retries: int = 3,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 30.0,
        default_headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.transport = transport
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.default_headers = dict(default_headers or {})
        self._sleep = sleep
        self._jitter = jitter
        self._clock = clock

    def delay(self, attempt: int, retry_after: str | None = None) -> float | None:
        """How long to wait before retry `attempt + 1`, or None to stop retrying.

        Exponential backoff (base × 1, 2, 4 …, capped at `backoff_max_s`) plus up to 25%
        jitter, still capped. A `Retry-After` (seconds or an HTTP date) wins when given; one
        asking for longer than `backoff_max_s` ends the retries, so the caller gets the
        response and its `Retry-After` rather than a request held open only to fail again.
        """
        if retry_after:
            wait = retry_after_seconds(retry_after, self._clock())
            if wait is not None:
                return wait if wait <= self.backoff_max_s else None
        base = min(self.backoff_base_s * (2**attempt), self.backoff_max_s)
        return min(base * (1 + 0.25 * self._jitter()), self.backoff_max_s)

    async def open(
        self,
        method: str,
        path: str,
        *,
        key: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        retries: int | None = None,
    ) -> UpstreamResponse:
        """Send and return once the status and headers are in; retries 429, 502, 503 and the
        connection errors that cannot have made anything happen upstream (see the module doc)."""
        retries = self.retries if retries is None else retries
        url = self.base_url + path
        merged = {**self.default_headers, **(headers or {})}
        if key:  # public reads (the model list) go without credentials rather than with an empty bearer
            merged["authorization"] = f"Bearer {key}"
        attempt = 0
        while True:
            try:
                response = await self.transport.send(method, url, merged, body)
            except UpstreamConnectionError as exc:
                if attempt >= retries or (exc.sent and method not in IDEMPOTENT_METHODS):
                    raise
                await self._sleep(self.delay(attempt) or 0.0)
                attempt += 1
                continue
            if response.status in RETRYABLE_STATUSES and attempt < retries:
                wait = self.delay(attempt, header(response, "retry-after"))
                if wait is not None:
                    await response.close()
                    await self._sleep(wait)
                    attempt += 1
                    continue
            return response

    async def fetch(self, method: str, path: str, *, key: str, body: bytes | None = None,
                    retry: bool = True) -> tuple[int, bytes]:
        """A whole answer, unparsed: status and body bytes."""
        headers = {"content-type": "application/json"} if body is not None else {}
        response = await self.open(method, path, key=key, body=body, headers=headers, retries=None if retry else 0)
        try:
            return response.status, await response.read()
        finally:
            await response.close()

    async def call(
        self, method: str, path: str, *, key: str, payload: Any = None, retry: bool = True
    ) -> tuple[int, Any]:
        """A control-plane call (key, generation, models, credits, keys): status and Decimal-parsed JSON."""
        status, raw = await self.fetch(method, path, key=key, body=dumps(payload) if payload is not None else None,
                                       retry=retry)
        try:
            return status, parse_json(raw) if raw else None
        except ValueError:
            return status, {"error": {"message": raw[:300].decode("utf-8", "replace")}}

    async def close(self) -> None:
        await self.transport.close()
