"""Settling generations: OpenRouter's `GET /generation` replaces the provisional cost.

OpenRouter writes its generation record asynchronously, so a look-up right after the
response answers 404 for a while. Each pending generation is looked up first
`generation_lookup.first_delay_s` after it was recorded, then after growing delays
(`× factor`, capped at `max_delay_s`), at most `attempts` times. The answer's
`total_cost` is authoritative: the record's provider cost, markup and total are
recomputed from it (markup with the percentage stored on the record, i.e. the tier in
force when the request was made). A record that never settles keeps its provisional
cost and is marked `unsettled`.

Every retry is persisted (attempt count and next attempt time) through the ledger's
batched writer, so a restart resumes look-ups where they stood (`resume`). Look-ups run
in the background with bounded concurrency and yield to traffic (`gateway.pacing`): a
look-up costs about as much as proxying a request, so while the process is CPU-bound
they run at `busy_floor_per_s` and catch up when the load eases. Nothing here is on the
request path.

Several instances share the pending records through leases (`generation_lookup.lease_s`):
the records an instance writes carry its lease, which it renews while it runs and
releases at a graceful shutdown; an instance claims only records whose lease is free or
has run out (`run_leases`), so each pending look-up is resumed by one instance only.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import secrets
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol
from urllib.parse import quote

import orjson

from gateway.accounting.pacing import Pacer
from gateway.core.clock import Clock, iso, parse_iso, system_clock
from gateway.core.config import GenerationLookupConfig
from gateway.core.money import markup_for, to_decimal
from gateway.store.usage import PENDING, SETTLED, UNSETTLED, Settlement, UsageRecord
from gateway.upstream.client import UpstreamClient, UpstreamConnectionError

if TYPE_CHECKING:
    from gateway.store import Store

log = logging.getLogger("gateway.accounting.settlement")

KeyLookup = Callable[[str], Awaitable[str | None]]


class SettlementSink(Protocol):
    """Where a look-up's outcome goes: the ledger, which owns the records."""

    def apply(self, settlement: Settlement, *, user_id: str, created_ts: float, old_total: Decimal) -> None: ...


@dataclass(slots=True)
class PendingGeneration:
    """What settling one generation needs, kept in memory while its look-up is due."""

    generation_id: str
    user_id: str
    created_ts: float
    tier: str
    model: str | None
    markup_pct: Decimal
    free: bool
    total_cost: Decimal
    provider_cost: Decimal
    markup: Decimal
    markup_reason: str
    attempts: int
    due: float
    key: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, record: UsageRecord, due: float, key: str | None, created_ts: float | None = None
           ) -> "PendingGeneration":
        return cls(
            generation_id=record.generation_id,
            user_id=record.user_id,
            created_ts=parse_iso(record.created_at) if created_ts is None else created_ts,
            tier=record.tier,
            model=record.model or record.model_requested,
            markup_pct=record.markup_pct,
            free=record.free,
            total_cost=record.total_cost,
            provider_cost=record.provider_cost,
            markup=record.markup,
            markup_reason=record.markup_reason,
            attempts=record.settle_attempts,
            due=due,
            key=key,
        )


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def authoritative_tokens(data: dict[str, Any]) -> tuple[int | None, int | None, int | None, int | None]:
    """(prompt, completion, reasoning, cached) from a /generation record (native counts first)."""
    prompt = _count(data.get("native_tokens_prompt"))
    completion = _count(data.get("native_tokens_completion"))
    return (
        prompt if prompt is not None else _count(data.get("tokens_prompt")),
        completion if completion is not None else _count(data.get("tokens_completion")),
        _count(data.get("native_tokens_reasoning")),
        _count(data.get("native_tokens_cached")),
    )


class Settler:
    def __init__(
        self,
        upstream: UpstreamClient,
        lookup: GenerationLookupConfig,
        *,
        key_for: KeyLookup,
        is_free_generation: Callable[[str | None, str | None], bool] = lambda requested, served: False,
        clock: Clock = system_clock,
        concurrency: int = 16,
        pacer: Pacer | None = None,
    ) -> None:
        self._upstream = upstream
        self._cfg = lookup
        self._key_for = key_for
        self._is_free_generation = is_free_generation
        self._clock = clock
        self._ledger: SettlementSink | None = None
        self._heap: list[tuple[float, int, PendingGeneration]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._limit = asyncio.Semaphore(concurrency)
        self._max_running = concurrency
        self._pacer = pacer
        self._running: set[asyncio.Task[None]] = set()
        self.lookups = 0
        self.owner = "settler-" + secrets.token_hex(8)  # this instance, as the holder of leases
        self.lease_s = lookup.lease_s

    def attach(self, ledger: SettlementSink) -> None:
        self._ledger = ledger

    @property
    def pending(self) -> int:
        return len(self._heap) + len(self._running)

    def delay(self, attempts: int) -> float:
        """Seconds before look-up number `attempts + 1` (attempts already made)."""
        cfg = self._cfg
        return min(cfg.first_delay_s * cfg.factor**attempts, cfg.max_delay_s)

    # -- scheduling ---------------------------------------------------------------

    def schedule(self, record: UsageRecord, *, key: str | None = None, due: float | None = None,
                 created_ts: float | None = None) -> None:
        """Put a record's look-up on the schedule (`due`/`created_ts` spare re-parsing its text times)."""
        if due is None:
            due = parse_iso(record.next_attempt_at) if record.next_attempt_at else self._clock()
        self._push(PendingGeneration.of(record, due, key, created_ts))

    def _push(self, pending: PendingGeneration) -> None:
        heapq.heappush(self._heap, (pending.due, next(self._seq), pending))
        self._wake.set()

    def lease_until(self) -> str:
        """The lease end to stamp on the records this instance writes or renews now."""
        return iso(self._clock() + self.lease_s)

    async def resume(self, store: "Store") -> int:
        """Claim the stored `pending` records nobody holds and put them on the schedule."""
        records = await store.usage.claim_pending(self.owner, self.lease_until(), iso(self._clock()), limit=1_000_000)
        for record in records:
            self.schedule(record)
        if records:
            log.info("resuming cost look-ups for %d pending generations", len(records))
        return len(records)

    async def run_leases(self, store: "Store") -> None:
        """Renew this instance's leases; take over the look-ups of an instance that died."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await store.usage.renew_leases(self.owner, self.lease_until())
                await self.resume(store)
            except Exception:
                log.exception("renewing cost look-up leases failed; retrying")

    async def release(self, store: "Store") -> None:
        """Graceful shutdown (after the last flush): the next instance resumes these at once."""
        await store.usage.release_leases(self.owner)

    # -- running ----------------------------------------------------------------

    def start_due(self) -> list[asyncio.Task[None]]:
        """Start due look-ups, at most `concurrency` at a time (a backlog waits in the heap, not as tasks)."""
        now = self._clock()
        started = []
        while self._heap and self._heap[0][0] <= now and len(self._running) < self._max_running:
            _, _, pending = heapq.heappop(self._heap)
            task = asyncio.ensure_future(self._settle_guarded(pending))
            self._running.add(task)
            task.add_done_callback(self._finished)
            started.append(task)
        return started

    def _finished(self, task: "asyncio.Task[None]") -> None:
        self._running.discard(task)
        self._wake.set()  # a slot is free: the run loop may start the next due look-up

    async def settle_due(self) -> int:
        """Run every due look-up to completion (tests drive time with an injected clock)."""
        done = 0
        while tasks := self.start_due():
            await asyncio.gather(*tasks)
            done += len(tasks)
        return done

    async def run(self) -> None:
        """Start what is due, then sleep until the next look-up is due or a slot frees.

        With every slot busy the wait has no timeout: `_finished` wakes it. (Waiting for
        "the next due time" then would be a timeout of 0 for an overdue backlog: a spin.)
        """
        while True:
            self.start_due()
            self._wake.clear()
            timeout = None
            if self._heap and len(self._running) < self._max_running:
                timeout = max(self._heap[0][0] - self._clock(), 0.001)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        """Cancel look-ups in flight; their records stay `pending` in the store and resume later."""
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    # -- one look-up ---------------------------------------------------------------

    async def _settle_guarded(self, pending: PendingGeneration) -> None:
        try:
            async with self._limit:
                if self._pacer is not None:
                    await self._pacer.acquire()  # spare CPU only, or the floor rate when saturated
                await self.settle(pending)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("settling generation %s failed; will retry", pending.generation_id)
            self._retry_or_give_up(pending)

    async def settle(self, pending: PendingGeneration) -> None:
        key = pending.key or await self._key_for(pending.user_id)
        if key is None:
            log.warning("no OpenRouter key for user %s: generation %s keeps its provisional cost",
                        pending.user_id, pending.generation_id)
            self._finish(pending, UNSETTLED)
            return
        pending.key = key
        pending.attempts += 1
        self.lookups += 1
        try:
            status, body = await self._upstream.call(
                "GET", "/generation?id=" + quote(pending.generation_id, safe=""), key=key, retry=False
            )
        except UpstreamConnectionError as exc:
            log.info("generation look-up for %s could not reach OpenRouter: %s", pending.generation_id, exc)
            status, body = 0, None
        data = body.get("data") if status == 200 and isinstance(body, dict) else None
        cost = to_decimal(data.get("total_cost")) if isinstance(data, dict) else None
        if cost is None or cost < 0:
            self._retry_or_give_up(pending)
            return
        assert isinstance(data, dict)
        self._settled(pending, cost, data)

    def _settled(self, pending: PendingGeneration, cost: Decimal, data: dict[str, Any]) -> None:
        model = data.get("model") if isinstance(data.get("model"), str) else pending.model
        free = pending.free or self._is_free_generation(pending.model, model)
        markup, reason = markup_for(cost, pending.tier, pending.markup_pct, free=free)
        self._apply(pending, Settlement(
            generation_id=pending.generation_id,
            provider_cost=cost,
            markup=markup,
            total_cost=cost + markup,
            markup_reason=reason,
            settle_status=SETTLED,
            settle_attempts=pending.attempts,
            settled_at=iso(self._clock()),
            upstream=orjson.dumps(data, default=str).decode(),
            tokens=authoritative_tokens(data),
        ))

    def _retry_or_give_up(self, pending: PendingGeneration) -> None:
        if pending.attempts >= self._cfg.attempts:
            log.warning("generation %s did not settle after %d look-ups; its provisional cost stands",
                        pending.generation_id, pending.attempts)
            self._finish(pending, UNSETTLED)
            return
        pending.due = self._clock() + self.delay(pending.attempts)
        self._finish(pending, PENDING, next_attempt_at=iso(pending.due))
        self._push(pending)

    def _finish(self, pending: PendingGeneration, status: str, *, next_attempt_at: str | None = None) -> None:
        self._apply(pending, Settlement(
            generation_id=pending.generation_id,
            provider_cost=pending.provider_cost,
            markup=pending.markup,
            total_cost=pending.total_cost,
            markup_reason=pending.markup_reason,
            settle_status=status,
            settle_attempts=pending.attempts,
            next_attempt_at=next_attempt_at,
        ))

    def _apply(self, pending: PendingGeneration, settlement: Settlement) -> None:
        assert self._ledger is not None, "Settler.attach(ledger) first"
        self._ledger.apply(
            settlement, user_id=pending.user_id, created_ts=pending.created_ts, old_total=pending.total_cost
        )
        pending.total_cost = settlement.total_cost
