"""Opening the database a `database.url` names, its schema brought up to date."""

from __future__ import annotations

from gateway.store.database import Database
from gateway.store.migrate import migrate
from gateway.store.postgres import PostgresDatabase
from gateway.store.sqlite import SqliteDatabase


async def connect(url: str) -> Database:
    """Open the database named by `database.url` and bring its schema up to date."""
    if url.startswith("sqlite:///"):
        db: Database = await SqliteDatabase.open(url[len("sqlite:///"):])
    elif url.startswith(("postgresql://", "postgres://")):
        db = await PostgresDatabase.open(url)
    else:
        raise ValueError(f"database.url: unsupported scheme in {url.split(':', 1)[0]!r}")
    await migrate(db)
    return db
