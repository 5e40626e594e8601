"""The usage ledger: every generation's cost, markup and tokens, recorded off the request path.

`Ledger.record` is the proxy's `Recorder` hook. It turns what the response said (the
`Observation`) and its `Charge` (pricing.py, the same one the limits count) into a
`UsageRecord`, and queues it; nothing on the request path waits on the database. Later
corrections reach the limits through `on_total_changed`. A background writer flushes the queue in one transaction
every `accounting.flush_interval_ms` (0: the writer wakes for each record, so it is
written within milliseconds of the response ending). The `Settler` (settlement.py) then
replaces the provisional cost with OpenRouter's authoritative `total_cost`.

Guarantees:
- One record per generation id (duplicates are dropped by the store's primary key).
- Money is Decimal from the parsed response to the TEXT column; markup comes only from
  `gateway.core.money.markup_for`, with the tier in force when the request was made.
- Graceful shutdown flushes everything (`close`); after kill -9 at most the records of
  the last flush interval are missing. Records whose cost look-up is still pending are
  stored as `pending` with their next attempt time and resume after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
from decimal import Decimal
from typing import Any, Callable

from gateway.accounting.record import build_record
from gateway.accounting.settlement import KeyLookup, Settler
from gateway.auth.tokens import Principal
from gateway.core.clock import Clock, iso, system_clock
from gateway.core.config import Config
from gateway.core.metrics import Metrics
from gateway.proxy.sse import Observation
from gateway.proxy.types import Charge, ProxyRequest
from gateway.security.vault import Vault
from gateway.store import Store
from gateway.store.usage import PENDING, Settlement, UsageRecord

log = logging.getLogger("gateway.accounting.ledger")

TotalChangedCallback = Callable[[str, float, Decimal, Decimal], None]


class Ledger:
    """Queue, batch writer and listeners; the `Settler` it owns settles costs in the background."""

    def __init__(
        self,
        store: Store,
        config: Config,
        *,
        settler: Settler,
        clock: Clock = system_clock,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics or Metrics()
        self._clock = clock
        self.settler = settler
        self.flush_interval_s = config.accounting.flush_interval_ms / 1000
        lookup = config.accounting.generation_lookup
        self._first_delay_s = lookup.first_delay_s
        self._only_missing = lookup.policy == "missing"
        self._audit_fraction = lookup.audit_fraction
        self._sample: Callable[[], float] = random.random
        self._unwritten: dict[str, UsageRecord] = {}
        self._writing: dict[str, UsageRecord] = {}
        self._settlements: list[Settlement] = []
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._total_changed: list[TotalChangedCallback] = []
        self.records_written = 0
        self.records_seen = 0  # grows with traffic: the settler's pacer tells load from its own work
        settler.attach(self)

    # -- listeners ------------------------------------------------------------

    def on_total_changed(self, callback: TotalChangedCallback) -> None:
        """`callback(user_id, created_at_ts, old_total, new_total)` when settling changes a total."""
        self._total_changed.append(callback)

    def _notify(self, callbacks: list[Callable[..., None]], *args: Any) -> None:
        for callback in callbacks:
            try:
                callback(*args)
            except Exception:
                log.exception("accounting listener failed")

    # -- the proxy hook ---------------------------------------------------------

    def record(self, principal: Principal, request: ProxyRequest, observation: Observation, charge: Charge) -> None:
        """Queue the generation's record; never blocks, never raises into the proxy."""
        self.records_seen += 1
        first_lookup_at = self._clock() + self._first_delay_s
        # policy `missing`: a response that said what it cost is final as reported, but for an audited sample
        complete = charge.cost_reported and not request.cancelled and observation.error is None
        look_up = not (self._only_missing and complete) or self._sample() < self._audit_fraction
        try:
            record = build_record(principal, request, observation, charge, first_lookup_at=first_lookup_at,
                                  look_up=look_up)
        except Exception:
            log.exception("could not build a usage record for request %s", request.request_id)
            return
        if record.generation_id in self._unwritten:
            return  # the same generation reported twice: one record
        self._unwritten[record.generation_id] = record
        if record.settle_status != PENDING:  # final already; a pending one is counted once it settles
            self._metrics.observe_generation(record.tier, record.prompt_tokens, record.completion_tokens,
                                             record.total_cost, record.markup)
        elif principal.key is not None:
            self.settler.schedule(record, key=principal.key.secret, due=first_lookup_at, created_ts=request.started,
                                  reported=complete)
        if self.flush_interval_s == 0:
            self._wake.set()

    # -- reading back (before and after the write) -----------------------------

    def unwritten(self, generation_id: str) -> UsageRecord | None:
        return self._unwritten.get(generation_id) or self._writing.get(generation_id)

    async def lookup(self, generation_id: str) -> UsageRecord | None:
        """The record as it stands now, whether or not it has reached the database yet."""
        record = self.unwritten(generation_id)
        if record is not None:
            return record
        return await self._store.usage.get(generation_id)

    # -- settlement results (called by the Settler) ----------------------------

    def apply(self, settlement: Settlement, *, user_id: str, created_ts: float, old_total: Decimal) -> None:
        """Apply a look-up's outcome: in place if the record is still queued, else as an update."""
        queued = self._unwritten.get(settlement.generation_id)
        if queued is not None:
            settlement.apply_to(queued)
        else:
            writing = self._writing.get(settlement.generation_id)
            if writing is not None:  # in the batch being written: mirror it for readers meanwhile
                settlement.apply_to(writing)
            self._settlements.append(settlement)
        if settlement.total_cost != old_total:
            self._notify(self._total_changed, user_id, created_ts, old_total, settlement.total_cost)
        if self.flush_interval_s == 0:
            self._wake.set()

    # -- the writer -------------------------------------------------------------

    @property
    def backlog(self) -> int:
        return len(self._unwritten) + len(self._settlements)

    async def flush(self) -> int:
        """Write everything queued in one transaction; on failure it stays queued for the next try."""
        async with self._flush_lock:
            if not self._unwritten and not self._settlements:
                return 0
            self._writing, self._unwritten = self._unwritten, {}
            settlements, self._settlements = self._settlements, []
            records = list(self._writing.values())
            lease_until = self.settler.lease_until()
            for record in records:
                if record.settle_status == PENDING:  # this instance holds its look-up
                    record.lease_owner, record.lease_until = self.settler.owner, lease_until
            try:
                await self._store.usage.write(records, settlements)
            except BaseException:
                self._unwritten = {**self._writing, **self._unwritten}
                self._settlements = settlements + self._settlements
                raise
            finally:
                self._writing = {}
            self.records_written += len(records)
            return len(records)

    async def run_writer(self) -> None:
        """Flush every `flush_interval_ms` (or as soon as something is queued when it is 0).

        Flushes start on a fixed cadence, each one early by the time the last write took, so a record is
        committed about `flush_interval_ms` after it was queued (sleeping a full interval after each write
        made it the interval plus the write: kill -9 lost records older than promised)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.flush_interval_s
        while True:
            if self.flush_interval_s == 0:
                await self._wake.wait()
                self._wake.clear()
            else:
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            started = loop.time()
            try:
                await self.flush()
            except Exception:
                log.exception("writing usage records failed; they stay queued and are retried")
                await asyncio.sleep(max(self.flush_interval_s, 0.5))
            took = loop.time() - started
            next_at = started + max(self.flush_interval_s - took, 0.0)

    async def run_retention(self, days: int, *, every_s: float = 3600) -> None:
        """`jobs.usage_retention_days`: drop finished records older than that, hourly."""
        while True:
            try:
                removed = await self._store.usage.delete_before(iso(self._clock() - days * 86400))
                if removed:
                    log.info("usage retention removed %d records older than %d days", removed, days)
            except Exception:
                log.exception("usage retention failed; retrying later")
            await asyncio.sleep(every_s)

    async def close(self) -> None:
        """Shutdown: stop settling (pending look-ups stay stored as pending) and flush everything."""
        await self.settler.stop()
        for attempt in range(5):
            try:
                await self.flush()
                await self.settler.release(self._store)
                return
            except Exception:
                log.exception("final usage flush failed (attempt %d)", attempt + 1)
                await asyncio.sleep(0.2 * (attempt + 1))


def key_lookup(store: Store, vault: Vault) -> KeyLookup:
    """The user's current decrypted OpenRouter key, for look-ups resumed after a restart."""

    async def lookup(user_id: str) -> str | None:
        row = await store.keys.get(user_id)
        if row is None:
            return None
        try:
            return vault.decrypt(row["ciphertext"])
        except Exception:
            log.error("the stored key of user %s cannot be decrypted; its generations stay provisional", user_id)
            return None

    return lookup


__all__ = ["Ledger", "key_lookup"]
