"""The composition root: every service built with what it needs, in one visible order.

`open_gateway` opens the foundations (store, vault, upstream), then the services in the order their
dependencies need (auth → stop → catalogue → accounts → accounting → limits → the proxy), starts
their background jobs and registers their shutdown steps on one `Lifecycle`. `create_app` wraps it in
the ASGI app: the proxy routes dispatched raw, the JSON APIs by Starlette. Neither has a process-wide
side effect (GC tuning, logging, environment): those belong to `server.py` and the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette

from gateway.accounting.ledger import Ledger, key_lookup
from gateway.accounting.pacing import CpuMeter, Pacer
from gateway.accounting.pricing import Pricing
from gateway.accounting.settlement import Settler
from gateway.accounts.credit_sync import CreditSync
from gateway.accounts.directory import Directory, report_broken_overrides
from gateway.accounts.provisioning import Provisioner
from gateway.accounts.settings import DefaultsPreparer, SettingsBook
from gateway.alerts.delivery import Courier
from gateway.alerts.scanner import AlertScanner
from gateway.api import account, admin, admin_keys, alerts, dashboard, limits, models, openapi, operator, ops, usage
from gateway.api.dispatch import EXCEPTION_HANDLERS, GatewayApp
from gateway.auth.admin import AdminAuth
from gateway.auth.feed_pruning import FeedPruning
from gateway.auth.tokens import Authenticator
from gateway.catalog import Catalog
from gateway.core.clock import Clock, system_clock
from gateway.core.config import Config
from gateway.core.lifecycle import Lifecycle
from gateway.core.metrics import Metrics
from gateway.core.metrics_share import SnapshotPublisher, WorkerFiles, metrics_directory
from gateway.instance import Gateway
from gateway.limits.limiter import Limiter, local_fallback, open_counters
from gateway.proxy.endpoint import ProxyEndpoint
from gateway.proxy.stop import EmergencyStop
from gateway.proxy.types import (
    Admission,
    DiscardRecorder,
    OpenAdmission,
    Recorder,
    StreamInFlight,
)
from gateway.security.secret_files import admin_token_hash, management_key
from gateway.security.vault import Vault
from gateway.store import Store
from gateway.upstream.client import Transport, UpstreamClient, make_transport
from gateway.upstream.key_api import KeyApi

PROXY_ENDPOINTS = ("/chat/completions", "/completions", "/embeddings", "/responses")
API_ROUTES = [*ops.routes, *models.routes, *account.routes, *usage.routes, *limits.routes, *admin.routes,
              *admin_keys.routes, *operator.routes, *alerts.routes,
              *dashboard.routes, *openapi.routes]


async def open_gateway(
    config: Config,
    lifecycle: Lifecycle,
    *,
    transport: Transport | None = None,
    clock: Clock = system_clock,
    limits: bool = True,
    accounting: bool = True,
    worker_group: str | None = None,
) -> Gateway:
    """Open every resource and service of one instance. `limits` / `accounting` False leave that service
    off the proxy path (the bench prices a service so); its API still answers. `worker_group`: this is
    one worker of `--workers N` (its metrics are shared with the group's other workers)."""
    cfg = config
    # -- foundations: closed last (steps run in reverse) --
    vault = Vault.from_sources(cfg.security.master_keys, cfg.security.master_key_file)
    admin_auth = AdminAuth(admin_token_hash(cfg.security))
    store = await Store.open(cfg.database.url, clock)
    lifecycle.on_shutdown(store.close)
    up = cfg.upstream
    upstream = UpstreamClient(
        transport or make_transport(up.client, pool_size=up.pool_size, connect_timeout_s=up.connect_timeout_s,
                                    read_timeout_s=up.read_timeout_s),
        up.base_url, retries=up.retries, backoff_base_s=up.backoff_base_s, backoff_max_s=up.backoff_max_s,
    )
    lifecycle.on_shutdown(upstream.close)
    if worker_group is None:
        metrics = Metrics()
    else:  # each scrape adds up every worker: this one's snapshot published every second and at shutdown
        files = WorkerFiles(metrics_directory(cfg.server.data_dir), worker_group, clock=clock)
        metrics = Metrics(peers=files)
        publisher = SnapshotPublisher(metrics.snapshot, files)
        lifecycle.spawn(publisher.run())
        lifecycle.on_shutdown(publisher.publish)  # runs after the ledger's final flush and the streams' end

    # -- who is calling, and whether anything may be forwarded --
    auth = Authenticator(store, vault, clock=clock)
    await auth.start_feed()
    lifecycle.on_shutdown(auth.flush_last_used)
    stop = EmergencyStop(store.state)
    await stop.load()
    auth.on_state_change(stop.on_state_change)
    catalog = Catalog(upstream, ttl_s=cfg.models.cache_ttl_s, clock=clock, metrics=metrics)

    # -- accounts --
    directory = Directory(store, cfg, forget_user=auth.forget_user, forget_token=auth.forget_token, clock=clock)
    await report_broken_overrides(store)  # limits an older version stored out of range: logged, read as unset
    settings = SettingsBook(store)
    await settings.load_all()
    auth.on_user_change(settings.on_user_change)
    provisioner = Provisioner(store, vault, KeyApi(upstream, management_key(up)), cfg, clock=clock,
                              forget_user=auth.forget_user)
    credit_sync = CreditSync(store, vault, upstream, rate_per_s=cfg.jobs.credit_sync_rate_per_s, clock=clock)
    lifecycle.on_shutdown(credit_sync.stop)

    # -- accounting: one charge (pricing) for the ledger and the limits --
    lookup = cfg.accounting.generation_lookup
    # saturated means busy *with traffic* (records coming in), so the look-ups' own CPU never throttles them
    meter = CpuMeter(activity=lambda: ledger.records_seen)
    settler = Settler(upstream, lookup, key_for=key_lookup(store, vault),
                      is_free_generation=catalog.is_free_generation, clock=clock,
                      pacer=Pacer(meter, busy_share=lookup.busy_cpu_share, floor_per_s=lookup.busy_floor_per_s,
                                  max_backlog=lookup.busy_max_backlog),
                      metrics=metrics)
    ledger = Ledger(store, cfg, settler=settler, clock=clock, metrics=metrics)
    lifecycle.on_shutdown(ledger.close)
    pricing = Pricing(cfg, catalog.is_free_generation)

    # -- limits: spend from the database, then from each charge and the ledger's corrections --
    counters = await open_counters(cfg, store.usage)
    lifecycle.on_shutdown(counters.close)
    # redis.on_error: local — this process's own counters, seeded from the database, while Redis is unreachable
    fallback = local_fallback(cfg, counters, store.usage, clock=clock, on_admitted=metrics.observe_limits_fallback)
    if fallback is not None:
        lifecycle.on_shutdown(fallback.close)
        metrics.gauge("gateway_limits_fallback", lambda: float(fallback.active))
    limiter = Limiter(cfg, counters, catalog, clock=clock, fallback=fallback)
    await limiter.load_spend(store.usage)
    ledger.on_total_changed(limiter.on_total_changed)

    # -- background jobs --
    lifecycle.spawn(auth.run_feed())
    lifecycle.spawn(auth.run_last_used())
    lifecycle.spawn(FeedPruning(store, retention_s=cfg.jobs.change_feed_retention_s, clock=clock).run())
    lifecycle.spawn(provisioner.run_recovery())
    lifecycle.spawn(provisioner.run_retirement())
    if cfg.jobs.credit_sync_interval_s > 0:
        lifecycle.spawn(credit_sync.run_periodically(cfg.jobs.credit_sync_interval_s))
    if accounting:
        await settler.resume(store)
        lifecycle.spawn(ledger.run_writer())
        lifecycle.spawn(settler.run())
        lifecycle.spawn(settler.run_leases(store))
        lifecycle.spawn(meter.run())
        if cfg.jobs.usage_retention_days:
            lifecycle.spawn(ledger.run_retention(cfg.jobs.usage_retention_days))
    # -- alerts: checked from the store, sent from its outbox (only with webhooks configured) --
    courier = Courier(store.alerts, cfg.alerts, clock=clock)
    lifecycle.on_shutdown(courier.close)
    scanner = AlertScanner(store, cfg, clock=clock, on_enqueued=courier.wake)
    if cfg.alerts.webhooks:
        lifecycle.spawn(scanner.run(cfg.alerts.check_interval_s))
        lifecycle.spawn(courier.run())
    catalog.warm()  # fetch the model list in the background so prices are known early

    # -- the proxy, built once --
    streams: dict[str, StreamInFlight] = {}
    metrics.gauge("gateway_streams_in_flight", lambda: len(streams))
    metrics.gauge("gateway_settlements_pending", lambda: settler.pending)
    metrics.gauge("gateway_usage_queue_depth", lambda: ledger.backlog)
    admission: Admission = limiter if limits else OpenAdmission()
    recorder: Recorder = ledger if accounting else DiscardRecorder()
    attribution = {"HTTP-Referer": up.app_referer or "", "X-OpenRouter-Title": up.app_title or ""}
    proxies: dict[str, ProxyEndpoint] = {}
    for endpoint in PROXY_ENDPOINTS:
        proxy = ProxyEndpoint(
            endpoint, auth=auth, upstream=upstream, stop=stop, max_body_bytes=cfg.server.max_body_bytes,
            attribution=attribution, pricing=pricing, admission=admission, recorder=recorder,
            preparer=DefaultsPreparer(settings), streams=streams, clock=clock,
            request_timeout_s=cfg.server.request_timeout_s, stream_idle_timeout_s=up.stream_idle_timeout_s,
            metrics=metrics,
        )
        proxies["/v1" + endpoint] = proxies["/api/v1" + endpoint] = proxy
    lifecycle.on_shutdown(lambda: streams_ended(streams))  # registered last: runs before the ledger's flush

    return Gateway(
        config=cfg, clock=clock, lifecycle=lifecycle, metrics=metrics, store=store, vault=vault, admin=admin_auth,
        upstream=upstream, auth=auth, stop=stop, catalog=catalog, directory=directory, settings=settings,
        provisioner=provisioner, credit_sync=credit_sync, ledger=ledger, limiter=limiter, alerts=scanner, streams=streams,
        proxies=proxies,
    )


async def streams_ended(streams: dict[str, StreamInFlight], within_s: float = 2.0) -> None:
    """Shutdown: the streams the server's grace end cancelled are still writing their closing error event and
    handing their record to the ledger; wait (briefly) for them, so the final flush has every record."""
    for _ in range(int(within_s * 100)):  # the streams are a plain dict the proxy owns: look every 10 ms
        if not streams:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)  # one more turn for a cancelled non-streamed request to record itself


def create_app(
    config: Config,
    *,
    transport: Transport | None = None,
    clock: Clock = system_clock,
    limits: bool = True,
    accounting: bool = True,
    after_start: Callable[[], None] | None = None,
    worker_group: str | None = None,
) -> GatewayApp:
    """The ASGI app; the instance opens when the server's lifespan starts (then `after_start` runs, the
    server's hook for process-wide tuning) and closes when it ends."""

    @contextlib.asynccontextmanager
    async def lifespan(api: Starlette) -> AsyncIterator[None]:
        lifecycle = Lifecycle()
        try:
            gateway = await open_gateway(config, lifecycle, transport=transport, clock=clock, limits=limits,
                                         accounting=accounting, worker_group=worker_group)
        except BaseException:
            await lifecycle.close()
            raise
        api.state.gateway = gateway
        app.serve(gateway.proxies, gateway.metrics)
        if after_start is not None:
            after_start()
        try:
            yield
        finally:
            await lifecycle.close()

    api = Starlette(routes=API_ROUTES, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app = GatewayApp(api, access_log_enabled=config.logging.access_log, cors_origins=config.server.cors_origins)
    return app


def instance_of(app: Any) -> Gateway:
    """The started instance behind an app from `create_app` (the demo set-up needs its services)."""
    gateway: Gateway = app.api.state.gateway
    return gateway
