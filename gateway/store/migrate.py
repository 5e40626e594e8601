"""Apply `migrations/NNN_name.sql` in order, once each, recording them in `schema_migrations`.

Several instances may start at once: each migration runs in a transaction together with
its bookkeeping row, so a racing instance fails on the primary key instead of applying twice.
"""

from __future__ import annotations

import contextlib
import time
from importlib import resources
from typing import Any

from gateway.core.clock import iso
from gateway.store.database import Database


def _migrations() -> list[tuple[str, str]]:
    folder = resources.files("gateway.store") / "migrations"
    files = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name, p.read_text()) for p in files]


def _statements(sql: str) -> list[str]:
    """Split on `;` after dropping `--` comment lines (migrations keep semicolons out of strings)."""
    code = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [statement.strip() for statement in code.split(";") if statement.strip()]


async def migrate(db: Any) -> list[str]:
    """Bring the schema up to date; returns the names of the migrations applied now.

    A backend may offer `migration_lock()` (PostgreSQL: an advisory lock) so instances
    starting together migrate one after another; even `CREATE TABLE IF NOT EXISTS` races there.
    """
    lock = getattr(db, "migration_lock", None)
    async with lock() if lock is not None else contextlib.nullcontext():
        return await _migrate(db)


async def _migrate(db: Any) -> list[str]:
    await db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = {r["name"] for r in await db.fetchall("SELECT name FROM schema_migrations")}
    applied = []
    for name, sql in _migrations():
        if name in done:
            continue
        try:
            async with db.transaction() as tx:
                for statement in _statements(db.translate(sql)):
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (name, iso(time.time()))
                )
        except Exception:
            rows = await db.fetchall("SELECT name FROM schema_migrations WHERE name = ?", (name,))
            if rows:  # another instance applied it first
                continue
            raise
        applied.append(name)
    return applied


__all__ = ["migrate", "Database"]
