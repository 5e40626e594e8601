"""Token counts from either usage shape: chat's `prompt_tokens` and the Responses API's `input_tokens`."""

from __future__ import annotations

from gateway.accounting.pricing import usage_tokens


def test_chat_usage() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 2},
             "completion_tokens_details": {"reasoning_tokens": 1}}
    assert usage_tokens(usage) == (7, 5, 1, 2)


def test_responses_usage() -> None:
    usage = {"input_tokens": 7, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 2},
             "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 12}
    assert usage_tokens(usage) == (7, 5, 1, 2)


def test_nonsense_counts_are_zero() -> None:
    assert usage_tokens({"input_tokens": "7", "output_tokens": -1, "input_tokens_details": []}) == (0, 0, 0, 0)
    assert usage_tokens(None) == (0, 0, 0, 0)
