"""Running the gateway under uvicorn (uvloop + httptools), alone or beside the emulator (--demo)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
from typing import Any

import uvicorn

from gateway.connections import ConnectionLimits, GuardedConfig
from gateway.core.config import Config, ServerConfig, load_config
from gateway.core.logs import configure_logging
from gateway.security.first_run import ensure_runtime

DEMO_EMULATOR_PORT = 8090
GRACEFUL_SHUTDOWN_S = 30


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
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        timeout_keep_alive=server.keep_alive_timeout_s,
        server_header=False,
        **extra,
    )


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
    return create_app(config)


def serve(
    config_file: str | None, *, host: str | None, port: int | None, workers: int | None, demo: bool,
    demo_port: int = DEMO_EMULATOR_PORT,
) -> None:
    config = load_config(config_file)
    if demo:
        config = _demo_config(config, demo_port)
    configure_logging(config.logging.level)
    ensure_runtime(config, announce=lambda line: print(line, file=sys.stderr, flush=True))
    host = host or config.server.host
    port = config.server.port if port is None else port
    workers = workers or config.server.workers
    _raise_open_file_limit(config)
    if workers > 1 and not demo:
        if config_file:
            os.environ["GATEWAY_CONFIG"] = str(config_file)
        from uvicorn.supervisors import Multiprocess

        uv_config = _uvicorn_config("gateway.server:create_from_env", host, port, config.server,
                                    factory=True, workers=workers)
        sockets = [uv_config.bind_socket()]
        if "target" in inspect.signature(Multiprocess).parameters:  # uvicorn before 0.36 takes the worker's target
            Multiprocess(uv_config, target=uvicorn.Server(uv_config).run, sockets=sockets).run()
        else:
            Multiprocess(uv_config, sockets=sockets).run()
        return
    asyncio.run(_serve(config, host, port, demo, demo_port))


def _demo_config(config: Config, demo_port: int) -> Config:
    upstream = config.upstream.model_copy(update={"base_url": f"http://127.0.0.1:{demo_port}/api/v1"})
    return config.model_copy(update={"upstream": upstream})


async def _serve(config: Config, host: str, port: int, demo: bool, demo_port: int = DEMO_EMULATOR_PORT) -> None:
    from gateway.app import create_app

    app = create_app(config)
    server = uvicorn.Server(_uvicorn_config(app, host, port, config.server))
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
            raise SystemExit(f"gateway: the emulator could not start on port {demo_port} (choose another with --demo-port)")
    server_task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
        if server_task.done():
            emulator.should_exit = True
            await emulator_task
            return
    await prepare_demo(app.api.state.gateway, host, port)
    await server_task
    emulator.should_exit = True
    await emulator_task
