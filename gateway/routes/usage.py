"""Usage and generations: /v1/generation, /v1/usage and the admin's /admin/v1/usage."""

from __future__ import annotations

from starlette.routing import BaseRoute

routes: list[BaseRoute] = []
