"""The catalogue cache: TTL, one fetch for concurrent misses, stale on failure with back-off, paging."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any, AsyncIterator, Mapping

import orjson
import pytest

from gateway.catalog import Catalog, CatalogUnavailable, page
from gateway.upstream.client import UpstreamClient, UpstreamConnectionError
from tests.conftest import FakeClock


def model(model_id: str, prompt: str = "0.000001", completion: str = "0.000002", outputs: tuple[str, ...] = ("text",),
          request: str = "0") -> dict[str, Any]:
    return {"id": model_id, "pricing": {"prompt": prompt, "completion": completion, "request": request},
            "architecture": {"output_modalities": list(outputs)}}


MODELS = [
    model("openai/gpt-4o"),
    model("meta/llama:free", "0", "0"),
    model("emulator/zero", "0", "0"),
    model("emulator/per-request", "0", "0", request="0.01"),
    model("openai/embed", "0.00000002", "0", outputs=("embeddings",)),
    model("openrouter/auto", "-1", "-1"),
]


class FakeResponse:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.headers = [("content-type", "application/json")]
        self._body = body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    async def read(self) -> bytes:
        return self._body

    async def close(self) -> None:
        return None


class FakeTransport:
    """Answers /models from `models`; `fail` makes it unreachable; `gate` holds answers back."""

    def __init__(self) -> None:
        self.models = list(MODELS)
        self.calls: list[str] = []
        self.fail: str | None = None  # None, "connect" or "500"
        self.gate: asyncio.Event | None = None

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> FakeResponse:
        self.calls.append(url)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail == "connect":
            raise UpstreamConnectionError("cannot reach upstream: ClientConnectorError")
        if self.fail == "500":
            return FakeResponse(500, b'{"error": {"code": 500, "message": "Internal Server Error"}}')
        return FakeResponse(200, orjson.dumps({"data": self.models, "total_count": len(self.models)}))

    async def close(self) -> None:
        return None




async def no_sleep(_: float) -> None:
    return None


def make(ttl_s: float = 60) -> tuple[Catalog, FakeTransport, FakeClock]:
    transport, clock = FakeTransport(), FakeClock(1_000_000.0)
    upstream = UpstreamClient(transport, "http://upstream/api/v1", retries=2, sleep=no_sleep)
    return Catalog(upstream, ttl_s=ttl_s, clock=clock), transport, clock


@pytest.mark.anyio
async def test_one_fetch_per_ttl_and_refetch_after_expiry() -> None:
    catalog, transport, clock = make(ttl_s=60)
    first = await catalog.get()
    for _ in range(5):
        assert await catalog.get() is first
    clock.now += 59.9
    assert await catalog.get() is first
    assert len(transport.calls) == 1
    assert transport.calls[0].endswith("/models?output_modalities=all")
    transport.models.append(model("new/model"))
    clock.now += 0.2
    second = await catalog.get()
    assert len(transport.calls) == 2
    assert "new/model" in second.prices and second.fetched_at == clock.now


@pytest.mark.anyio
async def test_concurrent_misses_share_one_fetch() -> None:
    catalog, transport, _ = make()
    transport.gate = asyncio.Event()
    waiters = [asyncio.create_task(catalog.get()) for _ in range(20)]
    await asyncio.sleep(0)
    catalog.warm()  # the request path's warm-up joins the same fetch
    transport.gate.set()
    snapshots = await asyncio.gather(*waiters)
    assert len(transport.calls) == 1
    assert all(s is snapshots[0] for s in snapshots)


@pytest.mark.anyio
@pytest.mark.parametrize("failure", ["connect", "500"])
async def test_failure_serves_stale_list_and_backs_off(failure: str) -> None:
    catalog, transport, clock = make(ttl_s=60)
    fresh = await catalog.get()
    clock.now += 61
    transport.fail = failure
    stale = await catalog.get()
    assert stale.stale and stale.error and stale.models == fresh.models and stale.fetched_at == fresh.fetched_at
    assert len(transport.calls) == 2  # no retries while a stale list can be served
    for _ in range(10):  # during the back-off nobody asks the upstream again
        assert (await catalog.get()).stale
    clock.now += 4.9
    await catalog.get()
    assert len(transport.calls) == 2
    clock.now += 0.2  # first back-off (5 s) over: one more attempt, then a longer wait
    await catalog.get()
    assert len(transport.calls) == 3
    clock.now += 9.9
    await catalog.get()
    assert len(transport.calls) == 3
    transport.fail = None
    clock.now += 0.2
    recovered = await catalog.get()
    assert not recovered.stale and recovered.fetched_at == clock.now
    assert len(transport.calls) == 4


@pytest.mark.anyio
async def test_cold_failure_raises_then_backs_off() -> None:
    catalog, transport, clock = make()
    transport.fail = "connect"
    with pytest.raises(CatalogUnavailable):
        await catalog.get()
    assert len(transport.calls) == 3  # cold: nothing to serve, so the client's retries are used
    with pytest.raises(CatalogUnavailable):
        await catalog.get()
    assert len(transport.calls) == 3
    transport.fail = None
    clock.now += 5
    assert (await catalog.get()).prices


@pytest.mark.anyio
async def test_prices_free_and_modalities() -> None:
    catalog, _, _ = make()
    snapshot = await catalog.get()
    assert snapshot.prices["openai/gpt-4o"].prompt == Decimal("0.000001")
    assert "openrouter/auto" not in snapshot.prices  # negative price = unknown
    assert snapshot.free == ["meta/llama:free", "emulator/zero"]
    assert catalog.is_free("meta/llama:free") and catalog.is_free("emulator/zero")
    assert catalog.is_free("unknown/model:free")
    assert not catalog.is_free("emulator/per-request") and not catalog.is_free("openai/gpt-4o")
    assert not catalog.is_free("unknown/model") and not catalog.is_free(None)
    assert [m["id"] for m in snapshot.rows(None)] == [m["id"] for m in MODELS if m["id"] != "openai/embed"]
    assert [m["id"] for m in snapshot.rows("embeddings")] == ["openai/embed"]
    assert len(snapshot.rows("all")) == len(MODELS)


@pytest.mark.anyio
async def test_price_never_waits_and_warms_a_cold_cache() -> None:
    catalog, transport, _ = make()
    transport.gate = asyncio.Event()
    assert catalog.price("openai/gpt-4o") is None  # cold: answers at once
    for _ in range(100):  # let the background refresh reach the transport
        if transport.calls:
            break
        await asyncio.sleep(0)
    assert len(transport.calls) == 1
    transport.gate.set()
    await catalog.get()
    assert catalog.price("openai/gpt-4o") is not None
    assert len(transport.calls) == 1


def test_price_outside_an_event_loop_does_not_raise() -> None:
    catalog, transport, _ = make()
    assert catalog.price("openai/gpt-4o") is None
    assert transport.calls == []


def test_paging_arithmetic_matches_openrouter_and_the_python_sdk() -> None:
    rows = list(range(1212))
    assert page(rows, None, None) == (rows, None)  # no params: the whole list
    first, nxt = page(rows, 0, 500)
    assert first == rows[:500] and nxt == 500
    second, nxt = page(rows, 500, 500)
    assert second == rows[500:1000] and nxt == 1000
    third, nxt = page(rows, 1000, 500)
    assert third == rows[1000:] and nxt is None and len(third) < 500  # the SDK stops at a short page
    assert page(rows, 1200, None) == (rows[1200:], None)  # limit defaults to 500
    assert page(rows, None, 10) == (rows[:10], 10)
    assert page(rows, 5000, 10) == ([], None)
    exact = list(range(1000))
    assert page(exact, 500, 500) == (exact[500:], None)
    # paging the whole list the SDK's way yields every row once
    seen: list[int] = []
    offset = 0
    while True:
        chunk, _ = page(rows, offset, 500)
        seen += chunk
        if len(chunk) < 500:
            break
        offset += 500
    assert seen == rows
