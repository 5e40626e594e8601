"""`GET /dashboard`: the operator's one page, static files shipped as package data (no build step).

The page signs in with the admin token (kept in the tab's sessionStorage, sent as a bearer header) and
talks only to the admin API; these routes serve files and need no token. The files are read once; a
strict Content-Security-Policy allows only the gateway's own scripts and API.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.core.errors import NotFound

MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8", ".md": "text/markdown; charset=utf-8"}
FILES = ("index.html", "dashboard.css", "dashboard.js", "vendor/chart.umd.js", "vendor/chart.js-LICENSE.md")
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def _load() -> dict[str, bytes]:
    folder = resources.files("gateway.api") / "static"
    return {name: (folder / name).read_bytes() for name in FILES}


CONTENT = _load()  # read once at import: a missing file fails start-up, not the first page view


def _file(name: str) -> Response:
    body = CONTENT.get(name)
    if body is None:
        raise NotFound(f"No dashboard file {name!r}.")
    media = MEDIA_TYPES[name[name.rindex("."):]]
    return Response(body, media_type=media, headers=HEADERS)


async def page(request: Request) -> Response:
    return _file("index.html")


async def asset(request: Request) -> Response:
    return _file(request.path_params["name"])


routes: list[BaseRoute] = [
    Route("/dashboard", page, methods=["GET"]),
    Route("/dashboard/{name:path}", asset, methods=["GET"]),
]
