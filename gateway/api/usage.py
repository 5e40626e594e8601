"""Usage and generations: /v1/generation, /v1/usage and the admin's /admin/v1/usage.

Thin handlers: validate the query (400 naming the parameter, before anything else
happens), flush the ledger's queue so a report includes what was just recorded, and
serve the one shared aggregation (`gateway.usage_report`).
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.accounting.generations import generation_view, parse_generation_id
from gateway.accounting.reports import API_FORMATS, GROUPS, PERIODS, report_csv, usage_report
from gateway.api.common import gateway_of, json_response, mirrored, principal_of
from gateway.api.inputs import Choice, Query, Text, accepts, read_query
from gateway.core.errors import NotFound

log = logging.getLogger("gateway.api.usage")
PERIOD = Choice("period", "the current UTC day, week (from Monday) or month", allowed=PERIODS, default="month")
GENERATION_QUERY = Query(Text("id", "the generation id: a response's `id` or X-Generation-Id", required=True,
                              check=parse_generation_id))
USAGE_QUERY = Query(PERIOD)
ADMIN_USAGE_QUERY = Query(
    PERIOD,
    Choice("group_by", "one row per", allowed=GROUPS, default="user"),
    Choice("format", "csv for a spreadsheet", allowed=API_FORMATS, default="json"),
    Text("user_id", "only this user"),
)


async def _flushed(gateway: Any) -> None:
    """Reports include records still queued; a failing write is logged, the report still served."""
    try:
        await gateway.ledger.flush()
    except Exception:
        log.exception("flushing usage records before a report failed")


@accepts(GET=GENERATION_QUERY)
async def generation(request: Request) -> Response:
    principal = await principal_of(request)
    generation_id = read_query(request, GENERATION_QUERY)["id"]
    gateway = gateway_of(request)
    record = await gateway.ledger.lookup(generation_id)
    if record is None or record.user_id != principal.user_id:
        raise NotFound(f"Generation {generation_id} not found among your generations.", param="id")
    return json_response({"data": await generation_view(gateway.upstream, principal, record)})


@accepts(GET=USAGE_QUERY)
async def usage(request: Request) -> Response:
    principal = await principal_of(request)
    period = read_query(request, USAGE_QUERY)["period"]
    gateway = gateway_of(request)
    await _flushed(gateway)
    report = await usage_report(
        gateway.store, period=period, group_by="model", user_id=principal.user_id, now=gateway.clock()
    )
    return json_response(report)


@accepts(GET=ADMIN_USAGE_QUERY)
async def admin_usage(request: Request) -> Response:
    gateway = gateway_of(request)
    gateway.admin.check(request.headers.get("authorization"))
    query = read_query(request, ADMIN_USAGE_QUERY)
    period, group_by, fmt, user_id = query["period"], query["group_by"], query["format"], query["user_id"]
    await _flushed(gateway)
    report = await usage_report(gateway.store, period=period, group_by=group_by, user_id=user_id, now=gateway.clock())
    if fmt == "csv":
        return Response(
            report_csv(report),
            media_type="text/csv",
            headers={"content-disposition": f'attachment; filename="usage-{period}-by-{group_by}.csv"'},
        )
    return json_response(report)


routes: list[BaseRoute] = [
    *mirrored("/generation", generation, ["GET"]),
    *mirrored("/usage", usage, ["GET"]),
    Route("/admin/v1/usage", admin_usage, methods=["GET"]),
]
