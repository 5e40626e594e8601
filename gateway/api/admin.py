"""The admin API under /admin/v1 (admin token): users, tokens, keys, emergency stop, audit, streams."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.accounts.byok import connect_byok
from gateway.api.common import (
    field_of,
    gateway_of,
    json_body,
    json_response,
    only_fields,
    query_int,
)
from gateway.core.errors import BadRequest, NotFound

PREFIX = "/admin/v1"
MAX_REASON_CHARS = 500


def _admin(request: Request) -> Any:
    gateway = gateway_of(request)
    gateway.admin.check(request.headers.get("authorization"))
    return gateway


# -- users -------------------------------------------------------------------


async def create_user(request: Request) -> Response:
    gateway = _admin(request)
    body = await json_body(request)
    only_fields(body, ("id", "email", "tier"))
    user = await gateway.directory.add_user(user_id=body.get("id"), email=body.get("email"), tier=body.get("tier"))
    return json_response(user, status=201)


async def list_users(request: Request) -> Response:
    gateway = _admin(request)
    limit = query_int(request, "limit", 50, low=1, high=500)
    cursor = request.query_params.get("cursor") or None
    return json_response(await gateway.directory.list_users(limit=limit, cursor=cursor))


async def user(request: Request) -> Response:
    gateway = _admin(request)
    user_id = request.path_params["user_id"]
    if request.method == "GET":
        return json_response(await gateway.directory.show_user(user_id))
    if request.method == "PATCH":
        return json_response(await gateway.directory.update_user(user_id, await json_body(request)))
    if await gateway.directory.get_user(user_id):
        await gateway.provisioner.remove(user_id, actor="admin")  # a managed key is deleted upstream, not orphaned
    await gateway.directory.delete_user(user_id)
    return Response(status_code=204)


# -- tokens ------------------------------------------------------------------


async def user_tokens(request: Request) -> Response:
    gateway = _admin(request)
    user_id = request.path_params["user_id"]
    if request.method == "GET":
        return json_response({"data": await gateway.directory.list_tokens(user_id)})
    body = await json_body(request)
    only_fields(body, ("name", "expires_at"))
    token = await gateway.directory.create_token(user_id, name=body.get("name"), expires_at=body.get("expires_at"))
    return json_response(token, status=201)


async def rotate_token(request: Request) -> Response:
    gateway = _admin(request)
    return json_response(await gateway.directory.rotate_token(request.path_params["token_id"]), status=201)


async def revoke_token(request: Request) -> Response:
    gateway = _admin(request)
    return json_response(await gateway.directory.revoke_token(request.path_params["token_id"]))


# -- OpenRouter keys -----------------------------------------------------------


async def openrouter_key(request: Request) -> Response:
    gateway = _admin(request)
    user_id = request.path_params["user_id"]
    if request.method == "PUT":
        body = await json_body(request)
        only_fields(body, ("api_key",))
        described = await connect_byok(gateway.store, gateway.vault, gateway.upstream, user_id, body.get("api_key"))
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


async def emergency_stop(request: Request) -> Response:
    gateway = _admin(request)
    if request.method == "PUT":
        body = await json_body(request)
        only_fields(body, ("enabled", "reason"))
        enabled = field_of(body, "enabled", bool, required=True)
        reason = field_of(body, "reason", str)
        if reason is not None and len(reason) > MAX_REASON_CHARS:
            raise BadRequest(f"Field 'reason' must be at most {MAX_REASON_CHARS} characters.", param="reason")
        await gateway.stop.set(enabled, reason)
        await gateway.store.audit.append(
            actor="admin", action="emergency_stop.on" if enabled else "emergency_stop.off",
            details={"reason": reason},
        )
    return json_response({"enabled": gateway.stop.enabled, "reason": gateway.stop.reason})


async def audit(request: Request) -> Response:
    gateway = _admin(request)
    limit = query_int(request, "limit", 50, low=1, high=500)
    cursor = request.query_params.get("cursor")
    before = None
    if cursor:
        if not cursor.isdigit():
            raise BadRequest("cursor must be the next_cursor value of the previous page.", param="cursor")
        before = int(cursor)
    rows = await gateway.store.audit.page(
        limit=limit + 1, before_id=before, user_id=request.query_params.get("user") or request.query_params.get("user_id"),
        action=request.query_params.get("action"),
    )
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
