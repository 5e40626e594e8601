"""The reservation estimate walks client bodies without recursion, whatever their nesting."""

from __future__ import annotations

from gateway.limits.estimates import SMALL_BODY_BYTES, prompt_tokens_bound


def test_deep_nesting_is_walked_without_recursion() -> None:
    content: object = "x" * (SMALL_BODY_BYTES * 3)
    for _ in range(100_000):
        content = [content]
    body = {"messages": [{"role": "user", "content": content}], "prompt": content, "input": [[{"text": "abc"}]]}
    assert prompt_tokens_bound(body, size=SMALL_BODY_BYTES + 1) == (2 * SMALL_BODY_BYTES * 3 + 3) // 3 + 1


def test_text_and_content_of_parts_are_counted() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "abcdef"},
                                                      {"type": "image_url", "image_url": {"url": "y" * 999}}]}]}
    assert prompt_tokens_bound(body, size=SMALL_BODY_BYTES + 1) == 6 // 3 + 1
