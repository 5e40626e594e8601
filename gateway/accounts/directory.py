"""Users and platform tokens as the admin manages them, shared by the admin API and the CLI.

Every operation validates its input before writing anything, appends to the audit log,
and tells the local auth cache at once (other instances learn through the change feed).
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any, Callable

from gateway.accounts.byok import describe_key
from gateway.core.amounts import AmountError, parse_count, parse_usd, stored_count, stored_usd
from gateway.core.clock import Clock, iso, system_clock
from gateway.core.config import Config
from gateway.core.errors import BadRequest, Conflict, NotFound
from gateway.store import Store
from gateway.store.database import IntegrityError

log = logging.getLogger("gateway.accounts.directory")

USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
EMAIL = re.compile(r"^(?=.{3,254}$)[^@\s]+@[^@\s]+\.[^@\s]+$")
STATUSES = ("active", "suspended")
LIMIT_OVERRIDES = (
    "daily_budget_usd",
    "monthly_budget_usd",
    "requests_per_minute",
    "requests_per_hour",
    "tokens_per_hour",
    "max_concurrent",
)


def _noop(*_: Any) -> None:
    return None


def broken_overrides(overrides: dict[str, Any]) -> list[str]:
    """The stored overrides that break today's rules (an older version accepted e.g. "1e999999999").

    The limiter treats each as unset (the tier's value applies); the admin API leaves them out."""
    broken = []
    for name, value in overrides.items():
        if name in LIMIT_OVERRIDES and value is not None:
            checked = stored_usd(value) if name.endswith("_usd") else stored_count(value)
            if checked is None:
                broken.append(name)
    return broken


async def report_broken_overrides(store: Store, *, page: int = 500) -> int:
    """At start-up: log each user whose stored limit overrides break the rules, once; returns how many."""
    found = 0
    cursor = None
    while True:
        rows = await store.users.list(limit=page, cursor=cursor)
        for row in rows:
            broken = broken_overrides(row["overrides"])
            if broken:
                found += 1
                log.warning(
                    "user %s has stored limit overrides out of range (%s): treated as unset; "
                    "set them again with PATCH /admin/v1/users/%s {\"limits\": {...}}",
                    row["id"], ", ".join(broken), row["id"],
                )
        if len(rows) < page:
            return found
        cursor = rows[-1]["id"]


class Directory:
    def __init__(
        self,
        store: Store,
        config: Config,
        *,
        actor: str = "admin",
        forget_user: Callable[[str], None] = _noop,
        forget_token: Callable[[str], None] = _noop,
        clock: Clock = system_clock,
    ) -> None:
        self.store = store
        self.config = config
        self.actor = actor
        self._forget_user = forget_user
        self._forget_token = forget_token
        self._clock = clock

    # -- users ------------------------------------------------------------------

    def check_tier(self, tier: Any) -> str:
        if not isinstance(tier, str) or tier not in self.config.tiers:
            raise BadRequest(
                f"Unknown tier {tier!r}; the tiers are: {', '.join(self.config.tiers)} (config `tiers`).", param="tier"
            )
        return tier

    async def add_user(self, *, user_id: Any = None, email: Any = None, tier: Any = None) -> dict[str, Any]:
        if user_id is not None and (not isinstance(user_id, str) or not USER_ID.match(user_id)):
            raise BadRequest(
                "User id must be 1-128 characters of letters, digits, '_', '.', '@' or '-'.", param="id"
            )
        if email is not None and (not isinstance(email, str) or not EMAIL.match(email)):
            raise BadRequest(f"{str(email)[:80]!r} is not an email address (at most 254 characters).", param="email")
        tier = self.check_tier(tier if tier is not None else self.config.default_tier)
        if await self.store.users.exists(user_id=user_id, email=email):
            raise Conflict("A user with that id or email already exists.", param="id" if user_id else "email")
        try:
            user = await self.store.users.create(user_id=user_id, email=email, tier=tier)
        except IntegrityError:  # a concurrent create won the race our check could not see
            raise Conflict("A user with that id or email already exists.", param="id" if user_id else "email") from None
        await self._audit("user.create", user["id"], details={"tier": tier})
        return await self.describe(user)

    async def get_user(self, user_id: str) -> dict[str, Any]:
        user = await self.store.users.get(user_id)
        if user is None:
            raise NotFound(f"No user {user_id!r}.")
        return user

    async def show_user(self, user_id: str) -> dict[str, Any]:
        return await self.describe(await self.get_user(user_id))

    async def describe(self, user: dict[str, Any]) -> dict[str, Any]:
        key = await self.store.keys.get(user["id"])
        return {
            "id": user["id"],
            "email": user["email"],
            "tier": user["tier"],
            "status": user["status"],
            "limits": _valid(user["overrides"]),
            "openrouter_key": describe_key(key),
            "created_at": user["created_at"],
            "updated_at": user["updated_at"],
        }

    async def list_users(self, *, limit: int, cursor: str | None) -> dict[str, Any]:
        rows = await self.store.users.list(limit=limit + 1, cursor=cursor)
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "data": [await self.describe(r) for r in rows],
            "next_cursor": rows[-1]["id"] if more and rows else None,
        }

    async def update_user(self, user_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """PATCH semantics: tier, status, email and `limits` overrides (null removes one)."""
        user = await self.get_user(user_id)
        fields: dict[str, Any] = {}
        allowed = {"tier", "status", "email", "limits"}
        for name in changes:
            if name not in allowed:
                raise BadRequest(f"Unknown field {name!r}; you can change: {', '.join(sorted(allowed))}.", param=name)
        if "tier" in changes:
            fields["tier"] = self.check_tier(changes["tier"])
        if "status" in changes:
            if changes["status"] not in STATUSES:
                raise BadRequest("status must be 'active' or 'suspended'.", param="status")
            fields["status"] = changes["status"]
        if "email" in changes:
            email = changes["email"]
            if email is not None and (not isinstance(email, str) or not EMAIL.match(email)):
                raise BadRequest(f"{str(email)[:80]!r} is not an email address (at most 254 characters).", param="email")
            if email is not None and email != user["email"] and await self.store.users.exists(email=email):
                raise Conflict(f"Another user already has the email {email!r}.", param="email")
            fields["email"] = email
        if "limits" in changes:
            fields["overrides"] = self._merge_overrides(user["overrides"], changes["limits"])
        if not fields:
            return await self.describe(user)
        try:
            updated = await self.store.users.update(user_id, **fields)
        except IntegrityError:
            raise Conflict("Another user already has that email.", param="email") from None
        if updated is None:
            raise NotFound(f"No user {user_id!r}.")
        self._forget_user(user_id)
        for name, value in fields.items():
            if name == "tier" and value != user["tier"]:
                await self._audit("user.tier", user_id, details={"from": user["tier"], "to": value})
            elif name == "status" and value != user["status"]:
                await self._audit("user.suspend" if value == "suspended" else "user.resume", user_id)
            elif name == "overrides":
                await self._audit("user.limits", user_id, details={"limits": value})
        return await self.describe(updated)

    def _merge_overrides(self, current: dict[str, Any], given: Any) -> dict[str, Any]:
        if not isinstance(given, dict):
            raise BadRequest("limits must be an object, e.g. {\"requests_per_minute\": 60}.", param="limits")
        merged = _valid(current)
        for name, value in given.items():
            if name not in LIMIT_OVERRIDES:
                raise BadRequest(
                    f"Unknown limit {name!r}; limits are: {', '.join(LIMIT_OVERRIDES)}.", param=f"limits.{name}"
                )
            if value is None:
                merged.pop(name, None)
                continue
            try:
                merged[name] = format(parse_usd(value), "f") if name.endswith("_usd") else parse_count(value)
            except AmountError as exc:
                raise BadRequest(f"limits.{name} {exc}; null removes the override.", param=f"limits.{name}") from None
        return merged

    async def set_tier(self, user_id: str, tier: Any) -> dict[str, Any]:
        return await self.update_user(user_id, {"tier": tier})

    async def set_status(self, user_id: str, status: str) -> dict[str, Any]:
        return await self.update_user(user_id, {"status": status})

    async def delete_user(self, user_id: str) -> None:
        await self.get_user(user_id)
        await self.store.users.delete(user_id)
        self._forget_user(user_id)
        await self._audit("user.delete", user_id)

    # -- tokens -----------------------------------------------------------------

    async def create_token(self, user_id: str, *, name: Any = None, expires_at: Any = None) -> dict[str, Any]:
        await self.get_user(user_id)
        if name is not None and (not isinstance(name, str) or len(name) > 200):
            raise BadRequest("name must be a string of at most 200 characters.", param="name")
        expires = self._parse_expiry(expires_at)
        row, secret = await self.store.tokens.create(user_id, name=name, expires_at=expires)
        await self._audit("token.create", user_id, target=row["id"], details={"prefix": row["prefix"]})
        return {**_public_token(row), "token": secret}

    def _parse_expiry(self, expires_at: Any) -> str | None:
        if expires_at is None:
            return None
        if not isinstance(expires_at, str) or len(expires_at) > 64:
            raise BadRequest("expires_at must be an ISO-8601 time such as 2027-01-31T00:00:00Z.", param="expires_at")
        try:
            moment = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
            ts = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()  # naive = UTC
        except ValueError:
            raise BadRequest("expires_at must be an ISO-8601 time such as 2027-01-31T00:00:00Z.", param="expires_at") from None
        if ts <= self._clock():
            raise BadRequest("expires_at is in the past.", param="expires_at")
        return iso(ts)

    async def list_tokens(self, user_id: str) -> list[dict[str, Any]]:
        await self.get_user(user_id)
        return [_public_token(r) for r in await self.store.tokens.list_for_user(user_id)]

    async def revoke_token(self, token_id: str) -> dict[str, Any]:
        row = await self.store.tokens.get(token_id)
        if row is None:
            raise NotFound(f"No token {token_id!r}.")
        if row["revoked_at"] is None:
            await self.store.tokens.revoke(token_id)
            self._forget_token(token_id)
            await self._audit("token.revoke", row["user_id"], target=token_id)
        return _public_token(await self.store.tokens.get(token_id))  # type: ignore[arg-type]

    async def rotate_token(self, token_id: str) -> dict[str, Any]:
        row = await self.store.tokens.get(token_id)
        if row is None:
            raise NotFound(f"No token {token_id!r}.")
        if row["revoked_at"] is not None:
            raise Conflict(f"Token {token_id!r} is revoked; create a new one instead.")
        rotated = await self.store.tokens.rotate(token_id)
        if rotated is None:
            raise Conflict(f"Token {token_id!r} was revoked meanwhile; create a new one instead.")
        new_row, secret = rotated
        self._forget_token(token_id)
        await self._audit("token.rotate", row["user_id"], target=new_row["id"], details={"replaced": token_id})
        return {**_public_token(new_row), "token": secret}

    async def _audit(self, action: str, user_id: str | None, *, target: str | None = None,
                     details: dict[str, Any] | None = None) -> None:
        await self.store.audit.append(actor=self.actor, action=action, user_id=user_id, target=target, details=details)


def _valid(overrides: dict[str, Any]) -> dict[str, Any]:
    broken = broken_overrides(overrides)
    return {k: v for k, v in overrides.items() if k not in broken}


def _public_token(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "user_id": row["user_id"],
        "name": row["name"],
        "prefix": row["prefix"],
        "created_at": row["created_at"],
        "last_used_at": row["last_used_at"],
        "expires_at": row["expires_at"],
        "revoked": row["revoked_at"] is not None,
        "revoked_at": row["revoked_at"],
    }
