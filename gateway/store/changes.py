"""The change feed: every write that an auth cache depends on appends a row here.

Each instance polls it (`since`) and drops the cache entries named, which is how a
revocation or suspension made on one instance reaches all of them within a second.
"""

from __future__ import annotations

from gateway.core.clock import iso
from gateway.store.database import Database, Executor, Row

WINDOW = 64  # changes re-read below the caller's last sequence number


async def publish(tx: Executor, kind: str, subject: str, now: float) -> None:
    await tx.execute("INSERT INTO changes (kind, subject, created_at) VALUES (?, ?, ?)", (kind, subject, iso(now)))


class ChangeFeed:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def latest(self) -> int:
        row = await self._db.fetchone("SELECT MAX(seq) AS seq FROM changes")
        return int(row["seq"] or 0) if row else 0

    async def since(self, seq: int) -> list[Row]:
        # Re-read a small window below `seq`: PostgreSQL sequences may commit out of order.
        return await self._db.fetchall(
            "SELECT seq, kind, subject FROM changes WHERE seq > ? ORDER BY seq", (max(0, seq - WINDOW),)
        )

    async def prune(self, before_iso: str) -> int:
        """Drop the rows written before `before_iso` (an instance reads only what is seconds old)."""
        return await self._db.execute("DELETE FROM changes WHERE created_at < ?", (before_iso,))
