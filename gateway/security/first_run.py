"""First-run set-up: a config file, a master key file and an admin token, each only if absent.

A master key is generated only for a new, empty database. A missing or wrong master key
in front of a database that holds encrypted OpenRouter keys is refused (`MasterKeyError`,
one line): writing a fresh key would silently make every stored key undecryptable.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

from gateway.core.config import Config, load_config
from gateway.security.secret_files import (
    admin_token_hash,
    new_admin_token,
    write_admin_token_hash,
)
from gateway.security.vault import Vault, VaultError, ensure_key_file

SAMPLE = 20  # stored ciphertexts tried against the master keys at start-up


class MasterKeyError(Exception):
    """The configured master key(s) cannot decrypt the stored keys (or are missing for them)."""


async def _stored_ciphertexts(database_url: str) -> list[str]:
    from gateway.store import connect

    db = await connect(database_url)
    try:
        rows = await db.fetchall("SELECT ciphertext FROM provider_keys LIMIT ?", (SAMPLE,))
        rows += await db.fetchall(
            "SELECT new_ciphertext AS ciphertext FROM managed_key_operations WHERE new_ciphertext IS NOT NULL LIMIT ?",
            (SAMPLE,))
    finally:
        await db.close()
    return [r["ciphertext"] for r in rows]


class DatabaseUnreadable(Exception):
    """The database could not be read to check the master key: an environment failure, not bad input."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"cannot read the database at database.url to check the master key "
                         f"({type(cause).__name__}: {cause})")
        self.cause = cause


def stored_ciphertexts(config: Config) -> list[str]:
    try:
        return asyncio.run(_stored_ciphertexts(config.database.url))
    except Exception as exc:
        raise DatabaseUnreadable(exc) from None


def check_master_keys(config: Config) -> None:
    """Refuse (MasterKeyError) when the stored keys cannot be decrypted with the configured master keys."""
    security = config.security
    source = "GATEWAY_MASTER_KEYS" if security.master_keys else security.master_key_file
    missing = not security.master_keys and not Path(security.master_key_file).exists()
    ciphertexts = stored_ciphertexts(config)
    if not ciphertexts:
        return
    if missing:
        raise MasterKeyError(
            f"the master key file {security.master_key_file} is missing but the database holds "
            f"{'at least ' if len(ciphertexts) >= SAMPLE else ''}{len(ciphertexts)} encrypted OpenRouter key(s): "
            "restore that file (or set GATEWAY_MASTER_KEYS / security.master_key_file); "
            "a new key would make them undecryptable, so none was written")
    try:
        vault = Vault.from_sources(security.master_keys, security.master_key_file)
        for ciphertext in ciphertexts:
            vault.decrypt(ciphertext)
    except (VaultError, ValueError) as exc:
        raise MasterKeyError(
            f"the master key(s) in {source} cannot decrypt the OpenRouter keys stored in the database ({exc}): "
            "configure the master key they were encrypted with (old keys may follow the newest, one per line)"
        ) from None

CONFIG_TEMPLATE = """\
# Written by `gateway init`. Every key and its default: config.example.yaml.
server:
  host: 127.0.0.1
  port: 8080
database:
  url: sqlite:///{data}/gateway.db
security:
  master_key_file: {data}/master.key
  admin_token_file: {data}/admin_token.sha256
upstream:
  base_url: https://openrouter.ai/api/v1
"""


def initialise(config_file: Path, *, announce: Callable[[str], None] = print) -> Config:
    """Create what is missing and return the loaded config; prints the admin token if it made one."""
    if not config_file.exists():
        data = (config_file.parent / "data").resolve()
        config_file.write_text(CONFIG_TEMPLATE.format(data=data))
        announce(f"wrote {config_file}")
    config = load_config(config_file)
    ensure_runtime(config, announce=announce)
    return config


def ensure_runtime(config: Config, *, announce: Callable[[str], None] = print) -> str | None:
    """Master key file and admin token, if neither env nor files provide them. Returns a new admin token.

    Raises MasterKeyError before writing anything if the master key does not fit the database."""
    check_master_keys(config)
    if not config.security.master_keys and ensure_key_file(Path(config.security.master_key_file)):
        announce(f"wrote a new master key to {config.security.master_key_file} (keep it safe: it decrypts stored keys)")
    if admin_token_hash(config.security) is None:
        token = new_admin_token()
        write_admin_token_hash(Path(config.security.admin_token_file), token)
        announce(f"admin token (shown once, store it now): {token}")
        return token
    return None
