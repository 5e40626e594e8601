"""`gateway keys …`: users' OpenRouter keys from the command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from gateway.config import Config


async def _with_services(config: Config, work: Any) -> Any:
    from gateway.store import Store
    from gateway.upstream import UpstreamClient, make_transport
    from gateway.vault import Vault

    store = await Store.open(config.database.url)
    upstream = UpstreamClient(
        make_transport(config.upstream.client, pool_size=4, connect_timeout_s=config.upstream.connect_timeout_s,
                       read_timeout_s=60),
        config.upstream.base_url,
        retries=1,
    )
    try:
        vault = Vault.from_sources(config.security.master_keys, config.security.master_key_file)
        return await work(store, vault, upstream)
    finally:
        await upstream.close()
        await store.close()


def run_keys_command(args: argparse.Namespace, config: Config) -> None:
    from gateway.cli import CliError, print_json

    if args.action == "set-byok":
        from gateway.openrouter_keys import connect_byok

        api_key = sys.stdin.readline().strip() if args.key_stdin else os.environ.get("OPENROUTER_API_KEY", "")
        if not api_key:
            raise CliError("no key given: set OPENROUTER_API_KEY or pass --key-stdin and type it")

        async def work(store: Any, vault: Any, upstream: Any) -> Any:
            described = await connect_byok(store, vault, upstream, args.user, api_key)
            await store.audit.append(actor="cli", action="key.byok.set", user_id=args.user,
                                     details={"label": described["label"]})
            return described

        print_json(asyncio.run(_with_services(config, work)))
        return
    raise CliError(f"unknown keys action {args.action}")
