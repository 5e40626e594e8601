"""What every handler shares: the gateway object, strict JSON bodies, JSON responses."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.core.errors import (
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from gateway.core.money import dumps

if TYPE_CHECKING:
    from gateway.auth.tokens import Principal
    from gateway.instance import Gateway


def gateway_of(request: Request) -> "Gateway":
    return request.app.state.gateway


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(payload), status_code=status, media_type="application/json", headers=headers)


def error_response(error: GatewayError, request: Request | None = None) -> Response:
    headers = dict(error.headers)
    if request is not None and "request_id" in request.scope.get("state", {}):
        headers["x-request-id"] = request.scope["state"]["request_id"]
    return Response(error.body(), status_code=error.status, media_type="application/json", headers=headers)


async def body_bytes(request: Request, *, max_bytes: int | None = None) -> bytes:
    """The request body, refused (413) as soon as it passes `server.max_api_body_bytes`: never buffered whole first."""
    limit = gateway_of(request).config.server.max_api_body_bytes if max_bytes is None else max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit} (server.max_api_body_bytes).")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is over {limit} bytes (server.max_api_body_bytes).")
        chunks.append(chunk)
    return b"".join(chunks)


def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json (got {content_type[:100] or 'none'}).")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # as orjson and RFC 8259: no NaN or Infinity


def parse_json_object(request: Request, raw: bytes) -> dict[str, Any]:
    """A JSON object from an application/json body (415 for another type, 400 naming what is wrong)."""
    require_json(request)
    try:
        # decimals parse exactly (money never passes through float); the body is bounded and off the hot path
        body = json.loads(raw, parse_float=Decimal, parse_constant=_no_constant) if raw else {}
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


async def json_body(request: Request, *, max_bytes: int | None = None) -> dict[str, Any]:
    """The body as a JSON object; the content type is checked before a byte of the body is read."""
    require_json(request)
    return parse_json_object(request, await body_bytes(request, max_bytes=max_bytes))


async def principal_of(request: Request) -> "Principal":
    """The caller of a client-API route, from the same cached path as the proxy."""
    return await gateway_of(request).auth.authenticate(request.headers.get("authorization"))


def mirrored(path: str, endpoint: Any, methods: list[str]) -> list[BaseRoute]:
    """The same handler under /v1 (OpenAI SDKs) and /api/v1 (OpenRouter SDKs)."""
    return [Route("/v1" + path, endpoint, methods=methods), Route("/api/v1" + path, endpoint, methods=methods)]
