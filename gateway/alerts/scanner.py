"""What fires an alert: a check every `alerts.check_interval_s` that writes due events to the outbox.

Why a periodic check over the stored figures rather than a hook on the request path: the hot path stays
as it is, every instance sees the same database, and an event missed while an instance was down is
found at the next check. Each event has a `dedupe_key`, so checking again (or on several instances)
never sends it twice:

- `budget.threshold`: spend this UTC day / month at or over each fraction of the user's daily / monthly
  budget (tier with the user's overrides): once per user, period and fraction;
- `credits.low`: a user's last synced balance under `accounting.low_balance_usd`: once per user per UTC day;
- `key.disabled`, `emergency_stop.changed`: from the audit log, once per entry, from where the last
  check stopped (entries from before alerts were first switched on are not replayed).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from decimal import Decimal
from typing import Any, Callable

import orjson

from gateway.core import windows
from gateway.core.clock import Clock, iso, system_clock
from gateway.core.config import Config
from gateway.limits.policy import Limits
from gateway.store import Store

log = logging.getLogger("gateway.alerts")
AUDIT_EVENTS = {"key.managed.disable": "key.disabled", "emergency_stop.on": "emergency_stop.changed",
                "emergency_stop.off": "emergency_stop.changed"}
AUDIT_MARK = "audit_cursor"
BUDGET_PERIODS = (("day", "daily_budget_usd"), ("month", "monthly_budget_usd"))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class AlertScanner:
    def __init__(self, store: Store, config: Config, *, clock: Clock = system_clock,
                 on_enqueued: Callable[[], None] = lambda: None) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._on_enqueued = on_enqueued
        self.checked_at: float | None = None  # the end of this instance's last complete check

    async def check(self) -> int:
        """One pass over every source; returns how many deliveries it added to the outbox."""
        added = await self._budgets() + await self._low_credits() + await self._audit()
        self.checked_at = self._clock()
        if added:
            self._on_enqueued()
        return added

    async def run(self, interval_s: float) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("alert check failed; trying again at the next interval")
            await asyncio.sleep(interval_s)

    # -- sources --------------------------------------------------------------------

    async def _budgets(self) -> int:
        now = self._clock()
        added = 0
        thresholds = self._config.alerts.budget_thresholds
        for period, name in BUDGET_PERIODS:
            start = windows.period_start(period, now)
            spend = await self._store.usage.spend_since(iso(start.timestamp()))
            for user_id, spent in sorted(spend.items()):
                user = await self._store.users.get(user_id)
                if user is None:
                    continue
                budget: Decimal | None = getattr(Limits.of(self._config.tier(user["tier"]), user["overrides"]), name)
                if not budget:
                    continue
                for fraction in thresholds:
                    if spent < budget * fraction:
                        continue
                    key = f"budget.threshold:{user_id}:{period}:{start.date().isoformat()}:{fraction}"
                    added += await self._enqueue("budget.threshold", key, user_id, {
                        "user_id": user_id, "tier": user["tier"], "period": period,
                        "period_start": iso(start.timestamp()), "threshold": fraction, "budget_usd": budget,
                        "spent_usd": spent,
                    })
        return added

    async def _low_credits(self) -> int:
        low = self._config.accounting.low_balance_usd
        day = iso(self._clock())[:10]
        added = 0
        for row in await self._store.account.low_balances(low, limit=1000):
            added += await self._enqueue("credits.low", f"credits.low:{row['user_id']}:{day}", row["user_id"], {
                "user_id": row["user_id"], "balance_usd": row["balance"], "low_balance_usd": low,
                "synced_at": row["synced_at"],
            })
        return added

    async def _audit(self) -> int:
        alerts = self._store.alerts
        mark = await alerts.mark(AUDIT_MARK)
        if mark is None:  # first check ever: start from now, do not replay history
            await alerts.set_mark(AUDIT_MARK, str(await alerts.last_audit_id()))
            return 0
        added, cursor = 0, int(mark)
        for row in await alerts.audit_after(cursor, tuple(AUDIT_EVENTS)):
            event = AUDIT_EVENTS[row["action"]]
            details = orjson.loads(row["details"] or "{}")
            data: dict[str, Any] = {"at": row["at"], "user_id": row["user_id"]}
            if event == "emergency_stop.changed":
                data = {"at": row["at"], "enabled": row["action"] == "emergency_stop.on", "reason": details.get("reason")}
            added += await self._enqueue(event, f"audit:{row['id']}", row["user_id"], data)
            cursor = max(cursor, int(row["id"]))
        if cursor != int(mark):
            await alerts.set_mark(AUDIT_MARK, str(cursor))
        return added

    # -- the outbox -------------------------------------------------------------------

    async def _enqueue(self, event: str, key: str, user_id: str | None, data: dict[str, Any]) -> int:
        """One delivery per webhook that wants `event`; the body (and so its signature) is fixed now."""
        event_id = "evt_" + _digest(key)
        body = orjson.dumps({"id": event_id, "type": event, "created_at": iso(self._clock()), "data": data},
                            default=str).decode()
        added = 0
        for webhook in self._config.alerts.webhooks:
            if event not in webhook.events:
                continue
            delivery_key = f"{key}:{_digest(webhook.url)}"
            if await self._store.alerts.enqueue(id="alr_" + _digest(delivery_key), dedupe_key=delivery_key,
                                                event=event, user_id=user_id, webhook=webhook.url, payload=body):
                added += 1
                log.info("alert %s queued for %s", event, user_id or "-", extra={"event_id": event_id})
        return added
