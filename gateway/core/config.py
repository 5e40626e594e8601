"""Typed settings: one YAML file, `${VAR}` expansion and `GATEWAY_<SECTION>__<KEY>` overrides.

Everything is validated once at start-up; an unknown key or a wrong type is refused with
the key's dotted path, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.core.amounts import AmountError, parse_usd

ENV_PREFIX = "GATEWAY_"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)  # the proxy routes' request bodies
    max_api_body_bytes: int = Field(64 * 1024, ge=1024)  # the JSON API routes' (settings, admin) bodies
    max_header_bytes: int = Field(64 * 1024, ge=1024)  # request line + header block; over it → 431
    max_headers: int = Field(100, ge=8)  # header lines per request; over it → 431
    header_timeout_s: float = Field(10, gt=0)  # the whole header block must arrive within this
    body_timeout_s: float = Field(30, gt=0)  # no body byte for this long (or slower than 1 KiB/s after it) → 408
    keep_alive_timeout_s: float = Field(30, gt=0)  # an idle keep-alive connection is closed after this
    max_connections: int = Field(2048, ge=1)  # open connections per worker; beyond it → 503 and closed
    request_timeout_s: float = Field(600, gt=0)  # bounds a whole request, a stream's total time included
    shutdown_grace_s: int = Field(30, ge=0)  # SIGTERM: streams drain this long, then end with an SSE error
    cors_origins: list[str] = []
    data_dir: str = "data"


class DatabaseConfig(_Section):
    url: str = "sqlite:///data/gateway.db"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value


class RedisConfig(_Section):
    url: str | None = None
    # Redis unreachable: refuse proxied requests with a 503 (`closed`), or admit on each instance's own
    # counters seeded from the database until it answers (`local`: limits then hold per instance only)
    on_error: Literal["closed", "local"] = "closed"


class SecurityConfig(_Section):
    master_key_file: str = "data/master.key"
    master_keys: str | None = None  # GATEWAY_MASTER_KEYS: comma-separated Fernet keys
    admin_token: str | None = None  # GATEWAY_ADMIN_TOKEN
    admin_token_file: str = "data/admin_token.sha256"  # holds the token's SHA-256, never the token


class UpstreamConfig(_Section):
    base_url: str = "https://openrouter.ai/api/v1"
    management_key: str | None = None
    management_key_file: str | None = None
    app_referer: str | None = None
    app_title: str | None = None
    connect_timeout_s: float = Field(10, gt=0)
    read_timeout_s: float = Field(600, gt=0)
    stream_idle_timeout_s: float = Field(120, gt=0)  # the longest gap between two chunks of a stream
    retries: int = Field(3, ge=0, le=10)
    backoff_base_s: float = Field(1, ge=0)
    backoff_max_s: float = Field(30, ge=0)
    client: Literal["h1", "aiohttp", "httpx"] = "h1"  # h1: the gateway's own HTTP/1.1 client (the fastest)
    pool_size: int = Field(256, ge=1)


class ModelsConfig(_Section):
    cache_ttl_s: float = Field(3600, ge=0)


class _DecimalLoader(yaml.SafeLoader):
    """YAML's safe loader with decimals read as `Decimal`: money in the config never passes through float
    (pydantic turns them into floats where a field is a duration or a share)."""


def _decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        return Decimal(text)
    except ArithmeticError:  # .inf, .nan and the like: what YAML itself makes of them
        return loader.construct_yaml_float(node)


_DecimalLoader.add_constructor("tag:yaml.org,2002:float", _decimal)


def _usd(value: Any) -> Any:
    """Money in config follows the API's rules (`core.amounts`): a plain decimal from 0 to 10⁹."""
    if value is None:
        return None
    try:
        return parse_usd(value)
    except AmountError as exc:
        raise ValueError(str(exc)) from None


class GenerationLookupConfig(_Section):
    # all: every generation is looked up (GET /generation); missing: only those whose response carried no
    # usage.cost (cut, cancelled, errored), plus a sample of `audit_fraction` of the rest
    policy: Literal["all", "missing"] = "all"
    audit_fraction: float = Field(0.01, ge=0, le=1)
    first_delay_s: float = Field(0.5, ge=0)
    factor: float = Field(2.0, ge=1)
    max_delay_s: float = Field(30, gt=0)
    attempts: int = Field(12, ge=1)
    busy_cpu_share: float = Field(0.6, gt=0)
    busy_floor_per_s: float = Field(20, gt=0)
    busy_max_backlog: int = Field(2000, ge=0)  # with more look-ups pending than this they run at full speed, busy or not
    lease_s: float = Field(30, gt=0)


class AccountingConfig(_Section):
    generation_lookup: GenerationLookupConfig = GenerationLookupConfig()
    flush_interval_ms: int = Field(200, ge=0)
    low_balance_usd: Decimal = Decimal("10")
    default_estimate_usd: Decimal = Decimal("0.01")

    _amounts = field_validator("low_balance_usd", "default_estimate_usd", mode="before")(_usd)


class TierConfig(_Section):
    markup_pct: Decimal = Field(Decimal("0"), ge=0, le=10_000)
    daily_budget_usd: Decimal | None = None
    monthly_budget_usd: Decimal | None = None
    requests_per_minute: int | None = Field(None, ge=0)
    requests_per_hour: int | None = Field(None, ge=0)
    tokens_per_hour: int | None = Field(None, ge=0)
    max_concurrent: int | None = Field(None, ge=0)

    _budgets = field_validator("markup_pct", "daily_budget_usd", "monthly_budget_usd", mode="before")(_usd)


def _default_tiers() -> dict[str, TierConfig]:
    return {
        "trial": TierConfig(markup_pct=Decimal("15"), monthly_budget_usd=Decimal("10")),
        "starter": TierConfig(markup_pct=Decimal("10"), monthly_budget_usd=Decimal("50")),
        "professional": TierConfig(markup_pct=Decimal("5"), monthly_budget_usd=Decimal("250")),
        "enterprise": TierConfig(markup_pct=Decimal("0")),
    }


class JobsConfig(_Section):
    credit_sync_interval_s: float = Field(3600, ge=0)
    credit_sync_rate_per_s: float = Field(1, gt=0)
    usage_retention_days: int | None = Field(None, ge=1)
    change_feed_retention_s: float = Field(3600, ge=1)  # change feed rows older than this are pruned


class KeysConfig(_Section):
    rotation_grace_s: float = Field(60, ge=0)  # a rotated-out managed key stays valid this long (0: deleted at once)


AlertEvent = Literal["budget.threshold", "credits.low", "key.disabled", "emergency_stop.changed"]
ALERT_EVENTS: tuple[AlertEvent, ...] = ("budget.threshold", "credits.low", "key.disabled", "emergency_stop.changed")


class WebhookConfig(_Section):
    """One receiver: an http(s) URL, the events it wants (default all), the HMAC-SHA256 key it checks."""

    url: str
    events: list[AlertEvent] = Field(
        default_factory=lambda: list(ALERT_EVENTS), min_length=1)
    secret: str = Field(min_length=16)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"is not a valid URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
            raise ValueError("must be an http:// or https:// URL with a host, such as https://hooks.example.com/gateway")
        del port
        return value


class AlertsConfig(_Section):
    webhooks: list[WebhookConfig] = []
    budget_thresholds: list[Decimal] = Field(default_factory=lambda: [Decimal("0.8"), Decimal("1.0")])
    check_interval_s: float = Field(30, gt=0)
    max_attempts: int = Field(8, ge=1, le=50)
    backoff_base_s: float = Field(2, gt=0)
    backoff_max_s: float = Field(600, gt=0)
    timeout_s: float = Field(10, gt=0)

    @field_validator("budget_thresholds")
    @classmethod
    def _fractions(cls, value: list[Decimal]) -> list[Decimal]:
        if any(not (0 < f <= 10) for f in value):
            raise ValueError("each threshold is a fraction of the budget above 0 (0.8 = 80%), at most 10")
        return sorted(set(value))


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True


class Config(_Section):
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    redis: RedisConfig = RedisConfig()
    security: SecurityConfig = SecurityConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    models: ModelsConfig = ModelsConfig()
    accounting: AccountingConfig = AccountingConfig()
    tiers: dict[str, TierConfig] = Field(default_factory=_default_tiers)
    default_tier: str = "trial"
    jobs: JobsConfig = JobsConfig()
    keys: KeysConfig = KeysConfig()
    logging: LoggingConfig = LoggingConfig()
    alerts: AlertsConfig = AlertsConfig()

    def model_post_init(self, _context: Any) -> None:
        if self.default_tier not in self.tiers:
            raise ValueError(
                f"default_tier {self.default_tier!r} is not one of the tiers: {', '.join(sorted(self.tiers))}"
            )

    def tier(self, name: str) -> TierConfig:
        """The tier's settings; a tier removed from config falls back to the default tier."""
        return self.tiers.get(name) or self.tiers[self.default_tier]


def _expand(value: Any, where: str, environ: dict[str, str]) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string of the YAML tree."""
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k), environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]", environ) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set (write ${{{name}:-default}} to give a default)")

    return _VAR.sub(substitute, value)


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Collect `GATEWAY_SECTION__KEY[__SUBKEY]=value` into a nested dict (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    specials = {"GATEWAY_MASTER_KEYS": ("security", "master_keys"), "GATEWAY_ADMIN_TOKEN": ("security", "admin_token")}
    for name, raw in environ.items():
        if name in specials:
            path = list(specials[name])
        elif name.startswith(ENV_PREFIX) and "__" in name:
            path = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        else:
            continue
        if any(not part for part in path):
            raise ConfigError(f"{name}: empty section or key in the variable name")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: conflicts with another GATEWAY_ variable")
        try:
            value = yaml.load(raw, _DecimalLoader) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if path[-1] in {"master_keys", "admin_token", "management_key", "url", "base_url"}:
            value = raw  # secrets and URLs stay strings even if they look like YAML
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key (see config.example.yaml for the keys that exist)")
        else:
            lines.append(f"{path}: {item['msg']}")
    return "; ".join(lines)


def load_config(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read the YAML file (if any), expand variables, apply env overrides, validate."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("GATEWAY_CONFIG")
    raw: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist (run `gateway init` to write one)")
        try:
            loaded = yaml.load(file.read_text(), _DecimalLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
        raw = _expand(loaded, "", environ)
    overrides = _env_overrides(environ)
    if "tiers" in overrides and "tiers" not in raw:
        # GATEWAY_TIERS__TRIAL__X changes one key of the default tiers, it does not replace them all.
        raw["tiers"] = {name: tier.model_dump(mode="json") for name, tier in _default_tiers().items()}
    raw = _merge(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_describe(exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
