"""`GET /admin/v1/alerts`: the webhook deliveries and their state, newest first (admin token)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.alerts.delivery import webhook_label
from gateway.api.common import gateway_of, json_response
from gateway.api.inputs import Choice, IntParam, Query, Text, accepts, read_query
from gateway.core.clock import iso
from gateway.store.alerts import STATES

QUERY = Query(
    IntParam("limit", "rows per page", default=50, low=1, high=500),
    Choice("state", "only deliveries in this state", allowed=STATES),
    Text("cursor", "the next_cursor of the previous page", pattern="[^|]*[|].*",
         message="cursor must be the next_cursor value of the previous page."),
)


@accepts(GET=QUERY)
async def list_alerts(request: Request) -> Response:
    gateway = gateway_of(request)
    gateway.admin.check(request.headers.get("authorization"))
    query = read_query(request, QUERY)
    limit = query["limit"]
    rows = await gateway.store.alerts.page(limit=limit + 1, state=query["state"], before=query["cursor"])
    more = len(rows) > limit
    rows = rows[:limit]
    data = [
        {
            "id": row["id"], "event": row["event"], "user_id": row["user_id"], "webhook": webhook_label(row["webhook"]),
            "state": row["state"], "attempts": row["attempts"], "last_status": row["last_status"],
            "last_error": row["last_error"], "created_at": row["created_at"], "next_attempt_at": row["next_attempt_at"],
            "delivered_at": row["delivered_at"],
        }
        for row in rows
    ]
    checked = gateway.alerts.checked_at
    return json_response({
        "data": data,
        "next_cursor": f"{rows[-1]['created_at']}|{rows[-1]['id']}" if more and rows else None,
        "webhooks": len(gateway.config.alerts.webhooks),
        "checked_at": iso(checked) if checked is not None else None,
    })


routes: list[BaseRoute] = [Route("/admin/v1/alerts", list_alerts, methods=["GET"])]
