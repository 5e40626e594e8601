"""What one client connection may cost the server: bounded headers, bounded waits, bounded connections.

uvicorn's httptools protocol buffers a header block of any size, never times out a connection
that has not finished its first request, and reads a trickled body forever. This subclass adds,
at the protocol level (before anything reaches the app, and at no cost to a request whose
headers and body arrive together):

- `max_header_bytes` / `max_headers`: a request line + header block over either → 431 and closed,
  after buffering at most one read (256 KiB) past the limit;
- `header_timeout_s`: the header block must arrive within this of the connection opening (or, on a
  kept-alive connection, of the first read that ends inside the next header block) → 408 and closed;
- `body_timeout_s`: no body byte for this long, or a body slower than `MIN_BODY_RATE` bytes/s on
  average once this long has passed → 408 and closed (a trickle of 1 byte / 2 s is cut too);
- `max_connections`: beyond it a new connection gets 503 and is closed, so open sockets (file
  descriptors) stay under the process limit;
- a body still arriving when the response is complete (413, or a route that ignores bodies) is
  discarded for at most `LINGER_S`, then the connection is closed.

Everything else is uvicorn's. `GuardedConfig` carries the limits to worker processes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("gateway.connections")

MIN_BODY_RATE = 1024  # bytes per second a body must average once `body_timeout_s` has passed
LINGER_S = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 2048


class GuardedConfig(uvicorn.Config):
    """uvicorn's config plus the connection limits (picklable, so `--workers N` processes get them)."""

    def __init__(self, app: Any, *, connection_limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, http=GuardedHttpToolsProtocol, **kwargs)
        self.connection_limits = connection_limits


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded header bytes and lines, header and body timeouts,
    a connection cap and a bounded linger."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = getattr(config, "connection_limits", None) or ConnectionLimits()
        self._in_headers = True  # waiting for, or reading, a header block
        self._header_bytes = 0  # bytes read since the header block began (whole reads: may overcount)
        self._read_size = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_pending = False  # headers done, body not complete
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_since = 0.0
        self._body_last = 0.0
        self._body_bytes = 0

    # -- connection ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("refusing a connection: %d open, the limit is %d (server.max_connections)",
                        len(self.connections) - 1, self.limits.max_connections)
            self._answer(503, f"The server has {self.limits.max_connections} connections open, its limit "
                              "(server.max_connections); try again shortly.", retry_after=True)
            return
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, plus the bounds; a timer starts only when a read ends inside a header block or a body,
        so a request whose headers and body arrive together costs no timer at all."""
        self._unset_keepalive_if_required()
        self._read_size = len(data)
        if self._in_headers:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._answer(refused.status, str(refused))
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_headers:
            if self._header_bytes > self.limits.max_header_bytes:
                self._answer(431, self._too_large())
            elif self._header_timer is None:
                self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timed_out)
        elif self._body_pending and not self.transport.is_closing():
            if self._body_timer is None:
                self._body_since = self._body_last = self.loop.time()
                self._body_bytes = 0
                self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._check_body)
            else:
                self._body_last = self.loop.time()
                self._body_bytes += len(data)

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = self._read_size  # this whole read, at most: the check below is exact

    def on_headers_complete(self) -> None:
        limits = self.limits
        if len(self.headers) > limits.max_headers:
            raise _Refused(431, f"The request has more than {limits.max_headers} header lines (server.max_headers).")
        if self._header_bytes > limits.max_header_bytes and (  # the reads say it may be over: count exactly
                len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
                > limits.max_header_bytes):
            raise _Refused(431, self._too_large())
        self._in_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._body_pending = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_pending = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._body_pending and not self.transport.is_closing():
            self.loop.call_later(LINGER_S, self._close_if_body_pending)  # the rest is discarded meanwhile

    # -- timers ----------------------------------------------------------------------

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._header_bytes:
            self._answer(408, f"The request headers did not arrive within {self.limits.header_timeout_s:g} s "
                              "(server.header_timeout_s).")
        else:
            self.transport.close()

    def _check_body(self) -> None:
        self._body_timer = None
        if not self._body_pending or self.transport.is_closing():
            return
        now = self.loop.time()
        timeout = self.limits.body_timeout_s
        if self.flow.read_paused:  # the app is not reading: the wait is ours, not the client's
            self._body_since = self._body_last = now
            self._body_bytes = 0
            self._body_timer = self.loop.call_later(timeout, self._check_body)
            return
        deadline = min(self._body_last + timeout, self._body_since + timeout + self._body_bytes / MIN_BODY_RATE)
        if now < deadline:
            self._body_timer = self.loop.call_later(deadline - now, self._check_body)
            return
        self._answer(408, f"The request body stopped arriving (nothing for {timeout:g} s, or under "
                          f"{MIN_BODY_RATE} bytes/s; server.body_timeout_s).")

    def _close_if_body_pending(self) -> None:
        if self._body_pending and not self.transport.is_closing():
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    # -- answering -------------------------------------------------------------------

    def _too_large(self) -> str:
        return (f"The request line and headers are over {self.limits.max_header_bytes} bytes "
                "(server.max_header_bytes).")

    def _answer(self, status: int, message: str, *, retry_after: bool = False) -> None:
        """Write an error in OpenAI's envelope (unless a response has started) and close the connection;
        an app still waiting on the request sees a disconnect."""
        self._cancel_timers()
        cycle = self.cycle
        if cycle is not None and not self._in_headers:  # the refusal is about this cycle's request
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:  # the client has its answer (or part of it): nothing more to say
                self.transport.close()
                return
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body = orjson.dumps({"error": {"message": message, "type": kind, "code": status, "param": None}})
        head = [STATUS_LINE[status], b"content-type: application/json\r\n",
                b"content-length: ", str(len(body)).encode(), b"\r\n", b"connection: close\r\n"]
        if retry_after:
            head.append(b"retry-after: 1\r\n")
        self.transport.write(b"".join(head) + b"\r\n" + body)
        self.transport.close()
