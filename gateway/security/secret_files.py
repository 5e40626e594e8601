"""Secrets that come from env or files, never only from the YAML: admin token, management key.

`gateway init` writes the admin token's SHA-256 to `security.admin_token_file`; the token
itself is printed once and kept nowhere.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from gateway.core.config import SecurityConfig, UpstreamConfig


def new_admin_token() -> str:
    return "gwadmin-" + secrets.token_urlsafe(32)


def admin_token_hash(security: SecurityConfig) -> str | None:
    if security.admin_token:
        return hashlib.sha256(security.admin_token.encode()).hexdigest()
    path = Path(security.admin_token_file)
    if path.is_file():
        text = path.read_text().strip()
        return text or None
    return None


def write_admin_token_hash(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(hashlib.sha256(token.encode()).hexdigest() + "\n")


def management_key(upstream: UpstreamConfig) -> str | None:
    if upstream.management_key:
        return upstream.management_key
    if upstream.management_key_file:
        path = Path(upstream.management_key_file)
        if path.is_file():
            return path.read_text().strip() or None
    return None
