"""Users: id, email, tier, status (active/suspended) and per-user limit overrides."""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from gateway.core.clock import Clock, iso, system_clock
from gateway.store.changes import publish
from gateway.store.database import Database, Row


def _decode(row: Row | None) -> Row | None:
    if row is not None:
        row["overrides"] = orjson.loads(row["overrides"] or "{}")
    return row


class UserRepository:
    def __init__(self, db: Database, clock: Clock = system_clock) -> None:
        self._db = db
        self._clock = clock

    async def create(self, *, user_id: str | None, email: str | None, tier: str) -> Row:
        now = iso(self._clock())
        user_id = user_id or "usr_" + secrets.token_hex(8)
        async with self._db.transaction() as tx:
            await tx.execute(
                "INSERT INTO users (id, email, tier, status, overrides, created_at, updated_at)"
                " VALUES (?, ?, ?, 'active', '{}', ?, ?)",
                (user_id, email, tier, now, now),
            )
        return await self.get(user_id)  # type: ignore[return-value]

    async def get(self, user_id: str) -> Row | None:
        return _decode(await self._db.fetchone("SELECT * FROM users WHERE id = ?", (user_id,)))

    async def exists(self, *, user_id: str | None = None, email: str | None = None) -> bool:
        row = await self._db.fetchone("SELECT 1 AS one FROM users WHERE id = ? OR email = ?", (user_id, email))
        return row is not None

    async def list(self, *, limit: int, cursor: str | None) -> list[Row]:
        rows = await self._db.fetchall(
            "SELECT * FROM users WHERE id > ? ORDER BY id LIMIT ?", (cursor or "", limit)
        )
        return [_decode(r) for r in rows]  # type: ignore[misc]

    async def update(self, user_id: str, **fields: Any) -> Row | None:
        """Change tier, status, email or overrides; every instance's auth cache hears of it."""
        if "overrides" in fields:
            fields["overrides"] = orjson.dumps(fields["overrides"]).decode()
        fields["updated_at"] = iso(self._clock())
        columns = ", ".join(f"{name} = ?" for name in fields)
        async with self._db.transaction() as tx:
            changed = await tx.execute(f"UPDATE users SET {columns} WHERE id = ?", (*fields.values(), user_id))
            if changed:
                await publish(tx, "user", user_id, self._clock())
        return await self.get(user_id) if changed else None

    async def delete(self, user_id: str) -> bool:
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM tokens WHERE user_id = ?", (user_id,))
            await tx.execute("DELETE FROM provider_keys WHERE user_id = ?", (user_id,))
            changed = await tx.execute("DELETE FROM users WHERE id = ?", (user_id,))
            if changed:
                await publish(tx, "user", user_id, self._clock())
        return bool(changed)
