"""What a generation costs its user: the one place a charge is computed (provider cost plus the tier's markup).

The proxy asks `Pricing.charge` once per generation that reached the upstream and hands the same `Charge`
to accounting (the record) and to limits (the budgets), so the two can never disagree.
"""

from __future__ import annotations

from typing import Any, Callable

from gateway.auth.tokens import Principal
from gateway.core.config import Config
from gateway.core.money import ZERO, markup_for, to_decimal, to_pico
from gateway.proxy.sse import Observation
from gateway.proxy.types import Charge, ProxyRequest

IsFreeGeneration = Callable[[str | None, str | None], bool]  # (model requested, model served) → free?


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_tokens(usage: dict[str, Any] | None) -> tuple[int, int, int, int]:
    """(prompt, completion, reasoning, cached) from an OpenAI/OpenRouter `usage` object.

    Chat and completions say `prompt_tokens`/`completion_tokens`; the Responses API says
    `input_tokens`/`output_tokens` (details likewise renamed)."""
    if not usage:
        return 0, 0, 0, 0
    if "prompt_tokens" in usage or "input_tokens" not in usage:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        prompt_details, completion_details = usage.get("prompt_tokens_details"), usage.get("completion_tokens_details")
    else:
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
        prompt_details, completion_details = usage.get("input_tokens_details"), usage.get("output_tokens_details")
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    reasoning = _int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
    return _int(prompt), _int(completion), reasoning, cached


class Pricing:
    """The proxy's `Pricing`: the response's `usage.cost` (provisional until settled) at the user's tier."""

    def __init__(self, config: Config, is_free_generation: IsFreeGeneration) -> None:
        self._config = config
        self._is_free = is_free_generation

    def charge(self, principal: Principal, request: ProxyRequest, observation: Observation) -> Charge:
        usage = observation.usage
        cost = to_decimal(usage.get("cost")) if usage else None
        provider_cost = cost if cost is not None and cost >= 0 else ZERO
        free = self._is_free(request.model, observation.model or request.model)
        markup_pct = ZERO if free else self._config.tier(principal.tier).markup_pct
        markup, reason = markup_for(provider_cost, principal.tier, markup_pct, free=free)
        total = provider_cost + markup
        prompt, completion, reasoning, cached = usage_tokens(usage)
        return Charge(provider_cost, markup, total, to_pico(total) if total else 0, markup_pct, reason, free,
                      prompt, completion, reasoning, cached, cost is not None and cost >= 0)
