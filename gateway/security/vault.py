"""Provider keys encrypted at rest with MultiFernet: the first master key encrypts, all decrypt.

Master keys come from `GATEWAY_MASTER_KEYS` (comma-separated) or the key file (one per
line). Nothing here ever logs or returns a plaintext key except `decrypt`'s caller.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class VaultError(Exception):
    pass


def parse_master_keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.replace(",", "\n").splitlines() if k.strip() and not k.strip().startswith("#")]
    for index, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise VaultError(
                f"master key #{index} is not a valid Fernet key (32 url-safe base64 bytes; "
                "make one with `gateway init` or Fernet.generate_key())"
            ) from None
    if not keys:
        raise VaultError("no master key found: set GATEWAY_MASTER_KEYS or security.master_key_file (`gateway init` writes one)")
    return keys


def write_key_file(path: Path, keys: list[str]) -> None:
    """Write the key file atomically with owner-only permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(keys) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def ensure_key_file(path: Path) -> bool:
    """Create a key file with one fresh key if none exists; True if created."""
    if path.exists():
        return False
    write_key_file(path, [Fernet.generate_key().decode()])
    return True


class Vault:
    def __init__(self, keys: list[str], *, key_file: Path | None = None) -> None:
        self.keys = keys
        self._fernet = MultiFernet([Fernet(k) for k in keys])
        self._key_file = key_file  # re-read when it changes: `gateway keys rotate-master` on a live gateway
        self._stamp = _stamp(key_file)

    def refresh(self) -> bool:
        """Reload the key file if it changed since it was read (a stat; the file is tiny). True if reloaded."""
        if self._key_file is None or _stamp(self._key_file) == self._stamp:
            return False
        try:
            keys = parse_master_keys(self._key_file.read_text())
        except (OSError, VaultError):
            return False  # mid-write or broken: keep the keys we have
        self.keys, self._fernet, self._stamp = keys, MultiFernet([Fernet(k) for k in keys]), _stamp(self._key_file)
        return True

    @classmethod
    def from_sources(cls, env_keys: str | None, key_file: str) -> "Vault":
        if env_keys:
            return cls(parse_master_keys(env_keys))
        path = Path(key_file)
        if not path.exists():
            raise VaultError(f"master key file {path} does not exist (security.master_key_file: run `gateway init` to write one, "
                             "or set GATEWAY_MASTER_KEYS)")
        return cls(parse_master_keys(path.read_text()), key_file=path)

    def encrypt(self, secret: str) -> str:
        self.refresh()  # encrypt under the newest master key even if it was added after start
        return self._fernet.encrypt(secret.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            if self.refresh():
                return self.decrypt(ciphertext)
            raise VaultError("a stored key cannot be decrypted with the configured master keys") from None

    def rotate(self, ciphertext: str) -> str:
        """Re-encrypt under the first (newest) master key."""
        return self._fernet.rotate(ciphertext.encode()).decode()


def _stamp(path: Path | None) -> tuple[int, int] | None:
    try:
        info = os.stat(path) if path is not None else None
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_ino) if info is not None else None


def mask_key(secret: str) -> str:
    """OpenRouter's label style: `sk-or-v1-abc...wxyz`."""
    if len(secret) <= 14:
        return "..." + secret[-4:]
    return f"{secret[:11]}...{secret[-4:]}"
