"""The alert outbox: deliveries written before they are tried, claimed by one instance, kept with their state."""

from __future__ import annotations

from typing import Any, Sequence

from gateway.core.clock import Clock, iso, system_clock
from gateway.store.database import Database, Row

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
STATES = (PENDING, DELIVERED, FAILED)


class AlertRepository:
    def __init__(self, db: Database, clock: Clock = system_clock) -> None:
        self._db = db
        self._clock = clock

    async def enqueue(self, *, id: str, dedupe_key: str, event: str, user_id: str | None, webhook: str,
                      payload: str) -> bool:
        """Add a delivery unless one with the same `dedupe_key` exists; True when this call added it."""
        now = iso(self._clock())
        added = await self._db.execute(
            "INSERT INTO alert_outbox (id, dedupe_key, event, user_id, webhook, payload, state, attempts,"
            " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?) ON CONFLICT (dedupe_key) DO NOTHING",
            (id, dedupe_key, event, user_id, webhook, payload, PENDING, now, now),
        )
        return added > 0

    async def due(self, *, limit: int = 50) -> list[Row]:
        now = iso(self._clock())
        return await self._db.fetchall(
            "SELECT * FROM alert_outbox WHERE state = ? AND next_attempt_at <= ?"
            " AND (claimed_until IS NULL OR claimed_until < ?) ORDER BY next_attempt_at, id LIMIT ?",
            (PENDING, now, now, limit),
        )

    async def claim(self, delivery_id: str, owner: str, lease_s: float) -> bool:
        """Take the delivery for `lease_s` seconds; False when another instance holds it or it is done."""
        now = self._clock()
        claimed = await self._db.execute(
            "UPDATE alert_outbox SET claimed_by = ?, claimed_until = ? WHERE id = ? AND state = ?"
            " AND (claimed_until IS NULL OR claimed_until < ?)",
            (owner, iso(now + lease_s), delivery_id, PENDING, iso(now)),
        )
        return claimed == 1

    async def delivered(self, delivery_id: str, status: int) -> None:
        await self._db.execute(
            "UPDATE alert_outbox SET state = ?, attempts = attempts + 1, last_status = ?, last_error = NULL,"
            " delivered_at = ?, claimed_by = NULL, claimed_until = NULL WHERE id = ?",
            (DELIVERED, status, iso(self._clock()), delivery_id),
        )

    async def attempt_failed(self, delivery_id: str, *, status: int | None, error: str, retry_at: float | None) -> None:
        """Record a failed try: due again at `retry_at`, or `failed` for good when it is None."""
        await self._db.execute(
            "UPDATE alert_outbox SET state = ?, attempts = attempts + 1, last_status = ?, last_error = ?,"
            " next_attempt_at = ?, claimed_by = NULL, claimed_until = NULL WHERE id = ?",
            (PENDING if retry_at is not None else FAILED, status, error[:500],
             iso(retry_at if retry_at is not None else self._clock()), delivery_id),
        )

    async def page(self, *, limit: int, state: str | None = None, before: str | None = None) -> list[Row]:
        """Newest first; `before` is the `created_at|id` cursor of the previous page."""
        clauses: list[str] = []
        params: list[Any] = []
        if state is not None:
            clauses.append("state = ?")
            params.append(state)
        if before is not None:
            created, _, ident = before.partition("|")
            clauses.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend((created, created, ident))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return await self._db.fetchall(
            f"SELECT * FROM alert_outbox {where} ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit)
        )

    async def mark(self, name: str) -> str | None:
        row = await self._db.fetchone("SELECT value FROM alert_marks WHERE name = ?", (name,))
        return row["value"] if row else None

    async def set_mark(self, name: str, value: str) -> None:
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM alert_marks WHERE name = ?", (name,))
            await tx.execute("INSERT INTO alert_marks (name, value) VALUES (?, ?)", (name, value))

    async def audit_after(self, after_id: int, actions: Sequence[str], *, limit: int = 500) -> list[Row]:
        marks = ", ".join("?" for _ in actions)
        return await self._db.fetchall(
            f"SELECT id, at, action, user_id, details FROM audit_log WHERE id > ? AND action IN ({marks})"
            " ORDER BY id LIMIT ?", (after_id, *actions, limit),
        )

    async def last_audit_id(self) -> int:
        row = await self._db.fetchone("SELECT MAX(id) AS top FROM audit_log")
        return int(row["top"]) if row and row["top"] is not None else 0
