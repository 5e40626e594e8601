"""Catalogue, credits, the user's account, BYOK and settings end to end (real gateway + emulator).

The catalogue is fetched once per TTL for everyone and pages the way the OpenRouter
Python SDK expects; credits are exact and flag low balances on the right side of the
line; a user connects their own key through the client API (bad keys refused, nothing
stored, only the last four characters ever shown); the user's settings fill absent
fields on the proxy path and leave everything else byte for byte.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from openrouter import OpenRouter

from tests.conftest import Emulator, GatewayProcess, start_gateway

CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def orsdk(gateway: GatewayProcess, token: str) -> OpenRouter:
    return OpenRouter(api_key=token, server_url=f"{gateway.url}/api/v1", timeout_ms=30_000)


def exact(response: httpx.Response) -> Any:
    """The JSON body with every non-integer number as an exact Decimal."""
    return json.loads(response.content, parse_float=Decimal)


def error_param(response: httpx.Response, status: int) -> str | None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"]
    return error["param"]


def upstream_free_ids(emulator: Emulator) -> list[str]:
    rows = httpx.get(f"{emulator.base_url}/models", params={"output_modalities": "all"}, timeout=10).json()["data"]
    return [m["id"] for m in rows if m["id"].endswith(":free") or (
        Decimal(m["pricing"]["prompt"]) == 0 and Decimal(m["pricing"]["completion"]) == 0
        and Decimal(m["pricing"].get("request", "0")) == 0)]


# ---------------------------------------------------------------- catalogue


def test_catalogue_is_fetched_once_and_the_sdk_pages_all_of_it(
    emulator: Emulator, gateway: GatewayProcess, tmp_path: Path
) -> None:
    emulator.control("models", {"extra": 600})
    own = None
    try:
        upstream_ids = [m["id"] for m in httpx.get(f"{emulator.base_url}/models", timeout=10).json()["data"]]
        assert len(upstream_ids) > 600
        free_ids = upstream_free_ids(emulator)
        before = emulator.stats()["models_fetches"]
        own = start_gateway(tmp_path, emulator)
        user = own.create_user(tier="starter", key=emulator.new_key())
        client = own.client(user["token"])

        reads = [client.get("/v1/models"), client.get("/api/v1/models", params={"offset": 0, "limit": 500}),
                 client.get("/v1/models/free")] + [client.get("/v1/models") for _ in range(7)]
        assert all(r.status_code == 200 for r in reads), [r.text for r in reads if r.status_code != 200]
        full = reads[0].json()
        assert [m["id"] for m in full["data"]] == upstream_ids  # no params: the whole (text) list
        assert full["total_count"] == len(upstream_ids) and full["links"]["next"] is None
        first = reads[1].json()
        assert len(first["data"]) == 500 and first["links"]["next"] == "/api/v1/models?offset=500&limit=500"
        free = reads[2].json()
        assert free["data"] == free_ids and free["count"] == len(free_ids)
        assert "meta-llama/llama-3.3-70b-instruct:free" in free["data"] and "emulator/zero-priced" in free["data"]
        assert free["cached_at"].endswith("Z") and "x-catalog-stale" not in reads[2].headers

        listed: list[str] = []
        pages = 0
        result = orsdk(own, user["token"]).models.list()  # offset=0&limit=500, then pages until a short one
        while result is not None:
            listed += [m.id for m in result.result.data]
            pages += 1
            result = result.next()
        assert listed == upstream_ids and pages == 2

        embeddings = client.get("/v1/models", params={"output_modalities": "embeddings"}).json()
        assert [m["id"] for m in embeddings["data"]] == ["openai/text-embedding-3-small"]
        assert emulator.stats()["models_fetches"] - before == 1  # one fetch served all of the above
    finally:
        if own is not None:
            own.stop()
        emulator.control("models", {"extra": 0})


def test_a_stale_catalogue_is_served_and_flagged_without_hammering_the_upstream(
    emulator: Emulator, tmp_path: Path
) -> None:
    own = start_gateway(tmp_path, emulator, {"models": {"cache_ttl_s": 1}})
    try:
        client = own.client(own.create_user(tier="starter", key=emulator.new_key())["token"])
        fresh = client.get("/v1/models/free")
        assert fresh.status_code == 200 and "x-catalog-stale" not in fresh.headers
        emulator.control("fail", {"path": "/models", "status": 500, "times": 1})
        time.sleep(1.1)  # let the 1 s TTL run out
        before = emulator.stats()["requests"].get("/models", 0)  # counts refused attempts too
        reads = [client.get("/v1/models/free") for _ in range(5)]
        for stale in reads:
            assert stale.status_code == 200 and stale.json() == fresh.json()  # same list, same cached_at
            assert stale.headers["x-catalog-stale"] == "true" and "Stale" in stale.headers["warning"]
        assert emulator.stats()["requests"].get("/models", 0) - before == 1  # one failed attempt, then back-off
    finally:
        own.stop()


@pytest.mark.parametrize(
    ("params", "param"),
    [({"offset": "-1"}, "offset"), ({"offset": "x"}, "offset"), ({"limit": "0"}, "limit"),
     ({"limit": "1001"}, "limit"), ({"limit": "ten"}, "limit"), ({"offset": "0", "limit": "2.5"}, "limit")],
)
def test_bad_paging_is_refused_naming_the_parameter(gateway: GatewayProcess, user: dict[str, Any],
                                                    params: dict[str, str], param: str) -> None:
    response = gateway.client(user["token"]).get("/v1/models", params=params)
    assert error_param(response, 400) == param


def test_catalogue_needs_a_platform_token(gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.url}/v1/models/free").status_code == 401


# ---------------------------------------------------------------- credits


@pytest.mark.parametrize(("credits", "low"), [("9.99", True), ("10", False), ("123.456789", False)])
def test_credits_are_exact_and_flag_low_balances(gateway: GatewayProcess, emulator: Emulator, credits: str,
                                                 low: bool) -> None:
    user = gateway.create_user(tier="starter", key=emulator.new_key(credits=credits))
    response = gateway.client(user["token"]).get("/v1/credits")
    assert response.status_code == 200, response.text
    data = exact(response)["data"]
    assert data["total_credits"] == Decimal(credits) and data["total_usage"] == 0
    assert data["balance"] == Decimal(credits) and data["low_balance"] is low
    assert data["source"] == "credits"
    assert (data["note"] is not None and "latency" in data["note"]) is low


def test_credits_fall_back_to_the_keys_limit_when_credits_are_forbidden(
    gateway: GatewayProcess, emulator: Emulator
) -> None:
    user = gateway.create_user(tier="starter", key=emulator.new_key(limit="7.5"))
    emulator.control("fail", {"path": "/credits", "status": 403, "message": "Only management keys can do this"})
    data = exact(gateway.client(user["token"]).get("/v1/credits"))["data"]
    assert data["source"] == "key" and data["total_credits"] == Decimal("7.5") and data["low_balance"] is True


def test_credits_without_a_key_say_how_to_add_one(gateway: GatewayProcess) -> None:
    user = gateway.create_user(tier="starter")
    response = gateway.client(user["token"]).get("/v1/credits")
    assert response.status_code == 402 and "openrouter-key" in response.json()["error"]["message"]


# ---------------------------------------------------------------- account and BYOK


def test_byok_through_the_client_api(gateway: GatewayProcess, emulator: Emulator) -> None:
    user = gateway.create_user(tier="starter")
    client = gateway.client(user["token"])
    assert client.get("/v1/account").json()["key"] == {"connected": False}

    assert error_param(client.put("/v1/account/openrouter-key", json={"api_key": "not-a-key"}), 400) == "api_key"
    unknown = "sk-or-v1-" + secrets.token_hex(32)
    refused = client.put("/v1/account/openrouter-key", json={"api_key": unknown})
    assert error_param(refused, 400) == "api_key" and unknown not in refused.text
    assert error_param(client.put("/v1/account/openrouter-key", json={"api_key": unknown, "x": 1}), 400) == "x"
    assert client.get("/v1/account").json()["key"] == {"connected": False}  # nothing stored
    assert client.post("/v1/chat/completions", json={"model": "openai/gpt-4o-mini", **CHAT_BODY}).status_code == 402

    key = emulator.new_key(credits="42")
    connected = client.put("/v1/account/openrouter-key", json={"api_key": key})
    assert connected.status_code == 200, connected.text
    assert connected.json()["key"]["last4"] == key[-4:] and connected.json()["key"]["kind"] == "byok"
    assert client.post("/v1/account/sync").status_code == 200
    account = client.get("/v1/account")
    body = exact(account)
    for text in (connected.text, account.text):
        assert key[:-4] not in text and key[9:17] not in text  # last 4 only
    assert body["key"] == {"connected": True, "kind": "byok", "label": "sk-or-..." + key[-4:], "last4": key[-4:],
                           "disabled": False}
    assert body["credits"]["total_credits"] == Decimal("42") and body["credits"]["low_balance"] is False
    assert body["last_synced"] and body["sync_error"] is None
    assert body["free_models"]["count"] == len(upstream_free_ids(emulator))
    assert body["usage_this_month"]["total_cost"] == 0

    assert client.post("/v1/chat/completions", json={"model": "openai/gpt-4o-mini", **CHAT_BODY}).status_code == 200
    audit = gateway.admin.get("/admin/v1/audit", params={"user_id": user["id"]}).json()
    actions = [(row["actor"], row["action"]) for row in audit["data"]]
    assert (f"user:{user['id']}", "key.byok.set") in actions and key not in str(audit)

    assert client.delete("/v1/account/openrouter-key").status_code == 204
    assert client.get("/v1/account").json()["key"] == {"connected": False}
    assert client.post("/v1/chat/completions", json={"model": "openai/gpt-4o-mini", **CHAT_BODY}).status_code == 402
    assert client.delete("/v1/account/openrouter-key").status_code == 404


# ---------------------------------------------------------------- settings on the proxy path


def chat_and_capture(client: httpx.Client, emulator: Emulator, **kwargs: Any) -> tuple[httpx.Response, bytes]:
    """The response and the body the emulator received for it.

    The emulator keeps only its last request, and gateways settling earlier tests' costs
    call `/generation` in the background; if one lands in between, send again.
    """
    for _ in range(5):
        response = client.post("/v1/chat/completions", **kwargs)
        last = emulator.stats()["last_request"]
        if last is not None and last["path"].endswith("/chat/completions"):
            return response, last["body"].encode()
    raise AssertionError("the emulator never showed the chat request as its last one")


def test_settings_fill_absent_fields_and_leave_the_rest(gateway: GatewayProcess, emulator: Emulator) -> None:
    user = gateway.create_user(tier="starter", key=emulator.new_key())
    client = gateway.client(user["token"])
    assert client.get("/v1/settings").json() == {"default_model": None, "fallback_models": [], "temperature": None,
                                                 "max_tokens": None, "fallback_enabled": True}
    assert error_param(client.put("/v1/settings", json={"temperature": "hot"}), 400) == "temperature"
    assert error_param(client.put("/v1/settings", json={"default_modle": "a/b"}), 400) == "default_modle"
    assert client.get("/v1/settings").json()["temperature"] is None  # nothing written

    saved = client.put("/v1/settings", json={"default_model": "anthropic/claude-3.5-haiku", "temperature": 0.3,
                                             "max_tokens": 4, "fallback_models": ["openai/gpt-4o-mini"]})
    assert saved.status_code == 200 and saved.json()["default_model"] == "anthropic/claude-3.5-haiku"

    response, sent_raw = chat_and_capture(client, emulator, json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "anthropic/claude-3.5-haiku"
    assert response.json()["usage"]["completion_tokens"] == 4  # the max_tokens default reached the upstream
    sent = json.loads(sent_raw)
    assert sent["model"] == "anthropic/claude-3.5-haiku" and sent["temperature"] == 0.3 and sent["max_tokens"] == 4
    assert sent["models"] == ["openai/gpt-4o-mini"]

    # The fallback list is OpenRouter's `models`: a primary the upstream refuses falls back to it.
    response, _ = chat_and_capture(client, emulator, json={"model": "emulator/data-policy", **CHAT_BODY})
    assert response.status_code == 200 and response.json()["model"] == "openai/gpt-4o-mini"

    raw = b'{"model": "openai/gpt-4o-mini",  "models": [], "temperature": 1.50, "messages": [{"role": "user", ' \
          b'"content": "caf\\u00e9"}], "max_tokens": 2}'
    response, sent_raw = chat_and_capture(client, emulator, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200 and sent_raw == raw  # nothing to fill: byte for byte

    assert client.put("/v1/settings", json={"fallback_enabled": False}).json()["fallback_models"] == [
        "openai/gpt-4o-mini"]
    response, sent_raw = chat_and_capture(client, emulator, json={"model": "openai/gpt-4o", **CHAT_BODY})
    assert "models" not in json.loads(sent_raw)
    response, _ = chat_and_capture(client, emulator, json={"model": "emulator/data-policy", **CHAT_BODY})
    assert response.status_code == 404  # no fallback any more


# ---------------------------------------------------------------- the OpenRouter SDK


def test_openrouter_sdk_reads_models_credits_key_and_generation(gateway: GatewayProcess, emulator: Emulator) -> None:
    user = gateway.create_user(tier="starter", key=emulator.new_key(credits="12.5"))
    sdk = orsdk(gateway, user["token"])
    # catalogue engineer (this file's owner): models.list and credits.get_credits
    assert any(m.id == "openai/gpt-4o-mini" for m in sdk.models.list().result.data)
    credits = sdk.credits.get_credits()
    assert credits.data.total_credits == 12.5 and credits.data.total_usage == 0
    completion = sdk.chat.send(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    # limits engineer: /v1/key
    assert sdk.api_keys.get_current_key_metadata().data is not None
    # accounting engineer: /v1/generation (the record may lag a moment; the SDK does not retry 404)
    for _ in range(50):
        try:
            generation = sdk.generations.get_generation(id=completion.id)
            break
        except Exception:  # noqa: BLE001 - not readable yet: poll, as OpenRouter's clients do
            time.sleep(0.1)
    else:
        raise AssertionError("the generation never became readable")
    assert generation.data.id == completion.id


# ---------------------------------------------------------------- sync: admin API and CLI


def test_admin_sync_and_cli_sync(emulator: Emulator, tmp_path: Path) -> None:
    own = start_gateway(tmp_path, emulator, {"jobs": {"credit_sync_rate_per_s": 100}})
    try:
        users = [own.create_user(tier="starter", key=emulator.new_key(credits=str(5 + i))) for i in range(3)]
        no_key = own.create_user(tier="starter")
        unauth = httpx.post(f"{own.url}/admin/v1/credits/sync")
        assert unauth.status_code == 401
        report = own.admin.post("/admin/v1/credits/sync")
        assert report.status_code == 200, report.text
        assert report.json()["synced"] == 3 and report.json()["failed"] == 0 and report.json()["status"] == "done"
        for i, user in enumerate(users):
            credits = exact(own.client(user["token"]).get("/v1/account"))["credits"]
            assert credits["total_credits"] == Decimal(5 + i) and credits["low_balance"] is (5 + i < 10)
        assert own.client(no_key["token"]).get("/v1/account").json()["credits"] is None
        assert own.client(no_key["token"]).post("/v1/account/sync").status_code == 402

        env = {**os.environ, "GATEWAY_CONFIG": str(own.config_file)}
        cli = subprocess.run([sys.executable, "-m", "gateway", "sync-credits", "--user", users[0]["id"]],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["synced"] == 1 and "1/1 users" in cli.stderr
        bad = subprocess.run([sys.executable, "-m", "gateway", "sync-credits", "--user", "nobody"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nobody" in bad.stderr
    finally:
        own.stop()
