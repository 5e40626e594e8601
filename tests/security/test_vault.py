"""Provider keys at rest: MultiFernet (first master key encrypts, all decrypt), key files, masking."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from gateway.security.vault import (
    Vault,
    VaultError,
    ensure_key_file,
    mask_key,
    parse_master_keys,
    write_key_file,
)

SECRET = "sk-or-v1-" + "0123456789abcdef" * 4


def test_round_trip_and_ciphertext_hides_the_key() -> None:
    vault = Vault([Fernet.generate_key().decode()])
    ciphertext = vault.encrypt(SECRET)
    assert SECRET not in ciphertext and SECRET[-8:] not in ciphertext
    assert vault.encrypt(SECRET) != ciphertext  # fresh IV every time
    assert vault.decrypt(ciphertext) == SECRET


def test_old_master_key_still_decrypts_and_rotate_moves_to_the_new_one() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    before = Vault([old]).encrypt(SECRET)
    both = Vault([new, old])
    assert both.decrypt(before) == SECRET
    rotated = both.rotate(before)
    assert Vault([new]).decrypt(rotated) == SECRET
    with pytest.raises(VaultError):
        Vault([old]).decrypt(rotated)


def test_wrong_master_key_fails_without_leaking() -> None:
    ciphertext = Vault([Fernet.generate_key().decode()]).encrypt(SECRET)
    with pytest.raises(VaultError) as caught:
        Vault([Fernet.generate_key().decode()]).decrypt(ciphertext)
    assert SECRET not in str(caught.value) and ciphertext not in str(caught.value)


def test_parse_accepts_lines_commas_and_comments() -> None:
    a, b = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    assert parse_master_keys(f"# newest first\n{a}\n\n{b}\n") == [a, b]
    assert parse_master_keys(f"{a}, {b}") == [a, b]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "not-a-fernet-key"])
def test_parse_refuses_missing_or_malformed_keys(text: str) -> None:
    with pytest.raises(VaultError, match="master key|no master key"):
        parse_master_keys(text)


def test_bad_key_error_names_its_position_not_its_value() -> None:
    good = Fernet.generate_key().decode()
    with pytest.raises(VaultError, match="#2") as caught:
        parse_master_keys(f"{good}\nsecret-but-wrong")
    assert "secret-but-wrong" not in str(caught.value)


def test_key_file_is_owner_only_and_written_once(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "master.key"
    assert ensure_key_file(path) is True
    first = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_key_file(path) is False
    assert path.read_text() == first
    assert len(parse_master_keys(first)) == 1


def test_write_key_file_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    keys = [Fernet.generate_key().decode() for _ in range(2)]
    write_key_file(path, keys)
    assert parse_master_keys(path.read_text()) == keys
    assert not (tmp_path / "master.key.tmp").exists()


def test_from_sources_prefers_env_keys_and_explains_a_missing_file(tmp_path: Path) -> None:
    env_key = Fernet.generate_key().decode()
    assert Vault.from_sources(env_key, str(tmp_path / "absent")).keys == [env_key]
    with pytest.raises(VaultError, match="gateway init"):
        Vault.from_sources(None, str(tmp_path / "absent"))
    ensure_key_file(tmp_path / "master.key")
    assert len(Vault.from_sources(None, str(tmp_path / "master.key")).keys) == 1


@pytest.mark.parametrize(
    ("secret", "label"),
    [(SECRET, "sk-or-v1-01...cdef"), ("sk-or-short1", "...ort1")],
)
def test_mask_shows_only_the_start_and_last_four(secret: str, label: str) -> None:
    assert mask_key(secret) == label
