"""Small named values shared by every instance (the emergency stop, for one)."""

from __future__ import annotations

from gateway.core.clock import Clock, iso, system_clock
from gateway.store.changes import publish
from gateway.store.database import Database


class StateRepository:
    def __init__(self, db: Database, clock: Clock = system_clock) -> None:
        self._db = db
        self._clock = clock

    async def get(self, name: str) -> str | None:
        row = await self._db.fetchone("SELECT value FROM gateway_state WHERE name = ?", (name,))
        return row["value"] if row else None

    async def set(self, name: str, value: str) -> None:
        """Store the value and name it in the change feed, so every instance reloads it."""
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM gateway_state WHERE name = ?", (name,))
            await tx.execute(
                "INSERT INTO gateway_state (name, value, updated_at) VALUES (?, ?, ?)", (name, value, iso(self._clock()))
            )
            await publish(tx, "state", name, self._clock())
