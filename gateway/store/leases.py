"""Leases on jobs that one instance among several runs (the change feed's pruning, for one)."""

from __future__ import annotations

from gateway.store.database import Database


class JobLeases:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def claim(self, name: str, owner: str, *, until_iso: str, now_iso: str) -> bool:
        """Take or renew the lease of job `name` until `until_iso`; False while another owner holds it."""
        changed = await self._db.execute(
            "INSERT INTO job_leases (name, owner, until_at) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE"
            " SET owner = excluded.owner, until_at = excluded.until_at"
            " WHERE job_leases.owner = excluded.owner OR job_leases.until_at < ?",
            (name, owner, until_iso, now_iso),
        )
        return changed > 0
