"""The proxy path end to end: a real `gateway serve` in front of the real emulator process.

What a client and OpenRouter each see: bodies and streams passed on byte for byte, the
right key upstream and no secret downstream, retries only before the first byte,
disconnects closing the upstream at once, and a clear refusal (with nothing forwarded)
for every bad input. The emulator is shared by the session, so counters are compared as
before/after deltas and every injected misbehaviour is consumed by the test that set it.
"""

from __future__ import annotations

import base64
import time
from typing import Any, Iterator

import httpx
import orjson
import pytest

from tests.conftest import Emulator, GatewayProcess, start_gateway

REFERER = "https://platform.example"
TITLE = "Platform Example"
MAX_BODY = 2048
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello, please!"}]}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "upgrade"}


@pytest.fixture(scope="module")
def gw(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway with attribution headers, a small body limit and fast, observable retries."""
    process = start_gateway(
        tmp_path_factory.mktemp("proxy-e2e"),
        emulator,
        {
            "server": {"max_body_bytes": MAX_BODY},
            "upstream": {"app_referer": REFERER, "app_title": TITLE, "retries": 3,
                         "backoff_base_s": 0.01, "backoff_max_s": 1.5},
            "tiers": {name: {"markup_pct": "0"} for name in ("trial", "starter", "professional", "enterprise")},
        },
    )
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def account(gw: GatewayProcess, emulator: Emulator) -> dict[str, Any]:
    key = emulator.new_key()
    return {**gw.create_user(tier="starter", key=key), "key": key}


@pytest.fixture(scope="module")
def client(gw: GatewayProcess, account: dict[str, Any]) -> Iterator[httpx.Client]:
    with gw.client(account["token"]) as c:
        yield c


def sent_upstream(emulator: Emulator, path: str = "/chat/completions") -> int:
    return emulator.stats()["requests"].get(path, 0)


def inference_requests(emulator: Emulator) -> dict[str, int]:
    """Requests the emulator saw on the proxied paths (background cost look-ups don't count)."""
    requests = emulator.stats()["requests"]
    return {path: requests.get(path, 0) for path in ("/chat/completions", "/completions", "/embeddings")}


def last_stream(emulator: Emulator) -> dict[str, Any]:
    response = httpx.get(f"{emulator.url}/_emulator/last-stream", timeout=5)
    assert response.status_code == 200, response.text
    data = response.json()
    data["bytes"] = base64.b64decode(data.pop("base64"))
    return data


def stream_raw(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    with client.stream("POST", path, json=body) as response:
        raw = b"".join(response.iter_raw())
    return response, raw


def generation_record(emulator: Emulator, key: str, generation_id: str, wait_s: float = 5) -> dict[str, Any] | None:
    """The emulator's record of a generation, polled: a cancelled one appears at its next chunk."""
    deadline = time.monotonic() + wait_s
    while True:
        found = httpx.get(f"{emulator.base_url}/generation", params={"id": generation_id},
                          headers={"Authorization": f"Bearer {key}"}, timeout=5)
        if found.status_code == 200:
            return found.json()["data"]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def events(raw: bytes) -> list[bytes]:
    return [block[6:] for block in raw.split(b"\n\n") if block.startswith(b"data: ")]


# ---------------------------------------------------------------- pass-through


def test_non_stream_keeps_status_body_and_openrouter_headers(client, account, emulator):
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "Hello from the emulator."
    assert response.headers["x-generation-id"] == body["id"] and body["id"].startswith("gen-")
    assert response.headers["x-request-id"].startswith("req_")
    assert response.headers["content-type"].startswith("application/json")
    names = {name.lower() for name in response.headers}
    assert not names & (HOP_BY_HOP | {"set-cookie", "authorization", "x-api-key"})
    everything = str(response.headers.multi_items()) + response.text
    assert account["key"] not in everything and account["token"] not in everything


def test_upstream_gets_the_users_key_and_configured_attribution(client, account, emulator):
    assert client.post("/v1/chat/completions", json=CHAT, headers={"User-Agent": "tests/1"}).status_code == 200
    last = emulator.stats()["last_request"]
    headers = last["headers"]
    assert last["path"] == "/api/v1/chat/completions"
    assert headers["authorization"] == account["key"][-4:]  # the emulator shows the last 4 characters only
    assert not account["token"].endswith(headers["authorization"])
    assert all(account["token"] not in value for value in headers.values())
    assert headers["http-referer"] == REFERER and headers["x-openrouter-title"] == TITLE
    assert headers["user-agent"] == "tests/1"
    assert orjson.loads(last["body"]) == CHAT


@pytest.mark.parametrize(
    ("sent", "expected", "absent"),
    [
        ({"X-Title": "Legacy App"}, {"x-title": "Legacy App", "http-referer": REFERER}, "x-openrouter-title"),
        ({"X-OpenRouter-Title": "Mine", "HTTP-Referer": "https://mine.example"},
         {"x-openrouter-title": "Mine", "http-referer": "https://mine.example"}, "x-title"),
    ],
)
def test_client_attribution_headers_win_over_config(client, emulator, sent, expected, absent):
    assert client.post("/v1/chat/completions", json=CHAT, headers=sent).status_code == 200
    headers = emulator.stats()["last_request"]["headers"]
    assert {name: headers.get(name) for name in expected} == expected
    assert absent not in headers


def test_request_body_is_forwarded_as_sent(client, emulator):
    raw = b'{ "messages":[{"role":"user","content":"h\\u00e9llo \xc3\xa9"}],  "model" : "openai/gpt-4o-mini"}'
    response = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert emulator.stats()["last_request"]["body"].encode() == raw


@pytest.mark.parametrize(
    ("path", "body", "kind"),
    [
        ("/api/v1/chat/completions", CHAT, "chat.completion"),
        ("/v1/completions", {"model": "openai/gpt-4o-mini", "prompt": "Say hi"}, "text_completion"),
        ("/api/v1/completions", {"model": "openai/gpt-4o-mini", "prompt": "Say hi"}, "text_completion"),
        ("/v1/embeddings", {"model": "openai/text-embedding-3-small", "input": "hi"}, "list"),
        ("/api/v1/embeddings", {"model": "openai/text-embedding-3-small", "input": "hi"}, "list"),
    ],
)
def test_every_proxied_endpoint_and_its_mirror(client, emulator, path, body, kind):
    upstream_path = path.removeprefix("/api").removeprefix("/v1")
    before = sent_upstream(emulator, upstream_path)
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == kind
    assert response.headers["x-generation-id"] == response.json()["id"]
    assert sent_upstream(emulator, upstream_path) == before + 1


# ---------------------------------------------------------------- streaming


def test_stream_reaches_the_client_byte_for_byte(client, emulator):
    response, raw = stream_raw(client, "/v1/chat/completions", {**CHAT, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    upstream = last_stream(emulator)
    assert upstream["generation_id"] == response.headers["x-generation-id"] and upstream["complete"] is True
    assert raw == upstream["bytes"]
    assert raw.startswith(b": OPENROUTER PROCESSING\n\n") and raw.endswith(b"data: [DONE]\n\n")
    usage = orjson.loads(events(raw)[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


def test_long_legacy_completion_stream_is_byte_exact(client, emulator):
    body = {"model": "openai/gpt-4o-mini", "prompt": "Count", "stream": True, "max_tokens": 300}
    response, raw = stream_raw(client, "/api/v1/completions", body)
    assert response.status_code == 200
    upstream = last_stream(emulator)
    assert upstream["generation_id"] == response.headers["x-generation-id"]
    assert raw == upstream["bytes"] and len(events(raw)) == 300 + 3  # tokens, stop, usage, [DONE]


def test_midstream_error_chunk_passes_through_unchanged(client, emulator):
    emulator.control("midstream-error", {"after_chunks": 2, "code": 502, "message": "Provider disconnected"})
    response, raw = stream_raw(client, "/v1/chat/completions", {**CHAT, "stream": True})
    assert response.status_code == 200
    assert raw == last_stream(emulator)["bytes"]
    last = orjson.loads(events(raw)[-1])
    assert last["error"]["code"] == 502 and last["error"]["message"] == "Provider disconnected"
    assert last["choices"][0]["finish_reason"] == "error"


def test_stream_refused_before_the_first_byte_is_a_json_error(client, emulator):
    response, raw = stream_raw(client, "/v1/chat/completions", {**CHAT, "model": "nope/none", "stream": True})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    error = orjson.loads(raw)["error"]
    assert error["code"] == 400 and "nope/none is not a valid model ID" in error["message"]


def test_client_disconnect_closes_the_upstream_stream_at_once(client, account, emulator):
    emulator.control("stream", {"chunk_delay_ms": 50})
    try:
        started = time.monotonic()
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 200}) as r:
            generation_id = r.headers["x-generation-id"]
            for index, _ in enumerate(r.iter_raw()):
                if index == 3:
                    break
        closed_after = time.monotonic() - started
    finally:
        emulator.control("stream", {"chunk_delay_ms": 0})
    record = generation_record(emulator, account["key"], generation_id)
    assert record is not None, "the emulator never recorded the generation: the upstream stream stayed open"
    assert record["cancelled"] is True and record["streamed"] is True
    # 200 tokens at 50 ms take 10 s; a prompt close stops the upstream within a few chunks of the client.
    assert record["tokens_completion"] < 200
    assert record["generation_time"] / 1000 < closed_after + 1.5


# ---------------------------------------------------------------- retries


def test_retries_503_before_the_first_byte_then_succeeds(client, emulator):
    before = sent_upstream(emulator)
    emulator.control("fail", {"status": 503, "times": 2})
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    assert sent_upstream(emulator) == before + 3


def test_retries_a_stream_request_too(client, emulator):
    before = sent_upstream(emulator)
    emulator.control("fail", {"status": 502, "times": 1})
    response, raw = stream_raw(client, "/v1/chat/completions", {**CHAT, "stream": True})
    assert response.status_code == 200 and raw == last_stream(emulator)["bytes"]
    assert sent_upstream(emulator) == before + 2


def test_retry_after_on_429_is_waited_for(client, emulator):
    before = sent_upstream(emulator)
    emulator.control("fail", {"status": 429, "times": 1, "retry_after": 1})
    started = time.monotonic()
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started >= 1.0  # backoff alone would have retried after ~0.01 s
    assert sent_upstream(emulator) == before + 2


def test_retry_after_beyond_backoff_max_goes_back_to_the_client(client, emulator):
    before = sent_upstream(emulator)
    emulator.control("fail", {"status": 429, "times": 1, "retry_after": 20})
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "20"
    assert response.json()["error"] == {"message": "Rate limit exceeded", "type": "rate_limit_error", "code": 429,
                                        "param": None, "metadata": {"error_type": "rate_limit_exceeded"}}
    assert sent_upstream(emulator) == before + 1


def test_exhausted_retries_return_the_upstream_error(client, emulator):
    before = sent_upstream(emulator)
    emulator.control("fail", {"status": 502, "times": 4})  # the first try and 3 retries
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == 502 and error["message"] == "Provider returned error"
    assert sent_upstream(emulator) == before + 4


@pytest.mark.parametrize("status", [400, 401, 402, 403, 500])
def test_other_statuses_are_not_retried_and_keep_their_status(client, emulator, status):
    before = sent_upstream(emulator)
    emulator.control("fail", {"status": status, "times": 1, "message": f"emulated {status}"})
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["message"].startswith(f"emulated {status}")
    assert ("PUT /v1/account/openrouter-key" in error["message"]) == (status == 401)  # the user's key, not the token
    assert sent_upstream(emulator) == before + 1


# ---------------------------------------------------------------- upstream errors with hints


def test_no_models_provided_gets_the_settings_hint(client):
    response = client.post("/v1/chat/completions", json={"messages": CHAT["messages"]})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith("No models provided") and "https://openrouter.ai/settings/preferences" in message


def test_missing_model_uses_the_keys_default_model(gw, emulator):
    user = gw.create_user(tier="starter", key=emulator.new_key(default_model="openai/gpt-4o-mini"))
    with gw.client(user["token"]) as c:
        response = c.post("/v1/chat/completions", json={"messages": CHAT["messages"]})
    assert response.status_code == 200 and response.json()["model"] == "openai/gpt-4o-mini"


def test_data_policy_404_gets_the_privacy_hint(client):
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "emulator/data-policy"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "not_found_error" and "data policy" in error["message"]
    assert "https://openrouter.ai/settings/privacy" in error["message"]


# ---------------------------------------------------------------- refused before forwarding


def _oversized() -> Iterator[bytes]:
    yield b'{"model": "openai/gpt-4o-mini", "messages": [], "pad": "'
    for _ in range(MAX_BODY // 256 + 2):
        yield b"x" * 256
    yield b'"}'


REFUSALS = [
    pytest.param({"content": b'{"model": "openai/gpt-4o-mini", '}, 400, "not valid JSON", None, id="malformed-json"),
    pytest.param({"content": b""}, 400, "not valid JSON", None, id="empty-body"),
    pytest.param({"content": b'["openai/gpt-4o-mini"]'}, 400, "must be a JSON object", None, id="not-an-object"),
    pytest.param({"json": {**CHAT, "model": 4}}, 400, "`model` must be a string", "model", id="model-not-string"),
    pytest.param({"json": {**CHAT, "stream": "yes"}}, 400, "`stream` must be true or false", "stream",
                 id="stream-not-bool"),
    pytest.param({"content": b"x" * (MAX_BODY + 1)}, 413, "server.max_body_bytes", None, id="too-large"),
    pytest.param({"content": _oversized}, 413, "server.max_body_bytes", None, id="too-large-chunked"),
    pytest.param({"content": orjson.dumps(CHAT), "type": "text/plain"}, 415, "application/json", None,
                 id="wrong-content-type"),
    pytest.param({"content": orjson.dumps(CHAT), "type": None}, 415, "application/json", None,
                 id="no-content-type"),
    pytest.param({"json": CHAT, "token": None}, 401, "Missing platform token", None, id="no-token"),
    pytest.param({"json": CHAT, "token": "gw-unknown-token"}, 401, "Invalid platform token", None,
                 id="unknown-token"),
]


@pytest.mark.parametrize(("request_", "status", "says", "param"), REFUSALS)
def test_bad_input_is_refused_and_nothing_is_forwarded(gw, account, emulator, request_, status, says, param):
    headers = {}
    token = request_.get("token", account["token"])
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    content_type = request_.get("type", "application/json")
    if content_type is not None:
        headers["Content-Type"] = content_type
    content = request_.get("content")
    if callable(content):
        content = content()
    before = inference_requests(emulator)
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        if "json" in request_:
            response = c.post("/v1/chat/completions", json=request_["json"], headers=headers)
        else:
            response = c.post("/v1/chat/completions", content=content, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["code"] == status and error["param"] == param
    assert response.headers["x-request-id"]
    assert inference_requests(emulator) == before


def test_user_without_an_openrouter_key_gets_402_saying_how_to_add_one(gw, emulator):
    user = gw.create_user(tier="starter")
    before = inference_requests(emulator)
    with gw.client(user["token"]) as c:
        response = c.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 402
    error = response.json()["error"]
    assert error["code"] == 402 and "PUT /v1/account/openrouter-key" in error["message"]
    assert inference_requests(emulator) == before


def test_client_request_id_is_echoed(client):
    response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-42"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42"
