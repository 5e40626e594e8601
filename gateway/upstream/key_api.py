"""OpenRouter's key API (`/keys`, management key) as four calls with errors an admin can act on.

Every failure becomes a `GatewayError` naming what happened upstream (status and message)
without ever echoing a key: 503 when no management key is configured or OpenRouter is
unreachable or rate-limiting, 502 when it refused or failed. Creation is never retried
blindly (a retried POST could mint a second key); PATCH, GET and DELETE are idempotent and
use the client's normal retries. Each call is bounded by `timeout_s`, which is what lets
the provisioning service tell an abandoned operation from one still in flight.
"""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from typing import Any

from gateway.core.errors import GatewayError, ServiceUnavailable
from gateway.upstream.client import UpstreamClient, UpstreamConnectionError

MISSING_MANAGEMENT_KEY = (
    "No OpenRouter management key is configured, so managed keys cannot be created or changed. "
    "Set upstream.management_key_file (a file holding the key) or the environment variable "
    "GATEWAY_UPSTREAM__MANAGEMENT_KEY; create the key at https://openrouter.ai/settings/management-keys."
)
SECRET = re.compile(r"sk-or-[A-Za-z0-9_-]+")
PAGE_SIZE = 100
MAX_PAGES = 200


class KeyApiError(GatewayError):
    """An upstream key-API failure; `upstream_status` is None when OpenRouter was not reached."""

    def __init__(self, message: str, *, status: int, upstream_status: int | None) -> None:
        super().__init__(message, status=status)
        self.type = "service_unavailable" if status == 503 else "upstream_error"
        self.upstream_status = upstream_status


class KeyApi:
    def __init__(self, upstream: UpstreamClient, management_key: str | None, *, timeout_s: float = 30.0) -> None:
        self._upstream = upstream
        self._key = management_key
        self.timeout_s = timeout_s

    @property
    def configured(self) -> bool:
        return bool(self._key)

    def require(self) -> None:
        if not self._key:
            raise ServiceUnavailable(MISSING_MANAGEMENT_KEY)

    async def create(self, name: str, *, limit: Decimal | None, limit_reset: str | None = "monthly") -> tuple[dict[str, Any], str]:
        """`POST /keys` → (KeyRow, plaintext key). The plaintext exists only in this return value."""
        payload: dict[str, Any] = {"name": name, "limit_reset": limit_reset}
        if limit is not None:
            payload["limit"] = limit
        body = await self._call("POST", "/keys", payload, expect=(200, 201), what="creating the key", retry=False)
        row, secret = body.get("data"), body.get("key")
        if not isinstance(row, dict) or not isinstance(row.get("hash"), str) or not isinstance(secret, str):
            raise KeyApiError("OpenRouter's key API answered without a key; nothing was stored.", status=502,
                              upstream_status=None)
        return row, secret

    async def update(self, key_hash: str, **fields: Any) -> dict[str, Any]:
        body = await self._call("PATCH", f"/keys/{key_hash}", fields, expect=(200,), what="updating the key")
        return body.get("data") or {}

    async def delete(self, key_hash: str) -> bool:
        """True if deleted now, False if it was already gone (404): deleting is idempotent."""
        try:
            await self._call("DELETE", f"/keys/{key_hash}", None, expect=(200, 204), what="deleting the key")
        except KeyApiError as exc:
            if exc.upstream_status == 404:
                return False
            raise
        return True

    async def get(self, key_hash: str) -> dict[str, Any] | None:
        try:
            body = await self._call("GET", f"/keys/{key_hash}", None, expect=(200,), what="reading the key")
        except KeyApiError as exc:
            if exc.upstream_status == 404:
                return None
            raise
        return body.get("data")

    async def find_by_name(self, name: str) -> list[dict[str, Any]]:
        """Every key named `name` (disabled ones included): how an unrecorded creation is found."""
        found: list[dict[str, Any]] = []
        for page in range(MAX_PAGES):
            body = await self._call(
                "GET", f"/keys?include_disabled=true&offset={page * PAGE_SIZE}", None, expect=(200,),
                what="listing keys",
            )
            rows = body.get("data") or []
            found += [r for r in rows if isinstance(r, dict) and r.get("name") == name]
            if len(rows) < PAGE_SIZE:
                break
        return found

    async def _call(
        self, method: str, path: str, payload: Any, *, expect: tuple[int, ...], what: str, retry: bool = True
    ) -> dict[str, Any]:
        self.require()
        assert self._key is not None
        try:
            status, body = await asyncio.wait_for(
                self._upstream.call(method, path, key=self._key, payload=payload, retry=retry), self.timeout_s
            )
        except (TimeoutError, UpstreamConnectionError):
            raise KeyApiError(
                f"OpenRouter could not be reached while {what} (no answer within {self.timeout_s:g} s); "
                "nothing was changed here. Try again.", status=503, upstream_status=None,
            ) from None
        if status in expect:
            return body if isinstance(body, dict) else {}
        raise _failure(status, body, what)


def _failure(status: int, body: Any, what: str) -> KeyApiError:
    message = ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = SECRET.sub("sk-or-…", str(body["error"].get("message") or ""))[:200]
    said = f" ({message})" if message else ""
    if status in (401, 403):
        text = (f"OpenRouter refused the management key with HTTP {status}{said} while {what}: check "
                "upstream.management_key_file / GATEWAY_UPSTREAM__MANAGEMENT_KEY holds a valid management key.")
        return KeyApiError(text, status=502, upstream_status=status)
    if status == 429:
        return KeyApiError(f"OpenRouter is rate-limiting the key API (HTTP 429{said}) while {what}; try again shortly.",
                           status=503, upstream_status=status)
    if status == 404:
        return KeyApiError(f"OpenRouter has no such key (HTTP 404) while {what}.", status=502, upstream_status=status)
    return KeyApiError(f"OpenRouter answered HTTP {status}{said} while {what}.",
                       status=503 if status == 503 else 502, upstream_status=status)
