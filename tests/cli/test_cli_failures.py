"""The `gateway` command as a newcomer meets it: `--config` on either side, one-line failures, never a traceback.

Each case runs the real console entry point in a subprocess: exit 2 for bad input, 1 for
the environment (database, upstream, master key), one line on stderr that names the file
or URL and the setting or command that fixes it, and nothing written.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.fernet import Fernet

GOOD_KEY = "sk-or-v1-" + "a" * 64


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "master.key").write_text(Fernet.generate_key().decode() + "\n")
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump({
        "database": {"url": f"sqlite:///{tmp_path}/gateway.db"},
        "security": {"master_key_file": str(tmp_path / "master.key"),
                     "admin_token_file": str(tmp_path / "admin.sha256")},
        "upstream": {"base_url": "http://127.0.0.1:9/api/v1", "retries": 0, "connect_timeout_s": 2},
    }))
    return tmp_path


def gateway(home: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "OPENROUTER_API_KEY"}
    return subprocess.run([sys.executable, "-m", "gateway", *argv], cwd=home, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=60)


def one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gateway: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def rows(home: Path, table: str) -> int:
    with sqlite3.connect(home / "gateway.db") as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_before_or_after_the_subcommand(home: Path, where: str) -> None:
    config = ["--config", str(home / "gateway.yaml")]
    argv = [*config, "users", "add", "--id", "alice"] if where == "before" else ["users", "add", "--id", "alice",
                                                                                 *config]
    result = gateway(home.parent, *argv)  # from elsewhere: only --config finds the file
    assert result.returncode == 0, result.stderr
    assert rows(home, "users") == 1


def test_serve_accepts_config_after_the_subcommand(home: Path) -> None:
    result = gateway(home, "serve", "--config", str(home / "missing.yaml"))
    one_line(result, 2, "missing.yaml", "gateway init")


def test_set_byok_names_the_url_and_setting_when_openrouter_is_unreachable(home: Path) -> None:
    gateway(home, "users", "add", "--id", "alice")
    result = gateway(home, "keys", "set-byok", "alice", env={"OPENROUTER_API_KEY": GOOD_KEY})
    line = one_line(result, 1, "http://127.0.0.1:9/api/v1", "upstream.base_url")
    assert GOOD_KEY not in line and rows(home, "provider_keys") == 0


@pytest.mark.parametrize("key, says", [
    ("sk-or-v1-0123456789", "19 characters long"),
    ("sk-xx-" + "a" * 40, "start with 'sk-or-'"),
])
def test_set_byok_says_what_is_wrong_with_the_key(home: Path, key: str, says: str) -> None:
    gateway(home, "users", "add", "--id", "alice")
    line = one_line(gateway(home, "keys", "set-byok", "alice", env={"OPENROUTER_API_KEY": key}), 2, says)
    assert key not in line and rows(home, "provider_keys") == 0


def test_provision_without_a_management_key_is_bad_input(home: Path) -> None:
    gateway(home, "users", "add", "--id", "alice")
    one_line(gateway(home, "keys", "provision", "alice"), 2, "upstream.management_key_file",
             "GATEWAY_UPSTREAM__MANAGEMENT_KEY")


def test_provision_over_an_existing_key_speaks_cli(home: Path) -> None:
    gateway(home, "users", "add", "--id", "alice")
    master = Fernet((home / "master.key").read_text().split()[0].encode())
    ciphertext = master.encrypt(b"sk-or-v1-" + b"a" * 64).decode()  # a stored key, as set-byok would leave it
    with sqlite3.connect(home / "gateway.db") as conn:
        conn.execute("INSERT INTO provider_keys (user_id, kind, ciphertext, label, last4, created_at, updated_at) "
                     "VALUES ('alice', 'byok', ?, 'sk-or-v1-aaa...aaaa', 'aaaa', '2026-01-01', '2026-01-01')",
                     (ciphertext,))
    env = {"GATEWAY_UPSTREAM__MANAGEMENT_KEY": "sk-or-v1-" + "m" * 64}
    line = one_line(gateway(home, "keys", "provision", "alice", env=env), 2, "gateway keys rotate alice",
                    "gateway keys delete alice")
    assert "PATCH" not in line


def test_missing_master_key_is_one_line_naming_the_file(home: Path) -> None:
    gateway(home, "users", "add", "--id", "alice")
    (home / "master.key").unlink()
    result = gateway(home, "keys", "set-byok", "alice", env={"OPENROUTER_API_KEY": GOOD_KEY})
    one_line(result, 1, str(home / "master.key"), "security.master_key_file", "gateway init")


@pytest.mark.parametrize("command", [["users", "list"], ["usage", "report"], ["sync-credits"]])
def test_unreachable_database_is_one_line_without_its_password(home: Path, command: list[str]) -> None:
    env = {"GATEWAY_DATABASE__URL": "postgresql://gateway:hunter2@127.0.0.1:9/gateway"}
    line = one_line(gateway(home, *command, env=env), 1, "postgresql://gateway:***@127.0.0.1:9/gateway",
                    "database.url")
    assert "hunter2" not in line
