"""Accounting end to end: a real gateway process, its own emulator, the official SDKs.

The emulator here is this module's own (not the session one), because these tests turn
its global knobs (slow streams, generation records that lag) and must not disturb others.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from openrouter import OpenRouter

from tests.conftest import (
    ROOT,
    Emulator,
    GatewayProcess,
    free_port,
    start_gateway,
    stop_process,
    wait_for,
    wait_http,
)

MODEL = "openai/gpt-4o-mini"
FREE_MODEL = "meta-llama/llama-3.3-70b-instruct:free"
MESSAGES = [{"role": "user", "content": "Say hello, please!"}]
TIERS = {"trial": "15", "starter": "10", "professional": "5", "enterprise": "0"}
FAST_LOOKUPS = {"first_delay_s": 0.05, "factor": 2, "max_delay_s": 0.2, "attempts": 50}


def settings(flush_interval_ms: int = 50, **lookup: Any) -> dict[str, Any]:
    return {
        "tiers": {name: {"markup_pct": pct} for name, pct in TIERS.items()},
        "accounting": {"flush_interval_ms": flush_interval_ms, "generation_lookup": {**FAST_LOOKUPS, **lookup}},
    }


def rows(db: Path, sql: str = "SELECT * FROM usage_records", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def stored_rows(db: Path, sql: str, params: tuple[Any, ...], what: str = "the record's row") -> list[dict[str, Any]]:
    """`rows`, once the writer has flushed them: `GET /generation` answers from the queue before that."""
    return wait_for(lambda: rows(db, sql, params), what=what)


def generation(gw: GatewayProcess, token: str, gen_id: str) -> httpx.Response:
    with gw.client(token) as client:
        return client.get("/v1/generation", params={"id": gen_id})


def settled(gw: GatewayProcess, token: str, gen_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        response = generation(gw, token, gen_id)
        if response.status_code == 200 and response.json()["data"]["settled"]:
            return response.json()["data"]
        return None

    return wait_for(check, what=f"{gen_id} to settle")


def chat(gw: GatewayProcess, token: str, model: str = MODEL) -> str:
    with gw.client(token) as client:
        response = client.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES})
    assert response.status_code == 200, response.text
    return response.headers["x-generation-id"]


@pytest.fixture(scope="module")
def own_emulator() -> Iterator[Emulator]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gateway", "emulator", "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    emulator = Emulator(port, process)
    try:
        wait_http(f"{emulator.base_url}/models?limit=1", process)
        yield emulator
    finally:
        stop_process(process)


@pytest.fixture
def emu(own_emulator: Emulator) -> Iterator[Emulator]:
    own_emulator.control("reset")
    yield own_emulator
    own_emulator.control("reset")


@pytest.fixture(scope="module")
def gw(own_emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = start_gateway(tmp_path_factory.mktemp("acct"), own_emulator, settings())
    try:
        yield process
    finally:
        process.stop()


def db_of(gw: GatewayProcess) -> Path:
    return gw.config_file.parent / "gateway.db"


# ---------------------------------------------------------------- markup and read-back


@pytest.mark.parametrize("tier", list(TIERS))
def test_markup_for_each_default_tier(gw: GatewayProcess, emu: Emulator, tier: str) -> None:
    user = gw.create_user(tier=tier, key=emu.new_key())
    gen_id = chat(gw, user["token"])
    data = settled(gw, user["token"], gen_id)
    provider_cost = Decimal(str(data["provider_cost"]))
    assert provider_cost > 0
    pct = Decimal(TIERS[tier])
    assert Decimal(str(data["markup"])) == provider_cost * pct / 100
    assert Decimal(str(data["total_cost"])) == provider_cost + provider_cost * pct / 100
    assert data["markup_reason"] == f"{tier}_tier_{pct}pct" and data["tier"] == tier
    stored = stored_rows(db_of(gw), "SELECT * FROM usage_records WHERE generation_id = ? AND settle_status = 'settled'",
                         (gen_id,))[0]
    assert stored["markup"] == format(provider_cost * pct / 100, "f")  # exact text, no float on the way


def test_free_model_has_no_markup(gw: GatewayProcess, emu: Emulator) -> None:
    user = gw.create_user(tier="trial", key=emu.new_key())
    data = settled(gw, user["token"], chat(gw, user["token"], FREE_MODEL))
    assert (data["markup"], data["markup_reason"], data["total_cost"]) == (0, "free_model", 0)


def test_openrouter_sdk_reads_the_generation(gw: GatewayProcess, emu: Emulator) -> None:
    user = gw.create_user(tier="starter", key=emu.new_key())
    gen_id = chat(gw, user["token"])
    settled(gw, user["token"], gen_id)
    sdk = OpenRouter(api_key=user["token"], server_url=f"{gw.url}/api/v1", timeout_ms=30_000)
    result = sdk.generations.get_generation(id=gen_id)
    assert result.data.id == gen_id and result.data.model == MODEL
    assert result.data.total_cost > 0


def test_generation_readable_at_once_even_while_upstream_lags(gw: GatewayProcess, emu: Emulator) -> None:
    emu.control("generation-not-ready", {"lookups": 1000})
    user = gw.create_user(tier="trial", key=emu.new_key())
    gen_id = chat(gw, user["token"])
    response = generation(gw, user["token"], gen_id)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["settled"] is False and data["settle_status"] == "pending"
    assert Decimal(str(data["total_cost"])) > 0  # the provisional cost, from the response's usage
    sdk = OpenRouter(api_key=user["token"], server_url=f"{gw.url}/api/v1", timeout_ms=30_000)
    assert sdk.generations.get_generation(id=gen_id).data.id == gen_id  # the record alone satisfies the SDK


def test_streamed_generation_is_accounted(gw: GatewayProcess, emu: Emulator) -> None:
    user = gw.create_user(tier="starter", key=emu.new_key())
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=user["token"], max_retries=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    data = settled(gw, user["token"], chunks[0].id)
    assert data["streamed"] is True and data["cancelled"] is False
    assert data["tokens_completion"] == 5 and Decimal(str(data["provider_cost"])) > 0


def test_cancelled_stream_is_accounted(gw: GatewayProcess, emu: Emulator) -> None:
    emu.control("stream", {"chunk_delay_ms": 100})
    user = gw.create_user(tier="trial", key=emu.new_key())
    body = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 200}], "stream": True,
            "max_tokens": 200}
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {user['token']}"}, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            gen_id = response.headers["x-generation-id"]
            for _ in response.iter_bytes():
                break  # the client goes away mid-stream
    data = settled(gw, user["token"], gen_id)
    assert data["cancelled"] is True and data["streamed"] is True
    stored = stored_rows(db_of(gw), "SELECT cancelled, streamed FROM usage_records WHERE generation_id = ?", (gen_id,))
    assert stored == [{"cancelled": 1, "streamed": 1}]


def test_upstream_error_mid_stream_is_accounted(gw: GatewayProcess, emu: Emulator) -> None:
    emu.control("midstream-error", {"after_chunks": 2, "code": 502})
    user = gw.create_user(tier="trial", key=emu.new_key())
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {user['token']}"}, timeout=30) as client:
        response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "stream": True})
    assert response.status_code == 200 and b'"error"' in response.content
    gen_id = response.headers["x-generation-id"]
    data = settled(gw, user["token"], gen_id)
    assert data["finish_reason"] == "error" and data["streamed"] is True
    stored = stored_rows(db_of(gw), "SELECT error, finish_reason FROM usage_records WHERE generation_id = ?", (gen_id,))
    assert stored == [{"error": "Provider disconnected", "finish_reason": "error"}]


def test_embeddings_are_accounted(gw: GatewayProcess, emu: Emulator) -> None:
    user = gw.create_user(tier="professional", key=emu.new_key())
    with gw.client(user["token"]) as client:
        response = client.post("/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": "hi"})
    assert response.status_code == 200, response.text
    data = settled(gw, user["token"], response.headers["x-generation-id"])
    assert data["markup_reason"] == "professional_tier_5pct"


def test_another_users_generation_is_404(gw: GatewayProcess, emu: Emulator) -> None:
    owner = gw.create_user(tier="trial", key=emu.new_key())
    other = gw.create_user(tier="trial", key=emu.new_key())
    gen_id = chat(gw, owner["token"])
    response = generation(gw, other["token"], gen_id)
    assert response.status_code == 404 and owner["id"] not in response.text
    assert generation(gw, other["token"], "gen-does-not-exist").status_code == 404
    assert generation(gw, owner["token"], gen_id).status_code == 200


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("path", "params", "param"), [
    ("/v1/generation", {}, "id"),
    ("/v1/generation", {"id": "gen 1/../x"}, "id"),
    ("/api/v1/generation", {"id": "x" * 400}, "id"),
    ("/v1/usage", {"period": "year"}, "period"),
    ("/api/v1/usage", {"period": "DAY"}, "period"),
])
def test_bad_client_input_is_400_naming_the_parameter(gw: GatewayProcess, emu: Emulator, path: str,
                                                      params: dict[str, str], param: str) -> None:
    user = gw.create_user(tier="trial", key=emu.new_key())
    with gw.client(user["token"]) as client:
        response = client.get(path, params=params)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param and param in response.json()["error"]["message"]


@pytest.mark.parametrize(("params", "param"), [
    ({"period": "quarter"}, "period"), ({"group_by": "provider"}, "group_by"), ({"format": "xml"}, "format"),
])
def test_bad_admin_report_input_is_400_naming_the_parameter(gw: GatewayProcess, params: dict[str, str],
                                                            param: str) -> None:
    response = gw.admin.get("/admin/v1/usage", params=params)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_admin_report_needs_the_admin_token(gw: GatewayProcess, emu: Emulator) -> None:
    user = gw.create_user(tier="trial", key=emu.new_key())
    with gw.client(user["token"]) as client:
        assert client.get("/admin/v1/usage").status_code == 401


@pytest.mark.parametrize(("option", "value"), [("--period", "year"), ("--format", "xml")])
def test_cli_bad_option_is_one_line_exit_2(gw: GatewayProcess, option: str, value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(gw.config_file), "usage", "report", option, value],
        cwd=ROOT, env=gw.env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and value in result.stderr


# ---------------------------------------------------------------- reports agree


def test_report_totals_equal_the_records_everywhere(gw: GatewayProcess, emu: Emulator) -> None:
    user = gw.create_user(tier="professional", key=emu.new_key())
    ids = [chat(gw, user["token"], model) for model in (MODEL, MODEL, FREE_MODEL, "anthropic/claude-3.5-haiku")]
    for gen_id in ids:
        settled(gw, user["token"], gen_id)
    settled_rows = "SELECT * FROM usage_records WHERE user_id = ? AND settle_status = 'settled'"

    def all_four() -> list[dict[str, Any]] | None:
        found = rows(db_of(gw), settled_rows, (user["id"],))
        return found if len(found) == 4 else None

    records = wait_for(all_four, what="all four records written settled")
    assert sorted(r["generation_id"] for r in records) == sorted(ids)
    exact_total = sum((Decimal(r["total_cost"]) for r in records), Decimal(0))
    exact_markup = sum((Decimal(r["markup"]) for r in records), Decimal(0))

    with gw.client(user["token"]) as client:
        mine = client.get("/v1/usage", params={"period": "day"}).json(parse_float=Decimal)
    assert mine["totals"]["requests"] == 4
    assert mine["totals"]["total_cost"] == exact_total and mine["totals"]["markup"] == exact_markup
    assert {row["model"]: row["requests"] for row in mine["rows"]}[MODEL] == 2

    admin = gw.admin.get("/admin/v1/usage", params={"period": "day", "group_by": "user"}).json(parse_float=Decimal)
    assert next(r for r in admin["rows"] if r["user_id"] == user["id"])["total_cost"] == exact_total
    csv_text = gw.admin.get("/admin/v1/usage", params={"period": "day", "format": "csv"}).text
    line = next(line for line in csv_text.splitlines() if line.startswith(user["id"] + ","))
    assert Decimal(line.split(",")[9]) == exact_total

    cli = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(gw.config_file), "usage", "report", "--user", user["id"],
         "--period", "day", "--format", "json"],
        cwd=ROOT, env=gw.env, capture_output=True, text=True, timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    report = json.loads(cli.stdout, parse_float=Decimal)
    assert report["totals"] == mine["totals"] and report["rows"] == mine["rows"]


# ---------------------------------------------------------------- durability


def test_sigterm_drains_a_stream_and_keeps_pending_lookups_across_a_restart(
    emu: Emulator, tmp_path: Path
) -> None:
    emu.control("generation-not-ready", {"lookups": 100_000})
    overrides = settings(flush_interval_ms=5_000, max_delay_s=0.1)
    first = start_gateway(tmp_path, emu, overrides)
    user = first.create_user(tier="trial", key=emu.new_key())
    ids = [chat(first, user["token"]) for _ in range(20)]

    emu.control("stream", {"chunk_delay_ms": 60})
    received: dict[str, Any] = {}

    def stream() -> None:
        with httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {user['token']}"},
                          timeout=30) as client:
            with client.stream("POST", "/v1/chat/completions",
                               json={"model": MODEL, "messages": MESSAGES, "stream": True}) as response:
                received["id"] = response.headers["x-generation-id"]
                received["body"] = b"".join(response.iter_bytes())

    reader = threading.Thread(target=stream)
    reader.start()
    wait_for(lambda: "id" in received, what="the stream to start")
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # flush interval 5 s: only shutdown writes
    reader.join(30)
    assert received["body"].endswith(b"data: [DONE]\n\n")  # drained, not cut

    db = tmp_path / "gateway.db"
    stored = {r["generation_id"]: r for r in rows(db)}
    assert set(stored) == {*ids, received["id"]}
    assert {r["settle_status"] for r in stored.values()} == {"pending"}
    assert all(r["next_attempt_at"] for r in stored.values())

    emu.control("generation-not-ready", {"lookups": 0})
    second = start_gateway(tmp_path, emu, settings())
    try:
        wait_for(lambda: {r["settle_status"] for r in rows(db)} == {"settled"}, what="all 21 to settle")
        assert len(rows(db)) == 21
        data = settled(second, user["token"], ids[0])
        assert Decimal(str(data["total_cost"])) > 0
    finally:
        second.stop()


def test_kill_9_loses_at_most_the_last_flush_interval(emu: Emulator, tmp_path: Path) -> None:
    flush_ms = 200
    gw_ = start_gateway(tmp_path, emu, settings(flush_interval_ms=flush_ms))
    user = gw_.create_user(tier="trial", key=emu.new_key())
    done: list[tuple[str, float]] = []
    stop = threading.Event()

    def load() -> None:
        with gw_.client(user["token"]) as client:
            while not stop.is_set():
                try:
                    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
                except httpx.HTTPError:
                    return
                if response.status_code == 200:
                    done.append((response.headers["x-generation-id"], time.monotonic()))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    window = flush_ms / 1000 + 0.5  # the flush interval plus the time one batch takes to write
    wait_for(lambda: len(done) >= 50 and time.monotonic() - done[0][1] > 2 * window, timeout=60,
             what="load running for twice the window")
    gw_.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    gw_.process.wait(10)
    stop.set()
    for worker in workers:
        worker.join(10)
    gw_.admin.close()

    stored = {r["generation_id"] for r in rows(tmp_path / "gateway.db", "SELECT generation_id FROM usage_records")}
    older = [gen_id for gen_id, at in done if at < killed_at - window]
    assert older, "the load ran long enough to have records older than the window"
    missing = [gen_id for gen_id in older if gen_id not in stored]
    assert missing == []
    assert len(stored) >= len(older)

