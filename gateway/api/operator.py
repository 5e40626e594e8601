"""What the operator's dashboard reads (admin token): daily series, model figures, top spenders, the overview.

Thin handlers over `accounting.trends` and the running services; every query parameter is validated
(400 naming it) before anything is read.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.accounting.reports import PERIODS
from gateway.accounting.trends import SPLITS, daily_series, model_stats, top_spenders
from gateway.api.common import gateway_of, json_response
from gateway.api.inputs import Choice, IntParam, Query, accepts, read_query
from gateway.core.clock import iso
from gateway.limits.policy import Limits

PREFIX = "/admin/v1"
DAILY_QUERY = Query(IntParam("days", "UTC days back, today included", default=30, low=1, high=90),
                    Choice("split", "one series per", allowed=SPLITS, default="tier"))
MODELS_QUERY = Query(Choice("period", "the current UTC day, week or month", allowed=PERIODS, default="month"))
TOP_QUERY = Query(IntParam("limit", "how many users", default=10, low=1, high=100))


def _admin(request: Request) -> Any:
    gateway = gateway_of(request)
    gateway.admin.check(request.headers.get("authorization"))
    return gateway


async def _flushed(gateway: Any) -> None:
    try:
        await gateway.ledger.flush()
    except Exception:  # noqa: BLE001 - the figures are still served from what is stored
        pass


@accepts(GET=DAILY_QUERY)
async def usage_daily(request: Request) -> Response:
    """Cost and requests per UTC day for the last `days` days, split by tier, model or user."""
    gateway = _admin(request)
    query = read_query(request, DAILY_QUERY)
    await _flushed(gateway)
    return json_response(await daily_series(gateway.store, days=query["days"], split=query["split"],
                                            now=gateway.clock()))


@accepts(GET=MODELS_QUERY)
async def usage_models(request: Request) -> Response:
    """Per model this period: requests, cost, latency and time-to-first-byte percentiles."""
    gateway = _admin(request)
    period = read_query(request, MODELS_QUERY)["period"]
    await _flushed(gateway)
    return json_response(await model_stats(gateway.store, period=period, now=gateway.clock()))


@accepts(GET=TOP_QUERY)
async def top_users(request: Request) -> Response:
    """The users who spent most this month, with their monthly budget."""
    gateway = _admin(request)
    limit = read_query(request, TOP_QUERY)["limit"]
    config = gateway.config

    def monthly_budget(user: dict[str, Any]) -> Decimal | None:
        return Limits.of(config.tier(user["tier"]), user.get("overrides")).monthly_budget_usd

    await _flushed(gateway)
    return json_response(await top_spenders(gateway.store, limit=limit, now=gateway.clock(),
                                            monthly_budget=monthly_budget))


async def overview(request: Request) -> Response:
    """The live state of every worker: streams, queues, the stop; users with low credits; recent problems."""
    gateway = _admin(request)
    low = gateway.config.accounting.low_balance_usd
    gauges, events = await gateway.metrics.live()  # this worker's figures and the others' latest
    recent = [{**event, "at": iso(event["at"])} for event in events]
    return json_response({
        "object": "overview",
        "now": iso(gateway.clock()),
        "streams_in_flight": int(gauges.get("gateway_streams_in_flight", len(gateway.streams))),
        "settlements_pending": int(gauges.get("gateway_settlements_pending", gateway.ledger.settler.pending)),
        "usage_queue_depth": int(gauges.get("gateway_usage_queue_depth", gateway.ledger.backlog)),
        "emergency_stop": {"enabled": gateway.stop.enabled, "reason": gateway.stop.reason},
        "low_balance_usd": low,
        "low_credit_users": await gateway.store.account.low_balances(low),
        "recent_refusals": [e for e in recent if e["what"] == "refusal"],
        "recent_upstream_errors": [e for e in recent if e["what"] == "upstream_error"],
    })


routes: list[BaseRoute] = [
    Route(PREFIX + "/usage/daily", usage_daily, methods=["GET"]),
    Route(PREFIX + "/usage/models", usage_models, methods=["GET"]),
    Route(PREFIX + "/usage/top-users", top_users, methods=["GET"]),
    Route(PREFIX + "/overview", overview, methods=["GET"]),
]
