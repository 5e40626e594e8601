"""The gateway's own HTTP/1.1 client against a real socket server that answers from a script.

Each scripted server reads one request head (and its Content-Length body) per answer and
writes the answer's raw bytes, so framing, keep-alive, early closes and malformed answers
are exactly what the test says they are.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

import pytest

from gateway.upstream.client import UpstreamConnectionError
from gateway.upstream.h1 import H1Transport

Answer = bytes | Callable[[asyncio.StreamWriter], Any]


class Scripted:
    """A TCP server: for each request it reads, the next answer of the script (bytes, or a coroutine fn)."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "Scripted":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                answer = self.answers.pop(0)
                if callable(answer):
                    if await answer(writer) == "close":
                        break
                else:
                    writer.write(answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


@pytest.fixture
async def transport() -> AsyncIterator[H1Transport]:
    t = H1Transport(pool_size=4, connect_timeout_s=2, read_timeout_s=2)
    yield t
    await t.close()


@pytest.mark.anyio
async def test_a_content_length_answer_is_read_whole_and_the_connection_reused(transport: H1Transport) -> None:
    async with Scripted([ok(b'{"n":1}'), ok(b'{"n":2}')]) as server:
        first = await transport.send("POST", server.url + "/api/v1/chat?x=1", {"authorization": "Bearer k"}, b"{}")
        assert first.status == 200 and ("content-type", "application/json") in first.headers
        assert await first.read() == b'{"n":1}'
        await first.close()
        second = await transport.send("GET", server.url + "/api/v1/generation?id=g", {}, None)
        assert await second.read() == b'{"n":2}'
        await second.close()
    assert server.connections == 1
    head = server.requests[0]
    assert head.startswith(b"POST /api/v1/chat?x=1 HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"authorization: Bearer k\r\n" in head and head.endswith(b"content-length: 2\r\n\r\n{}")


@pytest.mark.anyio
async def test_a_chunked_stream_arrives_chunk_by_chunk(transport: H1Transport) -> None:
    gate = asyncio.Event()

    async def stream(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"6\r\ndata: \r\n")
        await writer.drain()
        await gate.wait()  # the first chunk must reach the reader before the rest is even written
        writer.write(b"3\r\n1\n\n\r\n0\r\n\r\n")
        await writer.drain()

    async with Scripted([stream, ok()]) as server:
        response = await transport.send("POST", server.url + "/s", {}, b"{}")
        chunks = response.chunks()
        assert await chunks.__anext__() == b"data: "
        gate.set()
        assert b"".join([c async for c in chunks]) == b"1\n\n"
        await response.close()
        again = await transport.send("GET", server.url + "/", {}, None)  # the stream ended cleanly: reused
        assert await again.read() == b'{"ok":true}'
        await again.close()
    assert server.connections == 1


@pytest.mark.anyio
async def test_a_close_delimited_body_ends_with_the_connection(transport: H1Transport) -> None:
    async def close_delimited(writer: asyncio.StreamWriter) -> str:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        return "close"

    async with Scripted([close_delimited]) as server:
        response = await transport.send("GET", server.url + "/", {}, None)
        assert await response.read() == b"all of it"
        await response.close()
    assert transport._open == 0  # not kept: the server said close


@pytest.mark.anyio
async def test_an_idle_connection_the_server_closed_is_not_reused(transport: H1Transport) -> None:
    async def answer_then_close(writer: asyncio.StreamWriter) -> str:
        writer.write(ok())
        await writer.drain()
        return "close"

    async with Scripted([answer_then_close, ok(b"second")]) as server:
        first = await transport.send("GET", server.url + "/", {}, None)
        await first.read()
        await first.close()
        for _ in range(100):  # the pool learns of the close from the event loop
            if transport._open == 0:
                break
            await asyncio.sleep(0.01)
        second = await transport.send("GET", server.url + "/", {}, None)
        assert await second.read() == b"second"
        await second.close()
    assert server.connections == 2


@pytest.mark.anyio
async def test_a_refused_connection_is_reported_as_never_sent(transport: H1Transport) -> None:
    async with Scripted([]) as server:
        url = server.url
    with pytest.raises(UpstreamConnectionError) as caught:
        await transport.send("POST", url + "/", {}, b"{}")
    assert caught.value.sent is False
    assert transport._open == 0


@pytest.mark.anyio
async def test_a_connection_that_breaks_mid_body_says_so(transport: H1Transport) -> None:
    async def cut(writer: asyncio.StreamWriter) -> str:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()
        return "close"

    async with Scripted([cut]) as server:
        response = await transport.send("POST", server.url + "/", {}, b"{}")
        with pytest.raises(UpstreamConnectionError) as caught:
            await response.read()
        await response.close()
    assert caught.value.sent is True and transport._open == 0


@pytest.mark.anyio
async def test_a_malformed_answer_is_an_error_and_the_connection_dropped(transport: H1Transport) -> None:
    async with Scripted([b"HTTP/1.1 abc nonsense\r\n\r\n"]) as server:
        with pytest.raises(UpstreamConnectionError, match="malformed"):
            await transport.send("GET", server.url + "/", {}, None)
    assert transport._open == 0


@pytest.mark.anyio
async def test_silence_past_the_read_timeout_is_a_timeout() -> None:
    transport = H1Transport(pool_size=2, read_timeout_s=0.2)

    async def silent(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with Scripted([silent]) as server:
        with pytest.raises(UpstreamConnectionError) as caught:
            await transport.send("POST", server.url + "/", {}, b"{}")
    assert caught.value.timeout is True and caught.value.sent is True
    await transport.close()


@pytest.mark.anyio
async def test_the_pool_never_opens_more_than_its_size_and_queues_the_rest() -> None:
    transport = H1Transport(pool_size=2, read_timeout_s=5)
    release = asyncio.Event()

    async def slow(writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.write(ok())
        await writer.drain()

    async with Scripted([slow] * 6) as server:
        async def one() -> bytes:
            response = await transport.send("GET", server.url + "/", {}, None)
            try:
                return await response.read()
            finally:
                await response.close()

        calls = [asyncio.ensure_future(one()) for _ in range(6)]
        for _ in range(100):
            if server.connections == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # a window in which a third connection would have opened
        assert server.connections == 2 and transport._open == 2
        release.set()
        assert await asyncio.gather(*calls) == [b'{"ok":true}'] * 6
    assert server.connections == 2
    await transport.close()


@pytest.mark.anyio
async def test_a_cancelled_call_closes_its_connection(transport: H1Transport) -> None:
    async def silent(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with Scripted([silent]) as server:
        task = asyncio.ensure_future(transport.send("POST", server.url + "/", {}, b"{}"))
        for _ in range(100):
            if server.requests:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert transport._open == 0


@pytest.mark.anyio
async def test_a_header_that_would_split_the_request_is_not_sent(transport: H1Transport) -> None:
    async with Scripted([ok()]) as server:
        response = await transport.send("GET", server.url + "/", {"x-title": "a\r\nx-injected: 1", "x-ok": "y"},
                                        None)
        await response.read()
        await response.close()
    assert b"x-injected" not in server.requests[0] and b"x-ok: y\r\n" in server.requests[0]


@pytest.mark.anyio
async def test_a_slow_reader_pauses_the_socket_instead_of_buffering_everything(transport: H1Transport) -> None:
    from gateway.upstream.h1 import HIGH_WATER

    size = HIGH_WATER * 8
    async with Scripted([ok(b"x" * size)]) as server:
        response = await transport.send("GET", server.url + "/", {}, None)
        for _ in range(100):
            if response._paused:
                break
            await asyncio.sleep(0.01)
        assert response._paused and response._buffered < size  # reading stopped short of the whole body
        total = 0
        async for chunk in response.chunks():
            total += len(chunk)
        assert total == size
        await response.close()


@pytest.mark.anyio
async def test_a_path_with_text_outside_ascii_goes_out_percent_encoded(transport: H1Transport) -> None:
    async with Scripted([ok()]) as server:
        response = await transport.send("GET", server.url + "/models/é x\u000b/ok%20?q=ü", {}, None)
        await response.read()
        await response.close()
    assert server.requests[0].startswith(b"GET /models/%C3%A9%20x%0B/ok%20?q=%C3%BC HTTP/1.1\r\n")


@pytest.mark.anyio
async def test_a_large_body_read_whole_is_not_held_back_by_back_pressure(transport: H1Transport) -> None:
    from gateway.upstream.h1 import HIGH_WATER

    body = b"y" * (HIGH_WATER * 6)
    async with Scripted([ok(body)]) as server:
        response = await transport.send("GET", server.url + "/models", {}, None)
        for _ in range(50):  # let it pause first, as a big answer does before anyone reads it
            if response._paused:
                break
            await asyncio.sleep(0.01)
        assert await response.read() == body
        await response.close()


@pytest.fixture
def self_signed(tmp_path: Any) -> tuple[Any, Any]:
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert), "-days", "1"], check=True, capture_output=True)
    return cert, key


@pytest.mark.anyio
async def test_https_is_spoken_over_tls_and_the_certificate_is_checked(self_signed: tuple[Any, Any]) -> None:
    """A TLS server with a self-signed certificate: refused as unverified (never sent), not talked to."""
    import ssl

    cert, key = self_signed
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(ok(b"secret"))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    transport = H1Transport(pool_size=2, connect_timeout_s=5)
    try:
        with pytest.raises(UpstreamConnectionError) as caught:
            await transport.send("GET", f"https://localhost:{port}/", {}, None)
        assert caught.value.sent is False and "SSL" in str(caught.value)
        trusting = ssl.create_default_context(cafile=str(cert))  # the same server, its certificate trusted
        transport._ssl = trusting
        response = await transport.send("GET", f"https://localhost:{port}/", {}, None)
        assert response.status == 200 and await response.read() == b"secret"
        await response.close()
    finally:
        await transport.close()
        server.close()


@pytest.mark.anyio
async def test_a_url_it_cannot_speak_to_is_refused_before_anything_is_sent(transport: H1Transport) -> None:
    for url in ("ftp://127.0.0.1:21/file", "http:///no-host"):
        with pytest.raises(UpstreamConnectionError, match="unsupported upstream URL") as caught:
            await transport.send("GET", url, {}, None)
        assert caught.value.sent is False
    assert transport._open == 0
