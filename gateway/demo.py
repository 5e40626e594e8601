"""`gateway serve --demo`: a demo user with the emulator's key and a token, and a curl line to try."""

from __future__ import annotations

import sys
from pathlib import Path

from gateway.accounts.byok import connect_byok
from gateway.core.errors import GatewayError
from gateway.instance import Gateway

DEMO_USER = "demo"


async def prepare_demo(gateway: Gateway, host: str, port: int, *, database: Path | None = None) -> str:
    """Create (or reuse) the demo user, connect the emulator's key, mint a token, print how to call."""
    from openrouter_emulator.app import DEMO_KEY

    directory = gateway.directory
    if await gateway.store.users.get(DEMO_USER) is None:
        await directory.add_user(user_id=DEMO_USER, email=None, tier="starter")
    try:
        await connect_byok(gateway.store, gateway.vault, gateway.upstream, DEMO_USER, DEMO_KEY)
    except GatewayError as exc:
        print(f"demo: could not connect the emulator key: {exc.message}", file=sys.stderr)
    gateway.auth.forget_user(DEMO_USER)
    token = (await directory.create_token(DEMO_USER, name="demo"))["token"]
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    curl = (
        f"curl -s http://{shown_host}:{port}/v1/chat/completions "
        f"-H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' "
        "-d '{\"model\": \"openai/gpt-4o-mini\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'"
    )
    print("\nDemo ready: the gateway is in front of the local OpenRouter emulator. Try:\n", file=sys.stderr)
    print(curl, flush=True)
    if database is not None:
        print(f"\nThe demo keeps its own database, {database}. Its usage so far:\n"
              f"  GATEWAY_DATABASE__URL=sqlite:///{database} .venv/bin/gateway usage report", file=sys.stderr)
    print("", file=sys.stderr, flush=True)
    return token
