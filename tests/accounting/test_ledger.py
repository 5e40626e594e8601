"""Unit tests of the usage ledger, settlement and reports: real SQLite, fake upstream and clock."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.accounting.generations import parse_generation_id, stats_from_record
from gateway.accounting.ledger import Ledger
from gateway.accounting.pricing import Pricing
from gateway.accounting.record import build_record
from gateway.accounting.reports import (
    aggregate,
    choice,
    period_start,
    report_csv,
    usage_report,
)
from gateway.accounting.settlement import Settler
from gateway.auth.tokens import Principal
from gateway.core.config import Config
from gateway.core.errors import BadRequest
from gateway.core.metrics import Metrics
from gateway.core.money import dumps, markup_for
from gateway.proxy.sse import Observation, observe_body
from gateway.proxy.types import Charge, ProxyRequest
from gateway.store import Store
from gateway.store.usage import COLUMNS, PENDING, SETTLED, UNSETTLED
from gateway.upstream.client import UpstreamConnectionError
from tests.conftest import FakeClock
from tests.conftest import principal as shared_principal

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a Thursday




class FakeUpstream:
    """Answers GET /generation from a script: a status, or a total_cost to return with 200."""

    def __init__(self, script: list[Any] | None = None, default: Any = 404) -> None:
        self.script = list(script or [])
        self.default = default
        self.calls: list[tuple[str, str]] = []

    async def fetch(self, method: str, path: str, *, key: str, body: bytes | None = None,
                    retry: bool = True) -> tuple[int, bytes]:
        """The answer as OpenRouter sends it: JSON text (a Decimal step is written as a JSON number)."""
        self.calls.append((path, key))
        step = self.script.pop(0) if self.script else self.default
        if step == "down":
            raise UpstreamConnectionError("connection refused")
        if isinstance(step, int):
            return step, dumps({"error": {"code": step, "message": "Generation not found"}})
        return 200, dumps({"data": {"id": path.split("=", 1)[1], "model": "openai/gpt-4o-mini", "total_cost": step,
                                    "usage": step, "native_tokens_prompt": 11, "native_tokens_completion": 7,
                                    "native_tokens_reasoning": 2, "native_tokens_cached": 3}})


def principal(tier: str = "trial", user_id: str = "usr_a", key: str | None = "sk-or-v1-user-a") -> Principal:
    return shared_principal(user_id, tier=tier, key=key, token_id="tok_1")


def proxy_request(*, model: str | None = "openai/gpt-4o-mini", stream: bool = False, started: float = T0,
                  cancelled: bool = False, request_id: str = "req_1") -> ProxyRequest:
    return ProxyRequest(endpoint="/chat/completions", body={}, raw=b"{}", model=model, stream=stream,
                        started=started, request_id=request_id, cancelled=cancelled, status=200,
                        first_byte=started + 0.1, ended=started + 0.25)


def observation(generation_id: str | None = "gen-1", cost: str | None = "0.0000021", *, model: str | None = None,
                prompt: int = 10, completion: int = 5) -> Observation:
    usage = None
    if cost is not None:
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "cost": Decimal(cost),
                 "prompt_tokens_details": {"cached_tokens": 4},
                 "completion_tokens_details": {"reasoning_tokens": 2}}
    return Observation(generation_id=generation_id, model=model or "openai/gpt-4o-mini", provider="OpenAI",
                       finish_reason="stop", usage=usage)


def config(**lookup: Any) -> Config:
    settings = {"first_delay_s": 0.5, "factor": 2, "max_delay_s": 4, "attempts": 4, **lookup}
    return Config(accounting={"flush_interval_ms": 100, "generation_lookup": settings})


def is_free(model: str | None) -> bool:
    return bool(model and model.endswith(":free"))


def is_free_generation(requested: str | None, served: str | None) -> bool:
    return is_free(served) or is_free(requested)


def charge_of(p: Principal, request: ProxyRequest, obs: Observation, *, free: bool | None = None,
              cfg: Config | None = None) -> Charge:
    rule = is_free_generation if free is None else (lambda requested, served: free)
    return Pricing(cfg or Config(), rule).charge(p, request, obs)


def record_of(p: Principal, request: ProxyRequest, obs: Observation, *, free: bool | None = None,
              first_lookup_at: float) -> Any:
    return build_record(p, request, obs, charge_of(p, request, obs, free=free), first_lookup_at=first_lookup_at)


def proxied(ledger: Ledger, p: Principal, request: ProxyRequest, obs: Observation) -> Charge:
    """What the proxy does once a generation is over: price it once, record that charge."""
    charge = charge_of(p, request, obs)  # the tests' configs all keep the default tiers
    ledger.record(p, request, obs, charge)
    return charge


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    store = await Store.open(f"sqlite:///{tmp_path}/usage.db")
    yield store
    await store.close()


def make_ledger(store: Store, clock: FakeClock, upstream: FakeUpstream, cfg: Config | None = None,
                keys: dict[str, str] | None = None) -> Ledger:
    cfg = cfg or config()

    async def key_for(user_id: str) -> str | None:
        return (keys or {}).get(user_id)

    settler = Settler(upstream, cfg.accounting.generation_lookup, key_for=key_for,  # type: ignore[arg-type]
                      is_free_generation=is_free_generation, clock=clock)
    return Ledger(store, cfg, settler=settler, clock=clock)


# -- markup and the record ------------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "markup", "reason"),
    [
        ("trial", "0.000000315", "trial_tier_15pct"),
        ("starter", "0.00000021", "starter_tier_10pct"),
        ("professional", "0.000000105", "professional_tier_5pct"),
        ("enterprise", "0", "enterprise_tier_0pct"),
    ],
)
def test_markup_per_default_tier_is_exact(tier: str, markup: str, reason: str) -> None:
    record = record_of(principal(tier), proxy_request(), observation(), free=False,
                          first_lookup_at=T0 + 0.5)
    assert record.provider_cost == Decimal("0.0000021")
    assert record.markup == Decimal(markup)
    assert record.total_cost == Decimal("0.0000021") + Decimal(markup)
    assert record.markup_reason == reason
    assert record.tier == tier


def test_free_model_has_no_markup_whatever_the_tier() -> None:
    record = record_of(principal("trial"), proxy_request(model="meta-llama/llama-3.3-70b-instruct:free"),
                          observation(cost="0"), free=True, first_lookup_at=T0)
    assert (record.markup, record.markup_reason, record.total_cost) == (Decimal(0), "free_model", Decimal(0))
    assert markup_for(Decimal("1.5"), "trial", Decimal(15), free=True) == (
        Decimal(0), "free_model")


def test_record_keeps_every_spec_field() -> None:
    request = proxy_request(stream=True, cancelled=True)
    record = record_of(principal(), request, observation(), free=False,
                          first_lookup_at=T0 + 0.5)
    assert (record.user_id, record.token_id, record.generation_id) == ("usr_a", "tok_1", "gen-1")
    assert (record.model_requested, record.model, record.provider) == ("openai/gpt-4o-mini",) * 2 + ("OpenAI",)
    assert (record.streamed, record.cancelled, record.finish_reason) == (True, True, "stop")
    assert (record.prompt_tokens, record.completion_tokens, record.reasoning_tokens, record.cached_tokens) == (
        10, 5, 2, 4)
    assert record.latency_ms == 250
    assert record.created_at == "2026-01-01T00:00:00.000000Z"
    assert (record.settle_status, record.next_attempt_at) == (PENDING, "2026-01-01T00:00:00.500000Z")


def test_response_without_generation_id_is_recorded_locally_and_not_looked_up() -> None:
    record = record_of(principal(), proxy_request(request_id="req_x"), observation(generation_id=None),
                          free=False, first_lookup_at=T0)
    assert record.generation_id == "gw-req_x"
    assert record.settle_status == UNSETTLED


def test_cost_parsed_from_a_body_stays_decimal_exact() -> None:
    raw = b'{"id":"gen-x","model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"cost":1e-7}}'
    obs = observe_body(raw)
    record = record_of(principal("starter"), proxy_request(), obs, free=False,
                          first_lookup_at=T0)
    assert record.provider_cost == Decimal("1E-7")
    assert record.as_params()[COLUMNS.index("provider_cost")] == "0.0000001"
    assert record.markup == Decimal("1E-8")


def test_float_cost_is_refused_not_rounded() -> None:
    obs = observation(cost=None)
    obs.usage = {"cost": 0.1}
    with pytest.raises(TypeError):
        record_of(principal(), proxy_request(), obs, free=False, first_lookup_at=T0)


# -- the ledger: queue, listeners, batched writes --------------------------------------


@pytest.mark.anyio
async def test_record_is_queued_and_seen_at_once_then_written_in_one_batch(store: Store) -> None:
    clock = FakeClock(T0)
    ledger = make_ledger(store, clock, FakeUpstream())
    writes: list[int] = []
    real_write = store.usage.write

    async def counting_write(records: Any, settlements: Any = ()) -> None:
        writes.append(len(records))
        await real_write(records, settlements)

    store.usage.write = counting_write  # type: ignore[method-assign]
    requests = [proxy_request(request_id=f"req_{n}") for n in range(50)]
    charges = [proxied(ledger, principal(), request, observation(f"gen-{n}", "0.1")) for n, request in enumerate(requests)]
    # what the limits will count (charge, prompt + completion tokens): the very amounts recorded
    assert {(c.total, c.prompt_tokens + c.completion_tokens) for c in charges} == {(Decimal("0.115"), 15)}
    assert await store.usage.count() == 0  # nothing written on the request path
    assert (await ledger.lookup("gen-7")).total_cost == Decimal("0.115")  # type: ignore[union-attr]
    assert await ledger.flush() == 50
    assert writes == [50]
    assert await store.usage.count() == 50
    assert (await store.usage.spend_since("2026-01-01T00:00:00.000000Z")) == {"usr_a": Decimal("5.750")}


@pytest.mark.anyio
async def test_flush_interval_0_writes_each_record_as_soon_as_it_is_queued(store: Store) -> None:
    import asyncio

    cfg = config()
    cfg.accounting.flush_interval_ms = 0
    ledger = make_ledger(store, FakeClock(T0), FakeUpstream(), cfg)
    writer = asyncio.ensure_future(ledger.run_writer())
    try:
        proxied(ledger, principal(), proxy_request(), observation("gen-0", "0.2"))
        for _ in range(500):  # poll the outcome; the writer itself waits on no timer
            if await store.usage.count():
                break
            await asyncio.sleep(0.01)
        assert await store.usage.count() == 1
    finally:
        writer.cancel()


@pytest.mark.anyio
async def test_retention_drops_old_finished_records_only(store: Store) -> None:
    clock = FakeClock(T0 + 40 * 86400)
    ledger = make_ledger(store, clock, FakeUpstream())
    proxied(ledger, principal(), proxy_request(started=T0), observation(None, "0.1"))  # unsettled (no id)
    proxied(ledger, principal(), proxy_request(started=T0, request_id="r2"), observation("gen-old", "0.1"))
    proxied(ledger, principal(), proxy_request(started=clock.now, request_id="r3"), observation(None, "0.1"))
    await ledger.flush()
    assert await store.usage.delete_before("2026-01-31T00:00:00.000000Z") == 1  # the pending one stays
    assert await store.usage.count() == 2


@pytest.mark.anyio
async def test_same_generation_twice_makes_one_record(store: Store) -> None:
    ledger = make_ledger(store, FakeClock(T0), FakeUpstream())
    proxied(ledger, principal(), proxy_request(), observation("gen-dup", "0.2"))
    proxied(ledger, principal(), proxy_request(), observation("gen-dup", "0.2"))
    await ledger.flush()
    proxied(ledger, principal(), proxy_request(), observation("gen-dup", "0.2"))
    await ledger.flush()
    assert await store.usage.count() == 1
    assert await store.usage.spend_since("2000-01-01") == {"usr_a": Decimal("0.230")}


@pytest.mark.anyio
async def test_failed_write_keeps_records_queued(store: Store) -> None:
    ledger = make_ledger(store, FakeClock(T0), FakeUpstream())
    proxied(ledger, principal(), proxy_request(), observation("gen-a", "0.2"))
    real_write = store.usage.write

    async def broken(records: Any, settlements: Any = ()) -> None:
        raise OSError("disk full")

    store.usage.write = broken  # type: ignore[method-assign]
    with pytest.raises(OSError):
        await ledger.flush()
    assert ledger.backlog == 1
    store.usage.write = real_write  # type: ignore[method-assign]
    assert await ledger.flush() == 1
    assert (await store.usage.get("gen-a")) is not None


@pytest.mark.anyio
async def test_spend_since_by_user_and_time(store: Store) -> None:
    ledger = make_ledger(store, FakeClock(T0), FakeUpstream())
    proxied(ledger, principal(user_id="u1"), proxy_request(started=T0 - 10), observation("g1", "1"))
    proxied(ledger, principal(user_id="u1"), proxy_request(started=T0 + 10), observation("g2", "2"))
    proxied(ledger, principal(user_id="u2", tier="enterprise"), proxy_request(started=T0 + 10), observation("g3", "3"))
    await ledger.flush()
    since = "2026-01-01T00:00:00.000000Z"
    assert await store.usage.spend_since(since) == {"u1": Decimal("2.30"), "u2": Decimal("3")}
    assert await store.usage.spend_since(since, user_id="u2") == {"u2": Decimal("3")}


# -- settlement -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_404_then_found_settles_with_growing_backoff_and_reports_the_change(store: Store) -> None:
    clock = FakeClock(T0)
    upstream = FakeUpstream([404, 404, Decimal("0.0000030")])
    ledger = make_ledger(store, clock, upstream)
    changes: list[tuple[str, float, Decimal, Decimal]] = []
    ledger.on_total_changed(lambda *args: changes.append(args))
    proxied(ledger, principal("trial"), proxy_request(), observation("gen-s", "0.0000021"))
    settler = ledger.settler

    assert await settler.settle_due() == 0  # not due before first_delay_s
    clock.now = T0 + 0.5
    assert await settler.settle_due() == 1  # 404: next in 0.5 × 2 = 1.0 s
    await ledger.flush()
    stored = await store.usage.get("gen-s")
    assert stored is not None and stored.settle_attempts == 1 and stored.next_attempt_at == "2026-01-01T00:00:01.500000Z"
    clock.now = T0 + 1.4
    assert await settler.settle_due() == 0
    clock.now = T0 + 1.5
    assert await settler.settle_due() == 1  # 404 again: next in 2.0 s
    clock.now = T0 + 3.5
    assert await settler.settle_due() == 1  # found
    await ledger.flush()

    record = await store.usage.get("gen-s")
    assert record is not None
    assert record.settle_status == SETTLED and record.settle_attempts == 3
    assert record.provisional_cost == Decimal("0.0000021")
    assert (record.provider_cost, record.markup, record.total_cost) == (
        Decimal("0.0000030"), Decimal("0.00000045"), Decimal("0.00000345"))
    assert (record.prompt_tokens, record.completion_tokens, record.reasoning_tokens, record.cached_tokens) == (
        11, 7, 2, 3)
    assert changes == [("usr_a", T0, Decimal("0.000002415"), Decimal("0.00000345"))]
    assert upstream.calls[0] == ("/generation?id=gen-s", "sk-or-v1-user-a")


@pytest.mark.anyio
async def test_settled_before_the_first_flush_is_written_settled(store: Store) -> None:
    clock = FakeClock(T0)
    ledger = make_ledger(store, clock, FakeUpstream([Decimal("0.0000021")]))
    changes: list[Any] = []
    ledger.on_total_changed(lambda *args: changes.append(args))
    proxied(ledger, principal("starter"), proxy_request(), observation("gen-q", "0.0000021"))
    clock.now = T0 + 1
    await ledger.settler.settle_due()
    await ledger.flush()
    record = await store.usage.get("gen-q")
    assert record is not None and record.settle_status == SETTLED and record.total_cost == Decimal("0.00000231")
    assert changes == []  # same total: nobody is told


@pytest.mark.anyio
async def test_never_settles_keeps_provisional_cost_and_is_marked_unsettled(store: Store) -> None:
    clock = FakeClock(T0)
    upstream = FakeUpstream(default=404)
    ledger = make_ledger(store, clock, upstream, config(attempts=3))
    proxied(ledger, principal("trial"), proxy_request(), observation("gen-n", "0.5"))
    for _ in range(10):
        clock.now += 10
        await ledger.settler.settle_due()
    await ledger.flush()
    record = await store.usage.get("gen-n")
    assert record is not None
    assert (record.settle_status, record.settle_attempts) == (UNSETTLED, 3)
    assert (record.provider_cost, record.total_cost) == (Decimal("0.5"), Decimal("0.575"))
    assert len(upstream.calls) == 3
    assert ledger.settler.pending == 0


@pytest.mark.anyio
async def test_upstream_down_counts_as_a_failed_attempt(store: Store) -> None:
    clock = FakeClock(T0)
    ledger = make_ledger(store, clock, FakeUpstream(["down", Decimal("0.5")]))
    proxied(ledger, principal("enterprise"), proxy_request(), observation("gen-d", "0.4"))
    for _ in range(3):
        clock.now += 5
        await ledger.settler.settle_due()
    await ledger.flush()
    record = await store.usage.get("gen-d")
    assert record is not None and (record.settle_status, record.total_cost, record.settle_attempts) == (
        SETTLED, Decimal("0.5"), 2)


@pytest.mark.anyio
async def test_pending_lookups_resume_after_a_restart(store: Store) -> None:
    clock = FakeClock(T0)
    first = make_ledger(store, clock, FakeUpstream(default=404))
    proxied(first, principal("professional"), proxy_request(), observation("gen-r", "0.2"))
    clock.now = T0 + 0.5
    await first.settler.settle_due()
    await first.close()  # graceful shutdown: flushed, look-up still pending
    stored = await store.usage.get("gen-r")
    assert stored is not None and stored.settle_status == PENDING and stored.settle_attempts == 1

    upstream = FakeUpstream([Decimal("0.3")])
    second = make_ledger(store, clock, upstream, keys={"usr_a": "sk-or-v1-from-store"})
    assert await second.settler.resume(store) == 1
    clock.now = T0 + 10
    assert await second.settler.settle_due() == 1
    await second.flush()
    record = await store.usage.get("gen-r")
    assert record is not None and record.settle_status == SETTLED
    assert (record.total_cost, record.settle_attempts) == (Decimal("0.315"), 2)
    assert upstream.calls == [("/generation?id=gen-r", "sk-or-v1-from-store")]


@pytest.mark.anyio
async def test_no_key_after_restart_leaves_the_provisional_cost(store: Store) -> None:
    clock = FakeClock(T0)
    first = make_ledger(store, clock, FakeUpstream())
    proxied(first, principal(), proxy_request(), observation("gen-k", "0.2"))
    await first.flush()  # then the first instance dies: its lease runs out
    clock.now += first.settler.lease_s + 1
    second = make_ledger(store, clock, FakeUpstream(), keys={})
    assert await second.settler.resume(store) == 1
    clock.now += 5
    await second.settler.settle_due()
    await second.flush()
    record = await store.usage.get("gen-k")
    assert record is not None and (record.settle_status, record.total_cost) == (UNSETTLED, Decimal("0.230"))


# -- reports and read-back ----------------------------------------------------------------


def test_periods_are_calendar_periods_in_utc() -> None:
    now = T0 + 86400 * 5 + 3600 * 13  # Tuesday 2026-01-06 13:00Z
    assert period_start("day", now).isoformat() == "2026-01-06T00:00:00+00:00"
    assert period_start("week", now).isoformat() == "2026-01-05T00:00:00+00:00"
    assert period_start("month", now).isoformat() == "2026-01-01T00:00:00+00:00"


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("period", "year", ("day", "week", "month")),
    ("group_by", "provider", ("user", "model", "tier", "day")),
    ("format", "xml", ("json", "csv")),
])
def test_bad_report_options_are_400_naming_the_parameter(name: str, value: str, allowed: tuple[str, ...]) -> None:
    with pytest.raises(BadRequest) as caught:
        choice(name, value, allowed, allowed[0])
    assert caught.value.param == name and value in caught.value.message and allowed[0] in caught.value.message


@pytest.mark.parametrize("raw", [None, "", "gen 1", "x" * 300, "../etc", "gen-1;drop"])
def test_malformed_generation_ids_are_refused(raw: str | None) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_generation_id(raw)
    assert caught.value.param == "id"


@pytest.mark.anyio
async def test_report_totals_equal_the_sum_of_records_exactly(store: Store) -> None:
    clock = FakeClock(T0 + 3600)
    ledger = make_ledger(store, clock, FakeUpstream())
    costs = ["0.1", "0.2", "0.0000003", "1E-9", "7.123456789"]
    for n, cost in enumerate(costs):
        model = "m/a" if n % 2 else "m/b:free"
        proxied(ledger, principal("trial" if n < 3 else "starter", user_id=f"u{n % 2}"),
                      proxy_request(model=model, started=T0 + n), observation(f"g{n}", cost, model=model))
    await ledger.flush()
    records = await store.usage.between("2026-01-01")
    report = await usage_report(store, period="month", group_by="model", now=clock())
    assert report["totals"]["provider_cost"] == sum((Decimal(c) for c in costs), Decimal(0))
    assert report["totals"]["total_cost"] == sum((r.total_cost for r in records), Decimal(0))
    assert report["totals"]["total_cost"] == sum((row["total_cost"] for row in report["rows"]), Decimal(0))
    assert report["totals"]["requests"] == 5
    free_row = next(row for row in report["rows"] if row["model"] == "m/b:free")
    assert free_row["markup"] == 0
    totals, rows = aggregate(records, "tier")
    assert {key for key, _ in rows} == {"trial", "starter"}
    csv_text = report_csv(report)
    assert csv_text.splitlines()[-1].split(",")[7] == format(report["totals"]["provider_cost"], "f")
    mine = await usage_report(store, period="day", group_by="model", user_id="u1", now=clock())
    assert mine["totals"]["requests"] == 2


def test_generation_from_the_record_alone_satisfies_the_sdk_schema() -> None:
    from openrouter.components import GenerationResponse

    record = record_of(principal(), proxy_request(), observation(), free=False,
                          first_lookup_at=T0)
    data = {k: (float(v) if isinstance(v, Decimal) else v) for k, v in stats_from_record(record).items()}
    GenerationResponse.model_validate({"data": data})
    assert orjson.loads(orjson.dumps(data))["total_cost"] == pytest.approx(0.0000021)


@pytest.mark.anyio
async def test_the_run_loop_sleeps_while_every_slot_is_busy(store: Store) -> None:
    """A due backlog behind busy slots waits for a slot, it does not spin (issue 14)."""
    import time as _time

    gate = asyncio.Event()

    class Blocking:
        async def fetch(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
            await gate.wait()
            return 404, b""

    cfg = config()
    settler = Settler(Blocking(), cfg.accounting.generation_lookup,  # type: ignore[arg-type]
                      key_for=lambda user: asyncio.sleep(0, "k"), clock=_time.time, concurrency=2)
    Ledger(store, cfg, settler=settler, clock=_time.time)
    for n in range(10):
        record = record_of(principal(), proxy_request(request_id=f"r{n}"), observation(f"gen-{n}"), free=False,
                           first_lookup_at=_time.time())
        settler.schedule(record, key="k", due=_time.time() - 1)
    calls = 0
    take_due = settler._take_due

    def counting() -> list[Any]:
        nonlocal calls
        calls += 1
        return take_due()

    settler._take_due = counting  # type: ignore[method-assign]
    runner = asyncio.create_task(settler.run())
    await asyncio.sleep(0.3)  # a window to count the loop's turns in, not a wait for a condition
    runner.cancel()
    gate.set()
    await settler.stop()
    assert calls <= 3, f"the run loop went round {calls} times in 0.3 s with every slot busy"


@pytest.mark.anyio
async def test_pending_lookups_are_leased_to_one_instance(store: Store) -> None:
    """Two instances on one database: a held look-up is claimed by nobody else until its lease runs out."""
    clock = FakeClock()
    first = make_ledger(store, clock, FakeUpstream(default=404))
    proxied(first, principal(), proxy_request(), observation("gen-l", "0.2"))
    await first.flush()
    second = make_ledger(store, clock, FakeUpstream(), keys={"usr_a": "k"})
    third = make_ledger(store, clock, FakeUpstream(), keys={"usr_a": "k"})
    assert await second.settler.resume(store) == 0  # the first instance holds it
    clock.now += first.settler.lease_s - 1
    await store.usage.renew_leases(first.settler.owner, first.settler.lease_until())
    clock.now += 2
    assert await second.settler.resume(store) == 0  # renewed: still held
    clock.now += first.settler.lease_s + 1  # the first instance died: its lease ran out
    assert [await second.settler.resume(store), await third.settler.resume(store)] == [1, 0]
    stored = await store.usage.get("gen-l")
    assert stored is not None and stored.lease_owner == second.settler.owner


# -- the look-up policy, the audit, and what the metrics count ----------------------------


def test_generation_answers_parse_with_money_exact_from_the_text() -> None:
    from gateway.accounting.settlement import generation_data

    raw = (b'{"data": {"id": "gen-x", "total_cost": 0.000123456789012345678, "usage": 1e-7,'
           b' "cache_discount": -0.5, "upstream_inference_cost": 3, "tokens_prompt": 10}}')
    data = generation_data(raw)
    assert data is not None
    assert data["total_cost"] == Decimal("0.000123456789012345678")  # past float's 17 digits
    assert data["usage"] == Decimal("1e-7") and data["cache_discount"] == Decimal("-0.5")
    assert data["upstream_inference_cost"] == Decimal(3) and data["tokens_prompt"] == 10
    assert all(isinstance(data[k], Decimal) for k in ("total_cost", "usage", "cache_discount"))
    # a money name twice (nested): the exact stdlib parse decides, still no float
    nested = b'{"data": {"total_cost": 0.1, "extra": {"total_cost": 0.2}}}'
    assert generation_data(nested) == {"total_cost": Decimal("0.1"), "extra": {"total_cost": Decimal("0.2")}}
    for bad in (b"", b"not json", b"[]", b'{"data": []}', b'{"error": {"code": 404}}'):
        assert generation_data(bad) is None


@pytest.mark.anyio
async def test_policy_missing_keeps_a_reported_cost_and_looks_up_only_what_lacks_one(store: Store) -> None:
    clock = FakeClock()
    upstream = FakeUpstream(default=Decimal("0.5"))
    ledger = make_ledger(store, clock, upstream, config(policy="missing", audit_fraction=0))
    proxied(ledger, principal(), proxy_request(request_id="r1"), observation("gen-reported", "0.0000021"))
    proxied(ledger, principal(), proxy_request(request_id="r2", cancelled=True), observation("gen-cut", "0.0000021"))
    proxied(ledger, principal(), proxy_request(request_id="r3"), observation("gen-no-cost", None))
    assert ledger.settler.pending == 2  # the cut one and the one without a cost
    clock.now += 1
    assert await ledger.settler.settle_due() == 2
    await ledger.flush()
    paths = sorted(path for path, _ in upstream.calls)
    assert paths == ["/generation?id=gen-cut", "/generation?id=gen-no-cost"]
    reported = await store.usage.get("gen-reported")
    assert reported is not None and reported.settle_status == "reported"
    assert reported.total_cost == Decimal("0.0000021") * Decimal("1.15")  # trial tier: 15% markup
    assert reported.settled_at is not None and reported.next_attempt_at is None
    for gen in ("gen-cut", "gen-no-cost"):
        settled = await store.usage.get(gen)
        assert settled is not None and settled.settle_status == "settled" and settled.provider_cost == Decimal("0.5")


@pytest.mark.anyio
async def test_policy_missing_audits_a_sample_and_counts_each_difference(store: Store) -> None:
    clock = FakeClock()
    upstream = FakeUpstream(script=[Decimal("0.0000021"), Decimal("0.0000030")])
    cfg = config(policy="missing", audit_fraction=0.5)
    settler = Settler(upstream, cfg.accounting.generation_lookup, key_for=lambda user: asyncio.sleep(0, None),  # type: ignore[arg-type]
                      clock=clock, metrics=(metrics := Metrics()))
    ledger = Ledger(store, cfg, settler=settler, clock=clock, metrics=metrics)
    draws = iter([0.4, 0.6, 0.1])  # below the fraction: audited
    ledger._sample = lambda: next(draws)
    for n in range(3):
        proxied(ledger, principal(), proxy_request(request_id=f"r{n}"), observation(f"gen-{n}", "0.0000021"))
    assert ledger.settler.pending == 2
    clock.now += 1
    await ledger.settler.settle_due()
    assert dict(metrics.audits) == {"match": 1, "differ": 1}
    await ledger.flush()
    statuses = [(await store.usage.get(f"gen-{n}")).settle_status for n in range(3)]  # type: ignore[union-attr]
    assert statuses == ["settled", "reported", "settled"]


@pytest.mark.anyio
async def test_cost_metrics_count_each_generation_once_at_its_final_figure(store: Store) -> None:
    """Pending generations are counted when they settle, at OpenRouter's figure, never twice."""
    clock = FakeClock()
    upstream = FakeUpstream(script=[404, Decimal("0.001")])
    cfg = config()
    settler = Settler(upstream, cfg.accounting.generation_lookup, key_for=lambda user: asyncio.sleep(0, None),  # type: ignore[arg-type]
                      clock=clock, metrics=(metrics := Metrics()))
    ledger = Ledger(store, cfg, settler=settler, clock=clock, metrics=metrics)
    proxied(ledger, principal(), proxy_request(), observation("gen-m", "0.0000021"))
    proxied(ledger, principal(), proxy_request(request_id="r-local"), observation(None, "0.0000021"))  # no id: final
    local_total = Decimal("0.0000021") * Decimal("1.15")
    assert metrics.cost["trial"] == local_total
    clock.now += 1
    await ledger.settler.settle_due()  # 404: still pending, not counted
    assert metrics.cost["trial"] == local_total
    clock.now += 2
    await ledger.settler.settle_due()
    assert metrics.cost["trial"] == local_total + Decimal("0.001") * Decimal("1.15")
    assert metrics.markup["trial"] == Decimal("0.0000021") * Decimal("0.15") + Decimal("0.001") * Decimal("0.15")
    assert metrics.tokens[("trial", "prompt")] == 10 + 11  # the settled one at OpenRouter's native count
    assert dict(metrics.audits) == {"differ": 1}
