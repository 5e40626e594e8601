"""The emergency stop: one switch every instance reads before proxying.
"""

from __future__ import annotations


class EmergencyStop:
    """The switch every instance reads before proxying; kept fresh by the app's poller."""

    __slots__ = ("enabled", "reason")

    def __init__(self) -> None:
        self.enabled = False
        self.reason: str | None = None
