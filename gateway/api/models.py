"""The model catalogue and free-model list (/v1/models, /v1/models/free), from the TTL cache.

`/v1/models` answers in OpenRouter's shape (`data`, `total_count`, `links.next`) so the
OpenRouter SDKs page it unchanged. A list served from a cache that could not be
refreshed says so in `X-Catalog-Stale: true` and a `Warning` header instead of failing.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from gateway.api.common import gateway_of, json_response, mirrored, principal_of
from gateway.catalog import MAX_PAGE_SIZE, CatalogUnavailable, Snapshot, page
from gateway.core.clock import iso
from gateway.core.errors import BadRequest, ServiceUnavailable


def _paging_param(request: Request, name: str, low: int, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise BadRequest(
            f"Query parameter {name!r} must be an integer from {low} to {high}, got {raw!r} "
            "(page with e.g. ?offset=0&limit=500; send neither for the whole list).",
            param=name,
        )
    return value


async def _snapshot(request: Request) -> Snapshot:
    await principal_of(request)
    try:
        return await gateway_of(request).catalog.get()
    except CatalogUnavailable as exc:
        raise ServiceUnavailable(f"{exc}. The model list could not be fetched from OpenRouter; try again shortly.",
                                 headers={"retry-after": "5"}) from None


def _headers(snapshot: Snapshot) -> dict[str, str]:
    headers = {"x-catalog-cached-at": iso(snapshot.fetched_at)}
    if snapshot.stale:
        headers["x-catalog-stale"] = "true"
        headers["warning"] = '110 - "Response is Stale: the model list could not be refreshed from OpenRouter"'
    return headers


async def list_models(request: Request) -> Response:
    offset = _paging_param(request, "offset", 0, 10**9)
    limit = _paging_param(request, "limit", 1, MAX_PAGE_SIZE)
    snapshot = await _snapshot(request)
    modalities = request.query_params.get("output_modalities")
    rows = snapshot.rows(modalities)
    chunk, next_offset = page(rows, offset, limit)
    next_link = None
    if next_offset is not None:
        prefix = "/api/v1" if request.url.path.startswith("/api/") else "/v1"
        next_link = f"{prefix}/models?offset={next_offset}&limit={len(chunk)}"
        if modalities:
            next_link += f"&output_modalities={modalities}"
    payload: dict[str, Any] = {"data": chunk, "total_count": len(rows), "links": {"next": next_link}}
    return json_response(payload, headers=_headers(snapshot))


async def free_models(request: Request) -> Response:
    snapshot = await _snapshot(request)
    payload = {"data": snapshot.free, "count": len(snapshot.free), "cached_at": iso(snapshot.fetched_at)}
    return json_response(payload, headers=_headers(snapshot))


routes: list[BaseRoute] = [
    *mirrored("/models", list_models, ["GET"]),
    *mirrored("/models/free", free_models, ["GET"]),
]
