"""Platform token → principal (user, tier, status, decrypted OpenRouter key), from memory.

The first request of a token loads it from the database (concurrent first requests share
one load); after that it is served from the cache. Entries are dropped when the change
feed names their token or user: this instance drops them at once, other instances within
`poll_interval_s`. Unknown tokens are remembered for a second so a flood of bad tokens
does not reach the database.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from cachetools import LRUCache, TTLCache

from gateway.core.clock import Clock, parse_iso, system_clock
from gateway.core.errors import Unauthorized
from gateway.security.vault import Vault, VaultError
from gateway.store import Store
from gateway.store.changes import WINDOW as FEED_WINDOW
from gateway.store.tokens import hash_token

log = logging.getLogger("gateway.auth.tokens")


@dataclass(slots=True, frozen=True)
class ProviderKey:
    kind: str  # "byok" | "managed"
    secret: str = field(repr=False)
    label: str = ""
    last4: str = ""
    disabled: bool = False


@dataclass(slots=True, frozen=True)
class Principal:
    user_id: str
    token_id: str
    tier: str
    status: str
    overrides: dict[str, Any]
    key: ProviderKey | None
    expires_at: float | None = None


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class Authenticator:
    def __init__(
        self,
        store: Store,
        vault: Vault,
        *,
        clock: Clock = system_clock,
        max_entries: int = 100_000,
        poll_interval_s: float = 0.5,
    ) -> None:
        self._store = store
        self._vault = vault
        self._clock = clock
        self._cache: LRUCache[str, Principal] = LRUCache(maxsize=max_entries)
        self._unknown: TTLCache[str, bool] = TTLCache(maxsize=10_000, ttl=1.0)
        self._loading: dict[str, asyncio.Future[Principal | None]] = {}
        self._by_user: dict[str, set[str]] = {}
        self._by_token: dict[str, str] = {}
        self._last_seq = 0
        self._applied: set[int] = set()  # sequence numbers inside the re-read window already applied
        self.poll_interval_s = poll_interval_s
        self.last_used: dict[str, float] = {}
        self._user_listeners: list[Callable[[str], None]] = []
        self._state_listeners: list[Callable[[str], Awaitable[None]]] = []
        self._generation = 0  # bumped by every invalidation; a load that raced one is not cached

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer(authorization)
        if token is None:
            raise Unauthorized(
                "Missing platform token: send `Authorization: Bearer <platform token>` "
                "(an admin creates one with `gateway tokens create`)."
            )
        digest = hash_token(token)
        principal = self._cache.get(digest)
        if principal is None:
            if digest in self._unknown:
                raise _invalid()
            principal = await self._load_shared(digest)
            if principal is None:
                raise _invalid()
        if principal.expires_at is not None and principal.expires_at <= self._clock():
            raise Unauthorized("This platform token has expired; ask your admin for a new one.")
        self.last_used[principal.token_id] = self._clock()
        return principal

    async def _load_shared(self, digest: str) -> Principal | None:
        pending = self._loading.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._loading[digest] = future
        try:
            principal = await self._load(digest)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved
            raise
        finally:
            self._loading.pop(digest, None)
        future.set_result(principal)
        return principal

    async def _load(self, digest: str) -> Principal | None:
        generation = self._generation
        row = await self._store.tokens.by_hash(digest)
        if row is None or row["revoked_at"] is not None or not hmac.compare_digest(row["token_hash"], digest):
            self._unknown[digest] = True
            return None
        user = await self._store.users.get(row["user_id"])
        if user is None:
            self._unknown[digest] = True
            return None
        principal = Principal(
            user_id=user["id"],
            token_id=row["id"],
            tier=user["tier"],
            status=user["status"],
            overrides=user["overrides"],
            key=await self._key(user["id"]),
            expires_at=parse_iso(row["expires_at"]) if row["expires_at"] else None,
        )
        if generation != self._generation:
            return principal  # an invalidation landed while loading: use once, don't cache
        self._cache[digest] = principal
        self._by_user.setdefault(principal.user_id, set()).add(digest)
        self._by_token[principal.token_id] = digest
        return principal

    async def _key(self, user_id: str) -> ProviderKey | None:
        row = await self._store.keys.get(user_id)
        if row is None:
            return None
        try:
            secret = self._vault.decrypt(row["ciphertext"])
        except VaultError:
            log.error("stored OpenRouter key of user %s cannot be decrypted with the configured master keys", user_id)
            return None
        return ProviderKey(
            kind=row["kind"], secret=secret, label=row["label"], last4=row["last4"], disabled=bool(row["disabled"])
        )

    # -- invalidation ---------------------------------------------------------

    def on_user_change(self, listener: Callable[[str], None]) -> None:
        """Call `listener(user_id)` whenever a user's cached state is dropped (any instance's change)."""
        self._user_listeners.append(listener)

    def on_state_change(self, listener: Callable[[str], Awaitable[None]]) -> None:
        """Await `listener(name)` when a shared value (`store.state`) changes on any instance."""
        self._state_listeners.append(listener)

    def forget_user(self, user_id: str) -> None:
        self._generation += 1
        for listener in self._user_listeners:
            listener(user_id)
        for digest in self._by_user.pop(user_id, ()):
            principal = self._cache.pop(digest, None)
            if principal is not None:
                self._by_token.pop(principal.token_id, None)

    def forget_token(self, token_id: str) -> None:
        self._generation += 1
        digest = self._by_token.pop(token_id, None)
        if digest is not None:
            principal = self._cache.pop(digest, None)
            if principal is not None:
                self._by_user.get(principal.user_id, set()).discard(digest)

    def forget_all(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._by_user.clear()
        self._by_token.clear()

    async def start_feed(self) -> None:
        self._last_seq = await self._store.changes.latest()
        self._applied = {int(row["seq"]) for row in await self._store.changes.since(self._last_seq)}

    async def poll_changes(self) -> int:
        """Apply the change feed once; returns how many changes were applied.

        The feed re-reads a window below the last sequence number (PostgreSQL may commit
        sequences out of order); changes already applied are skipped, so a poll does not
        drop the same users' cache entries over and over.
        """
        rows = await self._store.changes.since(self._last_seq)
        applied = 0
        states: list[str] = []
        for row in rows:
            seq = int(row["seq"])
            if seq in self._applied:
                continue
            if row["kind"] == "token":
                self.forget_token(row["subject"])
            elif row["kind"] == "user":
                self.forget_user(row["subject"])
            elif row["kind"] == "all":
                self.forget_all()
            elif row["kind"] == "state":
                states.append(row["subject"])
            self._applied.add(seq)
            self._last_seq = max(self._last_seq, seq)
            applied += 1
        if applied:
            floor = self._last_seq - FEED_WINDOW
            self._applied = {seq for seq in self._applied if seq > floor}
        for name in dict.fromkeys(states):
            for listener in self._state_listeners:
                await listener(name)
        return applied

    async def run_feed(self) -> None:
        """Apply the change feed every `poll_interval_s`, for as long as the instance runs."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll_changes()
            except Exception:
                log.exception("change feed poll failed; retrying")

    async def flush_last_used(self) -> None:
        """Store the tokens' last-used times gathered since the previous flush."""
        await self._store.tokens.touch(self.take_last_used())

    async def run_last_used(self, every_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.flush_last_used()
            except Exception:
                log.exception("recording token last-used times failed")

    def take_last_used(self) -> dict[str, float]:
        used, self.last_used = self.last_used, {}
        return used


def _invalid() -> Unauthorized:
    return Unauthorized("Invalid platform token: it is unknown or revoked. Ask your admin for a new one.")


