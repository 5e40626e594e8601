"""Pruning the change feed: one instance at a time drops rows older than `jobs.change_feed_retention_s`.

An instance reads only the feed's last seconds (it starts from the latest row), so old rows are dead
weight that every poll's index walk and every backup carries. The pruning instance holds a job lease it
renews each run; if it dies, another takes over once the lease has run out.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from gateway.core.clock import Clock, iso, system_clock
from gateway.store import Store

log = logging.getLogger("gateway.auth.feed_pruning")
JOB = "change_feed_pruning"


class FeedPruning:
    def __init__(self, store: Store, *, retention_s: float, clock: Clock = system_clock) -> None:
        self._store = store
        self._clock = clock
        self.retention_s = retention_s
        self.every_s = min(3600.0, retention_s / 2)
        self.owner = "pruner-" + secrets.token_hex(8)

    async def prune_once(self) -> int | None:
        """Prune if this instance holds (or takes) the lease; None when another instance does it."""
        now = self._clock()
        if not await self._store.leases.claim(JOB, self.owner, until_iso=iso(now + 3 * self.every_s),
                                              now_iso=iso(now)):
            return None
        removed = await self._store.changes.prune(iso(now - self.retention_s))
        if removed:
            log.info("change feed: pruned %d rows older than %g s (job lease holder %s)", removed, self.retention_s,
                     self.owner)
        return removed

    async def run(self) -> None:
        while True:
            try:
                await self.prune_once()
            except Exception:
                log.exception("pruning the change feed failed; retrying later")
            await asyncio.sleep(self.every_s)
