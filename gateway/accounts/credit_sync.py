"""The credit-sync job: every user's OpenRouter credits refreshed into the database.

Why a job: `GET /v1/account` and the admin's views show credits without asking
OpenRouter on every read. The job runs every `jobs.credit_sync_interval_s` (0 = never;
the last run time is shared through the store, so several instances don't each run it)
and makes at most `jobs.credit_sync_rate_per_s` upstream calls per second, so a large
user base never trips OpenRouter's rate limits. `POST /v1/account/sync` (one user, not
paced: it is that user's own key), `POST /admin/v1/credits/sync` and
`gateway sync-credits [--user]` run it now. A failed look-up keeps the last good numbers
and records the error next to them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from gateway.core.clock import Clock, iso, system_clock
from gateway.core.errors import BadGateway, PaymentRequired
from gateway.security.vault import Vault, VaultError
from gateway.store import Store
from gateway.upstream.client import UpstreamClient
from gateway.upstream.credits import CreditsUnavailable, Pace, fetch_credits

if TYPE_CHECKING:

    pass

log = logging.getLogger("gateway.accounts.credit_sync")
LAST_RUN = "credit_sync_last_run"
PAGE = 200
Progress = Callable[[int, int], None]


@dataclass
class SyncReport:
    users: int = 0
    synced: int = 0
    failed: int = 0
    skipped: int = 0
    started_at: str = ""
    finished_at: str | None = None

    def public(self) -> dict[str, Any]:
        return asdict(self)


class Pacer:
    """At most `rate_per_s` calls per second, spaced evenly (shared by every run of one job)."""

    def __init__(self, rate_per_s: float, *, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._interval = 1.0 / rate_per_s
        self._monotonic = monotonic
        self._sleep = sleep
        self._next = 0.0
        self.calls = 0

    async def __call__(self) -> None:
        now = self._monotonic()
        slot = max(now, self._next)
        self._next = slot + self._interval
        self.calls += 1
        if slot > now:
            await self._sleep(slot - now)


class CreditSync:
    def __init__(self, store: Store, vault: Vault, upstream: UpstreamClient, *, rate_per_s: float,
                 clock: Clock = system_clock, pacer: Pacer | None = None) -> None:
        self._store = store
        self._vault = vault
        self._upstream = upstream
        self._clock = clock
        self.pacer = pacer or Pacer(rate_per_s)
        self.current: SyncReport | None = None
        self._running: asyncio.Task[SyncReport] | None = None

    async def _sync(self, user_id: str, pace: Pace) -> str:
        """Refresh one user's credits; returns "synced", "failed" or "skipped" (no usable key)."""
        row = await self._store.keys.get(user_id)
        if row is None or row["disabled"]:
            return "skipped"
        try:
            key = self._vault.decrypt(row["ciphertext"])
        except VaultError:
            await self._store.account.put_sync_error(user_id, "the stored key cannot be decrypted")
            return "failed"
        try:
            credits = await fetch_credits(self._upstream, key, pace=pace)
        except CreditsUnavailable as exc:
            await self._store.account.put_sync_error(user_id, str(exc))
            return "failed"
        await self._store.account.put_credits(
            user_id, total_credits=credits.total_credits, total_usage=credits.total_usage, source=credits.source
        )
        return "synced"

    async def sync_user(self, user_id: str) -> None:
        """Sync one user now (their own key, so not paced); errors say what to do."""
        outcome = await self._sync(user_id, _unpaced)
        if outcome == "skipped":
            raise PaymentRequired("No usable OpenRouter key is connected to this account; connect one with "
                                  "`PUT /v1/account/openrouter-key {\"api_key\": \"sk-or-...\"}`.")
        if outcome == "failed":
            row = await self._store.account.credits(user_id)
            error = row["error"] if row else "unknown error"
            raise BadGateway(f"The credits could not be synced: {error}. The last synced values are kept; try again "
                             "later, or connect a new key if OpenRouter rejected this one.")

    async def sync_all(self, *, user_id: str | None = None, progress: Progress | None = None) -> SyncReport:
        """Sync every user with a key (or just `user_id`), paced."""
        report = SyncReport(started_at=iso(self._clock()))
        self.current = report
        if user_id is not None:
            report.users = 1
            ids: Any = _one(user_id)
        else:
            report.users = await self._store.account.users_with_keys()
            ids = self._all_ids()
        done = 0
        async for uid in ids:
            outcome = await self._sync(uid, self.pacer)
            setattr(report, outcome, getattr(report, outcome) + 1)
            done += 1
            if progress is not None:
                progress(done, max(report.users, done))
        report.users = max(report.users, done)
        report.finished_at = iso(self._clock())
        log.info("credit sync: %s", report.public())
        return report

    async def _all_ids(self) -> Any:
        after = ""
        while True:
            rows = await self._store.keys.page(after_user_id=after, limit=PAGE)
            for row in rows:
                yield row["user_id"]
            if len(rows) < PAGE:
                return
            after = rows[-1]["user_id"]

    async def stop(self) -> None:
        """Cancel a run in progress (shutdown: the store is about to close)."""
        if self._running is not None and not self._running.done():
            self._running.cancel()
            await asyncio.gather(self._running, return_exceptions=True)

    def start(self) -> asyncio.Task[SyncReport]:
        """A full sync in the background, or the one already running (concurrent asks share it)."""
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self.sync_all())
            self._running.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self._running

    async def run_periodically(self, interval_s: float, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Every `interval_s`, counted from the last run of any instance (kept in the store)."""
        while True:
            try:
                last = await self._store.state.get(LAST_RUN)
                wait = (float(last) + interval_s - self._clock()) if last else 0.0
                if wait <= 0:
                    await self._store.state.set(LAST_RUN, repr(self._clock()))
                    await self.start()
                    wait = interval_s
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("credit sync failed; retrying at the next interval")
                wait = interval_s
            await sleep(min(wait, interval_s))


async def _unpaced() -> None:
    return None


async def _one(user_id: str) -> Any:
    yield user_id
