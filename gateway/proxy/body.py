"""Reading a request body within a byte limit, refusing (without reading it all) anything larger.
"""

from __future__ import annotations

from gateway.core.errors import (
    BadRequest,
    PayloadTooLarge,
)
from gateway.proxy.types import Receive


async def read_body(receive: Receive, content_length: bytes | None, limit: int) -> bytes:
    """The whole request body, refusing (without reading it all) anything over `limit` bytes."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise BadRequest("Content-Length is not a number.") from None
        if declared > limit:
            raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit} (server.max_body_bytes).")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("The client went away before sending the whole body.")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body is over {limit} bytes (server.max_body_bytes).")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
