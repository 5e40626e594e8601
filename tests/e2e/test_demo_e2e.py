"""`make demo` as a newcomer runs it: its ports chosen, its own database, a taken port in one line.

The demo must never write into the database `make run` uses (`data/gateway.db`), and its
printed usage-report line must show the completion just made.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import orjson

from tests.conftest import ROOT, free_port, stop_process


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


def test_make_demo_passes_its_ports_on() -> None:
    dry = subprocess.run(["make", "-n", "demo", "PORT=9123", "DEMO_PORT=9124"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert dry.returncode == 0, dry.stderr
    assert ".venv/bin/gateway serve --demo --port 9123 --demo-port 9124" in dry.stdout
    plain = subprocess.run(["make", "-n", "run", "PORT=9125"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert ".venv/bin/gateway serve --port 9125" in plain.stdout


def test_demo_keeps_its_own_database_and_its_usage_line_works(tmp_path: Path) -> None:
    port, demo_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--demo", "--port", str(port), "--demo-port", str(demo_port)],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = next((raw.decode().strip() for raw in iter(process.stdout.readline, b"")
                     if raw.startswith(b"curl ")), "")
        words = shlex.split(line)
        headers = dict(words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H")
        url = next(w for w in words if w.startswith("http://"))
        response = httpx.post(url, headers=headers, json=orjson.loads(words[words.index("-d") + 1]), timeout=30)
        assert response.status_code == 200, response.text
    finally:
        assert stop_process(process) in (0, -signal.SIGTERM)
    err = process.stderr.read().decode() if process.stderr else ""
    assert (tmp_path / "data" / "demo.db").is_file() and not (tmp_path / "data" / "gateway.db").exists()
    usage_line = next(text.strip() for text in err.splitlines() if "usage report" in text)
    env_part, command = usage_line.split(" ", 1)
    name, value = env_part.split("=", 1)
    report = subprocess.run([sys.executable, "-m", "gateway", *shlex.split(command)[1:], "--format", "json"],
                            cwd=tmp_path, env={**clean_env(), name: value}, capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    rows = orjson.loads(report.stdout)["rows"]
    assert [(r["user_id"], r["requests"]) for r in rows] == [("demo", 1)], rows


def test_a_taken_port_is_one_line_naming_the_option(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for argv, option in ((["--demo-port", str(busy), "--port", str(free_port())], "--demo-port"),
                             (["--port", str(busy), "--demo-port", str(free_port())], "--port")):
            done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--demo", *argv], cwd=tmp_path,
                                  env=clean_env(), capture_output=True, text=True, timeout=60)
            assert done.returncode == 1, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and f"port {busy}" in lines[0] and option in lines[0], done.stderr
            assert "Traceback" not in done.stderr and "never retrieved" not in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was written
