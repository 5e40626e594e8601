"""PostgreSQL through asyncpg, for several gateway instances sharing one database.

Repositories write `?` placeholders; they become `$1, $2, …` here (cached per statement).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any, AsyncIterator, Sequence

import asyncpg

from gateway.store.database import Executor, IntegrityError, Params, Row

_MIGRATION_LOCK = 0x6761_7465_7761_79  # "gateway": the advisory lock held while migrating


@lru_cache(maxsize=1024)
def _numbered(sql: str) -> str:
    out, n, quoted = [], 0, False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "?" and not quoted:
            n += 1
            out.append(f"${n}")
        else:
            out.append(ch)
    return "".join(out)


def _count(status: str) -> int:
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class _Connection(Executor):
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params = ()) -> int:
        try:
            return _count(await self._conn.execute(_numbered(sql), *params))
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise IntegrityError(str(exc)) from None

    async def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        try:
            await self._conn.executemany(_numbered(sql), [tuple(r) for r in rows])
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise IntegrityError(str(exc)) from None

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        row = await self._conn.fetchrow(_numbered(sql), *params)
        return dict(row) if row is not None else None

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return [dict(r) for r in await self._conn.fetch(_numbered(sql), *params)]


class PostgresDatabase:
    dialect = "postgres"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._inner = _Connection(pool)

    @classmethod
    async def open(cls, url: str) -> "PostgresDatabase":
        pool = await asyncpg.create_pool(url.replace("postgres://", "postgresql://", 1), min_size=1, max_size=10)
        return cls(pool)

    async def execute(self, sql: str, params: Params = ()) -> int:
        return await self._inner.execute(sql, params)

    async def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        async with self.transaction() as tx:
            await tx.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        return await self._inner.fetchone(sql, params)

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return await self._inner.fetchall(sql, params)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                yield _Connection(conn)

    def translate(self, sql: str) -> str:
        return sql.replace("{{AUTOINC}}", "BIGSERIAL PRIMARY KEY")

    @asynccontextmanager
    async def migration_lock(self) -> AsyncIterator[None]:
        """Instances starting together migrate one at a time (a session-level advisory lock)."""
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                yield
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    async def close(self) -> None:
        await self._pool.close()
