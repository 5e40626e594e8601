"""Limit counters in Redis, shared by every instance (`redis.url`).

One Lua script per admission reads every counter of the user, applies the same rules as
`limits.first_refusal`, and only if nothing refuses counts the request and stores its
reservation, all atomically on the Redis server: two instances can never both take the
last slot or the last dollar. Settles are queued and written in one MULTI per event-loop
turn (an admission of the same user waits for them on this instance). Nothing is
read-modified-written from Python.

Layout, all keys of a user in one hash slot (`{user}`):
- `gw:l:{user}:m` / `:h` / `:t`: hashes bucket → count, the sliding windows of
  `gateway.windows` (one-second buckets for the minute, one-minute buckets for the hour
  and for tokens), so both backends count the same way.
- `:f` a sorted set ticket → lease deadline (in flight; a crashed instance's requests
  stop counting when their lease ends) and `:r` a hash ticket → reserved charge.
- `:s:day:2025-01-31`, `:s:week:…`, `:s:month:2025-01`, `:s:all`: charged spend.
Money is stored as integer picodollars (10⁻¹² USD; reservations rounded up), so Redis
adds integers and Python converts back to Decimal; a float never holds money.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from decimal import Decimal
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.core.errors import ServiceUnavailable
from gateway.core.money import from_pico, to_pico
from gateway.core.windows import PERIODS, period_id
from gateway.limits.policy import (
    HOUR_BUCKET_S,
    MINUTE_BUCKET_S,
    Limits,
    Refusal,
    Snapshot,
)

log = logging.getLogger("gateway.limits.limiter")

PERIOD_TTL_S = {"day": 3 * 86400, "week": 15 * 86400, "month": 63 * 86400}
WINDOW_TTL_S = {"m": 120, "h": 7200, "t": 7200}

# KEYS: 1 minute, 2 hour, 3 tokens, 4 in flight, 5 reservations, 6 day, 7 week, 8 month, 9 all
# ARGV: 1 now, 2 rpm, 3 rph, 4 concurrent, 5 tokens/h, 6 day budget, 7 month budget (pico),
#       8 reserve (pico), 9 free, 10 ticket, 11 lease deadline, 12 minute bucket, 13 hour bucket, 14 lease ttl
# Limits are -1 when unlimited. Returns {refused or "", minute, hour, tokens, inflight, reserved, day, week, month, all}.
ADMIT = """
local function window(key, oldest)
  local raw = redis.call('HGETALL', key)
  local total, kept, stale = 0, {}, {}
  for i = 1, #raw, 2 do
    if tonumber(raw[i]) < oldest then
      stale[#stale + 1] = raw[i]
    else
      total = total + tonumber(raw[i + 1])
      kept[#kept + 1] = raw[i]
      kept[#kept + 1] = raw[i + 1]
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  return total, kept
end
local minute_bucket, hour_bucket = tonumber(ARGV[12]), tonumber(ARGV[13])
local minute, minute_kept = window(KEYS[1], minute_bucket - 59)
local hour, hour_kept = window(KEYS[2], hour_bucket - 59)
local tokens, tokens_kept = window(KEYS[3], hour_bucket - 59)
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[1])
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[1])
  redis.call('HDEL', KEYS[5], unpack(expired))
end
local inflight = redis.call('ZCARD', KEYS[4])
local reserved = 0
for _, v in ipairs(redis.call('HVALS', KEYS[5])) do reserved = reserved + tonumber(v) end
local day = redis.call('GET', KEYS[6]) or '0'
local week = redis.call('GET', KEYS[7]) or '0'
local month = redis.call('GET', KEYS[8]) or '0'
local all = redis.call('GET', KEYS[9]) or '0'
local function over(limit, used) return tonumber(limit) >= 0 and used >= tonumber(limit) end
local refused = ''
if over(ARGV[2], minute) then refused = 'requests_per_minute'
elseif over(ARGV[3], hour) then refused = 'requests_per_hour'
elseif over(ARGV[4], inflight) then refused = 'max_concurrent'
elseif over(ARGV[5], tokens) then refused = 'tokens_per_hour'
elseif ARGV[9] == '0' and over(ARGV[6], tonumber(day) + reserved) then refused = 'daily_budget_usd'
elseif ARGV[9] == '0' and over(ARGV[7], tonumber(month) + reserved) then refused = 'monthly_budget_usd'
end
if refused == '' then
  redis.call('HINCRBY', KEYS[1], ARGV[12], 1)
  redis.call('EXPIRE', KEYS[1], 120)
  redis.call('HINCRBY', KEYS[2], ARGV[13], 1)
  redis.call('EXPIRE', KEYS[2], 7200)
  redis.call('ZADD', KEYS[4], ARGV[11], ARGV[10])
  redis.call('HSET', KEYS[5], ARGV[10], ARGV[8])
  redis.call('EXPIRE', KEYS[4], ARGV[14])
  redis.call('EXPIRE', KEYS[5], ARGV[14])
end
return {refused, minute_kept, hour_kept, tokens_kept, inflight, string.format('%.0f', reserved),
        day, week, month, all}
"""


def _buckets(flat: list[Any]) -> dict[int, int]:
    """Bucket → count in ascending bucket order (Snapshot's contract; Redis hashes are unordered)."""
    return dict(sorted((int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)))


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class RedisCounters:
    def __init__(self, client: aioredis.Redis, *, lease_s: float) -> None:
        self._redis = client
        self._admit = client.register_script(ADMIT)
        self._lease_s = lease_s
        self._ops: list[Callable[[Any], None]] = []
        self._dirty: set[str] = set()  # users with queued updates
        self._writing: set[str] = set()  # users whose updates are being written
        self._flushing: asyncio.Task[None] | None = None
        self._ticket_prefix = secrets.token_hex(6) + "-"  # ticket ids are unique across instances
        self._tickets = itertools.count()

    @classmethod
    async def connect(cls, url: str, *, lease_s: float) -> "RedisCounters":
        client = aioredis.from_url(url, decode_responses=True)
        try:
            await client.ping()
        except RedisError as exc:
            await client.aclose()
            raise RuntimeError(f"redis.url: Redis at the configured URL is not reachable ({type(exc).__name__})") from None
        return cls(client, lease_s=lease_s)

    @staticmethod
    def _key(user_id: str, part: str) -> str:
        return f"gw:l:{{{user_id}}}:{part}"

    def _spend_keys(self, user_id: str, at: float) -> list[str]:
        return [self._key(user_id, f"s:{p}:{period_id(p, at)}") for p in PERIODS] + [self._key(user_id, "s:all")]

    async def _settled(self, user_id: str) -> None:
        """Let this instance's own settles of the user land first, so its next admission sees them."""
        task = self._flushing
        if task is not None and not task.done() and (user_id in self._dirty or user_id in self._writing):
            await asyncio.shield(task)

    def _later(self, user_id: str, op: Callable[[Any], None]) -> None:
        """Queue a counter update; one background MULTI per event-loop turn carries all queued ones."""
        self._ops.append(op)
        self._dirty.add(user_id)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._ops:
            ops, self._ops = self._ops, []
            self._writing, self._dirty = self._dirty, set()
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    for op in ops:
                        op(pipe)
                    await pipe.execute()
            except RedisError as exc:
                # reservations then lapse with their lease; spend is lost for this batch
                log.error("updating %d limit counters in Redis failed: %s", len(ops), exc)
            finally:
                self._writing = set()

    async def acquire(self, user_id: str, limits: Limits, reserve: int, free: bool, now: float) -> str:
        await self._settled(user_id)
        ticket_id = self._ticket_prefix + str(next(self._tickets))
        key = self._key
        keys = [key(user_id, "m"), key(user_id, "h"), key(user_id, "t"), key(user_id, "f"), key(user_id, "r"),
                *self._spend_keys(user_id, now)]
        args: list[Any] = [
            repr(now), _limit(limits.requests_per_minute), _limit(limits.requests_per_hour),
            _limit(limits.max_concurrent), _limit(limits.tokens_per_hour),
            -1 if limits.daily_budget_usd is None else limits.daily_cap_pico,
            -1 if limits.monthly_budget_usd is None else limits.monthly_cap_pico,
            reserve, "1" if free else "0", ticket_id, repr(now + self._lease_s),
            int(now // MINUTE_BUCKET_S), int(now // HOUR_BUCKET_S), int(self._lease_s) + 1,
        ]
        try:
            result = await self._admit(keys=keys, args=args)
        except RedisError as exc:
            raise _unavailable(exc) from None
        refused, minute, hour, tokens, inflight, reserved, day, week, month, total = result
        snapshot = Snapshot(
            minute=_buckets(minute), hour=_buckets(hour), tokens=_buckets(tokens), inflight=int(inflight),
            reserved=from_pico(reserved),
            spend={"day": from_pico(day), "week": from_pico(week), "month": from_pico(month), "all": from_pico(total)},
        )
        if refused:
            raise Refusal(refused, snapshot)
        return ticket_id

    def finish(self, user_id: str, ticket_id: str, at: float, amount: int, tokens: int, now: float) -> None:
        in_flight, reservations = self._key(user_id, "f"), self._key(user_id, "r")

        def op(pipe: Any) -> None:
            pipe.zrem(in_flight, ticket_id)
            pipe.hdel(reservations, ticket_id)

        self._later(user_id, op)  # queued before the spend: both go in the same MULTI
        self.spend(user_id, at, amount, tokens, now)

    def spend(self, user_id: str, at: float, amount: int, tokens: int, now: float) -> None:
        if not amount and not tokens:
            return
        spend_keys = self._spend_keys(user_id, at)
        tokens_key, bucket = self._key(user_id, "t"), str(int(now // HOUR_BUCKET_S))

        def op(pipe: Any) -> None:
            if amount:
                for period, key in zip(PERIODS, spend_keys):
                    pipe.incrby(key, amount)
                    pipe.expire(key, PERIOD_TTL_S[period])
                pipe.incrby(spend_keys[-1], amount)
            if tokens:
                pipe.hincrby(tokens_key, bucket, tokens)
                pipe.expire(tokens_key, WINDOW_TTL_S["t"])

        self._later(user_id, op)

    async def snapshot(self, user_id: str, now: float) -> Snapshot:
        """Read-only: the same counters the admission script reads, for /v1/limits and /v1/key."""
        await self._settled(user_id)
        key = self._key
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(key(user_id, "m"))
                pipe.hgetall(key(user_id, "h"))
                pipe.hgetall(key(user_id, "t"))
                pipe.zrangebyscore(key(user_id, "f"), repr(now), "+inf")
                pipe.hgetall(key(user_id, "r"))
                pipe.mget(self._spend_keys(user_id, now))
                minute, hour, tokens, live, reservations, spend = await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from None

        def window(raw: dict[str, str], bucket_s: float) -> dict[int, int]:
            oldest = int(now // bucket_s) - 59
            return dict(sorted((int(b), int(c)) for b, c in raw.items() if int(b) >= oldest))

        return Snapshot(
            minute=window(minute, MINUTE_BUCKET_S), hour=window(hour, HOUR_BUCKET_S),
            tokens=window(tokens, HOUR_BUCKET_S), inflight=len(live),
            reserved=sum((from_pico(reservations.get(t)) for t in live), Decimal(0)),
            spend=dict(zip((*PERIODS, "all"), (from_pico(v) for v in spend))),
        )

    async def seed(self, spend: dict[str, dict[str, Decimal]], now: float) -> None:
        """Fill counters Redis does not have yet (first instance after Redis started); never overwrite."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for period in PERIODS:
                for user_id, amount in spend.get(period, {}).items():
                    pipe.set(self._key(user_id, f"s:{period}:{period_id(period, now)}"), to_pico(amount),
                             nx=True, ex=PERIOD_TTL_S[period])
            for user_id, amount in spend.get("all", {}).items():
                pipe.set(self._key(user_id, "s:all"), to_pico(amount), nx=True)
            await pipe.execute()

    async def close(self) -> None:
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self._redis.aclose()


def _unavailable(exc: Exception) -> ServiceUnavailable:
    log.error("Redis (limits) failed: %s", exc)
    return ServiceUnavailable(
        "The gateway cannot check your limits right now (its shared counter store is unreachable); retry shortly.",
        headers={"retry-after": "2"},
    )
