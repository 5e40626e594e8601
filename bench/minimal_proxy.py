"""The yardstick: the least a Python proxy can do (`python -m bench.minimal_proxy --port P --upstream URL`).

Starlette + one pooled aiohttp session, the same shape as the issue-8 anchor: take
POST /v1/chat/completions, forward body and Authorization upstream, stream the response
body back as it arrives. No auth, no limits, no accounting: what the gateway adds over
this is the cost of being a gateway.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, AsyncIterator

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route


def create_app(upstream: str) -> Starlette:
    session: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # limit=0: no pool cap, so 1,000 concurrent streams are not queued behind the pool.
        session["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        yield
        await session["s"].close()

    async def chat(request: Request) -> Any:
        body = await request.body()
        headers = {"content-type": "application/json", "authorization": request.headers.get("authorization", "")}
        resp = await session["s"].post(upstream + "/chat/completions", data=body, headers=headers)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            finally:
                resp.release()

        return StreamingResponse(relay(), status_code=resp.status, media_type=resp.headers.get("content-type"))

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Minimal Starlette + aiohttp pass-through for `make bench`.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000/api/v1")
    args = parser.parse_args()
    uvicorn.run(create_app(args.upstream.rstrip("/")), host="127.0.0.1", port=args.port, loop="uvloop",
                http="httptools", log_level="warning", access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
