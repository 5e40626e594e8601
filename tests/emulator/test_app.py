"""The local OpenRouter emulator: shapes, money, failure injection, and the real SDKs.

Most tests talk to the app in-process through httpx's ASGI transport. Disconnects and
the official SDKs need a real socket, so those use a uvicorn server in a thread.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from decimal import Decimal

import httpx
import pytest
import uvicorn

from openrouter_emulator.app import (
    DEMO_KEY,
    DEMO_MANAGEMENT_KEY,
    EmulatorState,
    create_emulator_app,
)

BASE = "http://emulator/api/v1"
MINI_PROMPT, MINI_COMPLETION = Decimal("0.00000015"), Decimal("0.0000006")  # openai/gpt-4o-mini
GENERATION_FIELDS = {  # OPENROUTER.md §4: the SDKs require every one of these keys
    "id", "upstream_id", "total_cost", "cache_discount", "upstream_inference_cost", "created_at", "model",
    "app_id", "streamed", "cancelled", "provider_name", "latency", "moderation_latency", "generation_time",
    "finish_reason", "native_finish_reason", "tokens_prompt", "tokens_completion", "native_tokens_prompt",
    "native_tokens_completion", "native_tokens_completion_images", "native_tokens_reasoning",
    "native_tokens_cached", "num_media_prompt", "num_input_audio_prompt", "num_media_completion",
    "num_search_results", "num_fetches", "origin", "usage", "is_byok", "external_user", "api_type",
    "data_region", "preset_id", "router", "service_tier", "provider_responses", "web_search_engine",
    "workspace_id", "http_referer", "user_agent",
}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def auth(key: str = DEMO_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat_body(**extra) -> dict:
    return {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello, please!"}], **extra}


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (comments skipped)."""
    return [block[6:] for block in text.split("\n\n") if block.startswith("data: ")]


@pytest.fixture
def app():
    return create_emulator_app()


@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        yield c


async def mint_key(client: httpx.AsyncClient, **fields) -> str:
    response = await client.post("http://emulator/_emulator/keys", json=fields)
    assert response.status_code == 200
    return response.json()["key"]


# ---------------------------------------------------------------- chat


@pytest.mark.anyio
async def test_chat_non_stream_has_openrouter_shape(client):
    response = await client.post("/chat/completions", json=chat_body(), headers=auth())
    assert response.status_code == 200
    body = response.json()
    assert re.fullmatch(r"gen-\d+-[A-Za-z0-9]{20}", body["id"])
    assert response.headers["x-generation-id"] == body["id"]
    assert body["object"] == "chat.completion" and body["provider"] == "OpenAI"
    assert body["model"] == "openai/gpt-4o-mini"
    assert "system_fingerprint" in body and body["system_fingerprint"] is None
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello from the emulator.", "refusal": None,
                                 "reasoning": None}
    assert choice["finish_reason"] == choice["native_finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == len("Say hello, please!") // 4 + 1
    assert usage["completion_tokens"] == 5 and usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert set(usage["cost_details"]) >= {"upstream_inference_prompt_cost", "upstream_inference_completions_cost"}


@pytest.mark.anyio
async def test_cost_is_exact_decimal(client):
    response = await client.post("/chat/completions", json=chat_body(max_tokens=7), headers=auth())
    assert "e-" not in response.text.lower()
    usage = json.loads(response.text, parse_float=Decimal)["usage"]
    expected = MINI_PROMPT * usage["prompt_tokens"] + MINI_COMPLETION * 7
    assert usage["completion_tokens"] == 7
    assert usage["cost"] == expected
    assert usage["cost_details"]["upstream_inference_prompt_cost"] == MINI_PROMPT * usage["prompt_tokens"]


@pytest.mark.anyio
async def test_stream_framing(client):
    response = await client.post("/chat/completions", json=chat_body(stream=True, max_tokens=4), headers=auth())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.startswith(": OPENROUTER PROCESSING\n\n")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e, parse_float=Decimal) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {response.headers["x-generation-id"]}
    assert all(c["object"] == "chat.completion.chunk" and "system_fingerprint" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c for c in chunks[1:] if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == "Hello from the emulator"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    final = chunks[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 4
    assert final["usage"]["cost"] == MINI_PROMPT * final["usage"]["prompt_tokens"] + MINI_COMPLETION * 4


@pytest.mark.anyio
async def test_model_selection_and_request_errors(client):
    async def error(body, key=DEMO_KEY, content=None):
        r = await client.post("/chat/completions", json=body, content=content, headers=auth(key))
        envelope = r.json()["error"]
        assert envelope["code"] == r.status_code and "error_type" in envelope["metadata"]
        return r.status_code, envelope["message"]

    assert await error(chat_body(model="nope/model")) == (400, "nope/model is not a valid model ID")
    assert await error({"messages": [{"role": "user", "content": "x"}]}) == (400, "No models provided")
    status, message = await error(chat_body(model="emulator/data-policy"))
    assert status == 404 and message.startswith("No endpoints found matching your data policy")
    assert (await error(None, content=b"{not json"))[0] == 400
    assert await error(chat_body(), key="sk-or-v1-unknown") == (401, "User not found")
    assert (await error(chat_body(), key=DEMO_MANAGEMENT_KEY))[0] == 403

    fallback = await client.post("/chat/completions", headers=auth(),
                                 json=chat_body(model="nope/x", models=["anthropic/claude-3.5-sonnet"]))
    assert fallback.json()["model"] == "anthropic/claude-3.5-sonnet"
    key = await mint_key(client, default_model="google/gemma-2-9b-it:free")
    defaulted = await client.post("/chat/completions", headers=auth(key),
                                  json={"messages": [{"role": "user", "content": "hi"}]})
    assert defaulted.json()["model"] == "google/gemma-2-9b-it:free" and defaulted.json()["usage"]["cost"] == 0


# ---------------------------------------------------------------- generation, key, credits


@pytest.mark.anyio
async def test_generation_lags_then_matches_reported_cost(client, app):
    await client.post("http://emulator/_emulator/generation-not-ready", json={"lookups": 2})
    response = await client.post("/chat/completions", json=chat_body(stream=True), headers=auth())
    gen_id = response.headers["x-generation-id"]
    reported = json.loads(sse_events(response.text)[-2], parse_float=Decimal)["usage"]["cost"]
    for _ in range(2):
        missing = await client.get("/generation", params={"id": gen_id}, headers=auth())
        assert missing.status_code == 404 and missing.json()["error"]["message"] == "Generation not found"
    found = await client.get("/generation", params={"id": gen_id}, headers=auth())
    data = json.loads(found.text, parse_float=Decimal)["data"]
    assert GENERATION_FIELDS <= set(data)
    assert data["total_cost"] == data["usage"] == reported
    assert data["streamed"] is True and data["cancelled"] is False and data["data_region"] == "global"
    assert data["tokens_completion"] == 5 and data["finish_reason"] == "stop"

    other = await mint_key(client)
    assert (await client.get("/generation", params={"id": gen_id}, headers=auth(other))).status_code == 404
    assert (await client.get("/generation", params={"id": "gen-0-x"}, headers=auth())).status_code == 404
    assert app.state.generation_lookups == 5


@pytest.mark.anyio
async def test_key_and_credits_reflect_spend(client):
    key = await mint_key(client, credits=25)
    chat = json.loads((await client.post("/chat/completions", json=chat_body(), headers=auth(key))).text,
                      parse_float=Decimal)
    cost = chat["usage"]["cost"]
    info = json.loads((await client.get("/key", headers=auth(key))).text, parse_float=Decimal)["data"]
    assert info["usage"] == info["usage_daily"] == info["usage_monthly"] == cost
    assert info["label"] == f"{key[:12]}...{key[-3:]}" and info["is_management_key"] is False
    assert info["rate_limit"]["note"] and info["budgets"] == [] and info["effective_budget"] is None
    credits = json.loads((await client.get("/credits", headers=auth(key))).text, parse_float=Decimal)["data"]
    assert credits == {"total_credits": 25, "total_usage": cost}
    account = (await client.get("/credits", headers=auth(DEMO_MANAGEMENT_KEY))).json()["data"]
    assert set(account) == {"total_credits", "total_usage"}
    management = (await client.get("/key", headers=auth(DEMO_MANAGEMENT_KEY))).json()["data"]
    assert management["is_management_key"] is True


@pytest.mark.anyio
async def test_key_limit_gives_402(client):
    key = await mint_key(client, limit=0.000001)
    assert (await client.post("/chat/completions", json=chat_body(), headers=auth(key))).status_code == 200
    refused = await client.post("/chat/completions", json=chat_body(), headers=auth(key))
    assert refused.status_code == 402 and refused.json()["error"]["metadata"]["error_type"] == "payment_required"
    assert (await client.get("/key", headers=auth(key))).json()["data"]["limit_remaining"] == 0


# ---------------------------------------------------------------- models


@pytest.mark.anyio
async def test_models_paging(client, app):
    full = (await client.get("/models")).json()
    ids = [m["id"] for m in full["data"]]
    assert full["total_count"] == len(ids) and full["links"]["next"] is None
    assert {"openai/gpt-4o-mini", "meta-llama/llama-3.3-70b-instruct:free", "emulator/zero-priced"} <= set(ids)
    assert "openai/text-embedding-3-small" not in ids  # /models lists text output by default, as OpenRouter
    assert "openai/text-embedding-3-small" in [m["id"] for m in
                                               (await client.get("/models?output_modalities=all")).json()["data"]]
    mini = next(m for m in full["data"] if m["id"] == "openai/gpt-4o-mini")
    assert mini["pricing"]["prompt"] == "0.00000015" and mini["pricing"]["completion"] == "0.0000006"

    page = (await client.get("/models", params={"offset": 2, "limit": 3})).json()
    assert [m["id"] for m in page["data"]] == ids[2:5]
    assert page["links"]["next"] == "/api/v1/models?offset=5&limit=3"

    await client.post("http://emulator/_emulator/models", json={"extra": 600})
    first = (await client.get("/models", params={"offset": 0, "limit": 500})).json()
    assert len(first["data"]) == 500 and first["total_count"] == len(ids) + 600
    assert first["links"]["next"] == "/api/v1/models?offset=500&limit=500"
    rest = (await client.get("/models", params={"offset": 500, "limit": 500})).json()
    assert len(rest["data"]) == len(ids) + 100 and rest["links"]["next"] is None
    await client.post("http://emulator/_emulator/models", json={"extra": 1200})
    capped = (await client.get("/models", params={"limit": 5000})).json()
    assert len(capped["data"]) == 1000 and capped["links"]["next"] == "/api/v1/models?offset=1000&limit=1000"
    assert (await client.get("/models", params={"offset": "x"})).status_code == 400
    assert app.state.models_fetches == 7


# ---------------------------------------------------------------- key management


@pytest.mark.anyio
async def test_key_api_lifecycle(client):
    manage = auth(DEMO_MANAGEMENT_KEY)
    denied = await client.get("/keys", headers=auth())
    assert denied.status_code == 403
    assert denied.json()["error"]["message"] == "Only management keys can perform this operation"
    assert (await client.post("/keys", json={}, headers=manage)).status_code == 400

    created = await client.post("/keys", json={"name": "alice", "limit": 5, "limit_reset": "monthly"},
                                headers=manage)
    assert created.status_code == 201
    row, key = created.json()["data"], created.json()["key"]
    assert re.fullmatch(r"sk-or-v1-[0-9a-f]{64}", key) and row["name"] == "alice" and row["limit"] == 5
    assert {"creator_user_id", "external_user", "last_used_at", "workspace_id", "updated_at"} <= set(row)
    assert (await client.post("/chat/completions", json=chat_body(), headers=auth(key))).status_code == 200

    listed = (await client.get("/keys", headers=manage)).json()["data"]
    assert listed[0]["hash"] == row["hash"] and listed[0]["usage"] > 0
    assert (await client.get(f"/keys/{row['hash']}", headers=manage)).json()["data"]["name"] == "alice"

    patched = await client.patch(f"/keys/{row['hash']}", json={"disabled": True, "name": "bob"}, headers=manage)
    assert patched.json()["data"]["disabled"] is True and patched.json()["data"]["updated_at"]
    assert (await client.post("/chat/completions", json=chat_body(), headers=auth(key))).status_code == 401
    hashes = [r["hash"] for r in (await client.get("/keys", headers=manage)).json()["data"]]
    assert row["hash"] not in hashes
    hashes = [r["hash"] for r in (await client.get("/keys?include_disabled=true", headers=manage)).json()["data"]]
    assert row["hash"] in hashes

    assert (await client.delete(f"/keys/{row['hash']}", headers=manage)).json() == {"deleted": True}
    assert (await client.post("/chat/completions", json=chat_body(), headers=auth(key))).status_code == 401
    assert (await client.get(f"/keys/{row['hash']}", headers=manage)).status_code == 404


# ---------------------------------------------------------------- failure injection, control


@pytest.mark.anyio
async def test_injected_failure_with_retry_after(client):
    await client.post("http://emulator/_emulator/fail",
                      json={"path": "/chat/completions", "status": 503, "times": 2, "retry_after": 1})
    for _ in range(2):
        failed = await client.post("/chat/completions", json=chat_body(), headers=auth())
        assert failed.status_code == 503 and failed.headers["retry-after"] == "1"
        assert failed.json()["error"]["code"] == 503
    assert (await client.post("/chat/completions", json=chat_body(), headers=auth())).status_code == 200

    await client.post("http://emulator/_emulator/delay", json={"path": "/models", "delay_ms": 150})
    started = time.perf_counter()
    await client.get("/models")
    assert time.perf_counter() - started >= 0.15


@pytest.mark.anyio
async def test_midstream_error_chunk(client, app):
    await client.post("http://emulator/_emulator/midstream-error",
                      json={"after_chunks": 2, "code": 502, "message": "Provider disconnected"})
    response = await client.post("/chat/completions", json=chat_body(stream=True), headers=auth())
    events = sse_events(response.text)
    assert "[DONE]" not in events
    chunks = [json.loads(e) for e in events]
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) == 2
    last = chunks[-1]
    assert last["error"] == {"code": 502, "message": "Provider disconnected",
                             "metadata": {"error_type": "provider_unavailable"}}
    assert last["choices"][0]["finish_reason"] == "error"
    gen = app.state.generations[response.headers["x-generation-id"]]
    assert gen.finish_reason == "error" and gen.tokens_completion == 2 and gen.cost > 0
    again = await client.post("/chat/completions", json=chat_body(stream=True), headers=auth())
    assert sse_events(again.text)[-1] == "[DONE]"  # times=1: consumed


@pytest.mark.anyio
async def test_stats_record_last_request_and_reset(client):
    await client.post("/chat/completions", content=b'{"model":"openai/gpt-4o-mini","messages":[]}',
                      headers={**auth(), "X-Title": "tests"})
    stats = (await client.get("http://emulator/_emulator/stats")).json()
    last = stats["last_request"]
    assert last["path"] == "/api/v1/chat/completions" and last["headers"]["authorization"] == DEMO_KEY[-4:]
    assert last["headers"]["x-title"] == "tests" and last["body"] == '{"model":"openai/gpt-4o-mini","messages":[]}'
    assert stats["requests"] == {"/chat/completions": 1}
    assert len(stats["keys"]) == 1
    await client.post("http://emulator/_emulator/reset")
    stats = (await client.get("http://emulator/_emulator/stats")).json()
    assert stats["requests"] == {} and stats["last_request"] is None and len(stats["keys"]) == 1


@pytest.mark.anyio
async def test_last_stream_returns_the_exact_bytes_sent(client):
    assert (await client.get("http://emulator/_emulator/last-stream")).status_code == 404
    first = await client.post("/chat/completions", json=chat_body(stream=True), headers=auth())
    await client.post("http://emulator/_emulator/midstream-error", json={"after_chunks": 1})
    second = await client.post("/completions", json={"model": "openai/gpt-4o-mini", "prompt": "é", "stream": True},
                               headers=auth())
    await client.post("/chat/completions", json=chat_body(), headers=auth())  # not streamed: not kept
    kept = (await client.get("http://emulator/_emulator/last-stream")).json()
    assert kept["generation_id"] == second.headers["x-generation-id"] != first.headers["x-generation-id"]
    assert base64.b64decode(kept["base64"]) == second.content and kept["length"] == len(second.content)
    assert kept["complete"] is True and b'"error"' in second.content


@pytest.mark.anyio
async def test_legacy_completions_and_embeddings(client):
    text = (await client.post("/completions", headers=auth(),
                              json={"model": "openai/gpt-4o-mini", "prompt": "Once upon"})).json()
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "Hello from the emulator."
    streamed = await client.post("/completions", headers=auth(),
                                 json={"model": "openai/gpt-4o-mini", "prompt": "Once", "stream": True})
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 5

    embedded = await client.post("/embeddings", headers=auth(),
                                 json={"model": "openai/text-embedding-3-small", "input": ["a b c d", "e"]})
    body = json.loads(embedded.text, parse_float=Decimal)
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    assert body["id"] == embedded.headers["x-generation-id"]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3, "cost": Decimal("0.00000006")}


# ---------------------------------------------------------------- real server: disconnects and SDKs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """A real uvicorn emulator on a free port, in a background thread."""
    app = create_emulator_app(EmulatorState())
    port = _free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                                             log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not instance.started and time.time() < deadline:
        time.sleep(0.02)
    yield app, f"http://127.0.0.1:{port}/api/v1"
    instance.should_exit = True
    thread.join(5)


def test_client_disconnect_records_cancelled_generation(server):
    app, base = server
    httpx.post(base.replace("/api/v1", "/_emulator/stream"), json={"chunk_delay_ms": 20})
    try:
        with httpx.stream("POST", f"{base}/chat/completions", json=chat_body(stream=True, max_tokens=200),
                          headers=auth()) as response:
            gen_id = response.headers["x-generation-id"]
            for i, _ in enumerate(response.iter_raw()):
                if i == 3:
                    break
    finally:
        httpx.post(base.replace("/api/v1", "/_emulator/stream"), json={"chunk_delay_ms": 0})
    deadline = time.time() + 5
    while gen_id not in app.state.generations and time.time() < deadline:
        time.sleep(0.02)
    data = httpx.get(f"{base}/generation", params={"id": gen_id}, headers=auth()).json()["data"]
    assert data["cancelled"] is True and 0 < data["tokens_completion"] < 200
    assert Decimal(str(data["total_cost"])) == (MINI_PROMPT * data["tokens_prompt"]
                                                + MINI_COMPLETION * data["tokens_completion"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK flags its own is_provisioning_key field
def test_official_sdks_validate_every_response(server):
    import openai
    from openrouter import OpenRouter

    _, base = server
    oai = openai.OpenAI(base_url=base, api_key=DEMO_KEY, max_retries=0)
    completion = oai.chat.completions.create(model="openai/gpt-4o-mini",
                                             messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello from the emulator."
    stream = oai.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                         stream=True)
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    vectors = oai.embeddings.create(model="openai/text-embedding-3-small", input="hello")
    assert len(vectors.data[0].embedding) == 16

    sdk = OpenRouter(api_key=DEMO_KEY, server_url=base)
    page = sdk.models.list()
    assert page.result.total_count == len(page.result.data)
    assert sdk.api_keys.get_current_key_metadata().data.label.startswith("sk-or-v1-")
    generation = sdk.generations.get_generation(id=completion.id).data
    assert generation.total_cost == completion.usage.model_dump()["cost"]
    assert sdk.credits.get_credits().data.total_credits == 100
    sent = sdk.chat.send(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert sent.id.startswith("gen-")

    admin = OpenRouter(api_key=DEMO_MANAGEMENT_KEY, server_url=base)
    created = admin.api_keys.create(name="sdk-made", limit=3)
    assert created.key.startswith("sk-or-v1-")
    assert any(row.hash == created.data.hash for row in admin.api_keys.list().data)
    assert admin.api_keys.update(hash=created.data.hash, disabled=True).data.disabled is True
    assert admin.api_keys.get(hash=created.data.hash).data.name == "sdk-made"
    admin.api_keys.delete(hash=created.data.hash)
