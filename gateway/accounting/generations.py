"""A caller's own generation in OpenRouter's `GET /generation` shape, plus what the gateway charged.

Why this shape: OpenRouter's SDKs (`generations.get_generation(id=)`) validate the answer
strictly (OPENROUTER.md §4, §12.3), so every field is present, null where unknown, and the
non-nullable ones (`id`, `model`, `origin`, `created_at`, `is_byok`, `total_cost`,
`usage`, `data_region`) always have a value.

What the user is charged wins over what OpenRouter charged: `total_cost` and `usage` are
the gateway's total (provider cost + markup); OpenRouter's own figure is `provider_cost`.
Extra fields: `provider_cost`, `markup`, `total_cost`, `markup_reason`, `tier`, `settled`,
`settle_status`.

Where the stats come from: the settled record's stored copy; otherwise a live look-up with
the user's key; if that fails (not there yet, upstream down), the gateway's own record.
"""

from __future__ import annotations

import logging
import re
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import orjson

from gateway.accounting.settlement import GENERATION_MONEY
from gateway.auth.tokens import Principal
from gateway.core.errors import BadRequest
from gateway.core.money import to_decimal
from gateway.store.usage import FINAL, SETTLED, UsageRecord
from gateway.upstream.client import UpstreamClient, UpstreamConnectionError

log = logging.getLogger("gateway.accounting.generations")

GENERATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,255}")
MONEY_FIELDS = GENERATION_MONEY


def parse_generation_id(raw: str | None) -> str:
    """The `id` query parameter, or a 400 that says what a generation id looks like."""
    if raw is None or raw == "":
        raise BadRequest("Query parameter 'id' is required: ?id=gen-… (the response's `id` or X-Generation-Id).",
                         param="id")
    if not GENERATION_ID.fullmatch(raw):
        raise BadRequest("Query parameter 'id' is not a generation id: expected up to 256 letters, digits, "
                         "'-', '_', '.' or ':' such as gen-1732000000-AbCd.", param="id")
    return raw


def stored_stats(record: UsageRecord) -> dict[str, Any] | None:
    """The upstream stats kept when the record settled (money back to Decimal)."""
    if not record.upstream:
        return None
    try:
        data = orjson.loads(record.upstream)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    for name in MONEY_FIELDS:
        if data.get(name) is not None:
            data[name] = to_decimal(data[name])
    return data


def stats_from_record(record: UsageRecord) -> dict[str, Any]:
    """Every /generation field the SDKs require, from what the gateway recorded itself."""
    return {
        "id": record.generation_id, "request_id": None, "upstream_id": None, "session_id": None,
        "preset_id": None, "workspace_id": None, "app_id": None, "external_user": None,
        "response_cache_source_id": None,
        "model": record.model or record.model_requested or "unknown", "provider_name": record.provider,
        "router": None, "api_type": "embeddings" if record.endpoint == "/embeddings" else "completions",
        "data_region": "global", "service_tier": None, "web_search_engine": None, "provider_responses": None,
        "total_cost": record.provider_cost, "usage": record.provider_cost, "cache_discount": None,
        "upstream_inference_cost": None, "is_byok": False,
        "tokens_prompt": record.prompt_tokens, "tokens_completion": record.completion_tokens,
        "native_tokens_prompt": record.prompt_tokens, "native_tokens_completion": record.completion_tokens,
        "native_tokens_reasoning": record.reasoning_tokens, "native_tokens_cached": record.cached_tokens,
        "native_tokens_completion_images": None,
        "num_media_prompt": None, "num_media_completion": None, "num_input_audio_prompt": None,
        "num_search_results": None, "num_fetches": None,
        "created_at": record.created_at, "latency": record.latency_ms, "generation_time": None,
        "moderation_latency": None, "streamed": record.streamed, "cancelled": record.cancelled,
        "finish_reason": record.finish_reason, "native_finish_reason": record.finish_reason,
        "origin": "", "http_referer": None, "user_agent": None,
    }


async def live_stats(upstream: UpstreamClient, principal: Principal, generation_id: str) -> dict[str, Any] | None:
    if principal.key is None:
        return None
    try:
        status, body = await upstream.call(
            "GET", "/generation?id=" + quote(generation_id, safe=""), key=principal.key.secret, retry=False
        )
    except UpstreamConnectionError as exc:
        log.info("live generation look-up failed: %s", exc)
        return None
    data = body.get("data") if status == 200 and isinstance(body, dict) else None
    return data if isinstance(data, dict) and to_decimal(data.get("total_cost")) is not None else None


async def generation_view(upstream: UpstreamClient, principal: Principal, record: UsageRecord) -> dict[str, Any]:
    """The `data` of `GET /v1/generation` for a record the caller owns."""
    stats = None
    if record.settle_status == SETTLED:
        stats = stored_stats(record)
    if stats is None:
        stats = await live_stats(upstream, principal, record.generation_id)
    data = stats_from_record(record)
    if stats is not None:
        data.update({k: v for k, v in stats.items() if v is not None or k not in data})
        for name in ("id", "model", "created_at", "origin", "data_region"):
            if data.get(name) is None:
                data[name] = stats_from_record(record)[name]
        if not isinstance(data.get("is_byok"), bool):
            data["is_byok"] = False
    total: Decimal = record.total_cost
    data.update({
        "total_cost": total,
        "usage": total,
        "provider_cost": record.provider_cost,
        "markup": record.markup,
        "markup_reason": record.markup_reason,
        "tier": record.tier,
        "settled": record.settle_status in FINAL,  # the figure is final (looked up, or reported: policy missing)
        "settle_status": record.settle_status,
        "cancelled": record.cancelled if data.get("cancelled") is None else data["cancelled"],
    })
    return data
