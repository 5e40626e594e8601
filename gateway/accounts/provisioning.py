"""Managed OpenRouter keys: provisioned, limited, disabled, rotated and deleted through the key API.

The plaintext of a managed key exists only between OpenRouter's `POST /keys` answer and
`vault.encrypt`; it is never returned, logged or audited (audit rows carry the masked label).

Crash safety (no key orphaned upstream, none lost locally). Provision and rotate write an
operation row (`managed_key_operations`) BEFORE asking OpenRouter for a key, under a
unique upstream name `gateway:<user>:<nonce>`, and advance it step by step:

  creating  → the POST was (maybe) sent; the new key's hash is not known yet
  created   → the new key's hash and encrypted secret are recorded
  swapped   → the new key is the user's key (one transaction with `provider_keys`)
  (row deleted once the replaced key is retired: deleted upstream after its grace)

Whatever step a crash interrupts, the row says how to finish: `creating`/`abandoned` is
rolled back (find the key by its unique name and delete it upstream: its secret was never
stored, so it is useless); `created` is rolled forward (swap in, then delete the old key)
unless the user's key changed meanwhile, in which case the new key is deleted; `swapped`
only needs the old key deleted. Recovery runs for every pending operation when a gateway
starts, for a user's pending operation before the next operation on that user, and for
abandoned ones every `recovery_interval_s`. Every step is a compare-and-set and every
upstream delete is idempotent, so two actors finishing the same operation agree.

Requests in flight during a rotation finish on the old key: they hold its decrypted secret
in their `Principal`; the auth cache drops the user's entry at the swap, and the old key is
deleted upstream only `keys.rotation_grace_s` later (stored in `retired_keys` before the
operation row goes, so a restart still deletes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import weakref
from decimal import Decimal
from typing import Any, Callable

from gateway.accounts.byok import describe_key
from gateway.core.amounts import AmountError, parse_usd
from gateway.core.clock import Clock, iso, parse_iso, system_clock
from gateway.core.config import Config
from gateway.core.errors import BadRequest, Conflict, NotFound
from gateway.security.vault import Vault, mask_key
from gateway.store import Store
from gateway.store.managed_keys import ManagedKeyOperations
from gateway.upstream.key_api import KeyApi, KeyApiError

log = logging.getLogger("gateway.accounts.provisioning")
MISSING: Any = object()


def _noop(_: str) -> None:
    return None


def parse_limit(value: Any, param: str = "limit_usd") -> Decimal | None:
    """A spending limit in USD as an exact Decimal (the rules of `core.amounts`); None means no limit."""
    if value is None:
        return None
    try:
        return parse_usd(value)
    except AmountError as exc:
        raise BadRequest(f"{param} {exc}, or null for no limit.", param=param) from None


class Provisioner:
    def __init__(
        self,
        store: Store,
        vault: Vault,
        key_api: KeyApi,
        config: Config,
        *,
        clock: Clock = system_clock,
        forget_user: Callable[[str], None] = _noop,
        stale_after_s: float = 300.0,
    ) -> None:
        self.store = store
        self.vault = vault
        self.key_api = key_api
        self.config = config
        self.ops = ManagedKeyOperations(store.db, clock)
        self._clock = clock
        self._forget_user = forget_user
        self.stale_after_s = stale_after_s
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._retiring = asyncio.Event()  # a key was retired: the retirement job looks again

    def _lock(self, user_id: str) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = self._locks[user_id] = asyncio.Lock()
        return lock

    async def _user(self, user_id: str) -> dict[str, Any]:
        user = await self.store.users.get(user_id)
        if user is None:
            raise NotFound(f"No user {user_id!r}.")
        return user

    async def _managed_row(self, user_id: str) -> dict[str, Any]:
        row = await self.store.keys.get(user_id)
        if row is None:
            raise NotFound(f"User {user_id!r} has no managed key; create one with POST "
                           f"/admin/v1/users/{user_id}/managed-key.")
        if row["kind"] != "managed":
            raise Conflict(f"User {user_id!r} has their own key (BYOK), which the gateway cannot change; "
                           "remove it first with DELETE /admin/v1/users/{id}/openrouter-key.")
        return row

    # -- operations ---------------------------------------------------------------

    async def provision(self, user_id: str, *, limit_usd: Any = MISSING, actor: str) -> dict[str, Any]:
        """Create a key upstream (limit = `limit_usd` or the tier's monthly budget, monthly reset) and store it."""
        limit = None if limit_usd is MISSING else parse_limit(limit_usd)
        self.key_api.require()
        user = await self._user(user_id)
        if limit_usd is MISSING:
            limit = self.config.tier(user["tier"]).monthly_budget_usd
        async with self._lock(user_id):
            await self._settle(user_id, actor)
            if await self.store.keys.get(user_id) is not None:
                raise Conflict(f"User {user_id!r} already has an OpenRouter key; rotate it, change it with PATCH, "
                               "or delete it first.")
            op = await self._create(user_id, "provision", old_hash=None, limit=limit)
            await self._roll_forward(op, actor=actor, audit=False)
            row = await self.store.keys.get(user_id)
            if row is None or row["upstream_hash"] != op["new_hash"]:
                raise Conflict(f"User {user_id!r}'s key changed while provisioning; the new key was deleted.")
        await self.store.audit.append(actor=actor, action="key.managed.provision", user_id=user_id,
                                      target=row["upstream_hash"],
                                      details={"label": row["label"], "limit_usd": row["limit_usd"]})
        return describe_key(row)  # type: ignore[return-value]

    async def update(self, user_id: str, changes: dict[str, Any], *, actor: str) -> dict[str, Any]:
        """Change the limit and/or disabled state upstream first, then locally (nothing local on failure)."""
        allowed = ("limit_usd", "disabled")
        for name in changes:
            if name not in allowed:
                raise BadRequest(f"Unknown field {name!r}; you can change: limit_usd, disabled.", param=name)
        if not changes:
            raise BadRequest("Give limit_usd and/or disabled to change.", param="limit_usd")
        upstream: dict[str, Any] = {}
        local: dict[str, Any] = {}
        if "limit_usd" in changes:
            limit = parse_limit(changes["limit_usd"])
            upstream["limit"] = limit
            local["limit_usd"] = None if limit is None else str(limit)
        if "disabled" in changes:
            if not isinstance(changes["disabled"], bool):
                raise BadRequest("disabled must be true or false.", param="disabled")
            upstream["disabled"] = changes["disabled"]
            local["disabled"] = int(changes["disabled"])
        self.key_api.require()
        await self._user(user_id)
        async with self._lock(user_id):
            await self._settle(user_id, actor)
            row = await self._managed_row(user_id)
            await self.key_api.update(row["upstream_hash"], **upstream)
            await self.store.keys.update(user_id, **local)
            self._forget_user(user_id)
            updated = await self.store.keys.get(user_id)
        details: dict[str, Any] = {"label": row["label"]}
        if "limit_usd" in local:
            details["limit_usd"] = {"from": row["limit_usd"], "to": local["limit_usd"]}
        if "disabled" in local:
            details["disabled"] = bool(local["disabled"])
        action = "key.managed.update"
        if set(local) == {"disabled"}:
            action = "key.managed.disable" if local["disabled"] else "key.managed.enable"
        await self.store.audit.append(actor=actor, action=action, user_id=user_id, target=row["upstream_hash"],
                                      details=details)
        return describe_key(updated)  # type: ignore[return-value]

    async def rotate(self, user_id: str, *, actor: str) -> dict[str, Any]:
        """New key created, swapped in atomically, old one deleted upstream (see the module docstring)."""
        self.key_api.require()
        await self._user(user_id)
        async with self._lock(user_id):
            await self._settle(user_id, actor)
            row = await self._managed_row(user_id)
            limit = None if row["limit_usd"] is None else Decimal(row["limit_usd"])
            op = await self._create(user_id, "rotate", old_hash=row["upstream_hash"], limit=limit)
            await self._roll_forward(op, actor=actor, audit=False)
            new = await self.store.keys.get(user_id)
            if new is None or new["upstream_hash"] != op["new_hash"]:
                raise Conflict(f"User {user_id!r}'s key changed while rotating; the new key was deleted.")
        await self.store.audit.append(actor=actor, action="key.managed.rotate", user_id=user_id,
                                      target=new["upstream_hash"],
                                      details={"from": row["label"], "to": new["label"]})
        return describe_key(new)  # type: ignore[return-value]

    async def remove(self, user_id: str, *, actor: str) -> bool:
        """Remove the user's key of either kind; a managed key is deleted upstream first. False if none."""
        row = await self.store.keys.get(user_id)
        if row is None and await self.ops.get(user_id) is None:
            return False
        async with self._lock(user_id):
            if (row is not None and row["kind"] == "managed") or await self.ops.get(user_id) is not None:
                self.key_api.require()
                await self._settle(user_id, actor)
            row = await self.store.keys.get(user_id)
            if row is None:
                return False
            if row["kind"] == "managed" and row["upstream_hash"]:
                await self.key_api.delete(row["upstream_hash"])
            removed = await self.store.keys.delete(user_id)
            self._forget_user(user_id)
        if removed:
            action = "key.managed.delete" if row["kind"] == "managed" else "key.delete"
            await self.store.audit.append(actor=actor, action=action, user_id=user_id, target=row["upstream_hash"],
                                          details={"kind": row["kind"], "label": row["label"]})
        return removed

    # -- the steps ------------------------------------------------------------------

    async def _create(self, user_id: str, operation: str, *, old_hash: str | None,
                      limit: Decimal | None) -> dict[str, Any]:
        name = f"gateway:{user_id}:{secrets.token_hex(4)}"
        limit_text = None if limit is None else str(limit)
        if not await self.ops.begin(user_id, operation=operation, upstream_name=name, old_hash=old_hash,
                                    limit_usd=limit_text):
            raise Conflict(f"Another key operation for user {user_id!r} is in progress; try again shortly.")
        try:
            created, secret = await self.key_api.create(name, limit=limit)
        except KeyApiError as exc:
            if exc.upstream_status is not None:  # OpenRouter answered with an error: nothing was created
                await self.ops.finish(user_id, name)
            else:  # unknown whether it was created: roll back by name now, or recovery will
                await self._quietly(self._roll_back(user_id, name))
            raise
        ciphertext, label, last4 = self.vault.encrypt(secret), mask_key(secret), secret[-4:]
        del secret
        if not await self.ops.created(user_id, name, new_hash=created["hash"], ciphertext=ciphertext, label=label,
                                      last4=last4):
            await self.key_api.delete(created["hash"])  # recovery abandoned this operation meanwhile
            raise Conflict(f"The key operation for user {user_id!r} was interrupted; the new key was deleted.")
        op = await self.ops.get(user_id)
        assert op is not None
        return op

    async def _roll_forward(self, op: dict[str, Any], *, actor: str, audit: bool = True) -> str:
        user_id, name = op["user_id"], op["upstream_name"]
        outcome = "completed"
        if op["phase"] == "created":
            current = await self.store.keys.get(user_id)
            if (op["operation"] == "rotate" and current is not None and current["disabled"]
                    and current["upstream_hash"] == op["old_hash"]):
                await self.key_api.update(op["new_hash"], disabled=True)
            if await self.ops.swap_in(op):
                self._forget_user(user_id)
            else:
                await self.key_api.delete(op["new_hash"])
                outcome = "rolled_back"
        if outcome == "completed" and op["old_hash"]:
            await self._retire(user_id, op["old_hash"])
        await self.ops.finish(user_id, name)
        if audit:
            await self._audit_recovery(op, outcome, actor)
        return outcome

    async def _retire(self, user_id: str, old_hash: str) -> None:
        """The replaced key stays valid upstream for `keys.rotation_grace_s` (requests in flight hold it), then
        `run_retirement` deletes it; the row is stored before the operation finishes, so a crash loses nothing."""
        grace = self.config.keys.rotation_grace_s
        if grace <= 0:
            await self.key_api.delete(old_hash)
            return
        await self.ops.retire(user_id, old_hash, delete_after_iso=iso(self._clock() + grace))
        self._retiring.set()

    async def delete_retired(self) -> float | None:
        """Delete upstream the retired keys whose grace is over; when the next one is due (None: none left)."""
        now = self._clock()
        for row in await self.ops.retired():
            due = parse_iso(row["delete_after"])
            if due > now:
                return due
            await self.key_api.delete(row["upstream_hash"])
            await self.ops.forget_retired(row["upstream_hash"])
            log.info("deleted the rotated-out managed key %s of user %s after its grace", row["upstream_hash"],
                     row["user_id"])
        return None

    async def run_retirement(self, idle_s: float = 60.0) -> None:
        """Delete rotated-out keys as their grace ends (also those a restart or another instance left)."""
        while True:
            wait = idle_s
            self._retiring.clear()
            if self.key_api.configured:
                try:
                    due = await self.delete_retired()
                    if due is not None:
                        wait = min(idle_s, max(0.05, due - self._clock()))
                except Exception as exc:
                    log.warning("deleting rotated-out managed keys failed (%s); retrying",
                                getattr(exc, "message", type(exc).__name__))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retiring.wait(), wait)

    async def _roll_back(self, user_id: str, name: str) -> None:
        await self.ops.abandon(user_id, name)
        for row in await self.key_api.find_by_name(name):
            await self.key_api.delete(row["hash"])
        await self.ops.finish(user_id, name)

    async def _settle(self, user_id: str, actor: str) -> None:
        """Finish the user's pending operation before starting another (409 if one is genuinely in flight)."""
        op = await self.ops.get(user_id)
        if op is None:
            return
        if op["phase"] == "creating" and not self._stale(op):
            raise Conflict(f"A key operation for user {user_id!r} started at {op['started_at']} is in progress; "
                           f"if it was interrupted it is cleaned up within {self.stale_after_s:g} s. Try again then.")
        await self.recover_one(op, actor=actor)

    def _stale(self, op: dict[str, Any]) -> bool:
        return self._clock() - parse_iso(op["updated_at"]) >= self.stale_after_s

    async def recover_one(self, op: dict[str, Any], *, actor: str = "system") -> str:
        if op["phase"] in ("creating", "abandoned"):
            await self._roll_back(op["user_id"], op["upstream_name"])
            await self._audit_recovery(op, "rolled_back", actor)
            return "rolled_back"
        return await self._roll_forward(op, actor=actor)

    async def recover(self, *, only_stale: bool, actor: str = "system") -> dict[str, str]:
        """Complete or roll back pending operations; returns user → outcome (failures retried next time)."""
        outcomes: dict[str, str] = {}
        for op in await self.ops.all():
            if only_stale and not self._stale(op):
                continue
            lock = self._lock(op["user_id"])
            if lock.locked():
                continue  # this instance is working on it right now
            async with lock:
                fresh = await self.ops.get(op["user_id"])
                if fresh is None or fresh["upstream_name"] != op["upstream_name"]:
                    continue
                try:
                    outcomes[op["user_id"]] = await self.recover_one(fresh, actor=actor)
                except Exception as exc:
                    log.warning("recovering the key operation of user %s failed (%s); will retry",
                                op["user_id"], getattr(exc, "message", type(exc).__name__))
                    outcomes[op["user_id"]] = "failed"
        return outcomes

    async def _audit_recovery(self, op: dict[str, Any], outcome: str, actor: str) -> None:
        await self.store.audit.append(
            actor=actor, action="key.managed.recover", user_id=op["user_id"], target=op["new_hash"],
            details={"operation": op["operation"], "phase": op["phase"], "outcome": outcome},
        )

    async def run_recovery(self, interval_s: float = 60.0) -> None:
        """At start, finish whatever a crash left (safe even if another instance races it); then, every
        `interval_s`, operations left stale."""
        only_stale = False
        while True:
            if self.key_api.configured:
                try:
                    await self.recover(only_stale=only_stale)
                except Exception:
                    log.exception("managed-key recovery pass failed; retrying")
            only_stale = True
            await asyncio.sleep(interval_s)

    async def _quietly(self, work: Any) -> None:
        try:
            await work
        except Exception as exc:
            log.warning("rolling back an unconfirmed key creation failed (%s); recovery will retry",
                        getattr(exc, "message", type(exc).__name__))
