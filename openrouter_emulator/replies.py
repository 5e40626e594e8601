"""What the emulator's models say: a fixed reply, as long as the caller's token cap asks."""

from __future__ import annotations

from typing import Any

from openrouter_emulator.state import EmulatorError

MAX_COMPLETION_TOKENS = 10_000
_REPLY = ("Hello", " from", " the", " emulator", ".")  # the default 5-token reply; longer ones cycle it


def reply_tokens(body: dict[str, Any]) -> list[str]:
    """The reply, one string per token: ``max_tokens`` of them (≤ 10000), else 5."""
    wanted = body.get("max_tokens", body.get("max_completion_tokens"))
    if wanted is None:
        return list(_REPLY)
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise EmulatorError(400, "max_tokens must be a positive integer")
    n = min(wanted, MAX_COMPLETION_TOKENS)
    return [_REPLY[0]] + [_REPLY[i % 5] if i % 5 else " " + _REPLY[0] for i in range(1, n)]
