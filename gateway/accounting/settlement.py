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
from gateway.core.metrics import Metrics
from gateway.core.money import markup_for, number_after, to_decimal
from gateway.store.usage import PENDING, SETTLED, UNSETTLED, Settlement, UsageRecord
from gateway.upstream.client import UpstreamClient, UpstreamConnectionError, parse_json

if TYPE_CHECKING:
    from gateway.store import Store

log = logging.getLogger("gateway.accounting.settlement")

KeyLookup = Callable[[str], Awaitable[str | None]]
DISPATCH_TICK_S = 0.02  # the run loop's shortest sleep: due look-ups are handed over in batches


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
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    due: float
    key: str | None = field(default=None, repr=False)
    reported: bool = False  # the response said what it cost: the look-up audits that figure

    @classmethod
    def of(cls, record: UsageRecord, due: float, key: str | None, created_ts: float | None = None,
           reported: bool = False) -> "PendingGeneration":
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
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            attempts=record.settle_attempts,
            due=due,
            key=key,
            reported=reported,
        )


# the money in a /generation record; each is read exactly from its text (orjson alone would give floats)
GENERATION_MONEY = ("total_cost", "usage", "cache_discount", "upstream_inference_cost")


def generation_data(raw: bytes) -> dict[str, Any] | None:
    """The `data` of a `GET /generation` answer, parsed by orjson with every money field an exact Decimal
    taken from the number's own text; when that text is not unambiguous (the name occurs twice), the
    stdlib's Decimal parse decides. None for anything that is not such an answer."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        return None
    for name in GENERATION_MONEY:
        value = data.get(name)
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
            found = number_after(name).findall(raw)
            if len(found) != 1:
                exact = parse_json(raw).get("data")
                return exact if isinstance(exact, dict) else None
            data[name] = Decimal(found[0].decode())
    return data


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
        metrics: Metrics | None = None,
    ) -> None:
        self._upstream = upstream
        self._metrics = metrics or Metrics()
        self._cfg = lookup
        self._key_for = key_for
        self._is_free_generation = is_free_generation
        self._clock = clock
        self._ledger: SettlementSink | None = None
        self._heap: list[tuple[float, int, PendingGeneration]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._max_running = concurrency
        self._queue: asyncio.Queue[PendingGeneration] = asyncio.Queue(maxsize=concurrency)
        self._workers: list[asyncio.Future[None]] = []
        self._in_flight = 0
        self._handing_over = 0  # 1 while the run loop waits for room in the queue with a look-up in hand
        self._pacer = pacer
        self.lookups = 0
        self.owner = "settler-" + secrets.token_hex(8)  # this instance, as the holder of leases
        self.lease_s = lookup.lease_s

    def attach(self, ledger: SettlementSink) -> None:
        self._ledger = ledger

    @property
    def pending(self) -> int:
        """Look-ups not done yet: scheduled, handed to a worker, or under way (`gateway_settlements_pending`)."""
        return len(self._heap) + self._handing_over + self._queue.qsize() + self._in_flight

    def delay(self, attempts: int) -> float:
        """Seconds before look-up number `attempts + 1` (attempts already made)."""
        cfg = self._cfg
        return min(cfg.first_delay_s * cfg.factor**attempts, cfg.max_delay_s)

    # -- scheduling ---------------------------------------------------------------

    def schedule(self, record: UsageRecord, *, key: str | None = None, due: float | None = None,
                 created_ts: float | None = None, reported: bool = False) -> None:
        """Put a record's look-up on the schedule (`due`/`created_ts` spare re-parsing its text times;
        `reported`: the response carried its cost, which the answer audits)."""
        if due is None:
            due = parse_iso(record.next_attempt_at) if record.next_attempt_at else self._clock()
        self._push(PendingGeneration.of(record, due, key, created_ts, reported))

    def _push(self, pending: PendingGeneration) -> None:
        sooner = not self._heap or pending.due < self._heap[0][0]
        heapq.heappush(self._heap, (pending.due, next(self._seq), pending))
        if sooner:  # the run loop sleeps until the earliest due time: only an earlier one must wake it
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

    def _take_due(self) -> list[PendingGeneration]:
        """Everything due now, off the heap, in due order."""
        now = self._clock()
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        return due

    async def settle_due(self) -> int:
        """Run every due look-up to completion, `concurrency` at a time (tests drive time with a clock)."""
        done = 0
        while due := self._take_due():
            for start in range(0, len(due), self._max_running):
                await asyncio.gather(*(self._settle_guarded(p) for p in due[start:start + self._max_running]))
            done += len(due)
        return done

    async def run(self) -> None:
        """`concurrency` workers take due look-ups from a queue this loop fills: no task per look-up.

        The loop hands over what is due, then sleeps until the next look-up is due (at least
        `DISPATCH_TICK_S`, so a steady stream of records is handed over in batches, not one wake
        each) or a record that is due sooner arrives. A full queue makes it wait for a worker, so a
        backlog waits in the heap, never as tasks or a spin."""
        self._workers = [asyncio.ensure_future(self._work()) for _ in range(self._max_running)]
        try:
            while True:
                await self._hand_over()
                self._wake.clear()
                timeout = max(self._heap[0][0] - self._clock(), DISPATCH_TICK_S) if self._heap else None
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
        finally:
            for worker in self._workers:
                worker.cancel()

    async def _hand_over(self) -> None:
        """Move due look-ups to the workers' queue one at a time, as it has room: the rest stay in the heap
        (and in `pending`)."""
        while self._heap and self._heap[0][0] <= self._clock():
            pending = heapq.heappop(self._heap)[2]
            self._handing_over = 1
            try:
                await self._queue.put(pending)
            finally:
                self._handing_over = 0

    async def _work(self) -> None:
        while True:
            pending = await self._queue.get()
            self._in_flight += 1
            try:
                await self._settle_guarded(pending)
            finally:
                self._in_flight -= 1

    async def stop(self) -> None:
        """Cancel look-ups in flight; their records stay `pending` in the store and resume later."""
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    # -- one look-up ---------------------------------------------------------------

    async def _settle_guarded(self, pending: PendingGeneration) -> None:
        try:
            if self._pacer is not None:  # spare CPU only, or the floor rate when saturated and not behind
                await self._pacer.acquire(self.pending)
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
            status, raw = await self._upstream.fetch(
                "GET", "/generation?id=" + quote(pending.generation_id, safe=""), key=key, retry=False
            )
        except UpstreamConnectionError as exc:
            log.info("generation look-up for %s could not reach OpenRouter: %s", pending.generation_id, exc)
            status, raw = 0, b""
        data = generation_data(raw) if status == 200 else None
        cost = to_decimal(data.get("total_cost")) if data is not None else None
        if cost is None or cost < 0:
            self._retry_or_give_up(pending)
            return
        assert isinstance(data, dict)
        self._settled(pending, cost, data)

    def _settled(self, pending: PendingGeneration, cost: Decimal, data: dict[str, Any]) -> None:
        model = data.get("model") if isinstance(data.get("model"), str) else pending.model
        free = pending.free or self._is_free_generation(pending.model, model)
        markup, reason = markup_for(cost, pending.tier, pending.markup_pct, free=free)
        if pending.reported:
            self._metrics.observe_audit(cost == pending.provider_cost)
        tokens = authoritative_tokens(data)
        self._metrics.observe_generation(
            pending.tier, pending.prompt_tokens if tokens[0] is None else tokens[0],
            pending.completion_tokens if tokens[1] is None else tokens[1], cost + markup, markup)
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
            tokens=tokens,
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
        if status == UNSETTLED:  # final at the provisional figures
            self._metrics.observe_generation(pending.tier, pending.prompt_tokens, pending.completion_tokens,
                                             pending.total_cost, pending.markup)
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
