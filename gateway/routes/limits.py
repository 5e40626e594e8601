"""The caller's limits and key view: /v1/limits, /v1/key."""

from __future__ import annotations

from starlette.routing import BaseRoute

routes: list[BaseRoute] = []
