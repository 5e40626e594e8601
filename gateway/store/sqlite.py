"""SQLite through aiosqlite: one connection in WAL mode, statements serialised by a lock.

aiosqlite already runs every statement on one worker thread; the lock makes a
transaction's statements contiguous so a concurrent coroutine never lands inside it.

A cancelled await does not stop a statement already handed to that thread. A `BEGIN
IMMEDIATE` cancelled while it waits for another process's write lock (several workers
on one file; a shutdown cancelling the writer) would still begin a transaction nobody
owns, and every later `BEGIN` would fail with "cannot start a transaction within a
transaction". So BEGIN/COMMIT/ROLLBACK run shielded, and a transaction left open by a
cancelled caller is rolled back before the next one begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import aiosqlite

from gateway.store.database import Executor, IntegrityError, Params, Row


class _Connection(Executor):
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params = ()) -> int:
        try:
            cursor = await self._conn.execute(sql, tuple(params))
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from None
        count = cursor.rowcount
        await cursor.close()
        return count

    async def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        try:
            await self._conn.executemany(sql, [tuple(r) for r in rows])
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from None

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        async with self._conn.execute(sql, tuple(params)) as cursor:
            row = await cursor.fetchone()
            return dict(row) if row is not None else None

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        async with self._conn.execute(sql, tuple(params)) as cursor:
            return [dict(row) for row in await cursor.fetchall()]


class SqliteDatabase:
    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._inner = _Connection(conn)
        self._lock = asyncio.Lock()
        self._control_task: asyncio.Future[Any] | None = None

    @classmethod
    async def open(cls, path: str) -> "SqliteDatabase":
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA busy_timeout=5000")
        await _switch_to_wal(conn)
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("PRAGMA foreign_keys=ON")
        return cls(conn)

    async def execute(self, sql: str, params: Params = ()) -> int:
        async with self._lock:
            await self._drop_orphan()  # or this write would join (and die with) an orphaned transaction
            return await self._inner.execute(sql, params)

    async def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        async with self.transaction() as tx:
            await tx.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        async with self._lock:
            return await self._inner.fetchone(sql, params)

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        async with self._lock:
            return await self._inner.fetchall(sql, params)

    async def _control(self, sql: str) -> None:
        """BEGIN/COMMIT/ROLLBACK, shielded: a cancelled caller leaves it to finish, not half-known."""
        task = self._control_task = asyncio.ensure_future(self._conn.execute(sql))
        await asyncio.shield(task)

    async def _drop_orphan(self) -> None:
        """Roll back a transaction a cancelled caller left open (see the module doc)."""
        if self._control_task is not None and not self._control_task.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._control_task)
        if self._conn.in_transaction:
            await self._control("ROLLBACK")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._lock:
            await self._drop_orphan()
            await self._control("BEGIN IMMEDIATE")
            try:
                yield self._inner
            except BaseException:
                if self._conn.in_transaction:
                    await self._control("ROLLBACK")
                raise
            else:
                await self._control("COMMIT")

    def translate(self, sql: str) -> str:
        return sql.replace("{{AUTOINC}}", "INTEGER PRIMARY KEY AUTOINCREMENT")

    async def close(self) -> None:
        await self._conn.close()


async def _switch_to_wal(conn: aiosqlite.Connection, within_s: float = 5.0) -> None:
    """`journal_mode=WAL`, retried while another process opening the same new file holds it: SQLite answers
    that switch "database is locked" at once, without its busy handler (several workers starting together)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or loop.time() >= deadline:
                raise
            await asyncio.sleep(0.05)
