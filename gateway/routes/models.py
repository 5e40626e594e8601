"""The model catalogue and free-model list (/v1/models, /v1/models/free)."""

from __future__ import annotations

from starlette.routing import BaseRoute

routes: list[BaseRoute] = []
