"""What every `gateway` command shares: its error, the config it reads, JSON output.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson

from gateway.core.config import Config, load_config

DEFAULT_CONFIG = "gateway.yaml"
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 1


class CliError(Exception):
    """Bad input or a refused operation: one line on stderr, exit 2."""


class EnvironmentFailure(Exception):
    """The environment failed (database, upstream, master key): one line on stderr, exit 1."""


def shown_url(url: str) -> str:
    """A URL safe to print: any password replaced by `***`."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def database_failure(config: Config, exc: BaseException) -> EnvironmentFailure:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return EnvironmentFailure(
        f"the database {shown_url(config.database.url)} could not be opened ({reason}); fix database.url in "
        "the config or GATEWAY_DATABASE__URL"
    )


async def open_store(config: Config) -> Any:
    """The configured store, or an EnvironmentFailure naming the database URL and the setting."""
    from gateway.store import Store

    try:
        return await Store.open(config.database.url)
    except (OSError, ValueError, ImportError) as exc:
        raise database_failure(config, exc) from None
    except Exception as exc:  # a driver's own error (sqlite3, asyncpg): still the database
        if type(exc).__module__.split(".")[0] in ("sqlite3", "asyncpg", "aiosqlite"):
            raise database_failure(config, exc) from None
        raise


def add_config_option(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """`--config PATH`, accepted before the subcommand and after it (the later one wins)."""
    parser.add_argument("--config", metavar="PATH", default=None if top else argparse.SUPPRESS,
                        help="the YAML config (default: $GATEWAY_CONFIG, else ./gateway.yaml if present)")


def config_path(args: argparse.Namespace) -> str | None:
    path = getattr(args, "config", None) or os.environ.get("GATEWAY_CONFIG")
    if path:
        return path
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None


def load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args))


def print_json(value: Any) -> None:
    from gateway.core.money import dumps

    sys.stdout.write(orjson.dumps(orjson.loads(dumps(value)), option=orjson.OPT_INDENT_2).decode() + "\n")


async def with_directory(config: Config, work: Callable[[Any], Awaitable[Any]]) -> Any:
    from gateway.accounts.directory import Directory

    store = await open_store(config)
    try:
        return await work(Directory(store, config, actor="cli"))
    finally:
        await store.close()
