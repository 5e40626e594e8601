"""`gateway sync-credits [--user]`: refresh users' OpenRouter credits now, with a progress bar."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from gateway.accounts.credit_sync import CreditSync, Progress, SyncReport
from gateway.cli.common import open_store
from gateway.core.config import Config
from gateway.core.errors import NotFound
from gateway.security.vault import Vault
from gateway.upstream.client import UpstreamClient, make_transport


def progress_bar(stream: Any = None, width: int = 30) -> Progress:
    """A one-line progress bar on stderr, redrawn in place."""
    out = stream or sys.stderr

    def draw(done: int, total: int) -> None:
        filled = width * done // total if total else width
        out.write(f"\rsyncing credits [{'#' * filled}{'.' * (width - filled)}] {done}/{total} users")
        if done >= total:
            out.write("\n")
        out.flush()

    return draw


def run_sync_command(args: argparse.Namespace, config: Config) -> None:

    async def run() -> SyncReport:
        vault = Vault.from_sources(config.security.master_keys, config.security.master_key_file)
        store = await open_store(config)
        up = config.upstream
        upstream = UpstreamClient(
            make_transport(up.client, pool_size=4, connect_timeout_s=up.connect_timeout_s,
                           read_timeout_s=up.read_timeout_s),
            up.base_url, retries=up.retries, backoff_base_s=up.backoff_base_s, backoff_max_s=up.backoff_max_s,
        )
        try:
            if args.user is not None:
                if await store.users.get(args.user) is None:
                    raise NotFound(f"no user {args.user!r} (see `gateway users list`)")
                if await store.keys.get(args.user) is None:
                    raise NotFound(f"user {args.user!r} has no OpenRouter key to sync")
            sync = CreditSync(store, vault, upstream, rate_per_s=config.jobs.credit_sync_rate_per_s)
            return await sync.sync_all(user_id=args.user, progress=progress_bar())
        finally:
            await upstream.close()
            await store.close()

    report = asyncio.run(run())
    sys.stdout.write(orjson.dumps(report.public()).decode() + "\n")
    if report.failed:
        sys.stderr.write(f"gateway: {report.failed} user(s) could not be synced; their last good credits are kept.\n")
        sys.exit(1)
