"""Sending the outbox: claim a due delivery, POST it signed, record the answer, back off on failure.

One instance sends each delivery: it claims the row for a lease first (`AlertRepository.claim`), so
instances polling the same database never both send it. A non-2xx answer or a network error retries
after `backoff_base_s × 2^attempts` (at most `backoff_max_s`), up to `max_attempts`, then the delivery is
`failed`. Every try is recorded on the row (`GET /admin/v1/alerts`). Secrets never leave the signature.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from gateway.alerts.signing import SIGNATURE_HEADER, sign
from gateway.core.clock import Clock, system_clock
from gateway.core.config import AlertsConfig
from gateway.store.alerts import AlertRepository

log = logging.getLogger("gateway.alerts")
POLL_S = 1.0


def webhook_label(url: str) -> str:
    """The URL as shown to the admin: scheme, host and path (a query may carry a receiver's token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


class Courier:
    def __init__(self, outbox: AlertRepository, config: AlertsConfig, *, clock: Clock = system_clock,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._outbox = outbox
        self._config = config
        self._clock = clock
        self._secrets = {webhook.url: webhook.secret for webhook in config.webhooks}
        self._client = httpx.AsyncClient(timeout=config.timeout_s, follow_redirects=False, transport=transport)
        self._wake = asyncio.Event()
        self.owner = "inst_" + secrets.token_hex(6)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.send_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("alert delivery pass failed; trying again shortly")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            except TimeoutError:
                pass

    async def send_due(self) -> int:
        sent = 0
        for row in await self._outbox.due():
            if await self._outbox.claim(row["id"], self.owner, lease_s=self._config.timeout_s * 2 + 5):
                sent += await self._send(row)
        return sent

    async def _send(self, row: dict[str, Any]) -> int:
        secret = self._secrets.get(row["webhook"])
        if secret is None:
            await self._outbox.attempt_failed(row["id"], status=None, retry_at=None,
                                              error="this webhook is no longer in alerts.webhooks")
            return 0
        body = row["payload"].encode()
        event_id = orjson.loads(body)["id"]
        headers = {"content-type": "application/json", "user-agent": "openrouter-gateway-alerts",
                   "x-gateway-event": row["event"], "x-gateway-event-id": event_id, "x-gateway-delivery": row["id"],
                   SIGNATURE_HEADER: sign(secret, body)}
        status: int | None = None
        try:
            response = await self._client.post(row["webhook"], content=body, headers=headers)
            status = response.status_code
            if 200 <= status < 300:
                await self._outbox.delivered(row["id"], status)
                return 1
            error = f"the receiver answered HTTP {status}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        attempts = row["attempts"] + 1
        retry_at = None
        if attempts < self._config.max_attempts:
            retry_at = self._clock() + min(self._config.backoff_base_s * 2 ** (attempts - 1), self._config.backoff_max_s)
        log.warning("alert %s to %s failed (%s); %s", row["id"], webhook_label(row["webhook"]), error,
                    "will retry" if retry_at else "giving up")
        await self._outbox.attempt_failed(row["id"], status=status, error=error, retry_at=retry_at)
        return 0

    async def close(self) -> None:
        await self._client.aclose()
