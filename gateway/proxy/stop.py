"""The emergency stop: one switch, shared by every instance through `store.state`, read before proxying."""

from __future__ import annotations

import orjson

from gateway.store.state import StateRepository

STATE_NAME = "emergency_stop"


class EmergencyStop:
    """The switch the proxy reads on every request; `set` writes it for every instance, whose change
    feed then calls `on_state_change` to reload it."""

    __slots__ = ("enabled", "reason", "_state")

    def __init__(self, state: StateRepository) -> None:
        self.enabled = False
        self.reason: str | None = None
        self._state = state

    async def load(self) -> None:
        raw = await self._state.get(STATE_NAME)
        value = orjson.loads(raw) if raw else {}
        self.enabled = bool(value.get("enabled"))
        self.reason = value.get("reason")

    async def set(self, enabled: bool, reason: str | None) -> None:
        await self._state.set(STATE_NAME, orjson.dumps({"enabled": enabled, "reason": reason if enabled else None}).decode())
        await self.load()

    async def on_state_change(self, name: str) -> None:
        if name == STATE_NAME:
            await self.load()
