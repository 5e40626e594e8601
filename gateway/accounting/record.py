"""One generation's usage record, built from what the response said (pure: no I/O, no clock).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.auth.tokens import Principal
from gateway.core.clock import iso
from gateway.core.config import TierConfig
from gateway.core.money import ZERO, markup_for, to_decimal
from gateway.proxy.sse import Observation
from gateway.proxy.types import ProxyRequest
from gateway.store.usage import PENDING, UNSETTLED, UsageRecord

if TYPE_CHECKING:
    pass


LOCAL_ID_PREFIX = "gw-"  # records of responses that carried no generation id (nothing to look up)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_tokens(usage: dict[str, Any] | None) -> tuple[int, int, int, int]:
    """(prompt, completion, reasoning, cached) from an OpenAI/OpenRouter `usage` object."""
    if not usage:
        return 0, 0, 0, 0
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    reasoning = _int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
    return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")), reasoning, cached


def build_record(
    principal: Principal,
    request: ProxyRequest,
    observation: Observation,
    *,
    tier: TierConfig,
    free: bool,
    first_lookup_at: float,
) -> UsageRecord:
    """The provisional usage record of one proxied generation (pure: no I/O, no clock)."""
    usage = observation.usage
    cost = to_decimal(usage.get("cost")) if usage else None
    provider_cost = cost if cost is not None and cost >= 0 else ZERO
    markup, reason = markup_for(provider_cost, principal.tier, tier, free=free)
    prompt, completion, reasoning, cached = usage_tokens(usage)
    generation_id = observation.generation_id
    error = observation.error
    ended = request.ended if request.ended is not None else request.started
    return UsageRecord(
        generation_id=generation_id or LOCAL_ID_PREFIX + request.request_id,
        user_id=principal.user_id,
        token_id=principal.token_id,
        request_id=request.request_id,
        endpoint=request.endpoint,
        model_requested=request.model,
        model=observation.model,
        provider=observation.provider,
        streamed=request.stream,
        cancelled=request.cancelled,
        finish_reason=observation.finish_reason,
        error=str(error.get("message") or error.get("code") or "error")[:300] if error else None,
        status=request.status or None,
        prompt_tokens=prompt,
        completion_tokens=completion,
        reasoning_tokens=reasoning,
        cached_tokens=cached,
        provisional_cost=provider_cost,
        provider_cost=provider_cost,
        markup=markup,
        total_cost=provider_cost + markup,
        markup_pct=ZERO if free else tier.markup_pct,
        markup_reason=reason,
        free=free,
        tier=principal.tier,
        latency_ms=max(0, round((ended - request.started) * 1000)),
        created_at=iso(request.started),
        settle_status=PENDING if generation_id else UNSETTLED,
        next_attempt_at=iso(first_lookup_at) if generation_id else None,
    )
