"""The one interface every repository talks to: parameterised SQL with `?` placeholders.

SQL in this package sticks to a portable subset (TEXT, INTEGER, BIGINT; money as TEXT
holding an exact decimal string) so the same repositories run on SQLite and PostgreSQL;
backends translate placeholders and the `{{AUTOINC}}` marker in migrations.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, Sequence

Row = dict[str, Any]
Params = Sequence[Any]


class IntegrityError(Exception):
    """A write broke a unique or foreign-key constraint (raised the same way by every backend),
    so callers can answer 409 for a race their own checks could not see."""


class Executor(Protocol):
    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; returns the number of rows it changed."""

    async def executemany(self, sql: str, rows: Sequence[Params]) -> None: ...

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None: ...

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]: ...


class Database(Executor, Protocol):
    dialect: str

    def transaction(self) -> AbstractAsyncContextManager[Executor]:
        """All statements inside commit together or not at all."""

    async def close(self) -> None: ...
