"""The `gateway` command.

Bad input prints one line on stderr and exits 2, with nothing written: every command
validates before it touches the database (the services it calls do the same checks as
the admin API). A failure of the environment (database, upstream, master key) prints one
line naming the file or URL and the setting that fixes it, and exits 1. Never a traceback.
`--config PATH` works before the subcommand or after it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

from gateway.cli.common import (
    DEFAULT_CONFIG,
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    CliError,
    EnvironmentFailure,
    add_config_option,
    config_path,
    database_failure,
    load,
    print_json,
    with_directory,
)
from gateway.core.config import ConfigError
from gateway.core.errors import GatewayError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"gateway: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


# -- commands -------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    from gateway.security.first_run import initialise

    path = Path(config_path(args) or DEFAULT_CONFIG)
    initialise(path, announce=print)


def cmd_serve(args: argparse.Namespace) -> None:
    from gateway.server import serve

    serve(config_path(args), host=args.host, port=args.port, workers=args.workers, demo=args.demo,
          demo_port=args.demo_port)


def cmd_emulator(args: argparse.Namespace) -> None:
    from openrouter_emulator.app import run_emulator

    run_emulator(host=args.host, port=args.port)


def cmd_users(args: argparse.Namespace) -> None:
    config = load(args)

    async def work(directory: Any) -> Any:
        if args.action == "add":
            return await directory.add_user(user_id=args.id, email=args.email, tier=args.tier)
        if args.action == "list":
            return await directory.list_users(limit=args.limit, cursor=args.cursor)
        if args.action == "show":
            return await directory.show_user(args.user)
        if args.action == "set-tier":
            return await directory.set_tier(args.user, args.tier)
        if args.action == "suspend":
            return await directory.set_status(args.user, "suspended")
        if args.action == "resume":
            return await directory.set_status(args.user, "active")
        if args.action == "delete":
            key = await directory.store.keys.get(args.user)
            if key is not None and key["kind"] == "managed":  # deleting the row alone would orphan it upstream
                raise CliError(f"user {args.user!r} has a managed OpenRouter key: run `gateway keys delete "
                               f"{args.user}` first, which deletes it upstream too")
            await directory.delete_user(args.user)
            return {"deleted": args.user}
        raise CliError(f"unknown users action {args.action}")

    print_json(asyncio.run(with_directory(config, work)))


def cmd_tokens(args: argparse.Namespace) -> None:
    config = load(args)

    async def work(directory: Any) -> Any:
        if args.action == "create":
            return await directory.create_token(args.user, name=args.name, expires_at=args.expires_at)
        if args.action == "list":
            return {"data": await directory.list_tokens(args.user)}
        if args.action == "revoke":
            return await directory.revoke_token(args.token_id)
        if args.action == "rotate":
            return await directory.rotate_token(args.token_id)
        raise CliError(f"unknown tokens action {args.action}")

    result = asyncio.run(with_directory(config, work))
    print_json(result)
    if isinstance(result, dict) and "token" in result:
        print("The token is shown this once; store it now.", file=sys.stderr)


def cmd_keys(args: argparse.Namespace) -> None:
    from gateway.cli.keys import run_keys_command

    run_keys_command(args, load(args))


def cmd_usage(args: argparse.Namespace) -> None:
    from gateway.cli.usage import run_usage_command

    run_usage_command(args, load(args))


def cmd_sync_credits(args: argparse.Namespace) -> None:
    from gateway.cli.credits import run_sync_command

    run_sync_command(args, load(args))


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "init": cmd_init,
    "serve": cmd_serve,
    "emulator": cmd_emulator,
    "users": cmd_users,
    "tokens": cmd_tokens,
    "keys": cmd_keys,
    "usage": cmd_usage,
    "sync-credits": cmd_sync_credits,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gateway", description="OpenAI-compatible gateway in front of OpenRouter.")
    add_config_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("init", help="write a config, a master key file and an admin token (printed once)")

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--host", help="listen address (default: server.host)")
    p.add_argument("--port", type=int, help="listen port (default: server.port)")
    p.add_argument("--workers", type=int, help="worker processes (default: server.workers)")
    p.add_argument("--demo", action="store_true", help="also run the local OpenRouter emulator with a demo user")
    p.add_argument("--demo-port", type=int, default=8090, help="port of the demo's emulator (default 8090)")

    p = sub.add_parser("emulator", help="run the local OpenRouter emulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action", required=True, parser_class=_Parser)
    p = users.add_parser("add", help="add a user")
    p.add_argument("--id", help="user id (default: generated)")
    p.add_argument("--email")
    p.add_argument("--tier", help="tier name (default: default_tier)")
    p = users.add_parser("list", help="list users")
    p.add_argument("--limit", type=_positive_int, default=100, help="users per page (default 100)")
    p.add_argument("--cursor", help="the next_cursor of the previous page")
    for name, text in (("show", "show a user"), ("suspend", "suspend a user"), ("resume", "resume a user"),
                       ("delete", "delete a user, their tokens and key")):
        p = users.add_parser(name, help=text)
        p.add_argument("user", help="user id")
    p = users.add_parser("set-tier", help="change a user's tier")
    p.add_argument("user", help="user id")
    p.add_argument("tier", help="tier name")

    tokens = sub.add_parser("tokens", help="manage platform tokens").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    p = tokens.add_parser("create", help="create a token (printed once)")
    p.add_argument("user", help="user id")
    p.add_argument("--name")
    p.add_argument("--expires-at", help="ISO-8601 expiry, e.g. 2027-01-31T00:00:00Z")
    p = tokens.add_parser("list", help="list a user's tokens")
    p.add_argument("user", help="user id")
    for name, text in (("revoke", "revoke a token"), ("rotate", "replace a token with a new secret")):
        p = tokens.add_parser(name, help=text)
        p.add_argument("token_id", help="token id (tok_…)")

    keys = sub.add_parser("keys", help="manage users' OpenRouter keys and the master key").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    p = keys.add_parser("set-byok", help="connect a user's own OpenRouter key (verified first)")
    p.add_argument("user", help="user id")
    p.add_argument("--key-stdin", action="store_true", help="read the key from stdin (default: $OPENROUTER_API_KEY)")
    p = keys.add_parser("provision", help="create a managed key through OpenRouter's key API")
    p.add_argument("user", help="user id")
    p.add_argument("--limit-usd", help="spending limit in USD (default: the tier's monthly budget)")
    for name, text in (("rotate", "replace a user's managed key (old one deleted upstream)"),
                       ("disable", "disable a user's managed key upstream"),
                       ("enable", "enable a user's managed key upstream"),
                       ("delete", "remove a user's key (managed: deleted upstream too)")):
        p = keys.add_parser(name, help=text)
        p.add_argument("user", help="user id")
    p = keys.add_parser("rotate-master", help="add a new master key and re-encrypt every stored key")
    p.add_argument("--batch-size", type=int, default=200)

    usage = sub.add_parser("usage", help="usage reports").add_subparsers(dest="action", required=True, parser_class=_Parser)
    p = usage.add_parser("report", help="usage and cost per user/model")
    p.add_argument("--user", help="only this user")
    p.add_argument("--period", default="month", help="day, week or month (default month)")
    p.add_argument("--format", default="table", help="table, csv or json (default table)")

    p = sub.add_parser("sync-credits", help="refresh users' OpenRouter credits now")
    p.add_argument("--user", help="only this user")
    for leaf in _leaves(parser):
        add_config_option(leaf, top=False)
    return parser


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand's own parser, however deep (`users add`, `keys provision` …)."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found.extend(_leaves(child) or [child])
    return found


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from gateway.security.first_run import DatabaseUnreadable, MasterKeyError, check_master_keys
    from gateway.security.vault import VaultError

    try:
        if args.command not in ("emulator", "serve", "init"):  # serve and init check in `ensure_runtime`
            check_master_keys(load(args))  # a master key that cannot decrypt the stored keys: refuse, exit 2
        COMMANDS[args.command](args)
    except DatabaseUnreadable as exc:
        _fail(str(database_failure(load(args), exc.cause)), EXIT_ENVIRONMENT)
    except (CliError, ConfigError, MasterKeyError, VaultError) as exc:
        _fail(str(exc))
    except EnvironmentFailure as exc:
        _fail(str(exc), EXIT_ENVIRONMENT)
    except GatewayError as exc:
        _fail(exc.message, EXIT_ENVIRONMENT if exc.status >= 500 else EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # never a traceback: the cause in one line, and where to look
        from gateway.security.vault import VaultError

        if isinstance(exc, VaultError):
            _fail(str(exc), EXIT_ENVIRONMENT)
        reason = (str(exc).strip().splitlines() or [""])[0]
        _fail(f"{args.command} failed: {type(exc).__name__}{': ' + reason if reason else ''} "
              "(run with GATEWAY_LOGGING__LEVEL=debug for details)", EXIT_ENVIRONMENT)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    sys.stderr.write(f"gateway: {message}\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
