"""Limits through the real gateway and the emulator: each limit refuses at the right count,
budgets hold under 50 concurrent requests, also across two instances sharing Redis, and
/v1/limits and /v1/key read it all back (the OpenRouter SDK validates /api/v1/key).
"""

from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from cryptography.fernet import Fernet
from openrouter import OpenRouter

from tests.conftest import Emulator, GatewayProcess, redis_url_or_skip, start_gateway

PAID = "openai/gpt-4o"  # $0.0000025 per prompt token, $0.00001 per completion token
FREE = "meta-llama/llama-3.3-70b-instruct:free"
HELLO = [{"role": "user", "content": "hi"}]  # one prompt token, in the emulator and in the estimate
# 1 × 0.0000025 + 100 × 0.00001, plus the starter tier's 10 %: what one request with max_tokens=100 is charged
ONE = (Decimal("0.0000025") + 100 * Decimal("0.00001")) * Decimal("1.1")


def chat(client: httpx.Client, model: str = PAID, **body: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": 100, **body})


def limited_user(gateway: GatewayProcess, emulator: Emulator, **limits: Any) -> dict[str, Any]:
    user = gateway.create_user(tier="starter", key=emulator.new_key())
    response = gateway.admin.patch(f"/admin/v1/users/{user['id']}", json={"limits": limits})
    assert response.status_code == 200, response.text
    return user


def limits_of(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/v1/limits")
    assert response.status_code == 200, response.text
    return response.json()["data"]


def until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def settled(client: httpx.Client) -> Callable[[], bool]:
    def check() -> bool:
        limits = limits_of(client)["limits"]
        return limits["max_concurrent"]["used"] == 0 and Decimal(str(limits["monthly_budget_usd"]["reserved"])) == 0

    return check


# -- each limit refuses at the right count -----------------------------------------------


def test_requests_per_minute_refuses_the_third_with_429_and_headers(gateway, emulator):
    user = limited_user(gateway, emulator, requests_per_minute=2)
    with gateway.client(user["token"]) as client:
        first, second = chat(client, max_tokens=1), chat(client, max_tokens=1)
        assert first.status_code == second.status_code == 200
        # as OpenRouter does, only a refusal carries X-RateLimit-* (GET /v1/limits has the live numbers)
        assert not any(name.startswith("x-ratelimit") for name in (*first.headers, *second.headers))
        generations = emulator.stats()["generations"]
        refused = chat(client)
        assert emulator.stats()["generations"] == generations  # nothing forwarded
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == 429 and error["param"] == "requests_per_minute"
    assert "requests_per_minute is 2" in error["message"] and error["metadata"]["resets_at"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit"] == "2" and refused.headers["x-ratelimit-remaining"] == "0"
    reset_ms = int(refused.headers["x-ratelimit-reset"])
    assert time.time() * 1000 < reset_ms <= (time.time() + 61) * 1000


def test_max_concurrent_refuses_while_one_is_in_flight(gateway, emulator):
    user = limited_user(gateway, emulator, max_concurrent=1)
    emulator.control("delay", {"path": "/chat/completions", "delay_ms": 1500, "times": 1})
    with gateway.client(user["token"]) as client:
        slow: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: slow.setdefault("r", chat(client, max_tokens=1)))
        thread.start()
        until(lambda: limits_of(client)["limits"]["max_concurrent"]["used"] == 1, "the slow request in flight")
        refused = chat(client, max_tokens=1)
        thread.join()
        assert slow["r"].status_code == 200
        assert refused.status_code == 429 and refused.json()["error"]["param"] == "max_concurrent"
        assert refused.headers["retry-after"] == "1"
        until(settled(client), "the slow request to be released")
        assert chat(client, max_tokens=1).status_code == 200


def test_tokens_per_hour_refuses_once_used(gateway, emulator):
    user = limited_user(gateway, emulator, tokens_per_hour=50)
    with gateway.client(user["token"]) as client:
        assert chat(client, max_tokens=60).status_code == 200  # 61 tokens: over, but only known afterwards
        until(lambda: limits_of(client)["limits"]["tokens_per_hour"]["used"] == 61, "the tokens to be counted")
        refused = chat(client, max_tokens=1)
    assert refused.status_code == 429
    assert refused.json()["error"]["param"] == "tokens_per_hour" and "61 tokens" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) > 3000


def test_monthly_budget_admits_three_then_402_and_free_models_still_pass(gateway, emulator):
    user = limited_user(gateway, emulator, monthly_budget_usd=str(3 * ONE))
    with gateway.client(user["token"]) as client:
        for _ in range(3):
            assert chat(client).status_code == 200
        until(settled(client), "the three to settle")
        refused = chat(client)
        assert refused.status_code == 402
        error = refused.json()["error"]
        assert error["param"] == "monthly_budget_usd" and "resets at" in error["message"]
        assert error["metadata"]["resets_at"].endswith("-01T00:00:00.000000Z")
        assert chat(client, FREE).status_code == 200  # free models cost nothing
        limits = limits_of(client)
    assert limits["within_limits"] is False
    budget = limits["limits"]["monthly_budget_usd"]
    assert Decimal(str(budget["used"])) == 3 * ONE and Decimal(str(budget["remaining"])) == 0


# -- budgets under concurrency ---------------------------------------------------------------


async def _burst(urls: list[str], token: str, n: int = 50) -> list[int]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:

        async def one(i: int) -> int:
            body = {"model": PAID, "messages": HELLO, "max_tokens": 100}
            return (await client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body)).status_code

        return await asyncio.gather(*(one(i) for i in range(n)))


def _assert_budget_held(statuses: list[int], client: httpx.Client) -> None:
    admitted = statuses.count(200)
    assert 1 <= admitted <= 4 and statuses.count(402) == len(statuses) - admitted, statuses
    until(settled(client), "the burst to settle")
    used = Decimal(str(limits_of(client)["limits"]["monthly_budget_usd"]["used"]))
    assert used == admitted * ONE and used <= 4 * ONE


def test_fifty_concurrent_requests_on_a_budget_with_room_for_three(gateway, emulator):
    user = limited_user(gateway, emulator, monthly_budget_usd=str(3 * ONE))
    emulator.control("delay", {"path": "/chat/completions", "delay_ms": 300, "times": 3})
    statuses = asyncio.run(_burst([gateway.url], user["token"]))
    with gateway.client(user["token"]) as client:
        _assert_budget_held(statuses, client)


# -- reading it back ------------------------------------------------------------------------------


def test_limits_and_key_read_back(gateway, emulator):
    user = limited_user(gateway, emulator, requests_per_minute=10, daily_budget_usd="1", monthly_budget_usd="2")
    with gateway.client(user["token"]) as client:
        assert chat(client).status_code == 200
        until(settled(client), "the request to settle")
        data = limits_of(client)
        key = client.get("/v1/key")
    assert data["within_limits"] is True and data["tier"] == "starter"
    limits = data["limits"]
    assert set(limits) == {"requests_per_minute", "requests_per_hour", "max_concurrent", "tokens_per_hour",
                           "daily_budget_usd", "monthly_budget_usd"}
    assert limits["requests_per_minute"]["limit"] == 10 and limits["requests_per_minute"]["used"] == 1
    assert limits["requests_per_minute"]["remaining"] == 9 and limits["requests_per_minute"]["resets_at"]
    assert limits["requests_per_hour"] == {"limit": None, "used": 1, "remaining": None,
                                           "resets_at": limits["requests_per_hour"]["resets_at"]}
    daily = limits["daily_budget_usd"]
    assert Decimal(str(daily["used"])) == ONE and Decimal(str(daily["remaining"])) == 1 - ONE
    assert daily["resets_at"].endswith("T00:00:00.000000Z")
    assert key.status_code == 200
    body = key.json()["data"]
    assert body["label"].startswith("gw-") and body["label"].endswith("...") and user["token"] not in key.text
    assert Decimal(str(body["limit"])) == 1 and body["limit_reset"] == "daily"  # the tighter budget
    assert Decimal(str(body["limit_remaining"])) == 1 - ONE
    assert Decimal(str(body["usage"])) == Decimal(str(body["usage_monthly"])) == ONE
    assert body["tier"] == "starter" and body["rate_limit"]["requests"] == 10
    assert [b["reset_interval"] for b in body["budgets"]] == ["daily", "monthly"]
    assert body["effective_budget"]["budget_id"] == "daily_budget_usd"


def test_openrouter_sdk_validates_the_key_metadata(gateway, emulator):
    for user in (gateway.create_user(tier="starter", key=emulator.new_key()),
                 limited_user(gateway, emulator, monthly_budget_usd="5")):
        sdk = OpenRouter(api_key=user["token"], server_url=f"{gateway.url}/api/v1", timeout_ms=30_000)
        data = sdk.api_keys.get_current_key_metadata().data
        assert data.label.endswith("...") and data.rate_limit.note
        assert data.is_management_key is False and data.usage == 0
    assert data.limit == 5 and data.limit_reset == "monthly" and data.effective_budget.limit_usd == 5


def test_limit_routes_need_a_platform_token(gateway):
    for path in ("/v1/limits", "/v1/key", "/api/v1/key"):
        response = httpx.get(gateway.url + path, headers={"Authorization": "Bearer gw-nope"})
        assert response.status_code == 401 and response.json()["error"]["code"] == 401


# -- two instances, one Redis --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[GatewayProcess]]:
    """Two gateways sharing one SQLite file, one master key and one Redis."""
    url = redis_url_or_skip(db=14)
    tmp: Path = tmp_path_factory.mktemp("pair")
    (tmp / "master.key").write_text(Fernet.generate_key().decode() + "\n")
    overrides = {"redis": {"url": url}, "database": {"url": f"sqlite:///{tmp}/shared.db"},
                 "security": {"master_key_file": str(tmp / "master.key")},
                 "tiers": {"starter": {"markup_pct": "10"}}, "default_tier": "starter"}
    first = start_gateway(tmp / "a", emulator, overrides)
    second = start_gateway(tmp / "b", emulator, overrides)
    try:
        yield [first, second]
    finally:
        first.stop()
        second.stop()


def test_two_instances_share_request_limits(pair, emulator):
    a, b = pair
    user = limited_user(a, emulator, requests_per_minute=2)
    with a.client(user["token"]) as on_a, b.client(user["token"]) as on_b:
        assert chat(on_a, max_tokens=1).status_code == 200
        assert chat(on_b, max_tokens=1).status_code == 200
        refused = [chat(on_a, max_tokens=1), chat(on_b, max_tokens=1)]
        assert [r.status_code for r in refused] == [429, 429]
        assert limits_of(on_b)["limits"]["requests_per_minute"]["used"] == 2


def test_fifty_concurrent_requests_across_two_instances(pair, emulator):
    a, b = pair
    user = limited_user(a, emulator, monthly_budget_usd=str(3 * ONE))
    emulator.control("delay", {"path": "/chat/completions", "delay_ms": 300, "times": 3})
    statuses = asyncio.run(_burst([a.url, b.url], user["token"]))
    with b.client(user["token"]) as client:
        _assert_budget_held(statuses, client)
