"""What a request may cost before it runs: the bound its reservation holds against a budget.

Never under-reserves: the prompt is bounded by its text (or, for a small body, by its size) and the
completion by the request's cap or the configured default estimate.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal
from typing import Any

from gateway.catalog import ModelPrice
from gateway.core.config import TierConfig
from gateway.core.money import charged, to_pico

COMPLETION_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")  # the first valid one counts
_CAP_NAMES = frozenset(COMPLETION_CAPS)
SMALL_BODY_BYTES = 4096  # `prompt_tokens_bound` bounds bodies up to this size by their size


def _text_chars(value: Any) -> int:
    """Characters of text in strings, lists and the `text`/`content` of objects, walked with a stack:
    a client's nesting depth never reaches Python's recursion limit."""
    chars = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.append(item.get("text"))
            stack.append(item.get("content"))
    return chars


def prompt_tokens_bound(body: dict[str, Any], size: int | None = None) -> int:
    """A generous token count for the prompt: one token per three characters of text.

    Tokenizers average about four characters a token in English; three leaves room for
    code and other scripts. Over-estimating only holds a little more budget in flight.

    Given the body's `size` in bytes, a body of at most `SMALL_BODY_BYTES` is bounded by its
    size instead of walked: every character of its text is at least one byte of it, so the
    bound is never lower, and at most `SMALL_BODY_BYTES / 3` tokens higher (JSON syntax and
    roles count too). Larger bodies are walked, so images and other non-text parts do not
    inflate the hold."""
    if size is not None and size <= SMALL_BODY_BYTES:
        return size // 3 + 1
    messages = body.get("messages")
    if type(messages) is list:  # the usual shape (string contents) on a short path
        chars = 0
        for message in messages:
            content = message.get("content") if type(message) is dict else None
            chars += len(content) if type(content) is str and "text" not in message else _text_chars(message)
    else:
        chars = _text_chars(messages)
    if "prompt" in body:
        chars += _text_chars(body["prompt"])
    if "input" in body:
        chars += _text_chars(body["input"])
    return chars // 3 + 1


def completion_tokens_cap(body: dict[str, Any]) -> int | None:
    if _CAP_NAMES.isdisjoint(body):
        return None
    for name in COMPLETION_CAPS:
        value = body.get(name)
        if type(value) is int and value >= 0:  # `type`, not isinstance: True is not a cap
            return value
    return None


def estimate_cost(price: ModelPrice | None, body: dict[str, Any], default: Decimal, size: int | None = None) -> Decimal:
    """Provider cost bound: prompt at the prompt price plus `max_tokens` at the completion price.

    With no price (unknown model, cold catalogue) the configured default stands in; with no
    `max_tokens` the default stands in for the completion. `size`: see `prompt_tokens_bound`."""
    if price is None:
        return default
    cost = price.request + prompt_tokens_bound(body, size) * price.prompt
    cap = completion_tokens_cap(body)
    return cost + (cap * price.completion if cap is not None else default)


class Quote:
    """A catalogue price as one tier charges it, in whole picodollars: an estimate is integer work.

    Each price is the tier's charge rounded up, so `estimate(body, size)` is never below
    `to_pico(charged(estimate_cost(price, body, default, size), tier.markup_pct), ROUND_CEILING)` and above
    it by less than a picodollar per token."""

    __slots__ = ("price", "request", "prompt", "completion", "default")

    def __init__(self, price: ModelPrice | None, tier: TierConfig, default: Decimal) -> None:
        def charge(amount: Decimal) -> int:
            return to_pico(charged(amount, tier.markup_pct), ROUND_CEILING)

        self.price = price
        self.default = charge(default)
        self.request, self.prompt, self.completion = (
            (charge(price.request), charge(price.prompt), charge(price.completion)) if price else (0, 0, 0))

    def estimate(self, body: dict[str, Any], size: int | None = None) -> int:
        if self.price is None:
            return self.default
        cap = completion_tokens_cap(body)
        prompt = prompt_tokens_bound(body, size) * self.prompt
        return self.request + prompt + (self.default if cap is None else cap * self.completion)
