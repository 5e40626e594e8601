"""Strict admin and client payloads against a real `gateway serve`: each bad value is a 400 naming the
field and the allowed range, nothing is stored, and a bad value already stored reads as unset."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Iterator

import httpx
import orjson
import pytest

from tests.conftest import ADMIN_TOKEN, Emulator, GatewayProcess, start_gateway

BAD_MONEY = ["1e999999999", "1e-999999999", "1e-99999999", "1_000", "\u0663", " 5 ", "NaN", "Infinity", "-1", -1,
             "1E3", "0x10", "", "1000000000.5", 1000000001, "0.0000000000001", True, [], {"usd": 1}]


@pytest.fixture(scope="module")
def setup(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Path]]:
    tmp = tmp_path_factory.mktemp("strict")
    process = start_gateway(tmp, emulator, {"tiers": {"trial": {"markup_pct": "15", "monthly_budget_usd": "10"}}})
    try:
        yield process, tmp
    finally:
        process.stop()


@pytest.fixture(scope="module")
def gw(setup: tuple[GatewayProcess, Path]) -> GatewayProcess:
    return setup[0]


@pytest.fixture(scope="module")
def member(gw: GatewayProcess, emulator: Emulator) -> dict[str, Any]:
    return gw.create_user(tier="trial", key=emulator.new_key())


def stored_user(tmp: Path, user_id: str) -> tuple[Any, ...]:
    with sqlite3.connect(tmp / "gateway.db") as db:
        return db.execute("SELECT tier, status, email, overrides, updated_at FROM users WHERE id = ?",
                          (user_id,)).fetchone()


@pytest.mark.parametrize("name", ["monthly_budget_usd", "daily_budget_usd"])
@pytest.mark.parametrize("value", BAD_MONEY)
def test_a_bad_budget_is_400_naming_the_field_and_range_and_nothing_is_stored(
    setup: tuple[GatewayProcess, Path], member: dict[str, Any], name: str, value: Any,
) -> None:
    gw, tmp = setup
    before = stored_user(tmp, member["id"])
    audit_before = gw.admin.get("/admin/v1/audit", params={"user": member["id"]}).json()["data"]
    response = gw.admin.patch(f"/admin/v1/users/{member['id']}", json={"limits": {name: value}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == f"limits.{name}"
    assert "from 0 to 1,000,000,000" in error["message"] and "12 decimal places" in error["message"]
    assert stored_user(tmp, member["id"]) == before
    assert gw.admin.get("/admin/v1/audit", params={"user": member["id"]}).json()["data"] == audit_before
    client = gw.client(member["token"])
    assert client.get("/v1/key").status_code == 200
    assert client.get("/v1/limits").status_code == 200


@pytest.mark.parametrize("value", [-1, 10**9 + 1, 1.5, "60", True, 2**40])
def test_a_bad_count_is_400(setup: tuple[GatewayProcess, Path], member: dict[str, Any], value: Any) -> None:
    gw, tmp = setup
    before = stored_user(tmp, member["id"])
    response = gw.admin.patch(f"/admin/v1/users/{member['id']}", json={"limits": {"requests_per_minute": value}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "limits.requests_per_minute"
    assert "whole number from 0 to 1,000,000,000" in response.json()["error"]["message"]
    assert stored_user(tmp, member["id"]) == before


@pytest.mark.parametrize("value, stored", [("12.50", "12.50"), (25, "25"), (0.5, "0.5"), ("0.000000000001", "0.000000000001")])
def test_plain_amounts_are_stored_exactly(gw: GatewayProcess, emulator: Emulator, value: Any, stored: str) -> None:
    user = gw.create_user(tier="trial")
    response = gw.admin.patch(f"/admin/v1/users/{user['id']}", json={"limits": {"monthly_budget_usd": value}})
    assert response.status_code == 200, response.text
    assert response.json()["limits"]["monthly_budget_usd"] == stored


@pytest.mark.parametrize("body, param", [
    ({"limit_usd": "1e999999999"}, "limit_usd"), ({"limit_usd": " 5 "}, "limit_usd"), ({"limit_usd": "\u0663"}, "limit_usd"),
])
def test_a_bad_managed_key_limit_is_400(gw: GatewayProcess, member: dict[str, Any], body: dict[str, Any],
                                        param: str) -> None:
    response = gw.admin.post(f"/admin/v1/users/{member['id']}/managed-key", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 10**9 + 1}, "max_tokens"), ({"default_model": "m" * 201}, "default_model"),
    ({"fallback_models": ["a/b"] * 17}, "fallback_models"), ({"temperature": "1"}, "temperature"),
])
def test_bad_settings_are_400_and_not_stored(gw: GatewayProcess, member: dict[str, Any], body: dict[str, Any],
                                             param: str) -> None:
    client = gw.client(member["token"])
    before = client.get("/v1/settings").json()
    response = client.put("/v1/settings", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert client.get("/v1/settings").json() == before


@pytest.mark.parametrize("body, param", [
    ({"email": "a" * 250 + "@x.io"}, "email"), ({"name": "n" * 201}, "name"),
])
def test_strings_are_bounded(gw: GatewayProcess, member: dict[str, Any], body: dict[str, Any], param: str) -> None:
    path = "/admin/v1/users" if "email" in body else f"/admin/v1/users/{member['id']}/tokens"
    response = gw.admin.post(path, json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_an_emergency_stop_reason_is_bounded(gw: GatewayProcess) -> None:
    response = gw.admin.put("/admin/v1/emergency-stop", json={"enabled": True, "reason": "r" * 501})
    assert response.status_code == 400 and response.json()["error"]["param"] == "reason"
    assert gw.admin.get("/admin/v1/emergency-stop").json()["enabled"] is False


def test_a_json_api_body_over_the_limit_is_413(gw: GatewayProcess, member: dict[str, Any]) -> None:
    response = gw.client(member["token"]).put("/v1/settings", content=b'{"x": "' + b"a" * 70_000 + b'"}',
                                               headers={"content-type": "application/json"})
    assert response.status_code == 413 and "server.max_api_body_bytes" in response.json()["error"]["message"]


@pytest.mark.parametrize("depth", [900, 1000, 1020])
def test_deeply_nested_chat_bodies_are_not_a_500(gw: GatewayProcess, member: dict[str, Any], depth: int) -> None:
    content = "[" * depth + '"' + "x" * 5000 + '"' + "]" * depth
    raw = ('{"model": "openai/gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": '
           + content + "}]}").encode()
    response = gw.client(member["token"]).post("/v1/chat/completions", content=raw,
                                               headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text


def test_a_bad_value_stored_by_an_older_version_reads_as_unset(
    setup: tuple[GatewayProcess, Path], emulator: Emulator,
) -> None:
    gw, tmp = setup
    user = gw.create_user(tier="trial", key=emulator.new_key())
    overrides = {"monthly_budget_usd": "1e-999999999", "daily_budget_usd": "1e999999999", "requests_per_minute": -5}
    with sqlite3.connect(tmp / "gateway.db") as db:
        db.execute("UPDATE users SET overrides = ? WHERE id = ?", (orjson.dumps(overrides).decode(), user["id"]))
    restarted = start_gateway(tmp, emulator, {"tiers": {"trial": {"markup_pct": "15", "monthly_budget_usd": "10"}}})
    try:
        client = restarted.client(user["token"])
        key = client.get("/v1/key", timeout=5)
        assert key.status_code == 200 and key.json()["data"]["limit"] == 10  # the tier's budget: unset override
        limits = client.get("/v1/limits", timeout=5)
        assert limits.status_code == 200, limits.text
        chat = client.post("/v1/chat/completions", json={"model": "openai/gpt-4o-mini", "max_tokens": 5,
                                                         "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200, chat.text
        shown = httpx.get(f"{restarted.url}/admin/v1/users/{user['id']}",
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        assert shown["limits"] == {}
    finally:
        restarted.stop()
