"""The caller's account, OpenRouter key, credits and settings (/v1/account, /v1/credits, /v1/settings)."""

from __future__ import annotations

from starlette.routing import BaseRoute

routes: list[BaseRoute] = []
