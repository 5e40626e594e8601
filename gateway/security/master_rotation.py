"""`gateway keys rotate-master`: a new master key, then every stored OpenRouter key re-encrypted under it.

Order is what makes it safe while gateways keep serving and if it crashes mid-way:
1. The new key is written FIRST in the key file, before any row changes (atomic replace).
   From then on every reader holding the file's keys decrypts both old and new ciphertexts
   (MultiFernet), and running gateways re-read the file on their next encrypt or on the
   first ciphertext they cannot decrypt (`Vault.refresh`).
2. Rows are re-encrypted in batches, each batch one transaction that swaps a ciphertext
   only if nobody changed the row meanwhile (`replace_ciphertexts`). A crash leaves every
   row under the old or the new key, both in the file: nothing is lost.
3. A marker in `gateway_state` names the key being rotated to; a run that finds an
   unfinished marker whose key is still first in the file resumes with it instead of
   adding yet another key. Passes repeat until no row is left under an old key (a gateway
   that had not yet seen the new file may have written one meanwhile).
The old keys stay in the file: remove them yourself once every instance has restarted.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import orjson
from cryptography.fernet import Fernet, InvalidToken

from gateway.security.vault import Vault, parse_master_keys, write_key_file
from gateway.store import Store

MARKER = "master_key_rotation"
MAX_PASSES = 5
ENV_KEYS_REFUSAL = (
    "master keys come from GATEWAY_MASTER_KEYS, which this command cannot edit. Either put the new key first "
    "yourself (new,old: generate one with `python -c \"from cryptography.fernet import Fernet; "
    "print(Fernet.generate_key().decode())\"`) and restart every instance, or move the keys to a file: write "
    "them one per line to security.master_key_file, unset GATEWAY_MASTER_KEYS, and run "
    "`gateway keys rotate-master` again"
)


@dataclass
class RotationReport:
    key_file: str
    resumed: bool
    keys_in_file: int
    rotated: int = 0
    unchanged: int = 0
    passes: int = 0
    unreadable: list[str] = field(default_factory=list)


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Progress:
    """A one-line progress bar on stderr (redrawn in place; plain lines when not a terminal)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width

    def __call__(self, done: int, total: int) -> None:
        total = max(total, done, 1)
        filled = self.width * done // total
        line = f"re-encrypting [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}"
        end = "\r" if self.stream.isatty() and done < total else "\n"
        self.stream.write(("\r" if self.stream.isatty() else "") + line + end)
        self.stream.flush()


async def rotate_master(
    store: Store, key_file: Path, *, batch_size: int = 200, progress: Callable[[int, int], None] = lambda d, t: None,
) -> RotationReport:
    keys = parse_master_keys(key_file.read_text())  # noqa: ASYNC240 (a one-line file, read once by the CLI)
    marker = await store.state.get(MARKER)
    pending = orjson.loads(marker) if marker else None
    resumed = bool(pending and pending.get("fingerprint") == fingerprint(keys[0]))
    if not resumed:
        keys = [Fernet.generate_key().decode(), *keys]
        await store.state.set(MARKER, orjson.dumps({"fingerprint": fingerprint(keys[0])}).decode())
        write_key_file(key_file, keys)
    report = RotationReport(key_file=str(key_file), resumed=resumed, keys_in_file=len(keys))
    vault, newest = Vault(keys), Fernet(keys[0])
    total = await _count(store)
    while report.passes < MAX_PASSES:
        report.passes += 1
        rotated = await _one_pass(store, vault, newest, batch_size, report, progress, total)
        if not rotated:
            break
    await _rotate_pending_operations(store, vault, newest)
    await store.db.execute("DELETE FROM gateway_state WHERE name = ?", (MARKER,))
    return report


async def _count(store: Store) -> int:
    row = await store.db.fetchone("SELECT COUNT(*) AS n FROM provider_keys")
    return int(row["n"]) if row else 0


def _under(fernet: Fernet, ciphertext: str) -> bool:
    try:
        fernet.decrypt(ciphertext.encode())
    except InvalidToken:
        return False
    return True


async def _one_pass(store: Store, vault: Vault, newest: Fernet, batch_size: int, report: RotationReport,
                    progress: Callable[[int, int], None], total: int) -> int:
    after, seen, rotated_now = "", 0, 0
    report.unreadable.clear()
    while True:
        rows = await store.keys.page(after_user_id=after, limit=batch_size)
        if not rows:
            break
        changes = []
        for row in rows:
            if _under(newest, row["ciphertext"]):
                continue
            try:
                changes.append((row["user_id"], row["ciphertext"], vault.rotate(row["ciphertext"])))
            except InvalidToken:
                report.unreadable.append(row["user_id"])
        if changes:
            await store.keys.replace_ciphertexts(changes)
        rotated_now += len(changes)
        seen += len(rows)
        after = rows[-1]["user_id"]
        if report.passes == 1:
            progress(seen, total)
    if report.passes == 1:
        report.unchanged = seen - rotated_now - len(report.unreadable)
        progress(seen, seen)
    report.rotated += rotated_now
    return rotated_now


async def _rotate_pending_operations(store: Store, vault: Vault, newest: Fernet) -> None:
    """The encrypted secret of a managed key whose provisioning was interrupted is a stored key too."""
    rows = await store.db.fetchall(
        "SELECT user_id, upstream_name, new_ciphertext FROM managed_key_operations WHERE new_ciphertext IS NOT NULL"
    )
    for row in rows:
        if _under(newest, row["new_ciphertext"]):
            continue
        try:
            new = vault.rotate(row["new_ciphertext"])
        except InvalidToken:
            continue
        await store.db.execute(
            "UPDATE managed_key_operations SET new_ciphertext = ? WHERE user_id = ? AND upstream_name = ?"
            " AND new_ciphertext = ?",
            (new, row["user_id"], row["upstream_name"], row["new_ciphertext"]),
        )
