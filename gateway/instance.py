"""The running instance: one typed field per service, as the composition root (`app.py`) built them.

Handlers reach the services through it (`api.common.gateway_of`); no service is handed the whole instance.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.accounting.ledger import Ledger
from gateway.accounts.credit_sync import CreditSync
from gateway.accounts.directory import Directory
from gateway.accounts.provisioning import Provisioner
from gateway.accounts.settings import SettingsBook
from gateway.alerts.scanner import AlertScanner
from gateway.auth.admin import AdminAuth
from gateway.auth.tokens import Authenticator
from gateway.catalog import Catalog
from gateway.core.clock import Clock
from gateway.core.config import Config
from gateway.core.lifecycle import Lifecycle
from gateway.core.metrics import Metrics
from gateway.limits.limiter import Limiter
from gateway.proxy.endpoint import ProxyEndpoint
from gateway.proxy.stop import EmergencyStop
from gateway.proxy.types import StreamInFlight
from gateway.security.vault import Vault
from gateway.store import Store
from gateway.upstream.client import UpstreamClient


@dataclass(slots=True, eq=False)
class Gateway:
    config: Config
    clock: Clock
    lifecycle: Lifecycle
    metrics: Metrics
    store: Store
    vault: Vault
    admin: AdminAuth
    upstream: UpstreamClient
    auth: Authenticator
    stop: EmergencyStop
    catalog: Catalog
    directory: Directory
    settings: SettingsBook
    provisioner: Provisioner
    credit_sync: CreditSync
    ledger: Ledger
    limiter: Limiter
    alerts: AlertScanner  # when this instance last checked for alerts (`GET /admin/v1/alerts`)
    streams: dict[str, StreamInFlight]  # request id → stream in flight (admin `GET /streams`)
    proxies: dict[str, ProxyEndpoint]  # path → endpoint, under /v1 and /api/v1
