"""`gateway keys …`: users' OpenRouter keys from the command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from gateway.core.config import Config


async def _with_services(config: Config, work: Any) -> Any:
    from gateway.cli.common import open_store
    from gateway.upstream.client import UpstreamClient, make_transport

    vault = open_vault(config)
    store = await open_store(config)
    upstream = UpstreamClient(
        make_transport(config.upstream.client, pool_size=4, connect_timeout_s=config.upstream.connect_timeout_s,
                       read_timeout_s=60),
        config.upstream.base_url,
        retries=1,
    )
    try:
        return await work(store, vault, upstream)
    finally:
        await upstream.close()
        await store.close()


def open_vault(config: Config) -> Any:
    """The vault, or an EnvironmentFailure naming the master key file and how to provide one."""
    from gateway.cli.common import EnvironmentFailure
    from gateway.security.vault import Vault, VaultError

    try:
        return Vault.from_sources(config.security.master_keys, config.security.master_key_file)
    except VaultError as exc:
        raise EnvironmentFailure(str(exc)) from None


def run_keys_command(args: argparse.Namespace, config: Config) -> None:
    from gateway.cli.common import CliError, print_json

    if args.action == "set-byok":
        from gateway.accounts.byok import connect_byok

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
    if args.action == "rotate-master":
        print_json(_rotate_master(args, config))
        return
    if args.action in MANAGED_ACTIONS:
        print_json(asyncio.run(_with_services(config, lambda *services: _managed(args, *services, config=config))))
        return
    raise CliError(f"unknown keys action {args.action}")


MANAGED_ACTIONS = ("provision", "rotate", "disable", "enable", "delete")


async def _managed(args: argparse.Namespace, store: Any, vault: Any, upstream: Any, *, config: Config) -> Any:
    """The admin API's managed-key operations; running gateways learn of them through the change feed."""
    from gateway.accounts.provisioning import MISSING, Provisioner
    from gateway.cli.common import CliError
    from gateway.security.secret_files import management_key
    from gateway.upstream.key_api import KeyApi

    key = management_key(config.upstream)
    if key is None and args.action != "delete":
        raise CliError("no OpenRouter management key is configured: put it in a file named by "
                       "upstream.management_key_file in the config, or set GATEWAY_UPSTREAM__MANAGEMENT_KEY "
                       "(create one at https://openrouter.ai/settings/management-keys)")
    if args.action == "provision" and await store.keys.get(args.user) is not None:
        raise CliError(f"user {args.user!r} already has an OpenRouter key: replace a managed one with "
                       f"`gateway keys rotate {args.user}`, or remove it with `gateway keys delete {args.user}` first")
    provisioner = Provisioner(store, vault, KeyApi(upstream, key), config)
    if args.action == "provision":
        limit = MISSING if args.limit_usd is None else args.limit_usd
        return await provisioner.provision(args.user, limit_usd=limit, actor="cli")
    if args.action == "rotate":
        return await provisioner.rotate(args.user, actor="cli")
    if args.action in ("disable", "enable"):
        return await provisioner.update(args.user, {"disabled": args.action == "disable"}, actor="cli")
    if await store.users.get(args.user) is None:
        from gateway.core.errors import NotFound

        raise NotFound(f"No user {args.user!r}.")
    if not await provisioner.remove(args.user, actor="cli"):
        raise CliError(f"user {args.user!r} has no OpenRouter key")
    return {"deleted": True, "user": args.user}


def _rotate_master(args: argparse.Namespace, config: Config) -> Any:
    from pathlib import Path

    from gateway.cli.common import CliError
    from gateway.security.master_rotation import (
        ENV_KEYS_REFUSAL,
        Progress,
        rotate_master,
    )
    from gateway.security.vault import VaultError

    if config.security.master_keys:
        raise CliError(ENV_KEYS_REFUSAL)
    if args.batch_size < 1:
        raise CliError("--batch-size must be 1 or more")
    key_file = Path(config.security.master_key_file)
    if not key_file.is_file():
        raise CliError(f"master key file {key_file} does not exist (security.master_key_file; `gateway init` writes one)")

    async def work() -> Any:
        from gateway.cli.common import open_store

        store = await open_store(config)
        try:
            return await rotate_master(store, key_file, batch_size=args.batch_size, progress=Progress())
        finally:
            await store.close()

    try:
        report = asyncio.run(work())
    except VaultError as exc:
        raise CliError(str(exc)) from None
    print("New master key added first in the key file; the old ones still decrypt. Remove them only after every "
          "instance has restarted.", file=sys.stderr)
    return report.__dict__
