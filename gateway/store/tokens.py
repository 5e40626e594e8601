"""Platform tokens: random 256-bit secrets, stored only as their SHA-256."""

from __future__ import annotations

import hashlib
import secrets

from gateway.core.clock import Clock, iso, system_clock
from gateway.store.changes import publish
from gateway.store.database import Database, Row

TOKEN_PREFIX = "gw-"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)  # 32 bytes = 256 bits


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def display_prefix(token: str) -> str:
    return token[:10]


_PUBLIC = "id, user_id, name, prefix, created_at, last_used_at, expires_at, revoked_at"


class TokenRepository:
    def __init__(self, db: Database, clock: Clock = system_clock) -> None:
        self._db = db
        self._clock = clock

    async def create(self, user_id: str, *, name: str | None, expires_at: str | None) -> tuple[Row, str]:
        """Returns the row and the secret; the secret is never stored or shown again."""
        secret = new_token()
        token_id = "tok_" + secrets.token_hex(8)
        async with self._db.transaction() as tx:
            await tx.execute(
                "INSERT INTO tokens (id, user_id, name, prefix, token_hash, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_id, user_id, name, display_prefix(secret), hash_token(secret), iso(self._clock()), expires_at),
            )
        return await self.get(token_id), secret  # type: ignore[return-value]

    async def get(self, token_id: str) -> Row | None:
        return await self._db.fetchone(f"SELECT {_PUBLIC} FROM tokens WHERE id = ?", (token_id,))

    async def by_hash(self, token_hash: str) -> Row | None:
        return await self._db.fetchone(f"SELECT {_PUBLIC}, token_hash FROM tokens WHERE token_hash = ?", (token_hash,))

    async def list_for_user(self, user_id: str) -> list[Row]:
        return await self._db.fetchall(f"SELECT {_PUBLIC} FROM tokens WHERE user_id = ? ORDER BY created_at", (user_id,))

    async def revoke(self, token_id: str) -> bool:
        async with self._db.transaction() as tx:
            changed = await tx.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (iso(self._clock()), token_id)
            )
            if changed:
                await publish(tx, "token", token_id, self._clock())
        return bool(changed)

    async def rotate(self, token_id: str) -> tuple[Row, str] | None:
        """A new token for the same user and name; the old one is revoked in the same transaction."""
        old = await self.get(token_id)
        if old is None or old["revoked_at"] is not None:
            return None
        secret = new_token()
        new_id = "tok_" + secrets.token_hex(8)
        now = self._clock()
        async with self._db.transaction() as tx:
            changed = await tx.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (iso(now), token_id)
            )
            if not changed:
                return None
            await tx.execute(
                "INSERT INTO tokens (id, user_id, name, prefix, token_hash, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (new_id, old["user_id"], old["name"], display_prefix(secret), hash_token(secret), iso(now), old["expires_at"]),
            )
            await publish(tx, "token", token_id, now)
        return await self.get(new_id), secret  # type: ignore[return-value]

    async def touch(self, used: dict[str, float]) -> None:
        """Record last-used times in one batch (called from the background, never per request)."""
        if used:
            await self._db.executemany(
                "UPDATE tokens SET last_used_at = ? WHERE id = ?", [(iso(ts), tid) for tid, ts in used.items()]
            )
