"""One generation's usage record, built from what the response said and its charge (pure: no I/O, no clock)."""

from __future__ import annotations

from gateway.auth.tokens import Principal
from gateway.core.clock import iso
from gateway.proxy.sse import Observation
from gateway.proxy.types import Charge, ProxyRequest
from gateway.store.usage import PENDING, REPORTED, UNSETTLED, UsageRecord

LOCAL_ID_PREFIX = "gw-"  # records of responses that carried no generation id (nothing to look up)


def build_record(
    principal: Principal,
    request: ProxyRequest,
    observation: Observation,
    charge: Charge,
    *,
    first_lookup_at: float,
    look_up: bool = True,
) -> UsageRecord:
    """The usage record of one proxied generation, priced by `charge`: provisional until its look-up, or
    final as reported when `look_up` is False (a response that carried its cost, under policy `missing`)."""
    generation_id = observation.generation_id
    error = observation.error
    ended = request.ended if request.ended is not None else request.started
    if not generation_id:
        status = UNSETTLED
    else:
        status = PENDING if look_up else REPORTED
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
        prompt_tokens=charge.prompt_tokens,
        completion_tokens=charge.completion_tokens,
        reasoning_tokens=charge.reasoning_tokens,
        cached_tokens=charge.cached_tokens,
        provisional_cost=charge.provider_cost,
        provider_cost=charge.provider_cost,
        markup=charge.markup,
        total_cost=charge.total,
        markup_pct=charge.markup_pct,
        markup_reason=charge.markup_reason,
        free=charge.free,
        tier=principal.tier,
        latency_ms=max(0, round((ended - request.started) * 1000)),
        created_at=iso(request.started),
        settled_at=iso(ended) if status == REPORTED else None,
        settle_status=status,
        next_attempt_at=iso(first_lookup_at) if status == PENDING else None,
    )
