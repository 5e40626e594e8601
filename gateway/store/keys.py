"""Users' OpenRouter keys (BYOK or managed), stored only as MultiFernet ciphertext."""

from __future__ import annotations

from typing import Any

from gateway.core.clock import Clock, iso, system_clock
from gateway.store.changes import publish
from gateway.store.database import Database, Row


class KeyRepository:
    def __init__(self, db: Database, clock: Clock = system_clock) -> None:
        self._db = db
        self._clock = clock

    async def get(self, user_id: str) -> Row | None:
        return await self._db.fetchone("SELECT * FROM provider_keys WHERE user_id = ?", (user_id,))

    async def put(
        self,
        user_id: str,
        *,
        kind: str,
        ciphertext: str,
        label: str,
        last4: str,
        upstream_hash: str | None = None,
        limit_usd: str | None = None,
        disabled: bool = False,
    ) -> None:
        """Insert or replace the user's key in one transaction: requests see the old key or the new one."""
        now = iso(self._clock())
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM provider_keys WHERE user_id = ?", (user_id,))
            await tx.execute(
                "INSERT INTO provider_keys (user_id, kind, ciphertext, label, last4, upstream_hash, limit_usd,"
                " disabled, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (user_id, kind, ciphertext, label, last4, upstream_hash, limit_usd, int(disabled), now, now),
            )
            await publish(tx, "user", user_id, self._clock())

    async def update(self, user_id: str, **fields: Any) -> bool:
        fields["updated_at"] = iso(self._clock())
        columns = ", ".join(f"{name} = ?" for name in fields)
        async with self._db.transaction() as tx:
            changed = await tx.execute(f"UPDATE provider_keys SET {columns} WHERE user_id = ?", (*fields.values(), user_id))
            if changed:
                await publish(tx, "user", user_id, self._clock())
        return bool(changed)

    async def delete(self, user_id: str) -> bool:
        async with self._db.transaction() as tx:
            changed = await tx.execute("DELETE FROM provider_keys WHERE user_id = ?", (user_id,))
            if changed:
                await publish(tx, "user", user_id, self._clock())
        return bool(changed)

    async def page(self, *, after_user_id: str, limit: int) -> list[Row]:
        """Keys in user-id order, for batch jobs such as master-key rotation."""
        return await self._db.fetchall(
            "SELECT user_id, ciphertext FROM provider_keys WHERE user_id > ? ORDER BY user_id LIMIT ?",
            (after_user_id, limit),
        )

    async def replace_ciphertexts(self, rows: list[tuple[str, str, str]]) -> None:
        """(user_id, old ciphertext, new ciphertext): swaps only rows nobody changed meanwhile."""
        async with self._db.transaction() as tx:
            for user_id, old, new in rows:
                await tx.execute(
                    "UPDATE provider_keys SET ciphertext = ? WHERE user_id = ? AND ciphertext = ?", (new, user_id, old)
                )
