"""First run, as a newcomer does it: `gateway init`, `gateway serve` on defaults, `gateway serve --demo`;
health and readiness; the Dockerfile's contract."""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import orjson
import pytest

from tests.conftest import ROOT, free_port, start_gateway, stop_process, wait_http


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return {**env, **extra}


def gateway(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *argv], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=60)


# uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -15 is a clean stop, -9 is not.
CLEAN_EXIT = (0, -signal.SIGTERM)


def admin_token_in(text: str) -> str | None:
    found = re.search(r"admin token \(shown once, store it now\): (\S+)", text)
    return found.group(1) if found else None


def test_init_writes_config_and_key_once_and_prints_the_admin_token_once(tmp_path: Path) -> None:
    first = gateway("init", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    token = admin_token_in(first.stdout + first.stderr)
    assert token is not None and len(token) >= 40
    config, key = tmp_path / "gateway.yaml", tmp_path / "data" / "master.key"
    assert config.is_file() and key.is_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert token not in config.read_text()
    stored = b"".join(p.read_bytes() for p in (tmp_path / "data").iterdir())
    assert token.encode() not in stored  # only its hash is kept
    before = {p: p.read_bytes() for p in [config, *(tmp_path / "data").iterdir()]}

    second = gateway("init", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert admin_token_in(second.stdout + second.stderr) is None
    assert "gwadmin-" not in second.stdout + second.stderr
    assert {p: p.read_bytes() for p in before} == before


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`gateway init` then `gateway serve` in a fresh folder: (base URL, admin token)."""
    init = gateway("init", cwd=tmp_path)
    token = admin_token_in(init.stdout + init.stderr)
    assert token is not None
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port)], cwd=tmp_path,
                               env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", process)
        yield url, token
    finally:
        assert stop_process(process) in CLEAN_EXIT


def test_the_initialised_gateway_serves_and_accepts_the_printed_admin_token(served: tuple[str, str]) -> None:
    url, token = served
    # `gateway serve` with one worker runs on uvloop (uvicorn's own loop option does not reach Server.serve())
    assert httpx.get(url + "/health").json() == {"status": "ok", "server": "uvicorn", "loop": "uvloop"}
    assert httpx.get(url + "/admin/v1/users", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert httpx.get(url + "/admin/v1/users", headers={"Authorization": "Bearer gwadmin-guess"}).status_code == 401


def test_serve_demo_prints_a_curl_line_that_returns_a_completion(tmp_path: Path) -> None:
    port, demo_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--demo", "--port", str(port), "--demo-port", str(demo_port)],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = ""
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode().strip()
            if line.startswith("curl "):
                break
        assert line.startswith("curl "), "no curl line was printed"
        words = shlex.split(line)
        url = next(w for w in words if w.startswith("http://"))
        headers = dict(words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H")
        body = orjson.loads(words[words.index("-d") + 1])
        assert url == f"http://127.0.0.1:{port}/v1/chat/completions"
        response = httpx.post(url, headers=headers, json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]
        assert (tmp_path / "data" / "master.key").is_file()  # working defaults made on first start
        ready = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "upstream": "ok"}
    finally:
        assert stop_process(process) in CLEAN_EXIT
    err = process.stderr.read().decode() if process.stderr else ""
    assert admin_token_in(err) is not None  # no admin token anywhere: one was made and shown once
    assert headers["Authorization"].split()[-1] not in err  # the demo token is only in the curl line


def test_not_ready_when_the_upstream_is_unreachable(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api/v1"
    gw = start_gateway(tmp_path, None, {"upstream": {"base_url": dead, "retries": 0}})
    try:
        assert httpx.get(gw.url + "/health").status_code == 200  # alive all the same
        ready = httpx.get(gw.url + "/health/ready", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "ok"
        assert ready.json()["checks"]["upstream"].startswith("error")
    finally:
        gw.stop()


def test_bad_config_refuses_to_start_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("server:\n  port: 8080\n  hots: 0.0.0.0\n")
    done = gateway("serve", cwd=tmp_path)
    assert done.returncode == 2
    assert "server.hots: unknown key" in done.stderr and len(done.stderr.strip().splitlines()) == 1


# -- set-up files ---------------------------------------------------------------------------


def test_dockerfile_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert instructions[0].startswith("FROM python:3.11-slim")
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    assert instructions[-1] == 'CMD ["gateway", "serve", "--host", "0.0.0.0"]'
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "data", "tests"} <= set(ignored)


def test_ci_runs_make_test_and_make_has_the_set_up_targets() -> None:
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run:", "demo:", "test:"):
        assert re.search(rf"^{target}", makefile, re.M), target
    assert "gateway serve --demo" in makefile and "pip install --quiet -e '.[test]'" in makefile
