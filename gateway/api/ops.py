"""Liveness and readiness."""

from __future__ import annotations

import asyncio
import sys

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.common import gateway_of, json_response
from gateway.limits.in_redis import RedisCounters
from gateway.upstream.client import UpstreamConnectionError


async def health(request: Request) -> Response:
    """Alive; with the server and the event loop it runs on (the bench reports them per target)."""
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    return json_response({"status": "ok", "server": "granian" if "granian" in sys.modules else "uvicorn",
                          "loop": "uvloop" if loop == "uvloop" else "asyncio"})


async def ready(request: Request) -> Response:
    """Ready when the database answers, the upstream is reachable (any HTTP answer counts) and,
    with `redis.url` set, Redis answers."""
    gateway = gateway_of(request)
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(gateway.store.db.fetchone("SELECT 1 AS one"), 2)
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        response = await asyncio.wait_for(gateway.upstream.open("GET", "/models?limit=1", key="", retries=0), 5)
        await response.close()
        checks["upstream"] = "ok"
    except (TimeoutError, UpstreamConnectionError) as exc:
        checks["upstream"] = f"error: {type(exc).__name__}"
    counters = gateway.limiter.backend  # Redis even while admissions run on local counters (`redis.on_error: local`)
    if isinstance(counters, RedisCounters):  # shared limits in Redis: named whenever it does not answer
        try:
            await asyncio.wait_for(counters.ping(), 3)
            checks["redis"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["redis"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return json_response({"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503)


async def metrics(request: Request) -> Response:
    """Prometheus text format, every worker's figures in one scrape; unauthenticated like /health (expose it
    on a private network)."""
    gateway = gateway_of(request)
    return Response(await gateway.metrics.scrape(), media_type="text/plain; version=0.0.4")


routes = [
    Route("/metrics", metrics, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/health/ready", ready, methods=["GET"]),
]
