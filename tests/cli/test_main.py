"""The `gateway` command: users, tokens, BYOK keys; `--help` everywhere; bad input → one line, exit 2, nothing written."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet

from gateway.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
TABLES = ("users", "tokens", "provider_keys", "audit_log")


class Cli:
    def __init__(self, tmp: Path, capsys: pytest.CaptureFixture[str], upstream: str = "http://127.0.0.1:9/api/v1") -> None:
        self.tmp = tmp
        self.capsys = capsys
        self.db = tmp / "gateway.db"
        self.config = tmp / "gateway.yaml"
        (tmp / "master.key").write_text(Fernet.generate_key().decode() + "\n")
        self.config.write_text(yaml.safe_dump({
            "database": {"url": f"sqlite:///{self.db}"},
            "security": {"master_key_file": str(tmp / "master.key"), "admin_token_file": str(tmp / "admin.sha256")},
            "upstream": {"base_url": upstream, "retries": 0},
        }))

    def run(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        try:
            main(["--config", str(self.config), *argv])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> Any:
        code, out, err = self.run(*argv)
        assert code == 0, err
        return json.loads(out)

    def counts(self) -> dict[str, int]:
        with sqlite3.connect(self.db) as conn:
            return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}

    def refused(self, *argv: str, match: str) -> str:
        """Exit 2, exactly one line on stderr naming the problem, nothing on stdout, no row written."""
        before = self.counts()
        code, out, err = self.run(*argv)
        assert code == 2, (code, out, err)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("gateway: ") and match in lines[0], lines[0]
        assert self.counts() == before
        return lines[0]


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    for name in list(__import__("os").environ):
        if name.startswith("GATEWAY_") or name == "OPENROUTER_API_KEY":
            monkeypatch.delenv(name)
    made = Cli(tmp_path, capsys)
    made.ok("users", "add", "--id", "alice", "--email", "alice@example.com", "--tier", "starter")
    return made


# -- --help ---------------------------------------------------------------------------


def _commands() -> list[list[str]]:
    found: list[list[str]] = [[]]

    def walk(parser: Any, prefix: list[str]) -> None:
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    found.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return found


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "gateway")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: gateway")


def test_the_spec_commands_are_all_there() -> None:
    commands = {" ".join(c) for c in _commands()}
    for expected in ("serve", "init", "emulator", "users add", "users list", "users show", "users set-tier",
                     "users suspend", "users resume", "users delete", "tokens create", "tokens list",
                     "tokens revoke", "tokens rotate", "keys set-byok", "usage report", "sync-credits"):
        assert expected in commands


def test_python_dash_m_and_console_script_run() -> None:
    for argv in ([sys.executable, "-m", "gateway", "--help"], [str(Path(sys.executable).parent / "gateway"), "--help"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "usage: gateway" in done.stdout, done.stderr


# -- users ------------------------------------------------------------------------------


def test_users_lifecycle(cli: Cli) -> None:
    bob = cli.ok("users", "add", "--email", "bob@example.com")
    assert bob["tier"] == "trial" and bob["status"] == "active" and bob["id"].startswith("usr_")
    page = cli.ok("users", "list", "--limit", "1")
    assert [u["id"] for u in page["data"]] == ["alice"] and page["next_cursor"] == "alice"
    assert [u["id"] for u in cli.ok("users", "list", "--cursor", "alice")["data"]] == [bob["id"]]
    assert cli.ok("users", "set-tier", "alice", "professional")["tier"] == "professional"
    assert cli.ok("users", "suspend", "alice")["status"] == "suspended"
    assert cli.ok("users", "resume", "alice")["status"] == "active"
    assert cli.ok("users", "show", "alice")["email"] == "alice@example.com"
    assert cli.ok("users", "delete", bob["id"]) == {"deleted": bob["id"]}
    assert cli.counts()["users"] == 1
    with sqlite3.connect(cli.db) as conn:
        actions = [r[0] for r in conn.execute("SELECT action FROM audit_log WHERE actor = 'cli' ORDER BY id")]
    assert actions == ["user.create", "user.create", "user.tier", "user.suspend", "user.resume", "user.delete"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (("users", "add", "--tier", "platinum"), "Unknown tier 'platinum'"),
        (("users", "add", "--email", "not-an-email"), "is not an email address"),
        (("users", "add", "--id", "has space"), "User id must be"),
        (("users", "add", "--id", "alice"), "already exists"),
        (("users", "add", "--email", "alice@example.com"), "already exists"),
        (("users", "set-tier", "alice", "gold"), "Unknown tier 'gold'"),
        (("users", "set-tier", "nobody", "starter"), "No user 'nobody'"),
        (("users", "show", "nobody"), "No user 'nobody'"),
        (("users", "suspend", "nobody"), "No user 'nobody'"),
        (("users", "resume", "nobody"), "No user 'nobody'"),
        (("users", "delete", "nobody"), "No user 'nobody'"),
        (("users", "list", "--limit", "0"), "must be 1 or more"),
        (("users", "list", "--limit", "many"), "not a whole number"),
        (("users", "rename", "alice"), "invalid choice"),
        (("users", "set-tier", "alice"), "required"),
        (("users",), "required"),
        (("nonsense",), "invalid choice"),
    ],
)
def test_users_bad_input(cli: Cli, argv: tuple[str, ...], match: str) -> None:
    cli.refused(*argv, match=match)


def test_bad_config_is_one_line_naming_the_key(cli: Cli) -> None:
    cli.config.write_text(cli.config.read_text() + "server:\n  prot: 1\n")
    cli.refused("users", "list", match="server.prot: unknown key")
    code, _, err = cli.run("--config", str(cli.tmp / "absent.yaml"), "users", "list")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


# -- tokens -------------------------------------------------------------------------------


def test_tokens_lifecycle_prints_the_secret_once(cli: Cli) -> None:
    code, out, err = cli.run("tokens", "create", "alice", "--name", "laptop", "--expires-at", "2030-01-31T00:00:00Z")
    assert code == 0 and "shown this once" in err
    created = json.loads(out)
    secret = created["token"]
    assert secret.startswith("gw-") and created["expires_at"] == "2030-01-31T00:00:00.000000Z"
    listed = cli.ok("tokens", "list", "alice")["data"]
    assert [t["id"] for t in listed] == [created["id"]] and "token" not in listed[0]
    assert secret not in json.dumps(listed)
    rotated = cli.ok("tokens", "rotate", created["id"])
    assert rotated["token"] != secret and rotated["name"] == "laptop"
    revoked = cli.ok("tokens", "revoke", rotated["id"])
    assert revoked["revoked"] is True and "token" not in revoked
    assert [t["revoked"] for t in cli.ok("tokens", "list", "alice")["data"]] == [True, True]
    assert secret.encode() not in b"".join(p.read_bytes() for p in cli.tmp.glob("gateway.db*"))


def test_naive_expiry_is_utc(cli: Cli) -> None:
    assert cli.ok("tokens", "create", "alice", "--expires-at", "2030-01-31T12:00:00")["expires_at"] == (
        "2030-01-31T12:00:00.000000Z"
    )


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (("tokens", "create", "nobody"), "No user 'nobody'"),
        (("tokens", "create", "alice", "--expires-at", "next tuesday"), "expires_at must be an ISO-8601 time"),
        (("tokens", "create", "alice", "--expires-at", "2001-01-01T00:00:00Z"), "expires_at is in the past"),
        (("tokens", "list", "nobody"), "No user 'nobody'"),
        (("tokens", "revoke", "tok_missing"), "No token 'tok_missing'"),
        (("tokens", "rotate", "tok_missing"), "No token 'tok_missing'"),
        (("tokens", "create"), "required"),
    ],
)
def test_tokens_bad_input(cli: Cli, argv: tuple[str, ...], match: str) -> None:
    cli.refused(*argv, match=match)


def test_rotating_a_revoked_token_is_refused(cli: Cli) -> None:
    token = cli.ok("tokens", "create", "alice")
    cli.ok("tokens", "revoke", token["id"])
    cli.refused("tokens", "rotate", token["id"], match="is revoked")


# -- keys set-byok ------------------------------------------------------------------------------


@pytest.fixture
def byok_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
             emulator: Any) -> Cli:
    for name in list(__import__("os").environ):
        if name.startswith("GATEWAY_") or name == "OPENROUTER_API_KEY":
            monkeypatch.delenv(name)
    made = Cli(tmp_path, capsys, upstream=emulator.base_url)
    made.ok("users", "add", "--id", "alice")
    return made


def test_set_byok_verifies_then_stores_only_ciphertext(byok_cli: Cli, emulator: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    key = emulator.new_key()
    monkeypatch.setenv("OPENROUTER_API_KEY", key)
    described = byok_cli.ok("keys", "set-byok", "alice")
    assert described == {"kind": "byok", "label": described["label"], "last4": key[-4:]}
    assert key not in json.dumps(described)
    with sqlite3.connect(byok_cli.db) as conn:
        ciphertext = conn.execute("SELECT ciphertext FROM provider_keys WHERE user_id = 'alice'").fetchone()[0]
    assert key not in ciphertext
    assert key.encode() not in b"".join(p.read_bytes() for p in byok_cli.tmp.glob("gateway.db*"))


def test_set_byok_reads_the_key_from_stdin(byok_cli: Cli, emulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    key = emulator.new_key()
    monkeypatch.setattr(sys, "stdin", io.StringIO(key + "\n"))
    assert byok_cli.ok("keys", "set-byok", "alice", "--key-stdin")["last4"] == key[-4:]


@pytest.mark.parametrize(
    ("key", "user", "match"),
    [
        (None, "alice", "no key given"),
        ("not-a-key", "alice", "does not look like an OpenRouter key"),
        ("sk-or-v1-" + "0" * 48, "alice", "OpenRouter rejected this key"),
        ("sk-or-v1-" + "0" * 48, "nobody", "No user 'nobody'"),
        ("sk-or-v1-emulator-management-key-000000000000", "alice", "management key"),
    ],
)
def test_set_byok_bad_input_stores_nothing(byok_cli: Cli, monkeypatch: pytest.MonkeyPatch,
                                           key: str | None, user: str, match: str) -> None:
    if key is not None:
        monkeypatch.setenv("OPENROUTER_API_KEY", key)
    line = byok_cli.refused("keys", "set-byok", user, match=match)
    assert key is None or key not in line
