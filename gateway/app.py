"""Assembles the gateway: resources opened in the lifespan, the hot path dispatched raw.

`Gateway` holds everything a running instance needs (no module-level state). The ASGI
entry point sends the proxy routes straight to their raw endpoints and everything else
to Starlette, which serves the JSON APIs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import Any, Awaitable, Callable

import orjson
from starlette.applications import Starlette

from gateway.accounts.directory import Directory
from gateway.api.dispatch import EXCEPTION_HANDLERS, GatewayApp
from gateway.auth.admin import AdminAuth
from gateway.auth.tokens import Authenticator
from gateway.catalog import Catalog
from gateway.core.clock import Clock, system_clock
from gateway.core.config import Config
from gateway.core.metrics import Metrics
from gateway.proxy.endpoint import ProxyEndpoint
from gateway.proxy.stop import EmergencyStop
from gateway.proxy.types import (
    Admission,
    AsSent,
    BodyPreparer,
    DiscardRecorder,
    OpenAdmission,
    Recorder,
    StreamInFlight,
)
from gateway.security.secret_files import admin_token_hash, management_key
from gateway.security.vault import Vault
from gateway.store import Store
from gateway.upstream.client import Transport, UpstreamClient, make_transport

log = logging.getLogger("gateway")

PROXY_ENDPOINTS = ("/chat/completions", "/completions", "/embeddings")
EMERGENCY_STOP = "emergency_stop"


class Gateway:
    """One running instance: config, store, caches, upstream client and background jobs."""

    def __init__(self, config: Config, *, transport: Transport | None = None, clock: Clock = system_clock) -> None:
        self.config = config
        self.clock = clock
        self._transport = transport
        self.stop = EmergencyStop()
        self.streams: dict[str, StreamInFlight] = {}
        self.proxies: dict[str, ProxyEndpoint] = {}
        self.admission: Admission = OpenAdmission()
        self.recorder: Recorder = DiscardRecorder()
        self.preparer: BodyPreparer = AsSent()
        self._tasks: list[asyncio.Task[Any]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self.store: Store
        self.vault: Vault
        self.auth: Authenticator
        self.admin: AdminAuth
        self.upstream: UpstreamClient
        self.directory: Directory
        self.management_key: str | None = None
        self.catalog: Catalog
        self.metrics = Metrics()
        self.metrics.gauge("gateway_streams_in_flight", lambda: len(self.streams))

    async def start(self) -> None:
        cfg = self.config
        self.vault = Vault.from_sources(cfg.security.master_keys, cfg.security.master_key_file)
        self.admin = AdminAuth(admin_token_hash(cfg.security))
        self.management_key = management_key(cfg.upstream)
        self.store = await Store.open(cfg.database.url, self.clock)
        transport = self._transport or make_transport(
            cfg.upstream.client,
            pool_size=cfg.upstream.pool_size,
            connect_timeout_s=cfg.upstream.connect_timeout_s,
            read_timeout_s=cfg.upstream.read_timeout_s,
        )
        self.upstream = UpstreamClient(
            transport,
            cfg.upstream.base_url,
            retries=cfg.upstream.retries,
            backoff_base_s=cfg.upstream.backoff_base_s,
            backoff_max_s=cfg.upstream.backoff_max_s,
        )
        self.auth = Authenticator(self.store, self.vault, clock=self.clock)
        await self.auth.start_feed()
        self.directory = Directory(
            self.store, cfg, forget_user=self.auth.forget_user, forget_token=self.auth.forget_token, clock=self.clock
        )
        self.catalog = Catalog(self.upstream, ttl_s=cfg.models.cache_ttl_s, clock=self.clock)
        await self.load_emergency_stop()
        self.build_proxies()
        self.spawn(self._poll_changes())
        self.spawn(self._flush_last_used())

    def build_proxies(self) -> None:
        attribution = {"HTTP-Referer": self.config.upstream.app_referer or "",
                       "X-OpenRouter-Title": self.config.upstream.app_title or ""}
        for endpoint in PROXY_ENDPOINTS:
            proxy = ProxyEndpoint(
                endpoint,
                auth=self.auth,
                upstream=self.upstream,
                stop=self.stop,
                max_body_bytes=self.config.server.max_body_bytes,
                attribution=attribution,
                admission=self.admission,
                recorder=self.recorder,
                preparer=self.preparer,
                streams=self.streams,
                clock=self.clock,
            )
            self.proxies["/v1" + endpoint] = proxy
            self.proxies["/api/v1" + endpoint] = proxy

    def spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.append(task)
        return task

    def on_shutdown(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run at shutdown, after streams drained, before the store closes (flushes go here)."""
        self._on_stop.append(callback)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for callback in reversed(self._on_stop):
            try:
                await callback()
            except Exception:
                log.exception("shutdown step failed")
        with contextlib.suppress(Exception):
            await self.store.tokens.touch(self.auth.take_last_used())
        await self.upstream.close()
        await self.store.close()

    async def load_emergency_stop(self) -> None:
        raw = await self.store.state.get(EMERGENCY_STOP)
        value = orjson.loads(raw) if raw else {}
        self.stop.enabled = bool(value.get("enabled"))
        self.stop.reason = value.get("reason")

    async def _poll_changes(self) -> None:
        while True:
            await asyncio.sleep(self.auth.poll_interval_s)
            try:
                before = self.auth._last_seq
                await self.auth.poll_changes()
                if self.auth._last_seq != before:
                    await self.load_emergency_stop()
            except Exception:
                log.exception("change feed poll failed; retrying")

    async def _flush_last_used(self) -> None:
        while True:
            await asyncio.sleep(5)
            try:
                await self.store.tokens.touch(self.auth.take_last_used())
            except Exception:
                log.exception("recording token last-used times failed")


def settle_garbage_collector() -> None:
    """Move start-up objects out of the collector's sight and collect young objects less often.

    Every request allocates short-lived dicts and Decimals; with CPython's default gen-0
    threshold (700) the collector runs every few requests and re-walks everything that
    start-up left alive. Freezing those and raising the threshold keeps collections
    rare and short (the approach CPython documents for gc.freeze in forking servers).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def create_app(
    config: Config,
    *,
    transport: Transport | None = None,
    clock: Clock = system_clock,
    extensions: list[Callable[[Gateway], Awaitable[None]]] | None = None,
) -> GatewayApp:
    """Build the ASGI app; resources open when the server's lifespan starts."""
    from gateway.api import account, admin, admin_keys, limits, models, ops, usage

    gateway = Gateway(config, transport=transport, clock=clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        await gateway.start()
        from gateway.services import install_services

        await install_services(gateway)
        for extension in extensions or []:
            await extension(gateway)
        gateway.build_proxies()
        settle_garbage_collector()
        try:
            yield
        finally:
            await gateway.shutdown()

    api = Starlette(
        routes=[
            *ops.routes,
            *models.routes,
            *account.routes,
            *usage.routes,
            *limits.routes,
            *admin.routes,
            *admin_keys.routes,
        ],
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    api.state.gateway = gateway
    app = GatewayApp(api, access_log_enabled=config.logging.access_log, cors_origins=config.server.cors_origins)
    app.serve(gateway.proxies, gateway.metrics)
    return app


