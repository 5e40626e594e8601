"""First-run set-up: a config file, a master key file and an admin token, each only if absent."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from gateway.core.config import Config, load_config
from gateway.security.secret_files import (
    admin_token_hash,
    new_admin_token,
    write_admin_token_hash,
)
from gateway.security.vault import ensure_key_file

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
    """Master key file and admin token, if neither env nor files provide them. Returns a new admin token."""
    if not config.security.master_keys and ensure_key_file(Path(config.security.master_key_file)):
        announce(f"wrote a new master key to {config.security.master_key_file} (keep it safe: it decrypts stored keys)")
    if admin_token_hash(config.security) is None:
        token = new_admin_token()
        write_admin_token_hash(Path(config.security.admin_token_file), token)
        announce(f"admin token (shown once, store it now): {token}")
        return token
    return None
