"""Managed OpenRouter keys and credit sync for the admin: /admin/v1/users/{id}/managed-key…, /admin/v1/credits/sync."""

from __future__ import annotations

from starlette.routing import BaseRoute

routes: list[BaseRoute] = []
