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
- `:s` a hash of charged spend: fields `day:2025-01-31`, `week:…`, `month:2025-01`,
  `all`, and `seeded`, the marker that this hash holds the user's spend from the database.
Money is stored as integer picodollars (10⁻¹² USD; reservations rounded up), so Redis
adds integers and Python converts back to Decimal; a float never holds money.

Redis losing its data (restart without persistence, failover to an empty replica,
FLUSHALL, eviction, expiry of an idle user's hash) must never lose spend. The marker
goes with the spend it vouches for (one key), so a hash without `seeded` is detected by
the admission script itself, which then admits nothing for that user and notes when the
loss was first seen (`lost_at`). This instance waits until the records that ended
before that moment are in the database (`settle_wait_s`: the ledger's flush interval
and a margin), adds the user's spend from the database (records created before
`lost_at`) to whatever was counted live since, sets the marker (once, atomically, even
when several instances rebuild at the same time) and admits again. Spend is never
undercounted; a request in flight across the loss may be counted twice (the safe
side), and the reservations of requests in flight at the loss are not restored.

Dead pooled connections (Redis restarted) are retried at once on a fresh connection;
Redis unreachable makes admission fail fast with `CountersUnreachable`, a 503 naming it
(`redis.on_error: closed`), or the limiter admits on local counters meanwhile
(`redis.on_error: local`, `limits.fallback`); queued counter updates are kept and written
again once it answers. Failures are logged once, then at most once a minute while they last.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from decimal import Decimal
from typing import Any, Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.core.clock import iso
from gateway.core.errors import ServiceUnavailable
from gateway.core.money import ZERO, from_pico, to_pico
from gateway.core.windows import PERIODS, period_id, period_start
from gateway.limits.policy import (
    HOUR_BUCKET_S,
    MINUTE_BUCKET_S,
    Limits,
    Refusal,
    Snapshot,
)

log = logging.getLogger("gateway.limits.limiter")

WINDOW_TTL_S = {"m": 120, "h": 7200, "t": 7200}

# KEYS: 1 minute, 2 hour, 3 tokens, 4 in flight, 5 reservations, 6 spend hash
# ARGV: 1 now, 2 rpm, 3 rph, 4 concurrent, 5 tokens/h, 6 day budget, 7 month budget (pico),
#       8 reserve (pico), 9 free, 10 ticket, 11 lease deadline, 12 minute bucket, 13 hour bucket, 14 lease ttl,
#       15 day field, 16 week field, 17 month field
# Limits are -1 when unlimited. Returns {refused or "", minute, hour, tokens, inflight, reserved, day, week, month, all},
# or {"unseeded", lost_at} when the spend hash has lost its data (then nothing is counted).
ADMIT = """
if redis.call('HEXISTS', KEYS[6], 'seeded') == 0 then
  redis.call('HSETNX', KEYS[6], 'lost_at', ARGV[1])
  return {'unseeded', redis.call('HGET', KEYS[6], 'lost_at')}
end
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
local spend = redis.call('HMGET', KEYS[6], ARGV[15], ARGV[16], ARGV[17], 'all')
local day, week, month, all = spend[1] or '0', spend[2] or '0', spend[3] or '0', spend[4] or '0'
if redis.call('HLEN', KEYS[6]) > 12 then  -- periods gone by: drop their fields
  local keep = {[ARGV[15]] = 1, [ARGV[16]] = 1, [ARGV[17]] = 1, all = 1, seeded = 1, lost_at = 1}
  local old = {}
  for _, f in ipairs(redis.call('HKEYS', KEYS[6])) do if not keep[f] then old[#old + 1] = f end end
  if #old > 0 then redis.call('HDEL', KEYS[6], unpack(old)) end
end
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

# KEYS: 1 spend hash. ARGV: 1 ttl, then field, amount pairs (picodollars) from the database.
# Adds them (to what was counted live since the loss) and sets the marker, unless another
# instance did first. Returns 1 when this call rebuilt the hash.
REBUILD = """
if redis.call('HEXISTS', KEYS[1], 'seeded') == 1 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'seeded', '1')
redis.call('HDEL', KEYS[1], 'lost_at')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
# KEYS: 1 spend hash. ARGV: 1 ttl, then field, amount pairs (picodollars). A charge made while Redis was
# unreachable (admitted on local counters): added only to a hash that still vouches for its spend. An
# unseeded hash (Redis came back empty) is rebuilt from the database, which holds that charge already.
SPEND_IF_SEEDED = """
if redis.call('HEXISTS', KEYS[1], 'seeded') == 0 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
SPEND_TTL_S = 63 * 86400  # an idle user's hash expires; their next admission rebuilds it

SpendSource = Callable[[str, float, float], Awaitable[dict[str, Decimal]]]


def _buckets(flat: list[Any]) -> dict[int, int]:
    """Bucket → count in ascending bucket order (Snapshot's contract; Redis hashes are unordered)."""
    return dict(sorted((int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)))


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class RedisCounters:
    def __init__(self, client: aioredis.Redis, *, lease_s: float) -> None:
        self._redis = client
        self._admit = client.register_script(ADMIT)
        self._rebuild_script = client.register_script(REBUILD)
        self._lease_s = lease_s
        self._spend_source: SpendSource | None = None  # the database's spend of a user (`use_store`)
        self.settle_wait_s = 0.0
        self._rebuilding: dict[str, asyncio.Future[None]] = {}
        self.rebuilds = 0
        self._retry_handle: asyncio.TimerHandle | None = None
        self._ops: list[Callable[[Any], None]] = []
        self._dirty: set[str] = set()  # users with queued updates
        self._writing: set[str] = set()  # users whose updates are being written
        self._flushing: asyncio.Task[None] | None = None
        self._ticket_prefix = secrets.token_hex(6) + "-"  # ticket ids are unique across instances
        self._tickets = itertools.count()
        self._failure_log = _Throttled()

    @classmethod
    async def connect(cls, url: str, *, lease_s: float) -> "RedisCounters":
        # A dead pooled connection (Redis restarted) fails its first command: retried at once
        # on a new connection. Redis down fails within about a second, never a long hang.
        client = aioredis.from_url(
            url, decode_responses=True, socket_connect_timeout=1, socket_timeout=2, health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionError, OSError],
        )
        try:
            await client.ping()
        except RedisError as exc:
            await client.aclose()
            raise RuntimeError(f"redis.url: Redis at the configured URL is not reachable ({type(exc).__name__})") from None
        return cls(client, lease_s=lease_s)

    @staticmethod
    def _key(user_id: str, part: str) -> str:
        return f"gw:l:{{{user_id}}}:{part}"

    @staticmethod
    def _spend_fields(at: float) -> list[str]:
        return [f"{p}:{period_id(p, at)}" for p in PERIODS] + ["all"]

    def use_store(self, usage: Any, *, settle_wait_s: float) -> None:
        """Where a lost user's spend is rebuilt from: the usage records (`store.usage`)."""

        async def source(user_id: str, before: float, now: float) -> dict[str, Decimal]:
            until = iso(before)
            spend = {}
            for period in PERIODS:
                since = iso(period_start(period, now).timestamp())
                spend[period] = (await usage.spend_since(since, user_id=user_id, until_iso=until)).get(user_id, 0)
            spend["all"] = (await usage.spend_since(iso(0), user_id=user_id, until_iso=until)).get(user_id, 0)
            return spend

        self._spend_source = source
        self.settle_wait_s = settle_wait_s

    async def ping(self) -> None:
        await self._redis.ping()

    async def answers(self) -> bool:
        """Whether Redis answers a PING now (the local fallback's probe)."""
        try:
            await self._redis.ping()
        except (RedisError, OSError):
            return False
        return True

    async def drain(self) -> bool:
        """Write the queued counter updates now; whether none is left (the fallback's step before switching
        back, so a charge made meanwhile reaches Redis before any rebuild of a hash it lost)."""
        if self._ops and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        if self._flushing is not None:
            await asyncio.gather(asyncio.shield(self._flushing), return_exceptions=True)
        return not self._ops

    def _unavailable(self, exc: Exception) -> "CountersUnreachable":
        """The admission's error when Redis fails; logged once, then at most once a minute while it lasts."""
        self._failure_log.error("Redis (limits) failed: %s", exc)
        return CountersUnreachable()

    async def _rebuild(self, user_id: str, lost_at: float, now: float) -> None:
        """Rebuild one user's spend hash from the database (see the module doc); one at a time per user."""
        running = self._rebuilding.get(user_id)
        if running is not None:
            return await asyncio.shield(running)
        future = self._rebuilding[user_id] = asyncio.get_running_loop().create_future()
        try:
            wait = self.settle_wait_s - (now - lost_at)
            if wait > 0:
                await asyncio.sleep(min(wait, self.settle_wait_s))  # records ended before the loss reach the db
            spend = await self._spend_source(user_id, lost_at, now) if self._spend_source else {}
            args: list[Any] = [SPEND_TTL_S]
            for field, period in zip(self._spend_fields(now), (*PERIODS, "all")):
                args += [field, to_pico(spend.get(period) or ZERO)]
            try:
                rebuilt = await self._rebuild_script(keys=[self._key(user_id, "s")], args=args)
            except RedisError as exc:
                raise self._unavailable(exc) from None
            if rebuilt:
                self.rebuilds += 1
                log.warning("Redis had lost the limit counters of user %s: spend rebuilt from the database", user_id)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the caller gets it raised
            raise
        finally:
            self._rebuilding.pop(user_id, None)

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
                # kept, in order, and written again once Redis answers: spend is never dropped
                self._failure_log.error("updating limit counters in Redis failed (%s); %d kept to write again",
                                        exc, len(ops))
                self._ops = ops + self._ops
                self._dirty |= self._writing
                self._writing = set()
                self._retry_soon()
                return
            finally:
                self._writing = set()

    def _retry_soon(self) -> None:
        if self._retry_handle is None or self._retry_handle.cancelled():
            def kick() -> None:
                self._retry_handle = None
                if self._ops and (self._flushing is None or self._flushing.done()):
                    self._flushing = asyncio.get_running_loop().create_task(self._flush())
            self._retry_handle = asyncio.get_running_loop().call_later(0.5, kick)

    async def acquire(self, user_id: str, limits: Limits, reserve: int, free: bool, now: float) -> str:
        await self._settled(user_id)
        ticket_id = self._ticket_prefix + str(next(self._tickets))
        key = self._key
        keys = [key(user_id, "m"), key(user_id, "h"), key(user_id, "t"), key(user_id, "f"), key(user_id, "r"),
                key(user_id, "s")]
        args: list[Any] = [
            repr(now), _limit(limits.requests_per_minute), _limit(limits.requests_per_hour),
            _limit(limits.max_concurrent), _limit(limits.tokens_per_hour),
            -1 if limits.daily_budget_usd is None else limits.daily_cap_pico,
            -1 if limits.monthly_budget_usd is None else limits.monthly_cap_pico,
            reserve, "1" if free else "0", ticket_id, repr(now + self._lease_s),
            int(now // MINUTE_BUCKET_S), int(now // HOUR_BUCKET_S), int(self._lease_s) + 1,
            *self._spend_fields(now)[:3],
        ]
        for _ in range(3):
            try:
                result = await self._admit(keys=keys, args=args)
            except RedisError as exc:
                raise self._unavailable(exc) from None
            if result[0] != "unseeded":
                break
            await self._rebuild(user_id, float(result[1]), now)
        else:
            raise self._unavailable(RuntimeError("spend counters could not be rebuilt"))
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
        spend_key, fields = self._key(user_id, "s"), self._spend_fields(at)
        tokens_key, bucket = self._key(user_id, "t"), str(int(now // HOUR_BUCKET_S))

        def op(pipe: Any) -> None:
            if amount:
                for field in fields:
                    pipe.hincrby(spend_key, field, amount)
                pipe.expire(spend_key, SPEND_TTL_S)
            if tokens:
                pipe.hincrby(tokens_key, bucket, tokens)
                pipe.expire(tokens_key, WINDOW_TTL_S["t"])

        self._later(user_id, op)

    def spend_if_seeded(self, user_id: str, at: float, amount: int, tokens: int, now: float) -> None:
        """`spend` for a charge admitted on local counters while Redis was unreachable (`SPEND_IF_SEEDED`):
        queued like any update, and counted by Redis only if it kept its data (else the rebuild counts it)."""
        if not amount and not tokens:
            return
        spend_key, fields = self._key(user_id, "s"), self._spend_fields(at)
        tokens_key, bucket = self._key(user_id, "t"), str(int(now // HOUR_BUCKET_S))
        args: list[Any] = [SPEND_TTL_S]
        for field in fields:
            args += [field, amount]

        def op(pipe: Any) -> None:
            if amount:
                pipe.eval(SPEND_IF_SEEDED, 1, spend_key, *args)
            if tokens:
                pipe.hincrby(tokens_key, bucket, tokens)
                pipe.expire(tokens_key, WINDOW_TTL_S["t"])

        self._later(user_id, op)

    async def snapshot(self, user_id: str, now: float) -> Snapshot:
        """Read-only: the same counters the admission script reads, for /v1/limits and /v1/key."""
        await self._settled(user_id)
        key = self._key
        for _ in range(3):
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.hgetall(key(user_id, "m"))
                    pipe.hgetall(key(user_id, "h"))
                    pipe.hgetall(key(user_id, "t"))
                    pipe.zrangebyscore(key(user_id, "f"), repr(now), "+inf")
                    pipe.hgetall(key(user_id, "r"))
                    pipe.hmget(key(user_id, "s"), [*self._spend_fields(now), "seeded", "lost_at"])
                    minute, hour, tokens, live, reservations, spend = await pipe.execute()
            except RedisError as exc:
                raise self._unavailable(exc) from None
            if spend[4] is not None:
                break
            await self._rebuild(user_id, float(spend[5]) if spend[5] else now, now)
        spend = spend[:4]

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
        """At start-up: rebuild the hash of every user with spend that Redis does not vouch for."""
        users = set().union(*(spend.get(p, {}) for p in (*PERIODS, "all")))
        fields = self._spend_fields(now)
        for user_id in users:
            args: list[Any] = [SPEND_TTL_S]
            for field, period in zip(fields, (*PERIODS, "all")):
                args += [field, to_pico(spend.get(period, {}).get(user_id) or ZERO)]
            await self._rebuild_script(keys=[self._key(user_id, "s")], args=args)

    async def close(self) -> None:
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        if self._ops and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().create_task(self._flush())  # a last try
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self._redis.aclose()


class CountersUnreachable(ServiceUnavailable):
    """Redis failed an admission or a read: a 503 naming the shared counter store (`redis.on_error: closed`),
    or the limiter's cue to admit on local counters (`local`)."""

    def __init__(self) -> None:
        super().__init__(
            "The gateway cannot check your limits right now (its shared counter store is unreachable); retry shortly.",
            headers={"retry-after": "2"},
        )


class _Throttled:
    """One log line per message, then at most one a minute (saying how many were held back): Redis down
    under traffic fails every admission and every write, and the log must not grow with them."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def error(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(message)
        if last is not None and now - last < self.every_s:
            self._held[message] = self._held.get(message, 0) + 1
            return
        self._last[message] = now
        held = self._held.pop(message, 0)
        if held:
            log.error(message + " (and %d more times since the last line)", *args, held)
        else:
            log.error(message, *args)
