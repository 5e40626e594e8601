"""`GET /openapi.json`: an OpenAPI 3.1 description built from the running route table, not kept by hand.

Every Starlette route the instance serves becomes an operation (path template, methods, path parameters,
the handler's docstring as summary); its request body and query parameters are the schemas of the very
`api.inputs` declarations the handler validates with (attached by `@accepts`), and so is its success
response where the handler declares one. The proxy endpoints come from the instance's own table with the
request schema their validation enforces (`proxy.endpoint.REQUEST_SCHEMA`), errors share the one
envelope (`core.errors`), and each path gets the security scheme its handlers check (admin token under
/admin, platform token under /v1 and /api/v1, none for health, metrics, the dashboard and this document).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.api.common import gateway_of, json_response
from gateway.api.inputs import Accepts, accepted
from gateway.proxy.endpoint import REQUEST_SCHEMA

ERROR_ENVELOPE = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["integer", "string"]},
                "param": {"type": ["string", "null"]},
                "metadata": {"type": "object"},
            },
        }
    },
}
PUBLIC = ("/health", "/metrics", "/dashboard", "/openapi.json")
TEXT_ROUTES = {"/metrics": "text/plain", "/dashboard": "text/html", "/dashboard/{name}": "text/plain"}
_CONVERTOR = re.compile(r"\{(\w+):\w+\}")


def _security(path: str) -> list[dict[str, list[str]]]:
    if path.startswith("/admin/"):
        return [{"adminToken": []}]
    if path.startswith(PUBLIC):
        return []
    return [{"platformToken": []}]


def _summary(endpoint: Any, method: str, path: str) -> str:
    doc = (getattr(endpoint, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else f"{method} {path}"


def _operation(path: str, method: str, endpoint: Any, params: Iterable[str], declared: Accepts | None,
               proxy_body: dict[str, Any] | None = None) -> dict[str, Any]:
    media = TEXT_ROUTES.get(path, "application/json")
    verb = method.upper()
    body = declared.bodies.get(verb) if declared else None
    query = declared.queries.get(verb) if declared else None
    success = declared.returns.get(verb, {}) if declared else {}
    operation: dict[str, Any] = {
        "operationId": re.sub(r"[^A-Za-z0-9]+", "_", f"{method}_{path}").strip("_").lower(),
        "summary": _summary(endpoint, verb, path),
        "security": _security(path),
        "parameters": [{"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                       for name in params] + (query.parameters() if query else []),
        "responses": {
            "2XX": {"description": "success", "content": {media: {"schema": success}}},
            "204": {"description": "done, no content"},
            "default": {"description": "an error, in OpenAI's envelope",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    }
    if body is not None:
        operation["requestBody"] = {"required": body.required,
                                    "content": {"application/json": {"schema": body.schema()}}}
    elif proxy_body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": proxy_body}}}
    return operation


def build_openapi(routes: Iterable[BaseRoute], proxy_paths: Iterable[str], *, version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        path = _CONVERTOR.sub(r"{\1}", route.path)
        params = list(route.param_convertors)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            paths.setdefault(path, {})[method.lower()] = _operation(path, method.lower(), route.endpoint, params,
                                                                    accepted(route.endpoint))
    for path in sorted(proxy_paths):
        paths.setdefault(path, {})["post"] = _operation(
            path, "post", None, (), None, REQUEST_SCHEMA) | {"summary": f"Proxied to OpenRouter's {path.split('/v1', 1)[1]}"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "OpenRouter gateway", "version": version,
                 "description": "OpenAI-compatible client API (/v1, mirrored under /api/v1) and the admin API (/admin/v1)."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": {"Error": ERROR_ENVELOPE},
            "securitySchemes": {
                "platformToken": {"type": "http", "scheme": "bearer", "description": "a user's platform token"},
                "adminToken": {"type": "http", "scheme": "bearer", "description": "the admin token"},
            },
        },
    }


async def openapi(request: Request) -> Response:
    """The OpenAPI 3.1 description of this gateway's client and admin APIs."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("openrouter-gateway")
    except PackageNotFoundError:
        release = "0"
    return json_response(build_openapi(request.app.routes, gateway_of(request).proxies, version=release))


routes: list[BaseRoute] = [Route("/openapi.json", openapi, methods=["GET"])]
