"""The admin API under /admin/v1 (admin token): users, tokens, keys, emergency stop, audit, streams."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.accounts.byok import connect_byok
from gateway.accounts.directory import LIMIT_OVERRIDES, STATUSES, USER_ID
from gateway.api.account import BYOK
from gateway.api.common import gateway_of, json_body, json_response
from gateway.api.inputs import (
    Body,
    Count,
    Field,
    IntParam,
    Money,
    Nested,
    Query,
    Text,
    accepts,
    read_body,
    read_query,
)
from gateway.core.errors import NotFound

PREFIX = "/admin/v1"
MAX_REASON_CHARS = 500
PAGE = IntParam("limit", "rows per page", default=50, low=1, high=500)


def _email() -> Field:
    return Field("email", "string", max_length=254, format="email", description="an email address, unique among users")


NEW_USER = Body(
    Field("id", "string", pattern=USER_ID.pattern, max_length=128, description="the user id; generated when left out",
          message="User id must be 1-128 characters of letters, digits, '_', '.', '@' or '-'."),
    _email(),
    Field("tier", "string", description="a tier of config `tiers`; `default_tier` when left out"),
)
USER_CHANGES = Body(
    Field("tier", "string", nullable=False, description="a tier of config `tiers`"),
    Field("status", "string", nullable=False, enum=STATUSES, message="status must be 'active' or 'suspended'."),
    _email(),
    Nested("limits", nullable=False, message="limits must be an object, e.g. {\"requests_per_minute\": 60}.",
           description="overrides of the tier's limits; null removes one",
           body=Body(*(Money(name, hint="; null removes the override") if name.endswith("_usd")
                       else Count(name, hint="; null removes the override") for name in LIMIT_OVERRIDES),
                     unknown="Unknown limit {name!r}; limits are: {allowed}.", sort_allowed=False)),
    unknown="Unknown field {name!r}; you can change: {allowed}.",
)
NEW_TOKEN = Body(
    Field("name", "string", max_length=200, message="name must be a string of at most 200 characters."),
    Field("expires_at", "string", max_length=64, format="date-time",
          description="an ISO-8601 time in the future; never when left out",
          message="expires_at must be an ISO-8601 time such as 2027-01-31T00:00:00Z."),
)
STOP = Body(
    Field("enabled", "boolean", required=True, description="true refuses every proxied request (503)"),
    Field("reason", "string", max_length=MAX_REASON_CHARS, description="shown in the refusals"),
)
USERS_QUERY = Query(PAGE, Text("cursor", "the next_cursor of the previous page"))
AUDIT_QUERY = Query(
    PAGE,
    Text("cursor", "the next_cursor of the previous page", pattern="[0-9]{1,18}",
         message="cursor must be the next_cursor value of the previous page."),
    Text("user", "only this user's entries", aliases=("user_id",)),
    Text("action", "only this action, e.g. user.create"),
)


# -- what the admin API answers (JSON Schema; extra members may be added later, so none is forbidden) --------

TEXT_OR_NULL = {"type": ["string", "null"]}
KEY = {
    "type": ["object", "null"], "description": "the user's OpenRouter key, never the key itself",
    "required": ["kind", "label", "last4"],
    "properties": {"kind": {"type": "string", "enum": ["byok", "managed"]}, "label": TEXT_OR_NULL,
                   "last4": TEXT_OR_NULL, "disabled": {"type": "boolean"},
                   "limit_usd": {"type": ["string", "number", "null"]},
                   "created_at": TEXT_OR_NULL, "updated_at": TEXT_OR_NULL},
}
USER = {
    "type": "object",
    "required": ["id", "email", "tier", "status", "limits", "openrouter_key", "created_at", "updated_at"],
    "properties": {
        "id": {"type": "string"}, "email": TEXT_OR_NULL, "tier": {"type": "string"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "limits": {"type": "object", "description": "the overrides of the tier's limits",
                   "additionalProperties": {"type": ["string", "integer"]}},
        "openrouter_key": KEY, "created_at": {"type": "string"}, "updated_at": {"type": "string"},
    },
}
USERS = {"type": "object", "required": ["data", "next_cursor"],
         "properties": {"data": {"type": "array", "items": USER}, "next_cursor": TEXT_OR_NULL}}
TOKEN = {
    "type": "object",
    "required": ["id", "user_id", "name", "prefix", "created_at", "expires_at", "revoked"],
    "properties": {
        "id": {"type": "string"}, "user_id": {"type": "string"}, "name": TEXT_OR_NULL, "prefix": {"type": "string"},
        "created_at": {"type": "string"}, "last_used_at": TEXT_OR_NULL, "expires_at": TEXT_OR_NULL,
        "revoked": {"type": "boolean"}, "revoked_at": TEXT_OR_NULL,
        "token": {"type": "string", "description": "the secret, shown once: when the token is created or rotated"},
    },
}
TOKENS = {"type": "object", "required": ["data"], "properties": {"data": {"type": "array", "items": TOKEN}}}
STOP_STATE = {"type": "object", "required": ["enabled", "reason"],
              "properties": {"enabled": {"type": "boolean"}, "reason": TEXT_OR_NULL}}


def _admin(request: Request) -> Any:
    gateway = gateway_of(request)
    gateway.admin.check(request.headers.get("authorization"))
    return gateway


# -- users -------------------------------------------------------------------


@accepts(POST=NEW_USER, returns={"POST": USER})
async def create_user(request: Request) -> Response:
    gateway = _admin(request)
    body = read_body(request, NEW_USER, await json_body(request))
    user = await gateway.directory.add_user(user_id=body.get("id"), email=body.get("email"), tier=body.get("tier"))
    return json_response(user, status=201)


@accepts(GET=USERS_QUERY, returns={"GET": USERS})
async def list_users(request: Request) -> Response:
    gateway = _admin(request)
    query = read_query(request, USERS_QUERY)
    return json_response(await gateway.directory.list_users(limit=query["limit"], cursor=query["cursor"]))


@accepts(PATCH=USER_CHANGES, returns={"GET": USER, "PATCH": USER})
async def user(request: Request) -> Response:
    gateway = _admin(request)
    user_id = request.path_params["user_id"]
    if request.method == "GET":
        return json_response(await gateway.directory.show_user(user_id))
    if request.method == "PATCH":
        changes = read_body(request, USER_CHANGES, await json_body(request))
        return json_response(await gateway.directory.update_user(user_id, changes))
    if await gateway.directory.get_user(user_id):
        await gateway.provisioner.remove(user_id, actor="admin")  # a managed key is deleted upstream, not orphaned
    await gateway.directory.delete_user(user_id)
    return Response(status_code=204)


# -- tokens ------------------------------------------------------------------


@accepts(POST=NEW_TOKEN, returns={"GET": TOKENS, "POST": TOKEN})
async def user_tokens(request: Request) -> Response:
    gateway = _admin(request)
    user_id = request.path_params["user_id"]
    if request.method == "GET":
        return json_response({"data": await gateway.directory.list_tokens(user_id)})
    body = read_body(request, NEW_TOKEN, await json_body(request))
    token = await gateway.directory.create_token(user_id, name=body.get("name"), expires_at=body.get("expires_at"))
    return json_response(token, status=201)


@accepts(returns={"POST": TOKEN})
async def rotate_token(request: Request) -> Response:
    gateway = _admin(request)
    return json_response(await gateway.directory.rotate_token(request.path_params["token_id"]), status=201)


@accepts(returns={"DELETE": TOKEN})
async def revoke_token(request: Request) -> Response:
    gateway = _admin(request)
    return json_response(await gateway.directory.revoke_token(request.path_params["token_id"]))


# -- OpenRouter keys -----------------------------------------------------------


@accepts(PUT=BYOK, returns={"PUT": KEY})
async def openrouter_key(request: Request) -> Response:
    gateway = _admin(request)
    user_id = request.path_params["user_id"]
    if request.method == "PUT":
        body = read_body(request, BYOK, await json_body(request))
        described = await connect_byok(gateway.store, gateway.vault, gateway.upstream, user_id, body["api_key"])
        gateway.auth.forget_user(user_id)
        await gateway.store.audit.append(
            actor="admin", action="key.byok.set", user_id=user_id, details={"label": described["label"]}
        )
        return json_response(described)
    await gateway.directory.get_user(user_id)
    removed = await gateway.provisioner.remove(user_id, actor="admin")  # a managed key is deleted upstream too
    if not removed:
        raise NotFound(f"User {user_id!r} has no OpenRouter key.")
    gateway.auth.forget_user(user_id)
    return Response(status_code=204)


# -- emergency stop, audit, streams --------------------------------------------


@accepts(PUT=STOP, returns={"GET": STOP_STATE, "PUT": STOP_STATE})
async def emergency_stop(request: Request) -> Response:
    gateway = _admin(request)
    if request.method == "PUT":
        body = read_body(request, STOP, await json_body(request))
        enabled, reason = body["enabled"], body.get("reason")
        await gateway.stop.set(enabled, reason)
        await gateway.store.audit.append(
            actor="admin", action="emergency_stop.on" if enabled else "emergency_stop.off",
            details={"reason": reason},
        )
    return json_response({"enabled": gateway.stop.enabled, "reason": gateway.stop.reason})


@accepts(GET=AUDIT_QUERY)
async def audit(request: Request) -> Response:
    gateway = _admin(request)
    query = read_query(request, AUDIT_QUERY)
    limit = query["limit"]
    before = int(query["cursor"]) if query["cursor"] else None
    rows = await gateway.store.audit.page(limit=limit + 1, before_id=before, user_id=query["user"],
                                          action=query["action"])
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"data": rows, "next_cursor": str(rows[-1]["id"]) if more and rows else None})


async def streams(request: Request) -> Response:
    gateway = _admin(request)
    from gateway.core.clock import iso

    data = [
        {
            "id": stream_id,
            "user": s.user_id,
            "model": s.model,
            "started_at": iso(s.started_at),
            "bytes": s.observation.bytes,
            "generation_id": s.observation.generation_id,
        }
        for stream_id, s in list(gateway.streams.items())
    ]
    return json_response({"data": data, "count": len(data)})


routes: list[BaseRoute] = [
    Route(PREFIX + "/users", create_user, methods=["POST"]),
    Route(PREFIX + "/users", list_users, methods=["GET"]),
    Route(PREFIX + "/users/{user_id}", user, methods=["GET", "PATCH", "DELETE"]),
    Route(PREFIX + "/users/{user_id}/tokens", user_tokens, methods=["GET", "POST"]),
    Route(PREFIX + "/tokens/{token_id}/rotate", rotate_token, methods=["POST"]),
    Route(PREFIX + "/tokens/{token_id}", revoke_token, methods=["DELETE"]),
    Route(PREFIX + "/users/{user_id}/openrouter-key", openrouter_key, methods=["PUT", "DELETE"]),
    Route(PREFIX + "/emergency-stop", emergency_stop, methods=["GET", "PUT"]),
    Route(PREFIX + "/audit", audit, methods=["GET"]),
    Route(PREFIX + "/streams", streams, methods=["GET"]),
]
