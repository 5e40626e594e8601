"""The caller's account, OpenRouter key, credits and settings (/v1/account, /v1/credits, /v1/settings).

Handlers are thin: the platform token names the user (a user reaches only their own
account), services do the work. Keys never leave: a key is shown as its kind and last
four characters only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from gateway.accounts.byok import connect_byok
from gateway.accounts.settings import MAX_FALLBACK_MODELS, MAX_MODEL_ID_CHARS, validate_changes
from gateway.api.common import gateway_of, json_body, json_response, mirrored, principal_of
from gateway.api.inputs import Body, Field, accepts, read_body
from gateway.auth.tokens import Principal
from gateway.catalog import CatalogUnavailable
from gateway.core.amounts import MAX_COUNT
from gateway.core.clock import iso
from gateway.core.errors import BadGateway, NotFound, PaymentRequired
from gateway.proxy.endpoint import NO_KEY_MESSAGE
from gateway.upstream.credits import (
    CreditsUnavailable,
    KeyRejected,
    credits_view,
    fetch_credits,
)

MODEL_ID = r"^[^\s\x1c-\x1f\x85]+$"  # no str.isspace() character (ECMAScript's \s lacks \x1c-\x1f and \x85)
MODEL_ID_RULE = (f"an OpenRouter model id such as \"openai/gpt-4o-mini\" (a non-empty string without spaces, "
                 f"at most {MAX_MODEL_ID_CHARS} characters); see GET /v1/models")
BYOK = Body(Field("api_key", "string", required=True,
                  description="an OpenRouter inference key (sk-or-...), verified upstream before it is stored",
                  message="Field 'api_key' is required: your OpenRouter key (sk-or-...)."))
# `accounts.settings.validate_changes` applies the same rules again (it also serves the CLI); null resets a field
SETTINGS = Body(
    Field("default_model", "string", max_length=MAX_MODEL_ID_CHARS, pattern=MODEL_ID,
          description="filled in when a request names no model", message=f"Field 'default_model' must be {MODEL_ID_RULE}."),
    Field("fallback_models", "array", max_items=MAX_FALLBACK_MODELS,
          items=Field("model", "string", nullable=False, max_length=MAX_MODEL_ID_CHARS, pattern=MODEL_ID),
          description="OpenRouter's `models` fallback list, filled in when a request has none",
          message=f"Field 'fallback_models' must be a list of at most {MAX_FALLBACK_MODELS} model ids, tried in order "
                  "when the requested model fails; e.g. [\"anthropic/claude-3.5-haiku\"]."),
    Field("temperature", "number", minimum=0, maximum=2, description="filled in when a request has none",
          message="Field 'temperature' must be a number from 0 to 2, or null for no default."),
    Field("max_tokens", "integer", minimum=1, maximum=MAX_COUNT, description="filled in when a request has none",
          message=f"Field 'max_tokens' must be a whole number from 1 to {MAX_COUNT:,}, or null for no default."),
    Field("fallback_enabled", "boolean", description="whether fallback_models is filled in",
          message="Field 'fallback_enabled' must be true or false."),
    unknown="Unknown setting {name!r}; the settings are: {allowed}.", sort_allowed=False,
)


def masked(last4: str) -> str:
    return f"sk-or-...{last4}"


def _key_of(principal: Principal) -> str:
    if principal.key is None:
        raise PaymentRequired(NO_KEY_MESSAGE)
    return principal.key.secret


def _threshold(request: Request) -> Decimal:
    return gateway_of(request).config.accounting.low_balance_usd


def _stored_view(request: Request, row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None or row["synced_at"] is None:
        return None
    return credits_view(row["total_credits"], row["total_usage"], source=row["source"], threshold=_threshold(request),
                        synced_at=row["synced_at"])


# -- credits -----------------------------------------------------------------------


async def credits(request: Request) -> Response:
    """Live from OpenRouter with the caller's key (and remembered); the last synced values if it is down."""
    principal = await principal_of(request)
    gateway = gateway_of(request)
    key = _key_of(principal)
    try:
        found = await fetch_credits(gateway.upstream, key)
    except KeyRejected as exc:
        raise PaymentRequired(f"{exc}: connect a working key with `PUT /v1/account/openrouter-key`.") from None
    except CreditsUnavailable as exc:
        stored = _stored_view(request, await gateway.store.account.credits(principal.user_id))
        if stored is None:
            raise BadGateway(f"The credits could not be read: {exc}. Try again shortly.") from None
        return json_response({"data": stored}, headers={
            "x-credits-stale": "true", "warning": '110 - "Response is Stale: the last synced credits"'})
    synced_at = await gateway.store.account.put_credits(
        principal.user_id, total_credits=found.total_credits, total_usage=found.total_usage, source=found.source
    )
    return json_response({"data": credits_view(found.total_credits, found.total_usage, source=found.source,
                                               threshold=_threshold(request), synced_at=synced_at)})


async def sync(request: Request) -> Response:
    principal = await principal_of(request)
    gateway = gateway_of(request)
    await gateway.credit_sync.sync_user(principal.user_id)
    return json_response({"data": _stored_view(request, await gateway.store.account.credits(principal.user_id))})


# -- the account -------------------------------------------------------------------


def _month_start(now: float) -> str:
    start = datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return iso(start.timestamp())


async def account(request: Request) -> Response:
    principal = await principal_of(request)
    gateway = gateway_of(request)
    user_id = principal.user_id
    key = principal.key
    row = await gateway.store.account.credits(user_id)
    usage = None
    if hasattr(gateway.store, "usage"):
        since = _month_start(gateway.clock())
        spent = await gateway.store.usage.spend_since(since, user_id=user_id)
        usage = {"since": since, "total_cost": spent.get(user_id, Decimal(0))}
    try:
        snapshot = await gateway.catalog.get()
        free: dict[str, Any] | None = {"count": len(snapshot.free), "data": snapshot.free,
                                       "cached_at": iso(snapshot.fetched_at)}
    except CatalogUnavailable:
        free = None
    return json_response({
        "user_id": user_id,
        "tier": principal.tier,
        "status": principal.status,
        "key": {"connected": False} if key is None else {
            "connected": True, "kind": key.kind, "label": masked(key.last4), "last4": key.last4,
            "disabled": key.disabled},
        "credits": _stored_view(request, row),
        "last_synced": row["synced_at"] if row else None,
        "sync_error": row["error"] if row else None,
        "usage_this_month": usage,
        "free_models": free,
        "settings": gateway.settings.get(user_id).public(),
    })


@accepts(PUT=BYOK)
async def openrouter_key(request: Request) -> Response:
    """PUT: connect the caller's own key (verified upstream first); DELETE: remove whichever key they have."""
    principal = await principal_of(request)
    gateway = gateway_of(request)
    user_id = principal.user_id
    actor = f"user:{user_id}"
    if request.method == "PUT":
        body = read_body(request, BYOK, await json_body(request))
        previous = principal.key.kind if principal.key else None
        described = await connect_byok(gateway.store, gateway.vault, gateway.upstream, user_id, body["api_key"])
        gateway.auth.forget_user(user_id)
        await gateway.store.audit.append(actor=actor, action="key.byok.set", user_id=user_id,
                                         details={"last4": described["last4"], "replaced": previous})
        return json_response({"key": {"connected": True, "kind": "byok", "label": masked(described["last4"]),
                                      "last4": described["last4"], "disabled": False}})
    removed = await gateway.provisioner.remove(user_id, actor=actor)  # a managed key is deleted upstream too
    gateway.auth.forget_user(user_id)
    if not removed:
        raise NotFound("No OpenRouter key is connected to your account.")
    return Response(status_code=204)


# -- settings ----------------------------------------------------------------------


@accepts(PUT=SETTINGS)
async def settings(request: Request) -> Response:
    principal = await principal_of(request)
    book = gateway_of(request).settings
    if request.method == "PUT":
        changes = validate_changes(read_body(request, SETTINGS, await json_body(request)))
        return json_response((await book.update(principal.user_id, changes)).public())
    return json_response(book.get(principal.user_id).public())


routes: list[BaseRoute] = [
    *mirrored("/credits", credits, ["GET"]),
    *mirrored("/account", account, ["GET"]),
    *mirrored("/account/openrouter-key", openrouter_key, ["PUT", "DELETE"]),
    *mirrored("/account/sync", sync, ["POST"]),
    *mirrored("/settings", settings, ["GET", "PUT"]),
]
