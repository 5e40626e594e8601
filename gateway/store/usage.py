"""Usage records: one row per generation, written in batches, summed exactly.

Money columns are TEXT holding exact decimal strings; every sum happens here in
`Decimal` (SQL `SUM` over TEXT would go through float), so the API, the CLI and the
limits engine all see the same figures to the last digit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from decimal import Decimal
from typing import Any, Iterable, Sequence

from gateway.core.clock import Clock, system_clock
from gateway.store.database import Database, Row

PENDING, SETTLED, UNSETTLED = "pending", "settled", "unsettled"
# final at the cost the response itself reported, never looked up (`generation_lookup.policy: missing`)
REPORTED = "reported"
FINAL = (SETTLED, REPORTED)  # a figure that will not change


@dataclass(slots=True)
class UsageRecord:
    """What the gateway knows about one generation (SPEC §5); money as exact Decimal."""

    generation_id: str
    user_id: str
    token_id: str | None
    request_id: str | None
    endpoint: str
    model_requested: str | None
    model: str | None
    provider: str | None
    streamed: bool
    cancelled: bool
    finish_reason: str | None
    error: str | None
    status: int | None
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    provisional_cost: Decimal
    provider_cost: Decimal
    markup: Decimal
    total_cost: Decimal
    markup_pct: Decimal
    markup_reason: str
    free: bool
    tier: str
    latency_ms: int | None
    created_at: str
    settled_at: str | None = None
    settle_status: str = PENDING
    settle_attempts: int = 0
    next_attempt_at: str | None = None
    upstream: str | None = None  # the upstream /generation stats as JSON, once settled
    lease_owner: str | None = None  # the instance whose settler holds this pending look-up …
    lease_until: str | None = None  # … until then, unless it renews (see `claim_pending`)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_params(self) -> tuple[Any, ...]:
        """Row values in `COLUMNS` order. Spelled out: it runs for every record of every batch."""
        return (
            self.generation_id, self.user_id, self.token_id, self.request_id, self.endpoint,
            self.model_requested, self.model, self.provider, int(self.streamed), int(self.cancelled),
            self.finish_reason, self.error, self.status, self.prompt_tokens, self.completion_tokens,
            self.reasoning_tokens, self.cached_tokens, format(self.provisional_cost, "f"),
            format(self.provider_cost, "f"), format(self.markup, "f"), format(self.total_cost, "f"),
            format(self.markup_pct, "f"), self.markup_reason, int(self.free), self.tier, self.latency_ms,
            self.created_at, self.settled_at, self.settle_status, self.settle_attempts, self.next_attempt_at,
            self.upstream, self.lease_owner, self.lease_until,
        )

    @classmethod
    def from_row(cls, row: Row) -> "UsageRecord":
        values = dict(row)
        for name in MONEY:
            values[name] = Decimal(values[name])
        for name in FLAGS:
            values[name] = bool(values[name])
        return cls(**{name: values[name] for name in COLUMNS})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = tuple(f.name for f in fields(UsageRecord))
MONEY = ("provisional_cost", "provider_cost", "markup", "total_cost", "markup_pct")
FLAGS = ("streamed", "cancelled", "free")
_INSERT = (
    f"INSERT INTO usage_records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
    " ON CONFLICT (generation_id) DO NOTHING"
)
_SETTLE = (
    "UPDATE usage_records SET provider_cost = ?, markup = ?, total_cost = ?, markup_reason = ?, settled_at = ?,"
    " settle_status = ?, settle_attempts = ?, next_attempt_at = ?, upstream = ?,"
    " prompt_tokens = COALESCE(?, prompt_tokens), completion_tokens = COALESCE(?, completion_tokens),"
    " reasoning_tokens = COALESCE(?, reasoning_tokens), cached_tokens = COALESCE(?, cached_tokens)"
    " WHERE generation_id = ?"
)


@dataclass(slots=True, frozen=True)
class Settlement:
    """A change to a record's cost look-up: a retry scheduled, an answer, or giving up."""

    generation_id: str
    provider_cost: Decimal
    markup: Decimal
    total_cost: Decimal
    markup_reason: str
    settle_status: str
    settle_attempts: int
    settled_at: str | None = None
    next_attempt_at: str | None = None
    upstream: str | None = None
    # (prompt, completion, reasoning, cached) from the authoritative record; None keeps ours
    tokens: tuple[int | None, int | None, int | None, int | None] = (None, None, None, None)

    def as_params(self) -> tuple[Any, ...]:
        return (
            format(self.provider_cost, "f"),
            format(self.markup, "f"),
            format(self.total_cost, "f"),
            self.markup_reason,
            self.settled_at,
            self.settle_status,
            self.settle_attempts,
            self.next_attempt_at,
            self.upstream,
            *self.tokens,
            self.generation_id,
        )

    def apply_to(self, record: UsageRecord) -> None:
        """The same change on a record still held in memory (not yet written)."""
        record.provider_cost, record.markup, record.total_cost = self.provider_cost, self.markup, self.total_cost
        record.markup_reason, record.settle_status = self.markup_reason, self.settle_status
        record.settle_attempts, record.settled_at = self.settle_attempts, self.settled_at
        record.next_attempt_at, record.upstream = self.next_attempt_at, self.upstream
        prompt, completion, reasoning, cached = self.tokens
        record.prompt_tokens = record.prompt_tokens if prompt is None else prompt
        record.completion_tokens = record.completion_tokens if completion is None else completion
        record.reasoning_tokens = record.reasoning_tokens if reasoning is None else reasoning
        record.cached_tokens = record.cached_tokens if cached is None else cached


class UsageRepository:
    def __init__(self, db: Database, clock: Clock = system_clock) -> None:
        self._db = db
        self._clock = clock

    async def write(self, records: Sequence[UsageRecord], settlements: Sequence[Settlement] = ()) -> None:
        """One batch in one transaction: new records first, then settlements (which may name them).

        A generation id already stored is left as it is, so a batch replayed after a
        crash between commit and acknowledgement cannot double-count.
        """
        if not records and not settlements:
            return
        async with self._db.transaction() as tx:
            if records:
                await tx.executemany(_INSERT, [r.as_params() for r in records])
            if settlements:
                await tx.executemany(_SETTLE, [s.as_params() for s in settlements])

    async def get(self, generation_id: str) -> UsageRecord | None:
        row = await self._db.fetchone("SELECT * FROM usage_records WHERE generation_id = ?", (generation_id,))
        return UsageRecord.from_row(row) if row else None

    async def count(self) -> int:
        row = await self._db.fetchone("SELECT COUNT(*) AS n FROM usage_records")
        return int(row["n"]) if row else 0

    async def pending(self, *, limit: int = 10_000) -> list[UsageRecord]:
        """Records whose cost look-up is still due (resumed after a restart), soonest first."""
        rows = await self._db.fetchall(
            "SELECT * FROM usage_records WHERE settle_status = ? ORDER BY next_attempt_at LIMIT ?", (PENDING, limit)
        )
        return [UsageRecord.from_row(r) for r in rows]

    async def claim_pending(self, owner: str, until_iso: str, now_iso: str, *, limit: int = 100_000
                            ) -> list[UsageRecord]:
        """Take the lease of pending look-ups nobody holds (or whose holder let it run out).

        One transaction: SQLite serialises it; PostgreSQL locks the rows it claims and
        skips rows another instance is claiming, so each record goes to one instance.
        """
        sql = ("SELECT * FROM usage_records WHERE settle_status = ? AND (lease_until IS NULL OR lease_until < ?)"
               " ORDER BY next_attempt_at LIMIT ?")
        if self._db.dialect == "postgres":
            sql += " FOR UPDATE SKIP LOCKED"
        async with self._db.transaction() as tx:
            rows = await tx.fetchall(sql, (PENDING, now_iso, limit))
            if rows:
                await tx.executemany("UPDATE usage_records SET lease_owner = ?, lease_until = ? WHERE generation_id = ?",
                                     [(owner, until_iso, row["generation_id"]) for row in rows])
        claimed = [UsageRecord.from_row(r) for r in rows]
        for record in claimed:
            record.lease_owner, record.lease_until = owner, until_iso
        return claimed

    async def renew_leases(self, owner: str, until_iso: str) -> int:
        return await self._db.execute("UPDATE usage_records SET lease_until = ? WHERE lease_owner = ? AND settle_status = ?",
                                      (until_iso, owner, PENDING))

    async def release_leases(self, owner: str) -> int:
        """At a graceful shutdown: the next instance to start resumes these at once."""
        return await self._db.execute(
            "UPDATE usage_records SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ? AND settle_status = ?",
            (owner, PENDING))

    async def spend_since(self, since_iso: str, *, user_id: str | None = None, until_iso: str | None = None
                          ) -> dict[str, Decimal]:
        """Per user, the sum of `total_cost` (provider cost + markup; provisional while unsettled)
        of records created at or after `since_iso` (and before `until_iso`). Exact: summed in Decimal, not SQL."""
        sql = "SELECT user_id, total_cost FROM usage_records WHERE created_at >= ?"
        params: list[Any] = [since_iso]
        if until_iso is not None:
            sql += " AND created_at < ?"
            params.append(until_iso)
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        totals: dict[str, Decimal] = {}
        for row in await self._db.fetchall(sql, params):
            totals[row["user_id"]] = totals.get(row["user_id"], Decimal(0)) + Decimal(row["total_cost"])
        return totals

    async def between(
        self, since_iso: str, until_iso: str | None = None, *, user_id: str | None = None
    ) -> list[UsageRecord]:
        """Records created in [since, until), oldest first: the input of every usage report."""
        sql = "SELECT * FROM usage_records WHERE created_at >= ?"
        params: list[Any] = [since_iso]
        if until_iso is not None:
            sql += " AND created_at < ?"
            params.append(until_iso)
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        rows = await self._db.fetchall(sql + " ORDER BY created_at, generation_id", params)
        return [UsageRecord.from_row(r) for r in rows]

    async def delete_before(self, before_iso: str, *, statuses: Iterable[str] = (SETTLED, REPORTED, UNSETTLED)) -> int:
        """Retention: drop finished records older than `before_iso` (pending ones are kept)."""
        total = 0
        for status in statuses:
            total += await self._db.execute(
                "DELETE FROM usage_records WHERE created_at < ? AND settle_status = ?", (before_iso, status)
            )
        return total
