"""Persistence behind one interface: repositories over a `Database` (SQLite or PostgreSQL)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.clock import Clock, system_clock
from gateway.store.account import AccountRepository
from gateway.store.alerts import AlertRepository
from gateway.store.audit import AuditRepository
from gateway.store.changes import ChangeFeed
from gateway.store.connect import connect
from gateway.store.database import Database
from gateway.store.keys import KeyRepository
from gateway.store.leases import JobLeases
from gateway.store.state import StateRepository
from gateway.store.tokens import TokenRepository
from gateway.store.usage import UsageRepository
from gateway.store.users import UserRepository


@dataclass
class Store:
    db: Database
    users: UserRepository
    tokens: TokenRepository
    keys: KeyRepository
    changes: ChangeFeed
    state: StateRepository
    audit: AuditRepository
    account: AccountRepository
    usage: UsageRepository
    alerts: AlertRepository
    leases: JobLeases

    @classmethod
    def over(cls, db: Database, clock: Clock = system_clock) -> "Store":
        return cls(
            db=db,
            users=UserRepository(db, clock),
            tokens=TokenRepository(db, clock),
            keys=KeyRepository(db, clock),
            changes=ChangeFeed(db),
            state=StateRepository(db, clock),
            audit=AuditRepository(db, clock),
            account=AccountRepository(db, clock),
            usage=UsageRepository(db, clock),
            alerts=AlertRepository(db, clock),
            leases=JobLeases(db),
        )

    @classmethod
    async def open(cls, url: str, clock: Clock = system_clock) -> "Store":
        return cls.over(await connect(url), clock)

    async def close(self) -> None:
        await self.db.close()


__all__ = ["Store", "Database", "connect"]
