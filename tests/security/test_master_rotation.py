"""`gateway keys rotate-master`: every stored key re-encrypted under a new master key, nothing in
plaintext on disk, a crash mid-way loses nothing, and a running gateway keeps decrypting."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet

from gateway.cli.main import main
from gateway.core.clock import iso
from gateway.security.master_rotation import rotate_master
from gateway.security.vault import Vault, parse_master_keys
from gateway.store import Store

COUNT = 1000


async def seeded(tmp_path: Path, count: int = COUNT) -> tuple[Store, Path, dict[str, str]]:
    key_file = tmp_path / "master.key"
    key_file.write_text(Fernet.generate_key().decode() + "\n")
    vault = Vault(parse_master_keys(key_file.read_text()))
    store = await Store.open(f"sqlite:///{tmp_path}/gateway.db")
    plaintexts = {f"user{i:05d}": "sk-or-v1-" + secrets.token_hex(32) for i in range(count)}
    now = iso(0)
    async with store.db.transaction() as tx:
        await tx.executemany(
            "INSERT INTO users (id, email, tier, status, overrides, created_at, updated_at)"
            " VALUES (?, NULL, 'trial', 'active', '{}', ?, ?)", [(u, now, now) for u in plaintexts])
        await tx.executemany(
            "INSERT INTO provider_keys (user_id, kind, ciphertext, label, last4, disabled, created_at, updated_at)"
            " VALUES (?, 'byok', ?, 'sk-or-v1-…', ?, 0, ?, ?)",
            [(u, vault.encrypt(k), k[-4:], now, now) for u, k in plaintexts.items()])
    return store, key_file, plaintexts


async def stored(store: Store) -> dict[str, str]:
    rows = await store.db.fetchall("SELECT user_id, ciphertext FROM provider_keys")
    return {r["user_id"]: r["ciphertext"] for r in rows}


def disk_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(tmp_path.iterdir()) if p.is_file())


@pytest.mark.anyio
async def test_every_key_is_reencrypted_under_the_new_master_key(tmp_path: Path) -> None:
    store, key_file, plaintexts = await seeded(tmp_path)
    old_keys = parse_master_keys(key_file.read_text())
    running = Vault.from_sources(None, str(key_file))  # a gateway that started before the rotation
    seen: list[tuple[int, int]] = []
    try:
        report = await rotate_master(store, key_file, batch_size=150, progress=lambda d, t: seen.append((d, t)))
        keys = parse_master_keys(key_file.read_text())
        assert keys[1:] == old_keys and len(keys) == 2 and not report.resumed
        assert report.rotated == COUNT and report.unreadable == []
        only_new = Vault(keys[:1])
        rows = await stored(store)
        assert {u: only_new.decrypt(c) for u, c in rows.items()} == plaintexts
        assert seen[-1] == (COUNT, COUNT) and len(seen) > 5  # the bar moved batch by batch
        # the running gateway picks the new file up by itself and writes under the new key
        some = next(iter(rows))
        assert running.decrypt(rows[some]) == plaintexts[some]
        assert only_new.decrypt(running.encrypt("sk-or-v1-x" * 3)) == "sk-or-v1-x" * 3
        on_disk = disk_bytes(tmp_path)  # database, its WAL and the key file, while still open
        assert (tmp_path / "gateway.db-wal").exists()
    finally:
        await store.close()
    on_disk += disk_bytes(tmp_path)
    for secret in plaintexts.values():
        assert secret.encode() not in on_disk and secret[9:].encode() not in on_disk


class CrashingKeys:
    """The key repository, but the process dies during the third batch's write."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def replace_ciphertexts(self, rows: list[tuple[str, str, str]]) -> None:
        self.batches += 1
        if self.batches == 3:
            raise SystemExit("killed mid-rotation")
        await self.inner.replace_ciphertexts(rows)


@pytest.mark.anyio
async def test_a_crash_mid_way_loses_nothing_and_the_next_run_resumes(tmp_path: Path) -> None:
    store, key_file, plaintexts = await seeded(tmp_path, 500)
    real_keys = store.keys
    try:
        store.keys = CrashingKeys(real_keys)  # type: ignore[assignment]
        with pytest.raises(SystemExit):
            await rotate_master(store, key_file, batch_size=100)
        store.keys = real_keys
        keys = parse_master_keys(key_file.read_text())
        rows = await stored(store)
        assert {u: Vault(keys).decrypt(c) for u, c in rows.items()} == plaintexts
        mixed = sum(1 for c in rows.values() if _under(keys[0], c))
        assert mixed == 200  # two batches done, the rest still under the old key
        report = await rotate_master(store, key_file, batch_size=100)
        assert report.resumed and parse_master_keys(key_file.read_text()) == keys  # no third key
        rows = await stored(store)
        assert {u: Vault(keys[:1]).decrypt(c) for u, c in rows.items()} == plaintexts
        assert await store.state.get("master_key_rotation") is None
        again = await rotate_master(store, key_file, batch_size=100)  # a finished rotation: the next run is new
        assert not again.resumed and again.keys_in_file == 3
    finally:
        await store.close()


def _under(key: str, ciphertext: str) -> bool:
    try:
        Fernet(key).decrypt(ciphertext.encode())
    except Exception:
        return False
    return True


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "database": {"url": f"sqlite:///{tmp_path}/gateway.db"},
        "security": {"master_key_file": str(tmp_path / "master.key"),
                     "admin_token_file": str(tmp_path / "admin.sha256")},
    }))
    return path


def test_cli_draws_a_progress_bar_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def seed() -> tuple[Path, dict[str, str]]:
        store, key_file, plaintexts = await seeded(tmp_path, 30)
        await store.close()
        return key_file, plaintexts

    key_file, plaintexts = asyncio.run(seed())
    main(["--config", str(write_config(tmp_path)), "keys", "rotate-master", "--batch-size", "10"])
    out = capsys.readouterr()
    assert "re-encrypting [" in out.err and "30/30" in out.err and '"rotated": 30' in out.out
    assert not any(k in out.out + out.err for k in plaintexts.values())
    assert len(parse_master_keys(key_file.read_text())) == 2


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be 1 or more"),
])
def test_cli_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                               message: str) -> None:
    (tmp_path / "master.key").write_text(Fernet.generate_key().decode() + "\n")
    before = (tmp_path / "master.key").read_text()
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(write_config(tmp_path)), "keys", "rotate-master", *argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "master.key").read_text() == before


def test_cli_refuses_keys_from_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_MASTER_KEYS", Fernet.generate_key().decode())
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(write_config(tmp_path)), "keys", "rotate-master"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "GATEWAY_MASTER_KEYS" in err and "master_key_file" in err
    assert not (tmp_path / "master.key").exists()
