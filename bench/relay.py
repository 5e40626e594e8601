"""The speed of light: `python -m bench.relay --port P --upstream http://HOST:PORT/api/v1` (bench only).

What a Python pass-through costs when nothing but the relaying is left: uvloop, asyncio
Protocols and httptools' parsers, no framework, no ASGI. A client's POST /v1/chat/completions
goes upstream on a pooled keep-alive connection with its body and Authorization; the answer
comes back chunk by chunk as it arrives (re-framed as chunked when the upstream streams).
GET /health answers who it is. One request per connection at a time (no pipelining); never
part of the product: it is the bound the gateway's req/s is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from urllib.parse import urlsplit

import httptools
import orjson

HEALTH = orjson.dumps({"status": "ok", "loop": "uvloop", "server": "relay"})


def nodelay(transport: asyncio.Transport) -> None:
    """Small writes (a stream's chunks) leave at once instead of waiting for the last one's ACK."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; relays one response at a time to `client`."""

    def __init__(self, pool: list[Upstream]) -> None:
        self.pool, self.client, self.transport = pool, None, None
        self.parser = httptools.HttpResponseParser(self)
        self.chunked = False
        self.out: list[bytes] = []
        self.done: Client | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        nodelay(transport)

    def data_received(self, data: bytes) -> None:
        """Whatever one read brings (head, chunks, end) goes to the client in one write."""
        client, self.out = self.client, []
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()
        if self.out and client is not None:
            client.transport.write(b"".join(self.out))
        if self.done is not None:
            done, self.done = self.done, None
            done.done()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_message_begin(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        head = [b"HTTP/1.1 %d OK\r\n" % status]
        keep = {b"content-type", b"content-length", b"x-generation-id", b"cache-control"}
        head += [b"%s: %s\r\n" % (n, v) for n, v in self.headers if n in keep]
        self.chunked = not any(n == b"content-length" for n, _ in self.headers)
        if self.chunked:
            head.append(b"transfer-encoding: chunked\r\n")
        self.out.append(b"".join(head) + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.out.append(b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
        self.done, self.client = self.client, None  # the client reads its next request after this write
        if self.parser.should_keep_alive():
            self.pool.append(self)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:  # mid-response: the client cannot get a whole answer any more
            self.client.transport.close()


class Client(asyncio.Protocol):
    """One client connection: parse a request, hand it upstream, wait for the answer, repeat."""

    def __init__(self, relay: Relay) -> None:
        self.relay, self.transport = relay, None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        nodelay(transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.auth, self.body = b"", b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self.auth = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        if method == b"GET" and self.url == b"/health":
            self.respond(200, HEALTH)
        elif method == b"POST" and self.url == b"/v1/chat/completions":
            self.transport.pause_reading()  # one request at a time on this connection
            self.relay.forward(self, b"".join(self.body))
        else:
            self.respond(404, b'{"error":{"code":404,"message":"not found"}}')

    def respond(self, status: int, body: bytes) -> None:
        self.transport.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (status, len(body), body))

    def done(self) -> None:
        self.relay.serving.pop(self, None)
        self.transport.resume_reading()

    def pause_writing(self) -> None:  # a slow reader holds the upstream back instead of buffering
        upstream = self.relay.serving.get(self)
        if upstream is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.relay.serving.get(self)
        if upstream is not None:
            upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        upstream = self.relay.serving.pop(self, None)
        if upstream is not None and upstream.client is self:
            upstream.transport.close()  # its response has nowhere to go; the connection cannot be reused


class Relay:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path.rstrip("/").encode() + b"/chat/completions"
        self.pool: list[Upstream] = []
        self.serving: dict[Client, Upstream] = {}

    def forward(self, client: Client, body: bytes) -> None:
        """On an idle pooled connection at once; else on a new one, once it is open."""
        if self.pool:
            self.send(self.pool.pop(), client, body)
        else:
            asyncio.ensure_future(self.connect(client, body))

    async def connect(self, client: Client, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: Upstream(self.pool), self.host, self.port)
        except OSError:
            client.respond(502, b'{"error":{"code":502,"message":"upstream unreachable"}}')
            return client.done()
        self.send(upstream, client, body)

    def send(self, upstream: Upstream, client: Client, body: bytes) -> None:
        upstream.client = client
        self.serving[client] = upstream
        upstream.transport.write(
            b"POST %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\nauthorization: %s\r\n"
            b"content-length: %d\r\n\r\n%s" % (self.path, self.host.encode(), self.port, client.auth, len(body), body))


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000/api/v1")
    args = parser.parse_args()

    async def serve() -> None:
        relay = Relay(args.upstream)
        server = await asyncio.get_running_loop().create_server(lambda: Client(relay), "127.0.0.1", args.port,
                                                                backlog=2048)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
