"""The caller's limits and key view: /v1/limits, /v1/key (and their /api/v1 mirrors).

`/api/v1/key` is what OpenRouter's SDKs call for `get_current_key_metadata()`, so it keeps
OpenRouter's `/key` shape with every field the pinned SDKs require (OPENROUTER.md §6,
§12.3), describing the caller's platform token and the user's budget.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from gateway.api.common import gateway_of, json_response, mirrored, principal_of
from gateway.auth.tokens import bearer
from gateway.core.clock import iso
from gateway.core.money import ZERO
from gateway.core.windows import expiry, period_end
from gateway.limits.policy import (
    BUDGETS,
    HOUR_BUCKET_S,
    MINUTE_BUCKET_S,
    Limits,
    Snapshot,
    first_refusal,
)
from gateway.store.tokens import display_prefix

RESET_INTERVAL = {"daily_budget_usd": "daily", "monthly_budget_usd": "monthly"}
DEPRECATED_NOTE = "This field is deprecated and safe to ignore."


def _window(limit: int | None, buckets: dict[int, int], bucket_s: float) -> dict[str, Any]:
    used = sum(buckets.values())
    return {
        "limit": limit,
        "used": used,
        "remaining": None if limit is None else max(limit - used, 0),
        # when the oldest counted request (or token) leaves the sliding window
        "resets_at": iso(expiry(min(buckets), bucket_s)) if buckets else None,
    }


def _budget(name: str, limit: Decimal | None, snapshot: Snapshot, now: float) -> dict[str, Any]:
    spent = snapshot.spend.get(BUDGETS[name], ZERO)
    used = spent + snapshot.reserved
    return {
        "limit": limit,
        "used": used,
        "spent": spent,
        "reserved": snapshot.reserved,
        "remaining": None if limit is None else max(limit - used, ZERO),
        "resets_at": iso(period_end(BUDGETS[name], now).timestamp()),
    }


def describe_limits(limits: Limits, snapshot: Snapshot, now: float) -> dict[str, Any]:
    return {
        "requests_per_minute": _window(limits.requests_per_minute, snapshot.minute, MINUTE_BUCKET_S),
        "requests_per_hour": _window(limits.requests_per_hour, snapshot.hour, HOUR_BUCKET_S),
        "max_concurrent": {
            "limit": limits.max_concurrent,
            "used": snapshot.inflight,
            "remaining": None if limits.max_concurrent is None else max(limits.max_concurrent - snapshot.inflight, 0),
            "resets_at": None,
        },
        "tokens_per_hour": _window(limits.tokens_per_hour, snapshot.tokens, HOUR_BUCKET_S),
        "daily_budget_usd": _budget("daily_budget_usd", limits.daily_budget_usd, snapshot, now),
        "monthly_budget_usd": _budget("monthly_budget_usd", limits.monthly_budget_usd, snapshot, now),
    }


async def get_limits(request: Request) -> Response:
    principal = await principal_of(request)
    limits, snapshot, now = await gateway_of(request).limiter.standing(principal)
    return json_response(
        {
            "data": {
                "user_id": principal.user_id,
                "tier": principal.tier,
                "within_limits": first_refusal(limits, snapshot, free=False) is None,
                "limits": describe_limits(limits, snapshot, now),
            }
        }
    )


def _key_budgets(limits: Limits, snapshot: Snapshot, now: float) -> list[dict[str, Any]]:
    budgets = []
    for name in BUDGETS:
        limit = getattr(limits, name)
        if limit is None:
            continue
        view = _budget(name, limit, snapshot, now)
        budgets.append(
            {
                "budget_id": name,
                "guardrail_id": None,
                "include_byok": True,
                "limit_usd": limit,
                "remaining_usd": view["remaining"],
                "reset_interval": RESET_INTERVAL[name],
                "resets_at": view["resets_at"],
                "scope": "member",
                "spend_usd": view["spent"],
            }
        )
    return budgets


async def get_key(request: Request) -> Response:
    """OpenRouter's `/key` for the caller's platform token; the tightest budget is the key's limit."""
    principal = await principal_of(request)
    limits, snapshot, now = await gateway_of(request).limiter.standing(principal)
    budgets = _key_budgets(limits, snapshot, now)
    effective = min(budgets, key=lambda b: b["remaining_usd"], default=None)
    spend = snapshot.spend
    usage = {
        "usage": spend.get("all", ZERO),
        "usage_daily": spend.get("day", ZERO),
        "usage_weekly": spend.get("week", ZERO),
        "usage_monthly": spend.get("month", ZERO),
    }
    byok = principal.key is not None and principal.key.kind == "byok"
    token = bearer(request.headers.get("authorization")) or ""
    return json_response(
        {
            "data": {
                "label": display_prefix(token) + "...",
                "limit": effective["limit_usd"] if effective else None,
                "limit_remaining": effective["remaining_usd"] if effective else None,
                "limit_reset": effective["reset_interval"] if effective else None,
                "include_byok_in_limit": True,
                **usage,
                **{"byok_" + name: (value if byok else ZERO) for name, value in usage.items()},
                "is_free_tier": False,
                "is_management_key": False,
                "is_provisioning_key": False,
                "expires_at": iso(principal.expires_at) if principal.expires_at is not None else None,
                "creator_user_id": None,
                "organization_id": None,
                "workspace_id": None,
                "allowed_data_regions": ["global"],
                # the gateway sets no separate free-model cap; -1 = none, like `rate_limit.requests`
                "free_model_daily_requests": {"used": 0, "limit": -1, "remaining": -1},
                "rate_limit": {
                    "requests": limits.requests_per_minute if limits.requests_per_minute is not None else -1,
                    "interval": "60s",
                    "note": DEPRECATED_NOTE,
                },
                "budgets": budgets,
                "effective_budget": effective,
                "tier": principal.tier,
                "user_id": principal.user_id,
            }
        }
    )


routes: list[BaseRoute] = [
    *mirrored("/limits", get_limits, ["GET"]),
    *mirrored("/key", get_key, ["GET"]),
    *mirrored("/auth/key", get_key, ["GET"]),
]
