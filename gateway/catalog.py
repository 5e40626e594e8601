"""The model catalogue from a TTL cache: one upstream fetch per `models.cache_ttl_s` for everyone.

Why a cache: OpenRouter's list is the same for every user and changes rarely, while
clients (the Python SDK pages it on every `models.list()`) ask often. Guarantees:

- Concurrent misses share one fetch.
- A failed refresh keeps serving the last list, marked stale, and the upstream is not
  asked again until a back-off (5 s doubling, at most `min(ttl, 5 min)`) has passed, so an
  outage does not turn every catalogue read into an upstream call.
- The lookups used on the request path (`price`, `is_free`) never wait on the upstream:
  a cold cache starts a background refresh and answers from what it has.
- The fetch asks for every output modality (`output_modalities=all`) so embedding models
  have prices too; `/v1/models` filters like OpenRouter (default `text`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from cachetools import TTLCache

from gateway.core.clock import Clock, system_clock
from gateway.core.metrics import Metrics
from gateway.upstream.client import UpstreamClient, UpstreamConnectionError

log = logging.getLogger("gateway.catalog")
FREE_SUFFIX = ":free"
FETCH_PATH = "/models?output_modalities=all"
DEFAULT_PAGE_SIZE = 500  # OpenRouter's default `limit` once paging is asked for
MAX_PAGE_SIZE = 1000
BACKOFF_FIRST_S = 5.0
BACKOFF_MAX_S = 300.0


@dataclass(frozen=True, slots=True)
class ModelPrice:
    prompt: Decimal  # USD per token
    completion: Decimal  # USD per token
    request: Decimal = Decimal(0)
    free: bool = field(init=False, compare=False)  # known once: asked on every request

    def __post_init__(self) -> None:
        object.__setattr__(self, "free", self.prompt == 0 and self.completion == 0 and self.request == 0)


class CatalogUnavailable(Exception):
    """No catalogue was ever fetched and the upstream cannot be reached."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    models: list[dict[str, Any]]
    prices: dict[str, ModelPrice]
    fetched_at: float
    stale: bool = False
    error: str | None = None
    free: list[str] = field(default_factory=list)
    _views: dict[str, list[dict[str, Any]]] = field(default_factory=dict, compare=False, repr=False)
    _index: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    def model(self, model_id: str) -> dict[str, Any] | None:
        """The row of one model id (`GET /model/{author}/{slug}`), indexed on first use."""
        if not self._index and self.models:
            self._index.update((m["id"], m) for m in self.models)
        return self._index.get(model_id)

    def rows(self, output_modalities: str | None = None) -> list[dict[str, Any]]:
        """The models whose output modalities match (OpenRouter's filter: default `text`, `all` = every one)."""
        key = (output_modalities or "text").strip().lower() or "text"
        view = self._views.get(key)
        if view is None:
            wanted = {m.strip() for m in key.split(",") if m.strip()}
            view = self.models if "all" in wanted else [m for m in self.models if wanted & _outputs(m)]
            self._views[key] = view
        return view


def _outputs(model: dict[str, Any]) -> set[str]:
    architecture = model.get("architecture")
    outputs = architecture.get("output_modalities") if isinstance(architecture, dict) else None
    if not isinstance(outputs, list):
        return {"text"}  # no modality data: OpenRouter's default list is text models
    return {o for o in outputs if isinstance(o, str)}


def page(rows: list[Any], offset: int | None, limit: int | None) -> tuple[list[Any], int | None]:
    """One page of `rows` and the offset of the next one (None when this page reaches the end).

    As OpenRouter pages (OPENROUTER.md §5.1): with neither parameter the whole list; with
    either, `offset` defaults to 0 and `limit` to 500. The Python SDK sends
    `offset=0&limit=500` and keeps going while pages come back full.
    """
    if offset is None and limit is None:
        return rows, None
    start = offset or 0
    size = limit or DEFAULT_PAGE_SIZE
    end = start + size
    return rows[start:end], (end if end < len(rows) else None)


def is_free_model(model_id: str, price: ModelPrice | None) -> bool:
    """Free = a `:free` variant, or zero pricing in the catalogue."""
    return model_id.endswith(FREE_SUFFIX) or (price is not None and price.free)


def _decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
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


def build_snapshot(data: list[Any], fetched_at: float) -> Snapshot:
    models = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    prices = {m["id"]: p for m in models if (p := _price(m)) is not None}
    free = [m["id"] for m in models if is_free_model(m["id"], prices.get(m["id"]))]
    return Snapshot(models, prices, fetched_at, free=free)


class Catalog:
    def __init__(
        self,
        upstream: UpstreamClient,
        *,
        ttl_s: float,
        key: str | None = None,
        clock: Clock = system_clock,
        fetch_timeout_s: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._upstream = upstream
        self._metrics = metrics or Metrics()
        self._ttl_s = ttl_s
        self._key = key or ""
        self._clock = clock
        self._fetch_timeout_s = fetch_timeout_s
        self._snapshot: Snapshot | None = None
        # While the clock is before this the snapshot is fresh and stays as it is: what `price` answers
        # may be kept until then (the limiter does, per user).
        self.fresh_until = 0.0
        self._refreshing: asyncio.Task[Snapshot] | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._last_error = ""
        self.fetches = 0
        self.views = UpstreamViews(upstream, ttl_s=ttl_s, clock=clock, fetch_timeout_s=fetch_timeout_s)

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def _fresh(self) -> bool:
        return self._clock() < self.fresh_until

    def _backing_off(self) -> bool:
        return self._failures > 0 and self._clock() < self._retry_at

    async def get(self) -> Snapshot:
        """The catalogue, fetching it if expired; concurrent callers share the fetch.

        During an outage this answers the stale snapshot (or raises CatalogUnavailable
        when there never was one) without asking the upstream until the back-off ends.
        Each read counts in `gateway_catalog_requests_total{result}`: hit (fresh), miss (fetched now),
        stale (the last list during an outage); the request path's `price` look-ups are not counted.
        """
        if self._fresh():
            self._metrics.observe_catalog("hit")
            return self._snapshot  # type: ignore[return-value]
        if self._refreshing is None or self._refreshing.done():
            if self._backing_off():
                if self._snapshot is None:
                    raise CatalogUnavailable(f"the model catalogue is unavailable: {self._last_error}")
                self._metrics.observe_catalog("stale")
                return self._snapshot
            self._refreshing = asyncio.create_task(self._refresh())
        snapshot = await asyncio.shield(self._refreshing)
        self._metrics.observe_catalog("stale" if snapshot.stale else "miss")
        return snapshot

    def warm(self) -> None:
        """Start a refresh in the background if the cache is cold or expired (request path)."""
        if self._fresh() or self._backing_off() or (self._refreshing is not None and not self._refreshing.done()):
            return
        try:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        except RuntimeError:
            return  # no event loop (a synchronous caller): nothing to warm with
        self._refreshing.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _refresh(self) -> Snapshot:
        self.fetches += 1
        try:
            # With a list to fall back on, fail fast (no retries, bounded wait): the caller
            # gets the stale list at once and the back-off decides when to try again.
            status, body = await asyncio.wait_for(
                self._upstream.call("GET", FETCH_PATH, key=self._key, retry=self._snapshot is None),
                self._fetch_timeout_s,
            )
            if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
                raise CatalogUnavailable(f"OpenRouter answered HTTP {status} for the model list")
        except (TimeoutError, UpstreamConnectionError, CatalogUnavailable) as exc:
            return self._failed(str(exc) or type(exc).__name__)
        self._failures = 0
        self._snapshot = build_snapshot(body["data"], self._clock())
        self.fresh_until = self._snapshot.fetched_at + self._ttl_s
        return self._snapshot

    def _failed(self, error: str) -> Snapshot:
        self._failures += 1
        backoff = min(BACKOFF_FIRST_S * 2 ** (self._failures - 1), max(min(self._ttl_s, BACKOFF_MAX_S), BACKOFF_FIRST_S))
        self._retry_at = self._clock() + backoff
        self._last_error = error
        log.warning("model catalogue refresh failed (%s); next attempt in %.0f s", error, backoff)
        if self._snapshot is None:
            raise CatalogUnavailable(f"the model catalogue is unavailable: {error}") from None
        old = self._snapshot
        self.fresh_until = 0.0
        self._snapshot = Snapshot(old.models, old.prices, old.fetched_at, stale=True, error=error, free=old.free,
                                  _views=old._views, _index=old._index)
        return self._snapshot

    def price(self, model: str | None) -> ModelPrice | None:
        """The model's price if known now; never waits (warms the cache instead). On the hot path."""
        if self._clock() >= self.fresh_until:
            self.warm()
        snapshot = self._snapshot
        if model is None or snapshot is None:
            return None
        return snapshot.prices.get(model)

    def is_free(self, model: str | None) -> bool:
        """`is_free_model` with the catalogue's price (the one free-model rule)."""
        return model is not None and is_free_model(model, self.price(model))

    def is_free_generation(self, requested: str | None, served: str | None) -> bool:
        """A generation is free when the model that served it is, or the one asked for (a `:free` request
        routed to its paid twin is still free to the user)."""
        return self.is_free(served) or (requested != served and self.is_free(requested))


USER_MODELS_PATH = "/models/user?output_modalities=all"
MAX_VIEWS = 10_000  # cached per-key model lists and per-model endpoint lists, each


class UpstreamViews:
    """What only the upstream knows, TTL-cached like the catalogue: one fetch per key or model per TTL.

    - `user_model_ids(key)`: the ids OpenRouter's `GET /models/user` lists for that key (its
      account's provider preferences, privacy settings and guardrails applied); the rows
      served are the cached catalogue's.
    - `endpoints(author, slug)`: `GET /models/{author}/{slug}/endpoints` as OpenRouter answered it
      (the same for everyone), or None when it has no such model.
    Concurrent misses for one entry share a fetch; an upstream that cannot answer raises
    CatalogUnavailable and nothing is cached.
    """

    def __init__(self, upstream: UpstreamClient, *, ttl_s: float, clock: Clock = system_clock,
                 fetch_timeout_s: float = 30.0) -> None:
        self._upstream = upstream
        self._fetch_timeout_s = fetch_timeout_s
        self._cache: TTLCache[str, Any] = TTLCache(MAX_VIEWS, max(ttl_s, 0.001), timer=clock)
        self._fetching: dict[str, asyncio.Task[Any]] = {}

    async def user_model_ids(self, key: str) -> frozenset[str]:
        name = "user:" + hashlib.sha256(key.encode()).hexdigest()  # never the key itself as a dict key
        body = await self._get(name, USER_MODELS_PATH, key, found=True)
        return frozenset(m["id"] for m in body["data"] if isinstance(m, dict) and isinstance(m.get("id"), str))

    async def endpoints(self, author: str, slug: str) -> dict[str, Any] | None:
        body = await self._get(f"endpoints:{author}/{slug}", f"/models/{author}/{slug}/endpoints", "", found=False)
        return body if isinstance(body, dict) and isinstance(body.get("data"), dict) else None

    async def _get(self, name: str, path: str, key: str, *, found: bool) -> Any:
        if name in self._cache:
            return self._cache[name]
        task = self._fetching.get(name)
        if task is None:
            task = self._fetching[name] = asyncio.create_task(self._fetch(name, path, key, found))
            task.add_done_callback(lambda _: self._fetching.pop(name, None))
        return await asyncio.shield(task)

    async def _fetch(self, name: str, path: str, key: str, found: bool) -> Any:
        try:
            status, body = await asyncio.wait_for(self._upstream.call("GET", path, key=key), self._fetch_timeout_s)
        except (TimeoutError, UpstreamConnectionError) as exc:
            raise CatalogUnavailable(f"OpenRouter could not be reached for {path.split('?')[0]}: "
                                     f"{exc or type(exc).__name__}") from None
        if status == 404 and not found:
            self._cache[name] = None
            return None
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), (list, dict)):
            raise CatalogUnavailable(f"OpenRouter answered HTTP {status} for {path.split('?')[0]}")
        self._cache[name] = body
        return body
