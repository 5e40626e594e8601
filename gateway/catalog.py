"""The model catalogue from a TTL cache: one upstream fetch per `models.cache_ttl_s` for everyone.

Concurrent misses share one fetch; a failed refresh keeps serving the stale list (and says
so). The same prices feed budget estimates and the free-model markup rule. Lookups on
the request path (`price`, `is_free`) never wait on the upstream: a cold cache starts a
background refresh and answers from what it has.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.clock import Clock, system_clock
from gateway.upstream import UpstreamClient, UpstreamConnectionError

log = logging.getLogger("gateway.catalog")
FREE_SUFFIX = ":free"


@dataclass(frozen=True, slots=True)
class ModelPrice:
    prompt: Decimal  # USD per token
    completion: Decimal  # USD per token
    request: Decimal = Decimal(0)

    @property
    def free(self) -> bool:
        return self.prompt == 0 and self.completion == 0 and self.request == 0


class CatalogUnavailable(Exception):
    """No catalogue was ever fetched and the upstream cannot be reached."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    models: list[dict[str, Any]]
    prices: dict[str, ModelPrice]
    fetched_at: float
    stale: bool = False
    error: str | None = None


def _decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        return None
    return result if result.is_finite() else None


def _price(model: dict[str, Any]) -> ModelPrice | None:
    pricing = model.get("pricing")
    if not isinstance(pricing, dict):
        return None
    prompt, completion = _decimal(pricing.get("prompt")), _decimal(pricing.get("completion"))
    if prompt is None or completion is None or prompt < 0 or completion < 0:
        return None  # negative prices mark router models ("openrouter/auto"): price unknown
    return ModelPrice(prompt, completion, _decimal(pricing.get("request")) or Decimal(0))


class Catalog:
    def __init__(
        self, upstream: UpstreamClient, *, ttl_s: float, key: str | None = None, clock: Clock = system_clock
    ) -> None:
        self._upstream = upstream
        self._ttl_s = ttl_s
        self._key = key or ""
        self._clock = clock
        self._snapshot: Snapshot | None = None
        self._refreshing: asyncio.Task[Snapshot] | None = None
        self.fetches = 0

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def _fresh(self) -> bool:
        return self._snapshot is not None and not self._snapshot.stale and (
            self._clock() - self._snapshot.fetched_at < self._ttl_s
        )

    async def get(self) -> Snapshot:
        """The catalogue, fetching it if expired; concurrent callers share the fetch."""
        if self._fresh():
            return self._snapshot  # type: ignore[return-value]
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh())
        return await asyncio.shield(self._refreshing)

    def warm(self) -> None:
        """Start a refresh in the background if the cache is cold or expired (request path)."""
        if not self._fresh() and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.create_task(self._refresh())
            self._refreshing.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _refresh(self) -> Snapshot:
        self.fetches += 1
        try:
            status, body = await self._upstream.call("GET", "/models", key=self._key)
            if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
                raise CatalogUnavailable(f"OpenRouter answered HTTP {status} for the model list")
        except (UpstreamConnectionError, CatalogUnavailable) as exc:
            log.warning("model catalogue refresh failed: %s", exc)
            if self._snapshot is None:
                raise CatalogUnavailable(f"the model catalogue is unavailable: {exc}") from None
            self._snapshot = Snapshot(
                self._snapshot.models, self._snapshot.prices, self._snapshot.fetched_at, stale=True, error=str(exc)
            )
            return self._snapshot
        models = [m for m in body["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        prices = {m["id"]: p for m in models if (p := _price(m)) is not None}
        self._snapshot = Snapshot(models, prices, self._clock())
        return self._snapshot

    def price(self, model: str | None) -> ModelPrice | None:
        """The model's price if known now; never waits (warms the cache instead)."""
        self.warm()
        if model is None or self._snapshot is None:
            return None
        return self._snapshot.prices.get(model)

    def is_free(self, model: str | None) -> bool:
        """Free = a `:free` variant, or zero prompt and completion pricing in the catalogue."""
        if model is None:
            return False
        if model.endswith(FREE_SUFFIX):
            return True
        price = self.price(model)
        return price is not None and price.free
