"""The gateway's own HTTP/1.1 client: asyncio protocols and httptools, for the one upstream it talks to.

aiohttp's per-request machinery (request and response objects, automatic headers, URL
building, tracing hooks) was a third of the gateway's CPU per request in the bench's
profile. A reverse proxy to a single origin needs far less: a keep-alive pool per origin,
Content-Length, chunked and close-delimited bodies (httptools parses the framing),
streaming with back-pressure, connect and read timeouts, TLS through asyncio's `ssl`.
Nothing else: no redirects, cookies, proxies or decompression (bodies pass through as
sent). Failures are `UpstreamConnectionError`, with `sent` False only when no byte of the
request was written.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import AsyncIterator, Mapping
from urllib.parse import quote, urlsplit

import httptools

from gateway.upstream.client import UpstreamConnectionError

HIGH_WATER = 256 * 1024  # unread response bytes held before reading from the socket pauses
KEEPALIVE_S = 15.0  # an idle pooled connection older than this is closed, not reused (servers drop them)
Origin = tuple[str, str, int]  # scheme, host, port
_URL_SAFE = "/?#[]@!$&'()*+,;=:%-._~"  # RFC 3986's reserved and unreserved characters, and escapes as they are


class _Connection(asyncio.Protocol):
    """One upstream connection; it carries one response at a time."""

    def __init__(self, pool: "H1Transport", origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: H1Response | None = None
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: this connection cannot be trusted any more
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            response.fail(f"the upstream sent a malformed response ({type(exc).__name__})")
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost finishes the response

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._lost(self)
        response = self.response
        if response is not None and not response.complete:
            if response.status and not response.framed:  # a close-delimited body ends with the connection
                response.on_message_complete()
            else:
                response.fail("the upstream connection closed" + (f" ({type(exc).__name__})" if exc else ""))

    def pause_writing(self) -> None:  # requests are small: nothing to pause
        pass

    # -- httptools callbacks (forwarded to the response being read) ----------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.response is not None
        self.response.on_headers(self.parser.get_status_code(), self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response.on_body(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response.on_message_complete()

    # -- use -------------------------------------------------------------------

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def reusable(self, now: float) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing() \
            and now - self.idle_since < KEEPALIVE_S


class H1Response:
    """Status and headers once they are in; the body as it arrives (`chunks`) or whole (`read`)."""

    __slots__ = ("_conn", "status", "headers", "raw_headers", "framed", "complete", "_keep_alive", "_chunks",
                 "_buffered", "_waiter", "_error", "_read_timeout_s", "_paused", "_released", "_whole")

    def __init__(self, conn: _Connection, read_timeout_s: float) -> None:
        self._conn = conn
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.framed = False  # Content-Length or chunked: the body does not end with the connection
        self.complete = False
        self._keep_alive = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: str | None = None
        self._read_timeout_s = read_timeout_s
        self._paused = False
        self._released = False
        self._whole = False

    # -- fed by the connection ---------------------------------------------------------

    def on_headers(self, status: int, keep_alive: bool) -> None:
        self.status = status
        self._keep_alive = keep_alive
        headers = self.headers
        for name, value in self.raw_headers:
            lower = name.decode("latin-1").lower()
            headers.append((lower, value.decode("latin-1")))
            if lower == "content-length" or (lower == "transfer-encoding" and b"chunked" in value.lower()):
                self.framed = True
        if status in (204, 304) or 100 <= status < 200:
            self.framed = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and not self._whole and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, message: str) -> None:
        if not self.complete and self._error is None:
            self._error = message
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, what: str) -> None:
        """Until the connection has news; a read timeout bounds each wait (not the whole body)."""
        if self._error is not None:
            raise UpstreamConnectionError(f"{what}: {self._error}")
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(self._read_timeout_s, _time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._error is not None:
            raise UpstreamConnectionError(f"{what}: {self._error}")

    async def wait_headers(self) -> None:
        while not self.status:
            await self._wait("the upstream did not answer")

    # -- read by the proxy ---------------------------------------------------------------

    def _take(self) -> bytes:
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= HIGH_WATER // 4 and self._conn.transport is not None:
            self._paused = False
            self._conn.transport.resume_reading()
        return chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                yield self._take()
            elif self.complete:
                return
            else:
                await self._wait("upstream connection broke mid-body")

    async def read(self) -> bytes:
        self._whole = True  # the caller wants it all: no back-pressure (the caller bounds the size it reads)
        if self._paused and self._conn.transport is not None:
            self._paused = False
            self._conn.transport.resume_reading()
        while not self.complete:
            await self._wait("upstream connection broke mid-body")
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    async def close(self) -> None:
        """Back to the pool when the whole response was read and the server keeps the connection; else closed."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        conn.response = None
        if self.complete and self._keep_alive and self._error is None and not conn.closed:
            if self._paused and conn.transport is not None:
                conn.transport.resume_reading()
            conn.pool._release(conn)
        else:
            conn.close()
            conn.pool._forget(conn)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamConnectionError("the upstream sent nothing for upstream.read_timeout_s",
                                                     timeout=True))


class H1Transport:
    """The `Transport` of `upstream.client: h1`: at most `pool_size` connections, reused while kept alive."""

    def __init__(self, *, pool_size: int = 256, connect_timeout_s: float = 10, read_timeout_s: float = 600) -> None:
        self._pool_size = pool_size
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._open = 0  # connections open or being opened
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._ssl: ssl.SSLContext | None = None
        self._targets: dict[str, tuple[Origin, bytes]] = {}  # URL prefix → (origin, Host header line)
        self._conns: set[_Connection] = set()

    # -- the pool -----------------------------------------------------------------

    def _release(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.origin, deque()).append(conn)
        self._wake_one()

    def _lost(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.origin)
        if idle is not None and conn in idle:
            idle.remove(conn)
        self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            self._open -= 1
            self._wake_one()

    def _wake_one(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connection(self, origin: Origin) -> _Connection:
        now = time.monotonic()
        while True:
            idle = self._idle.get(origin)
            while idle:
                conn = idle.pop()  # the most recently used: the least likely to have been dropped
                if conn.reusable(now):
                    return conn
                conn.close()
                self._forget(conn)
            if self._open < self._pool_size:
                return await self._connect(origin)
            if self._close_an_idle_connection():
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the slot on
                raise

    def _close_an_idle_connection(self) -> bool:
        """At the limit with idle connections to another origin: free one of those."""
        for idle in self._idle.values():
            if idle:
                conn = idle.popleft()
                conn.close()
                self._forget(conn)
                return True
        return False

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        conn = _Connection(self, origin)
        self._open += 1
        self._conns.add(conn)
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()  # the system's CAs; hostnames checked
                self._ssl.set_alpn_protocols(["http/1.1"])
            context = self._ssl
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await asyncio.get_running_loop().create_connection(
                    lambda: conn, host, port, ssl=context, server_hostname=host if context else None)
        except BaseException as exc:
            self._forget(conn)
            conn.close()
            if isinstance(exc, TimeoutError):
                raise UpstreamConnectionError("cannot reach upstream: connect timeout", sent=False) from None
            if isinstance(exc, (OSError, ssl.SSLError)):
                raise UpstreamConnectionError(f"cannot reach upstream: {type(exc).__name__}", sent=False) from None
            raise
        return conn

    def _target(self, url: str) -> tuple[Origin, bytes, bytes]:
        """(origin, Host line, request target) of a URL; each base (`scheme://host:port`) is parsed once."""
        start = url.find("/", url.find("//") + 2)
        base, path = (url, "/") if start < 0 else (url[:start], url[start:])
        known = self._targets.get(base)
        if known is None:
            split = urlsplit(base)
            if split.scheme not in ("http", "https") or not split.hostname:
                raise UpstreamConnectionError(f"unsupported upstream URL {base!r}: upstream.base_url must be an http:// or https:// URL with a host", sent=False)
            port = split.port or (443 if split.scheme == "https" else 80)
            known = ((split.scheme, split.hostname, port), b"host: " + split.netloc.encode("idna") + b"\r\n")
            if len(self._targets) < 64:
                self._targets[base] = known
        if not (path.isascii() and path.isprintable()) or " " in path:  # as yarl would: never a raw byte
            path = quote(path, safe=_URL_SAFE)
        return known[0], known[1], path.encode("ascii")

    # -- the Transport interface -------------------------------------------------------

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> H1Response:
        origin, host, target = self._target(url)
        head = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n", host]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                continue  # a header that would split the request never goes out
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if body is not None:
            head.append(b"content-length: %d\r\n\r\n" % len(body))
            head.append(body)
        else:
            head.append(b"\r\n")
        conn = await self._connection(origin)
        response = H1Response(conn, self._read_timeout_s)
        conn.response = response
        assert conn.transport is not None
        if conn.transport.is_closing():  # closed between the check and now: nothing was written
            await response.close()
            raise UpstreamConnectionError("pooled upstream connection was closed", sent=False)
        conn.transport.write(b"".join(head))
        try:
            await response.wait_headers()
        except BaseException:
            await response.close()
            raise
        return response

    async def close(self) -> None:
        for conn in list(self._conns):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their connection_lost
