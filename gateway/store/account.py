"""The user's account data: OpenRouter credits as last synced, and their proxy preferences.

Credits are written by the credit-sync job (and by live look-ups) and read by
`GET /v1/account`; a failed sync keeps the last good numbers and records the error next
to them. Settings are one JSON object per user; every write names the user in the change
feed inside the same transaction, so every instance reloads them.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from gateway.core.clock import Clock, iso, system_clock
from gateway.store.changes import publish
from gateway.store.database import Database, Row


def _text(amount: Decimal | None) -> str | None:
    return None if amount is None else format(amount, "f")


class AccountRepository:
    def __init__(self, db: Database, clock: Clock = system_clock) -> None:
        self._db = db
        self._clock = clock

    # -- credits ------------------------------------------------------------------

    async def credits(self, user_id: str) -> Row | None:
        """The last synced credits (`total_credits`/`total_usage` as Decimal or None) and sync state."""
        row = await self._db.fetchone("SELECT * FROM account_credits WHERE user_id = ?", (user_id,))
        if row is not None:
            for name in ("total_credits", "total_usage"):
                row[name] = Decimal(row[name]) if row[name] is not None else None
        return row

    async def put_credits(
        self, user_id: str, *, total_credits: Decimal | None, total_usage: Decimal | None, source: str
    ) -> str:
        """Record a successful sync (clearing any earlier error); returns its time as ISO text."""
        now = iso(self._clock())
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM account_credits WHERE user_id = ?", (user_id,))
            await tx.execute(
                "INSERT INTO account_credits (user_id, total_credits, total_usage, source, synced_at, error, error_at)"
                " VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                (user_id, _text(total_credits), _text(total_usage), source, now),
            )
        return now

    async def put_sync_error(self, user_id: str, error: str) -> None:
        """Record a failed sync, keeping the last good numbers."""
        now = iso(self._clock())
        async with self._db.transaction() as tx:
            changed = await tx.execute(
                "UPDATE account_credits SET error = ?, error_at = ? WHERE user_id = ?", (error, now, user_id)
            )
            if not changed:
                await tx.execute(
                    "INSERT INTO account_credits (user_id, error, error_at) VALUES (?, ?, ?)", (user_id, error, now)
                )

    async def low_balances(self, under: Decimal, *, limit: int = 100) -> list[Row]:
        """Users whose last synced balance (credits − usage) is under `under`, lowest first (exact Decimal)."""
        rows = await self._db.fetchall(
            "SELECT user_id, total_credits, total_usage, synced_at FROM account_credits WHERE total_credits IS NOT NULL"
        )
        low = []
        for row in rows:
            balance = Decimal(row["total_credits"]) - Decimal(row["total_usage"] or "0")
            if balance < under:
                low.append({"user_id": row["user_id"], "balance": balance, "synced_at": row["synced_at"]})
        low.sort(key=lambda r: (r["balance"], r["user_id"]))
        return low[:limit]

    async def users_with_keys(self) -> int:
        """How many users have an OpenRouter key, i.e. how many a full credit sync visits."""
        row = await self._db.fetchone("SELECT COUNT(*) AS n FROM provider_keys")
        return int(row["n"]) if row else 0

    # -- settings -----------------------------------------------------------------

    async def settings(self, user_id: str) -> dict[str, Any] | None:
        row = await self._db.fetchone("SELECT settings FROM user_settings WHERE user_id = ?", (user_id,))
        return orjson.loads(row["settings"]) if row else None

    async def all_settings(self) -> dict[str, dict[str, Any]]:
        """Every stored preference set (only users who saved some have a row)."""
        rows = await self._db.fetchall("SELECT user_id, settings FROM user_settings")
        return {row["user_id"]: orjson.loads(row["settings"]) for row in rows}

    async def put_settings(self, user_id: str, settings: dict[str, Any]) -> None:
        now = self._clock()
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM user_settings WHERE user_id = ?", (user_id,))
            await tx.execute(
                "INSERT INTO user_settings (user_id, settings, updated_at) VALUES (?, ?, ?)",
                (user_id, orjson.dumps(settings).decode(), iso(now)),
            )
            await publish(tx, "user", user_id, now)
