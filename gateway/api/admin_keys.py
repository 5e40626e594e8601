"""Managed OpenRouter keys and credit sync for the admin: /admin/v1/users/{id}/managed-key…, /admin/v1/credits/sync."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.api.admin import KEY
from gateway.api.common import body_bytes, gateway_of, json_response, parse_json_object
from gateway.api.inputs import Body, Field, Money, accepts, read_body

PREFIX = "/admin/v1"
LIMIT = Money("limit_usd", hint=", or null for no limit",
              description="the key's spending limit at OpenRouter in USD; null for none")
NEW_KEY = Body(LIMIT, required=False, description="optional: without limit_usd, the tier's monthly budget is the limit")
KEY_CHANGES = Body(LIMIT, Field("disabled", "boolean", nullable=False, message="disabled must be true or false."))


def _provisioner(request: Request) -> Any:
    gateway = gateway_of(request)
    gateway.admin.check(request.headers.get("authorization"))
    return gateway.provisioner


@accepts(POST=NEW_KEY, PATCH=KEY_CHANGES, returns={"POST": KEY, "PATCH": KEY})
async def managed_key(request: Request) -> Response:
    provisioner = _provisioner(request)
    user_id = request.path_params["user_id"]
    raw = await body_bytes(request)
    empty = request.method == "POST" and not request.headers.get("content-type") and not raw
    body = {} if empty else parse_json_object(request, raw)  # POST's body is optional: {} = the tier's default limit
    if request.method == "POST":
        described = await provisioner.provision(user_id, actor="admin", **read_body(request, NEW_KEY, body))
        return json_response(described, status=201)
    return json_response(await provisioner.update(user_id, read_body(request, KEY_CHANGES, body), actor="admin"))


@accepts(returns={"POST": KEY})
async def rotate_managed_key(request: Request) -> Response:
    provisioner = _provisioner(request)
    return json_response(await provisioner.rotate(request.path_params["user_id"], actor="admin"))


async def sync_credits(request: Request) -> Response:
    """Sync every user's credits now: the report if done within 10 s, else 202 with the progress so far."""
    import asyncio

    gateway = gateway_of(request)
    gateway.admin.check(request.headers.get("authorization"))
    run = gateway.credit_sync.start()
    try:
        report = await asyncio.wait_for(asyncio.shield(run), 10)
    except TimeoutError:
        current = gateway.credit_sync.current
        return json_response({"status": "running", **(current.public() if current else {})}, status=202)
    return json_response({"status": "done", **report.public()})


routes: list[BaseRoute] = [
    Route(PREFIX + "/users/{user_id}/managed-key", managed_key, methods=["POST", "PATCH"]),
    Route(PREFIX + "/users/{user_id}/managed-key/rotate", rotate_managed_key, methods=["POST"]),
    Route(PREFIX + "/credits/sync", sync_credits, methods=["POST"]),
]
