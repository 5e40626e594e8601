"""Configuration: YAML + `${VAR}` expansion + `GATEWAY_<SECTION>__<KEY>` overrides, validated at start."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from gateway.core.config import Config, ConfigError, TierConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def model_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every dotted key path of a settings model (dict-of-model fields contribute `name.*.field`)."""
    paths: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.add(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= model_paths(annotation, path + ".")
        elif getattr(annotation, "__origin__", None) is dict:
            value_type = annotation.__args__[1]  # type: ignore[union-attr]
            if isinstance(value_type, type) and issubclass(value_type, BaseModel):
                paths |= model_paths(value_type, path + ".*.")
    return paths


def yaml_paths(tree: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if key == "tiers" and not prefix:
            for tier in value.values():
                paths |= {f"tiers.*.{name}" for name in tier}
        elif isinstance(value, dict):
            paths |= yaml_paths(value, path + ".")
    return paths


# -- config.example.yaml can't drift ------------------------------------------------


def test_example_names_every_config_key() -> None:
    documented = yaml_paths(yaml.safe_load(EXAMPLE.read_text()))
    missing = model_paths(Config) - documented
    assert not missing, f"add these keys, with their defaults and a comment, to config.example.yaml: {sorted(missing)}"


def test_every_example_tier_lists_every_tier_key() -> None:
    tiers = yaml.safe_load(EXAMPLE.read_text())["tiers"]
    for name, tier in tiers.items():
        assert set(tier) == set(TierConfig.model_fields), f"tiers.{name} in config.example.yaml"


def test_example_loads_cleanly_to_exactly_the_defaults() -> None:
    loaded = load_config(EXAMPLE, environ={})
    assert loaded == Config(), "a default changed: update config.example.yaml to match gateway/config.py"


def test_example_defaults_match_the_spec_tiers() -> None:
    tiers = load_config(EXAMPLE, environ={}).tiers
    assert {name: (t.markup_pct, t.monthly_budget_usd) for name, t in tiers.items()} == {
        "trial": (Decimal("15"), Decimal("10")),
        "starter": (Decimal("10"), Decimal("50")),
        "professional": (Decimal("5"), Decimal("250")),
        "enterprise": (Decimal("0"), None),
    }


# -- loading ----------------------------------------------------------------------


def test_no_file_and_no_env_gives_working_defaults() -> None:
    config = load_config(None, environ={})
    assert config.database.url == "sqlite:///data/gateway.db"
    assert config.upstream.base_url == "https://openrouter.ai/api/v1"
    assert config.models.cache_ttl_s == 3600 and config.default_tier == "trial"


def test_gateway_config_env_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {port: 9001}\n")
    assert load_config(None, environ={"GATEWAY_CONFIG": str(path)}).server.port == 9001


def test_variables_are_expanded_with_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "server:\n  port: ${PORT}\n  host: ${HOST:-0.0.0.0}\n"
        "database:\n  url: sqlite:///${DATA:-/var/lib/gw}/gateway.db\n",
    )
    config = load_config(path, environ={"PORT": "9100"})
    assert (config.server.port, config.server.host) == (9100, "0.0.0.0")
    assert config.database.url == "sqlite:////var/lib/gw/gateway.db"
    assert load_config(path, environ={"PORT": "9100", "HOST": "::1"}).server.host == "::1"


def test_unset_variable_without_default_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream:\n  app_title: ${APP_TITLE}\n")
    with pytest.raises(ConfigError, match=r"upstream\.app_title: environment variable APP_TITLE is not set"):
        load_config(path, environ={})


def test_env_overrides_win_over_the_file_and_nest(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {port: 9001, host: 10.0.0.1}\n")
    config = load_config(
        path,
        environ={
            "GATEWAY_SERVER__PORT": "9002",
            "GATEWAY_ACCOUNTING__GENERATION_LOOKUP__ATTEMPTS": "20",
            "GATEWAY_LOGGING__ACCESS_LOG": "false",
            "GATEWAY_SERVER__CORS_ORIGINS": '["https://a.example"]',
            "GATEWAY_ACCOUNTING__LOW_BALANCE_USD": "2.50",
        },
    )
    assert (config.server.port, config.server.host) == (9002, "10.0.0.1")
    assert config.accounting.generation_lookup.attempts == 20
    assert config.logging.access_log is False
    assert config.server.cors_origins == ["https://a.example"]
    assert config.accounting.low_balance_usd == Decimal("2.50")


def test_secret_and_url_overrides_stay_strings() -> None:
    config = load_config(
        None,
        environ={"GATEWAY_ADMIN_TOKEN": "12345", "GATEWAY_UPSTREAM__MANAGEMENT_KEY": "true",
                 "GATEWAY_MASTER_KEYS": "a,b", "GATEWAY_REDIS__URL": "redis://127.0.0.1:6379/0"},
    )
    assert config.security.admin_token == "12345"
    assert config.upstream.management_key == "true"
    assert config.security.master_keys == "a,b"
    assert config.redis.url == "redis://127.0.0.1:6379/0"


def test_env_override_of_one_tier_key_keeps_the_other_tiers() -> None:
    # Regression: GATEWAY_TIERS__TRIAL__X replaced the whole tiers map (trial's 15% markup became 0%).
    config = load_config(None, environ={"GATEWAY_TIERS__TRIAL__DAILY_BUDGET_USD": "0.3"})
    assert set(config.tiers) == {"trial", "starter", "professional", "enterprise"}
    assert config.tiers["trial"].markup_pct == Decimal("15")
    assert config.tiers["trial"].daily_budget_usd == Decimal("0.3")


def test_money_in_yaml_is_exact_decimal(tmp_path: Path) -> None:
    path = write(tmp_path, "tiers:\n  gold:\n    markup_pct: 0.1\n    daily_budget_usd: 1.1\ndefault_tier: gold\n")
    gold = load_config(path, environ={}).tiers["gold"]
    assert gold.markup_pct == Decimal("0.1") and gold.daily_budget_usd == Decimal("1.1")


def test_tier_falls_back_to_default_tier_when_removed() -> None:
    config = Config()
    assert config.tier("gone") == config.tiers["trial"]


# -- refused at start-up, naming the key -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server:\n  prot: 8080\n", r"server\.prot: unknown key"),
        ("sever:\n  port: 8080\n", r"sever: unknown key"),
        ("tiers:\n  trial:\n    markup: 5\n", r"tiers\.trial\.markup: unknown key"),
        ("server:\n  port: eighty\n", r"server\.port: .*integer"),
        ("server:\n  port: 70000\n", r"server\.port: .*65535"),
        ("upstream:\n  retries: -1\n", r"upstream\.retries"),
        ("upstream:\n  client: curl\n", r"upstream\.client"),
        ("redis:\n  on_error: open\n", r"redis\.on_error: .*'closed' or 'local'"),
        ("upstream:\n  stream_idle_timeout_s: 0\n", r"upstream\.stream_idle_timeout_s: .*greater than 0"),
        ("upstream:\n  stream_idle_timeout_s: soon\n", r"upstream\.stream_idle_timeout_s: .*number"),
        ("jobs:\n  change_feed_retention_s: 0\n", r"jobs\.change_feed_retention_s: .*greater than or equal to 1"),
        ("server:\n  shutdown_grace_s: -1\n", r"server\.shutdown_grace_s: .*greater than or equal to 0"),
        ("server:\n  request_timeout_s: 0\n", r"server\.request_timeout_s: .*greater than 0"),
        ("accounting:\n  low_balance_usd: lots\n", r"accounting\.low_balance_usd"),
        ("accounting:\n  generation_lookup:\n    policy: some\n",
         r"accounting\.generation_lookup\.policy: .*'all' or 'missing'"),
        ("accounting:\n  generation_lookup:\n    audit_fraction: 1.5\n",
         r"accounting\.generation_lookup\.audit_fraction: .*less than or equal to 1"),
        ("accounting:\n  generation_lookup:\n    busy_max_backlog: -1\n",
         r"accounting\.generation_lookup\.busy_max_backlog: .*greater than or equal to 0"),
        ("upstream:\n  client: h2\n", r"upstream\.client: .*'h1', 'aiohttp' or 'httpx'"),
        ("logging:\n  level: loud\n", r"logging\.level"),
        ("database:\n  url: mysql://x\n", r"database\.url: .*sqlite:///"),
        ("server: [1, 2]\n", r"server"),
        ("default_tier: platinum\n", r"default_tier 'platinum' is not one of the tiers"),
        ("- just\n- a list\n", r"top level must be a mapping"),
        ("server: {port: [\n", r"not valid YAML"),
    ],
)
def test_bad_file_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), environ={})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"GATEWAY_SERVER__PROT": "1"}, r"server\.prot: unknown key"),
        ({"GATEWAY_NOPE__X": "1"}, r"nope: unknown key"),
        ({"GATEWAY_SERVER__PORT": "abc"}, r"server\.port"),
        ({"GATEWAY_SERVER__": "1"}, r"GATEWAY_SERVER__: empty section or key"),
    ],
)
def test_bad_env_override_is_refused_naming_the_key(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, environ=environ)


def test_unrelated_gateway_variables_are_ignored() -> None:
    config = load_config(None, environ={"GATEWAY_TEST_POSTGRES_URL": "postgresql://x", "GATEWAY_CONFIG": ""})
    assert config == Config()


def test_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gateway init"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), environ={}) == Config()
