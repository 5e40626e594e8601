"""Managed-key operations in progress: the write-ahead record that makes provisioning and
rotation crash-safe (see `gateway/provisioning.py` for the protocol).

Every step is a compare-and-set on (user, upstream_name), so two actors replaying the same
operation (an instance recovering it, another finishing it) never both apply a step.
"""

from __future__ import annotations

from gateway.core.clock import Clock, iso, system_clock
from gateway.store.changes import publish
from gateway.store.database import Database, Row


class ManagedKeyOperations:
    def __init__(self, db: Database, clock: Clock = system_clock) -> None:
        self._db = db
        self._clock = clock

    async def get(self, user_id: str) -> Row | None:
        return await self._db.fetchone("SELECT * FROM managed_key_operations WHERE user_id = ?", (user_id,))

    async def all(self) -> list[Row]:
        return await self._db.fetchall("SELECT * FROM managed_key_operations ORDER BY started_at")

    async def begin(
        self, user_id: str, *, operation: str, upstream_name: str, old_hash: str | None, limit_usd: str | None
    ) -> bool:
        """Record the intent before anything is created upstream; False if one is already recorded."""
        now = iso(self._clock())
        async with self._db.transaction() as tx:
            if await tx.fetchone("SELECT 1 AS one FROM managed_key_operations WHERE user_id = ?", (user_id,)):
                return False
            await tx.execute(
                "INSERT INTO managed_key_operations (user_id, operation, phase, upstream_name, old_hash, limit_usd,"
                " started_at, updated_at) VALUES (?, ?, 'creating', ?, ?, ?, ?, ?)",
                (user_id, operation, upstream_name, old_hash, limit_usd, now, now),
            )
        return True

    async def created(
        self, user_id: str, upstream_name: str, *, new_hash: str, ciphertext: str, label: str, last4: str
    ) -> bool:
        """The upstream key exists: keep its hash and encrypted secret so it is never lost."""
        changed = await self._db.execute(
            "UPDATE managed_key_operations SET phase = 'created', new_hash = ?, new_ciphertext = ?, new_label = ?,"
            " new_last4 = ?, updated_at = ? WHERE user_id = ? AND upstream_name = ? AND phase = 'creating'",
            (new_hash, ciphertext, label, last4, iso(self._clock()), user_id, upstream_name),
        )
        return bool(changed)

    async def swap_in(self, op: Row, *, disabled: bool = False) -> bool:
        """Put the new key in `provider_keys` and mark the operation swapped, in one transaction.

        Provision inserts (only if the user still exists and has no key); rotation replaces
        only if the user's key is still the one being rotated. False means the world moved
        on (key deleted or replaced meanwhile) and the new upstream key must be rolled back.
        """
        now = iso(self._clock())
        user_id = op["user_id"]
        async with self._db.transaction() as tx:
            current = await tx.fetchone(
                "SELECT phase FROM managed_key_operations WHERE user_id = ? AND upstream_name = ?",
                (user_id, op["upstream_name"]),
            )
            if current is None or current["phase"] != "created":
                return bool(current and current["phase"] == "swapped")
            if op["operation"] == "provision":
                if await tx.fetchone("SELECT 1 AS one FROM provider_keys WHERE user_id = ?", (user_id,)):
                    return False
                if not await tx.fetchone("SELECT 1 AS one FROM users WHERE id = ?", (user_id,)):
                    return False
                await tx.execute(
                    "INSERT INTO provider_keys (user_id, kind, ciphertext, label, last4, upstream_hash, limit_usd,"
                    " disabled, created_at, updated_at) VALUES (?, 'managed', ?, ?, ?, ?, ?, ?, ?, ?)",
                    (user_id, op["new_ciphertext"], op["new_label"], op["new_last4"], op["new_hash"],
                     op["limit_usd"], int(disabled), now, now),
                )
            else:
                changed = await tx.execute(
                    "UPDATE provider_keys SET ciphertext = ?, label = ?, last4 = ?, upstream_hash = ?, updated_at = ?"
                    " WHERE user_id = ? AND kind = 'managed' AND upstream_hash = ?",
                    (op["new_ciphertext"], op["new_label"], op["new_last4"], op["new_hash"], now, user_id,
                     op["old_hash"]),
                )
                if not changed:
                    return False
            await tx.execute(
                "UPDATE managed_key_operations SET phase = 'swapped', new_ciphertext = NULL, updated_at = ?"
                " WHERE user_id = ? AND upstream_name = ?",
                (now, user_id, op["upstream_name"]),
            )
            await publish(tx, "user", user_id, self._clock())
        return True

    async def abandon(self, user_id: str, upstream_name: str) -> None:
        """Claim a `creating` operation for roll-back: its actor's `created` step now fails and cleans up."""
        await self._db.execute(
            "UPDATE managed_key_operations SET phase = 'abandoned', updated_at = ?"
            " WHERE user_id = ? AND upstream_name = ? AND phase = 'creating'",
            (iso(self._clock()), user_id, upstream_name),
        )

    async def finish(self, user_id: str, upstream_name: str) -> None:
        await self._db.execute(
            "DELETE FROM managed_key_operations WHERE user_id = ? AND upstream_name = ?", (user_id, upstream_name)
        )

    # -- keys a rotation replaced, deleted upstream after their grace ------------------

    async def retire(self, user_id: str, upstream_hash: str, *, delete_after_iso: str) -> None:
        await self._db.execute(
            "INSERT INTO retired_keys (upstream_hash, user_id, delete_after) VALUES (?, ?, ?)"
            " ON CONFLICT (upstream_hash) DO NOTHING", (upstream_hash, user_id, delete_after_iso))

    async def retired(self) -> list[Row]:
        return await self._db.fetchall("SELECT * FROM retired_keys ORDER BY delete_after")

    async def forget_retired(self, upstream_hash: str) -> None:
        await self._db.execute("DELETE FROM retired_keys WHERE upstream_hash = ?", (upstream_hash,))
