"""Running the gateway under uvicorn (uvloop + httptools), alone or beside the emulator (--demo)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Coroutine

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess
from uvloop import new_event_loop

from gateway.connections import ConnectionLimits, GuardedConfig
from gateway.core.config import Config, ServerConfig, load_config
from gateway.core.logs import configure_logging
from gateway.core.metrics_share import WORKER_GROUP_ENV
from gateway.security.first_run import ensure_runtime

DEMO_EMULATOR_PORT = 8090
DEMO_DATABASE = "demo.db"  # in server.data_dir: the demo's user and emulator key stay out of `make run`'s database


class GracefulServer(uvicorn.Server):
    """SIGTERM is how an operator (or an orchestrator) stops the gateway: after a clean
    drain the process exits 0. (uvicorn re-raises the captured signal once it has shut
    down, which made every clean stop exit −15, indistinguishable from a crash.)"""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def _uvicorn_config(app: Any, host: str, port: int, server: ServerConfig | None = None, **extra: Any) -> uvicorn.Config:
    """uvicorn (uvloop + httptools) with every connection bounded: see `gateway.connections`."""
    server = server or ServerConfig()
    return GuardedConfig(
        app,
        connection_limits=ConnectionLimits(
            max_header_bytes=server.max_header_bytes,
            max_headers=server.max_headers,
            header_timeout_s=server.header_timeout_s,
            body_timeout_s=server.body_timeout_s,
            max_connections=server.max_connections,
        ),
        host=host,
        port=port,
        loop="uvloop",
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=server.shutdown_grace_s,
        timeout_keep_alive=server.keep_alive_timeout_s,
        server_header=False,
        **extra,
    )


class _Workers(Multiprocess):
    """The supervisor of `--workers N`: at SIGTERM it closes its own copy of the listening socket first, so
    new connections are refused at once instead of waiting in the kernel's queue while the workers drain.
    (uvicorn's supervisor looks at its signals only every 0.5 s; SIGTERM here wakes it at once.)"""

    def __init__(self, config: uvicorn.Config, sockets: list[Any]) -> None:
        super().__init__(config, sockets)
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, sig: int, frame: FrameType | None) -> None:
        self.signal_queue.append(sig)
        self.should_exit.set()

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()


def _serve_workers(config: uvicorn.Config) -> None:
    """uvicorn.run's several-worker path, with the supervisor above (it exits 0 once the workers have)."""
    os.environ[WORKER_GROUP_ENV] = secrets.token_hex(8)  # this run's workers, whose metrics a scrape adds up
    _Workers(config, sockets=[config.bind_socket()]).run()


def settle_garbage_collector() -> None:
    """Move start-up objects out of the collector's sight and collect young objects less often.

    Every request allocates short-lived dicts and Decimals; with CPython's default gen-0
    threshold (700) the collector runs every few requests and re-walks everything that
    start-up left alive. Freezing those and raising the threshold keeps collections
    rare and short (the approach CPython documents for gc.freeze in forking servers).
    Process-wide, so only the server calls it, once the instance has started.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _raise_open_file_limit(config: Config) -> None:
    """Let the process hold `max_connections` client sockets plus the upstream pool and its own files.

    The soft limit is raised towards the hard one; if even that is too low, say so once, because
    running out of descriptors refuses clients at accept() instead of with a 503."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    needed = config.server.max_connections + config.upstream.pool_size + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        logging.getLogger("gateway").warning(
            "the open-file limit is %d, below the %d that server.max_connections=%d needs: lower "
            "server.max_connections or raise the limit (ulimit -n)", target, needed, config.server.max_connections)


def create_from_env() -> Any:
    """App factory for `--workers N` (each worker process builds its own app from the config)."""
    from gateway.app import create_app

    config = load_config(os.environ.get("GATEWAY_CONFIG"))
    configure_logging(config.logging.level)
    return create_app(config, after_start=settle_garbage_collector, worker_group=os.environ.get(WORKER_GROUP_ENV))


def serve(
    config_file: str | None, *, host: str | None, port: int | None, workers: int | None, demo: bool,
    demo_port: int = DEMO_EMULATOR_PORT,
) -> None:
    config = load_config(config_file)
    if demo:
        config = _demo_config(config, demo_port)
    host = host or config.server.host
    port = config.server.port if port is None else port
    _require_free_port(host, port, "the gateway", "--port PORT (make run/demo PORT=…) or server.port")
    if demo:
        _require_free_port("127.0.0.1", demo_port, "the demo's emulator", "--demo-port PORT (make demo DEMO_PORT=…)")
    configure_logging(config.logging.level)
    ensure_runtime(config, announce=lambda line: print(line, file=sys.stderr, flush=True))
    workers = workers or config.server.workers
    _raise_open_file_limit(config)
    if workers > 1 and not demo:
        if config_file:
            os.environ["GATEWAY_CONFIG"] = str(config_file)
        _serve_workers(_uvicorn_config("gateway.server:create_from_env", host, port, config.server,
                                       factory=True, workers=workers))
        return
    run_on_uvloop(_serve(config, host, port, demo, demo_port))


def run_on_uvloop(main: Coroutine[Any, Any, None]) -> None:
    """`asyncio.run` on uvloop. uvicorn's `loop="uvloop"` applies only when uvicorn makes the loop itself
    (`uvicorn.run`, the workers); `Server.serve()` inside `asyncio.run` would run on the stdlib loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main)


def serve_app(app: Any, host: str, port: int) -> None:
    """Run one built app on uvicorn until it is told to stop (the bench's variants use this too)."""
    run_on_uvloop(GracefulServer(_uvicorn_config(app, host, port)).serve())


def _require_free_port(host: str, port: int, what: str, fix: str) -> None:
    """Refuse in one line, before anything starts, when the port is taken (uvicorn would exit with a traceback)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "already in use" if exc.errno in (98, 48, 10048) else exc.strerror or str(exc)
            raise SystemExit(f"gateway: port {port} on {host} for {what} is {reason}: choose another with {fix}")


def _demo_config(config: Config, demo_port: int) -> Config:
    """The emulator as upstream, and a database of the demo's own (`data/demo.db`)."""
    upstream = config.upstream.model_copy(update={"base_url": f"http://127.0.0.1:{demo_port}/api/v1"})
    database = config.database.model_copy(update={"url": f"sqlite:///{demo_database(config)}"})
    return config.model_copy(update={"upstream": upstream, "database": database})


def demo_database(config: Config) -> Path:
    return Path(config.server.data_dir) / DEMO_DATABASE


async def _serve(config: Config, host: str, port: int, demo: bool, demo_port: int = DEMO_EMULATOR_PORT) -> None:
    from gateway.app import create_app, instance_of

    app = create_app(config, after_start=settle_garbage_collector)
    server = GracefulServer(_uvicorn_config(app, host, port, config.server))
    if not demo:
        await server.serve()
        return
    from gateway.demo import prepare_demo
    from openrouter_emulator.app import create_emulator_app

    emulator = uvicorn.Server(_uvicorn_config(create_emulator_app(), "127.0.0.1", demo_port))
    emulator.config.lifespan = "auto"
    emulator_task = asyncio.create_task(emulator.serve())
    while not emulator.started:
        await asyncio.sleep(0.05)
        if emulator_task.done():
            _retrieve(emulator_task)
            raise SystemExit(f"gateway: the demo's emulator could not start on port {demo_port}: choose another "
                             "with --demo-port PORT (make demo DEMO_PORT=…)")
    server_task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
        if server_task.done():
            _retrieve(server_task)
            emulator.should_exit = True
            await emulator_task
            raise SystemExit(f"gateway: the gateway could not start on {host}:{port}: choose another port with "
                             "--port PORT (make demo PORT=…)")
    await prepare_demo(instance_of(app), host, port, database=demo_database(config))
    await server_task
    emulator.should_exit = True
    await emulator_task


def _retrieve(task: "asyncio.Task[Any]") -> None:
    """Take a finished task's exception so asyncio does not print it as never retrieved."""
    if not task.cancelled():
        task.exception()
