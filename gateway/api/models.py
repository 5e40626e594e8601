"""The model catalogue and what OpenRouter's SDKs ask about it, from the TTL cache.

`/models` answers in OpenRouter's shape (`data`, `total_count`, `links.next`) so the
OpenRouter SDKs page it unchanged; so do `/models/user` (the rows of the caller's OpenRouter
key, its account settings applied), `/embeddings/models`, `/models/count`,
`/model/{author}/{slug}` and `/models/{author}/{slug}/endpoints` (OPENROUTER.md §5.2).
A list served from a cache that could not be refreshed says so in `X-Catalog-Stale: true`
and a `Warning` header instead of failing.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from gateway.api.common import gateway_of, json_response, mirrored, principal_of
from gateway.api.inputs import IntParam, Query, Text, accepts, read_query
from gateway.catalog import MAX_PAGE_SIZE, CatalogUnavailable, Snapshot, page
from gateway.core.clock import iso
from gateway.core.errors import BadGateway, NotFound, PaymentRequired, ServiceUnavailable
from gateway.proxy.endpoint import NO_KEY_MESSAGE

PAGING_RULE = ("Query parameter {name!r} must be an integer from {low} to {high}, got {raw!r} "
               "(page with e.g. ?offset=0&limit=500; send neither for the whole list).")
PAGING = (
    IntParam("offset", "the first row of the page; send neither offset nor limit for the whole list",
             low=0, high=10**9, message=PAGING_RULE),
    IntParam("limit", "rows per page", low=1, high=MAX_PAGE_SIZE, message=PAGING_RULE),
)
MODALITIES = Text("output_modalities", "OpenRouter's filter: text (the default), image, embeddings …, or all; "
                                       "comma-separated for several")
LISTING = Query(*PAGING, MODALITIES)
EMBEDDERS = Query(*PAGING)
COUNTING = Query(MODALITIES)


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


def _listing(request: Request, query: dict[str, Any], snapshot: Snapshot, rows: list[dict[str, Any]],
             modalities: str | None) -> Response:
    chunk, next_offset = page(rows, query["offset"], query["limit"])
    next_link = None
    if next_offset is not None:
        next_link = f"{request.url.path}?offset={next_offset}&limit={len(chunk)}"
        if modalities and not request.url.path.endswith("/embeddings/models"):
            next_link += f"&output_modalities={modalities}"
    payload: dict[str, Any] = {"data": chunk, "total_count": len(rows), "links": {"next": next_link}}
    return json_response(payload, headers=_headers(snapshot))


# the query is checked before anything is fetched: bad input never costs an upstream call


@accepts(GET=LISTING)
async def list_models(request: Request) -> Response:
    query = read_query(request, LISTING)
    snapshot = await _snapshot(request)
    modalities = query["output_modalities"]
    return _listing(request, query, snapshot, snapshot.rows(modalities), modalities)


@accepts(GET=EMBEDDERS)
async def embedding_models(request: Request) -> Response:
    query = read_query(request, EMBEDDERS)
    snapshot = await _snapshot(request)
    return _listing(request, query, snapshot, snapshot.rows("embeddings"), "embeddings")


@accepts(GET=COUNTING)
async def count_models(request: Request) -> Response:
    query = read_query(request, COUNTING)
    snapshot = await _snapshot(request)
    rows = snapshot.rows(query["output_modalities"])
    return json_response({"data": {"count": len(rows)}}, headers=_headers(snapshot))


@accepts(GET=LISTING)
async def user_models(request: Request) -> Response:
    """The catalogue as the caller's OpenRouter key sees it: OpenRouter's `/models/user` ids, cached per key."""
    principal = await principal_of(request)
    if principal.key is None:
        raise PaymentRequired(NO_KEY_MESSAGE)
    query = read_query(request, LISTING)
    snapshot = await _snapshot(request)
    try:
        allowed = await gateway_of(request).catalog.views.user_model_ids(principal.key.secret)
    except CatalogUnavailable as exc:
        raise BadGateway(f"{exc}; the models your OpenRouter key may use could not be listed. Try again shortly, "
                         "or use GET /v1/models for the whole catalogue.") from None
    modalities = query["output_modalities"]
    rows = [row for row in snapshot.rows(modalities) if row["id"] in allowed]
    return _listing(request, query, snapshot, rows, modalities)


def _model_id(request: Request) -> str:
    return f"{request.path_params['author']}/{request.path_params['slug']}"


async def get_model(request: Request) -> Response:
    """One model by id; a variant suffix (`:free`, `:nitro` …) not listed itself resolves to its base model."""
    snapshot = await _snapshot(request)
    wanted = _model_id(request)
    found = snapshot.model(wanted) or snapshot.model(wanted.split(":", 1)[0])
    if found is None:
        raise NotFound(f"No model {wanted!r} in the catalogue; GET /v1/models lists the ids.", param="slug")
    return json_response({"data": found}, headers=_headers(snapshot))


async def model_endpoints(request: Request) -> Response:
    """The providers serving a model, as OpenRouter lists them (cached per model for `models.cache_ttl_s`)."""
    await principal_of(request)
    author, slug = request.path_params["author"], request.path_params["slug"]
    try:
        found = await gateway_of(request).catalog.views.endpoints(author, slug)
    except CatalogUnavailable as exc:
        raise BadGateway(f"{exc}; try again shortly.") from None
    if found is None:
        raise NotFound(f"No model {author}/{slug!s} at OpenRouter; GET /v1/models lists the ids.", param="slug")
    return json_response(found)


async def free_models(request: Request) -> Response:
    snapshot = await _snapshot(request)
    payload = {"data": snapshot.free, "count": len(snapshot.free), "cached_at": iso(snapshot.fetched_at)}
    return json_response(payload, headers=_headers(snapshot))


routes: list[BaseRoute] = [
    *mirrored("/models", list_models, ["GET"]),
    *mirrored("/models/free", free_models, ["GET"]),
    *mirrored("/models/count", count_models, ["GET"]),
    *mirrored("/models/user", user_models, ["GET"]),
    *mirrored("/embeddings/models", embedding_models, ["GET"]),
    *mirrored("/model/{author}/{slug}", get_model, ["GET"]),
    *mirrored("/models/{author}/{slug}/endpoints", model_endpoints, ["GET"]),
]
