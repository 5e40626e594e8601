"""The audit log: who did what to whom, and when. Appended to, never updated."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.core.clock import Clock, iso, system_clock
from gateway.store.database import Database, Row


class AuditRepository:
    def __init__(self, db: Database, clock: Clock = system_clock) -> None:
        self._db = db
        self._clock = clock

    async def append(
        self, *, actor: str, action: str, user_id: str | None = None, target: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        await self._db.execute(
            "INSERT INTO audit_log (at, actor, action, user_id, target, details) VALUES (?, ?, ?, ?, ?, ?)",
            (iso(self._clock()), actor, action, user_id, target, orjson.dumps(details or {}).decode()),
        )

    async def page(
        self, *, limit: int, before_id: int | None = None, user_id: str | None = None, action: str | None = None
    ) -> list[Row]:
        """Newest first; `before_id` is the cursor from the previous page."""
        clauses: list[str] = []
        params: list[int | str] = []
        if before_id is not None:
            clauses.append("id < ?")
            params.append(before_id)
        if user_id is not None:
            clauses.append("user_id = ?")
            params.append(user_id)
        if action is not None:
            clauses.append("action = ?")
            params.append(action)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._db.fetchall(f"SELECT * FROM audit_log {where} ORDER BY id DESC LIMIT ?", (*params, limit))
        for row in rows:
            row["details"] = orjson.loads(row["details"])
        return rows
