"""Connecting a user's own OpenRouter key (BYOK): verified upstream first, then stored encrypted."""

from __future__ import annotations

from typing import Any

from gateway.core.errors import BadGateway, BadRequest, NotFound
from gateway.security.vault import Vault, mask_key
from gateway.store import Store
from gateway.upstream.client import UpstreamClient, UpstreamConnectionError

MIN_KEY_CHARS = 20
MAX_KEY_CHARS = 256


def check_key_format(api_key: Any) -> str:
    if not isinstance(api_key, str) or not api_key.strip():
        raise BadRequest("Field 'api_key' is required: your OpenRouter key (sk-or-...).", param="api_key")
    api_key = api_key.strip()
    problem = None
    if not api_key.startswith("sk-or-"):
        problem = "keys start with 'sk-or-'"
    elif any(c.isspace() for c in api_key):
        problem = "it contains whitespace (copy it again, on one line)"
    elif len(api_key) < MIN_KEY_CHARS:
        problem = f"it is {len(api_key)} characters long, and OpenRouter keys are longer (copy the whole key)"
    elif len(api_key) > MAX_KEY_CHARS:
        problem = f"it is {len(api_key)} characters long, and OpenRouter keys are at most {MAX_KEY_CHARS}"
    if problem:
        raise BadRequest(
            f"That does not look like an OpenRouter key: {problem}. Create one at https://openrouter.ai/settings/keys.",
            param="api_key",
        )
    return api_key


async def verify_key(upstream: UpstreamClient, api_key: str) -> dict[str, Any]:
    """Ask OpenRouter's `GET /key` whether the key works; returns its `data`."""
    try:
        status, body = await upstream.call("GET", "/key", key=api_key)
    except UpstreamConnectionError as exc:
        raise BadGateway(
            f"OpenRouter could not be reached at {upstream.base_url} to verify the key ({exc}); nothing was stored. "
            "Try again, or point upstream.base_url (GATEWAY_UPSTREAM__BASE_URL) at a reachable OpenRouter."
        ) from None
    if status in (401, 403):
        raise BadRequest(
            "OpenRouter rejected this key (invalid, disabled or deleted); nothing was stored.", param="api_key"
        )
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise BadGateway(f"OpenRouter answered HTTP {status} while verifying the key; nothing was stored.")
    if body["data"].get("is_management_key") or body["data"].get("is_provisioning_key"):
        raise BadRequest(
            "This is a management key, which cannot make completions; connect an inference key.", param="api_key"
        )
    return body["data"]


async def connect_byok(store: Store, vault: Vault, upstream: UpstreamClient, user_id: str, api_key: Any) -> dict[str, Any]:
    """Verify, encrypt and store; returns the public description (never the key)."""
    api_key = check_key_format(api_key)
    if await store.users.get(user_id) is None:
        raise NotFound(f"No user {user_id!r}.")
    await verify_key(upstream, api_key)
    label = mask_key(api_key)
    await store.keys.put(user_id, kind="byok", ciphertext=vault.encrypt(api_key), label=label, last4=api_key[-4:])
    return {"kind": "byok", "label": label, "last4": api_key[-4:]}


def describe_key(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "kind": row["kind"],
        "label": row["label"],
        "last4": row["last4"],
        "disabled": bool(row["disabled"]),
        "limit_usd": row["limit_usd"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }
