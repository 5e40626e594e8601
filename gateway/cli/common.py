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


class CliError(Exception):
    """Bad input or a refused operation: one line on stderr, exit 2."""


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
    from gateway.store import Store

    store = await Store.open(config.database.url)
    try:
        return await work(Directory(store, config, actor="cli"))
    finally:
        await store.close()
