"""Shared fixtures: a real emulator process and real gateway processes on free ports.

End-to-end tests talk HTTP to `python -m gateway serve` under uvicorn, exactly as an
operator runs it; the emulator stands in for OpenRouter.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import yaml
from cryptography.fernet import Fernet

from gateway.auth.tokens import Principal, ProviderKey

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "gwadmin-test-" + "a" * 40


class FakeClock:
    """A clock the test moves by hand (`clock.now = …`); services take any `() -> float`."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def principal(user_id: str = "u1", *, tier: str = "starter", status: str = "active",
              key: ProviderKey | str | None = None, overrides: dict[str, Any] | None = None,
              token_id: str = "tok") -> Principal:
    """An authenticated caller as the auth cache hands it over (`key`: a BYOK secret, or the key itself)."""
    provider_key = ProviderKey(kind="byok", secret=key) if isinstance(key, str) else key
    return Principal(user_id=user_id, token_id=token_id, tier=tier, status=status, overrides=overrides or {},
                     key=provider_key)


def wait_for(condition: Callable[[], Any], what: str = "condition", *, timeout: float = 15.0,
             every: float = 0.05) -> Any:
    """Poll `condition()` until it is truthy and return its value; fail naming `what` after `timeout` s
    (the test asserts on the value, never on how long it took)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 20.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out = log.read_text(errors="replace") if log is not None and log.exists() else ""
            raise RuntimeError(f"process exited with {process.returncode}:\n{out[-4000:]}")
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class Emulator:
    def __init__(self, port: int, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.url}/api/v1"

    def control(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        response = httpx.post(f"{self.url}/_emulator/{path}", json=payload or {}, timeout=5)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_emulator/stats", timeout=5).json()

    def new_key(self, **options: Any) -> str:
        return self.control("keys", options)["key"]


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    port = free_port()
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    with log.open("wb") as out:  # a file, not a pipe: a pipe nobody reads fills and blocks the process
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "emulator", "--port", str(port)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )
    emu = Emulator(port, process)
    try:
        wait_http(f"{emu.base_url}/models?limit=1", process, log=log)
        yield emu
    finally:
        stop_process(process)


class GatewayProcess:
    """A running `gateway serve` with admin helpers for setting up users."""

    def __init__(
        self, port: int, process: subprocess.Popen[bytes], config_file: Path, env: dict[str, str], log_file: Path
    ) -> None:
        self.log_file = log_file
        self.port = port
        self.process = process
        self.config_file = config_file
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)

    def create_user(self, *, tier: str | None = None, key: str | None = None, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in {"tier": tier, **fields}.items() if v is not None}
        user = self.admin.post("/admin/v1/users", json=body)
        assert user.status_code == 201, user.text
        user_id = user.json()["id"]
        if key is not None:
            response = self.admin.put(f"/admin/v1/users/{user_id}/openrouter-key", json={"api_key": key})
            assert response.status_code == 200, response.text
        token = self.admin.post(f"/admin/v1/users/{user_id}/tokens", json={"name": "test"})
        assert token.status_code == 201, token.text
        return {"id": user_id, "token": token.json()["token"], "token_id": token.json()["id"]}

    def output(self) -> str:
        """Everything the process has logged so far (stdout and stderr)."""
        return self.log_file.read_text(errors="replace")

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.admin.close()
        return stop_process(self.process, sig)


def write_config(tmp: Path, emulator: Emulator | None, overrides: dict[str, Any] | None = None) -> Path:
    config: dict[str, Any] = {
        "database": {"url": f"sqlite:///{tmp}/gateway.db"},
        "security": {"master_key_file": str(tmp / "master.key"), "admin_token_file": str(tmp / "admin.sha256")},
        "upstream": {"retries": 2, "backoff_base_s": 0.05, "backoff_max_s": 0.2},
        "logging": {"access_log": False},
    }
    if emulator is not None:
        config["upstream"]["base_url"] = emulator.base_url
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    if not (tmp / "master.key").exists():
        (tmp / "master.key").write_text(Fernet.generate_key().decode() + "\n")
    return path


def start_gateway(
    tmp: Path, emulator: Emulator | None, overrides: dict[str, Any] | None = None, *,
    port: int | None = None, extra_env: dict[str, str] | None = None,
) -> GatewayProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    config_file = write_config(tmp, emulator, overrides)
    port = port or free_port()
    env = {**os.environ, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, **(extra_env or {})}
    log_file = tmp / f"gateway-{port}.log"
    with log_file.open("ab") as out:  # a file, not a pipe: a pipe nobody reads fills and blocks the process
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(config_file), "serve", "--port", str(port)],
            cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    gateway = GatewayProcess(port, process, config_file, env, log_file)
    wait_http(f"{gateway.url}/health", process, log=log_file)
    return gateway


@pytest.fixture(scope="session")
def gateway(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway shared by the tests that don't need a config of their own."""
    process = start_gateway(tmp_path_factory.mktemp("gateway"), emulator, {"tiers": _unlimited_tiers()})
    try:
        yield process
    finally:
        process.stop()


def _unlimited_tiers() -> dict[str, Any]:
    return {
        "trial": {"markup_pct": "15"},
        "starter": {"markup_pct": "10"},
        "professional": {"markup_pct": "5"},
        "enterprise": {"markup_pct": "0"},
    }


@pytest.fixture
def user(gateway: GatewayProcess, emulator: Emulator) -> dict[str, Any]:
    """A fresh user with their own emulator key and a platform token."""
    return gateway.create_user(tier="starter", key=emulator.new_key())


REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def redis_url_or_skip(db: int) -> str:
    """Redis for the several-instance cases: skipped loudly when absent, a failure under CI=true."""
    import redis

    url = f"{REDIS_URL.rstrip('/')}/{db}"
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError as exc:
        reason = f"Redis unreachable at {REDIS_URL} ({type(exc).__name__}); run `bash .ci/services`"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(f"SKIPPED LOUDLY: {reason}")
    return url
