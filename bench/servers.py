"""Start, pin, watch and stop the processes under test: each server is its own process tree.

Pinning keeps the measurement honest on a 2-core box: the process that receives the load
(the proxy, or the upstream in the direct run) gets core 1 to itself; the load generator
and the upstream behind a proxy share core 0. A server's CPU and memory are those of its
whole process tree (granian and `--workers N` serve from child processes).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography.fernet import Fernet

from bench.backlog import deferred_from
from bench.load import process_cpu_s

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "bench" / "results" / "logs"
BENCH_ADMIN_TOKEN = "gwadmin-bench-" + "b" * 40
BENCH_KEY = "sk-or-v1-bench-key-000000000000000000000000"
FRONT_CPU, BACK_CPU = 1, 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinning(cpu: int | None) -> Any:
    """A preexec_fn: pin to `cpu` (if the box has it) and lift the open-files limit for 1,000 streams."""
    def setup() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
        if cpu is not None and cpu in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {cpu})
    return setup


class Server:
    def __init__(self, name: str, command: list[str], *, port: int, health: str, cpu: int | None,
                 cwd: Path = ROOT, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = open(LOGS / f"{name}.log", "w+b")  # kept after the run for a look at what went wrong
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        preexec_fn=pinning(cpu))
        self.health_path = health
        self._wait(self.url + health)

    def _wait(self, url: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   f"{self.log.read().decode(errors='replace')[-3000:]}")
            try:
                httpx.get(url, timeout=0.5)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout}s")

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def pids(self) -> list[int]:
        """The server process and every live descendant (granian's and uvicorn's workers)."""
        return process_tree(self.process.pid)

    def rss_kb(self) -> int:
        """VmRSS summed over the process tree (uvicorn with one worker serves in this very process)."""
        return sum(_rss_kb(pid) for pid in self.pids())

    def cpu_s(self) -> float:
        """User + system CPU seconds used so far by the process tree's live members."""
        return tree_cpu_s(self.pids())

    def health(self) -> dict[str, Any]:
        """`GET /health` as JSON ({} if it is not JSON)."""
        try:
            body = httpx.get(self.url + self.health_path, timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants, from /proc/<pid>/task/<tid>/children."""
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    queue.extend(int(child) for child in children.read().split())
        except OSError:  # gone meanwhile
            continue
    return found


def tree_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += process_cpu_s(pid)
        except OSError:
            pass
    return total


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def start_upstream(cpu: int | None) -> Server:
    port = free_port()
    return Server("upstream", [sys.executable, "-m", "bench.upstream", "--port", str(port)],
                  port=port, health="/_bench/health", cpu=cpu)


def start_minimal(upstream: Server, cpu: int | None) -> Server:
    port = free_port()
    return Server("minimal", [sys.executable, "-m", "bench.minimal_proxy", "--port", str(port),
                              "--upstream", upstream.url + "/api/v1"], port=port, health="/health", cpu=cpu)


def start_relay(upstream: Server, cpu: int | None) -> Server:
    port = free_port()
    return Server("relay", [sys.executable, "-m", "bench.relay", "--port", str(port),
                            "--upstream", upstream.url + "/api/v1"], port=port, health="/health", cpu=cpu)


def bench_tier() -> dict[str, Any]:
    """Markup, budgets and every rate limit on, set so high that none triggers during the run."""
    return {"markup_pct": "5", "daily_budget_usd": "1000000", "monthly_budget_usd": "1000000",
            "requests_per_minute": 100_000_000, "requests_per_hour": 1_000_000_000,
            "tokens_per_hour": 1_000_000_000_000, "max_concurrent": 100_000}


def start_gateway(upstream: Server, client: str | None, tmp: Path, cpu: int | None, without: str | None = None, *,
                  policy: str | None = None, server: str = "uvicorn", workers: int = 1,
                  name: str | None = None) -> tuple[Server, str]:
    """A gateway in its default shape (auth, limits, accounting) plus a user with a key; returns its token.

    `client` names `upstream.client` (None: the product's default).
    `without` names a service to leave out (`bench/variant.py`), to price it; `policy` sets
    `accounting.generation_lookup.policy` (`missing`: look up only what the response left unpriced,
    plus an audit of 1%); `server` is `uvicorn` (`gateway serve`, `--workers N`) or `granian`
    (ASGI mode, uvloop, the app from `gateway.server:create_from_env`)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "master.key").write_text(Fernet.generate_key().decode() + "\n")
    config: dict[str, Any] = {
        "server": {"data_dir": str(tmp)},
        "database": {"url": f"sqlite:///{tmp}/gateway.db"},
        "security": {"master_key_file": str(tmp / "master.key"), "admin_token_file": str(tmp / "admin.sha256")},
        # pool_size above the 1,000 concurrent streams, or they would queue for a connection
        "upstream": {"base_url": upstream.url + "/api/v1", "pool_size": 1100},
        "logging": {"access_log": False, "level": "warning"},
        "tiers": {"bench": bench_tier()},
        "default_tier": "bench",
    }
    if client is not None:  # else the product's default upstream client
        config["upstream"]["client"] = client
    if policy is not None:
        config["accounting"] = {"generation_lookup": {"policy": policy, "audit_fraction": 0.01}}
    config_file = tmp / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "GATEWAY_ADMIN_TOKEN": BENCH_ADMIN_TOKEN, "PYTHONPATH": str(ROOT)}
    if without is not None:
        command = [sys.executable, "-m", "bench.variant", "--without", without, "--config", str(config_file),
                   "--port", str(port)]
    elif server == "granian":
        env["GATEWAY_CONFIG"] = str(config_file)
        command = [sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--workers",
                   str(workers), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                   "--no-ws", "--factory", "gateway.server:create_from_env"]
    else:
        command = [sys.executable, "-m", "gateway", "--config", str(config_file), "serve", "--port", str(port),
                   "--workers", str(workers)]
    name = name or "gateway" + (f"-{client}" if client else "") + (f"-without-{without}" if without else "")
    process = Server(name, command, port=port, health="/health", cpu=cpu, cwd=tmp, env=env)
    try:
        return process, _create_user(process.url)
    except Exception:
        process.stop()
        raise


def _create_user(url: str) -> str:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {BENCH_ADMIN_TOKEN}"}, timeout=30) as admin:
        user = admin.post("/admin/v1/users", json={"tier": "bench"})
        user.raise_for_status()
        user_id = user.json()["id"]
        admin.put(f"/admin/v1/users/{user_id}/openrouter-key", json={"api_key": BENCH_KEY}).raise_for_status()
        token = admin.post(f"/admin/v1/users/{user_id}/tokens", json={"name": "bench"})
        token.raise_for_status()
        return token.json()["token"]


def deferred_work(server: Server) -> float | None:
    """Pending cost look-ups plus usage records not yet written (one scrape, on a fresh connection so
    that with several workers successive scrapes reach different ones); None if it is not exposed."""
    try:
        response = httpx.get(server.url + "/metrics", timeout=10, headers={"Connection": "close"})
    except httpx.HTTPError:
        return None
    return deferred_from(response.text)


def configure_upstream(upstream: Server, chunk_delay_ms: float) -> None:
    httpx.post(upstream.url + "/_bench/config", json={"chunk_delay_ms": chunk_delay_ms}, timeout=5).raise_for_status()
