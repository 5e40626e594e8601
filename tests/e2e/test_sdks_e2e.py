"""The official SDKs, unchanged, against the gateway: `openai` on /v1, `openrouter` 1.3.84 on /api/v1.

These are the clients the product promises to work with; each test is what a platform
user would write, with a platform token where OpenRouter expects its own key.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import openai
import pytest
from openrouter import OpenRouter
from openrouter import errors as or_errors

from tests.conftest import Emulator, GatewayProcess

MESSAGES = [{"role": "user", "content": "Say hello, please!"}]
MODEL = "openai/gpt-4o-mini"


def oai(gateway: GatewayProcess, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, timeout=30)


def orsdk(gateway: GatewayProcess, token: str) -> OpenRouter:
    return OpenRouter(api_key=token, server_url=f"{gateway.url}/api/v1", timeout_ms=30_000)


def last_stream(emulator: Emulator) -> dict[str, Any]:
    data = httpx.get(f"{emulator.url}/_emulator/last-stream", timeout=5).json()
    data["bytes"] = base64.b64decode(data.pop("base64"))
    return data


def data_events(raw: bytes) -> list[bytes]:
    return [b[6:] for b in raw.split(b"\n\n") if b.startswith(b"data: ") and b != b"data: [DONE]"]


# ---------------------------------------------------------------- openai


def test_openai_chat_completion(gateway, user):
    completion = oai(gateway, user["token"]).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.id.startswith("gen-") and completion.model == MODEL
    assert completion.choices[0].message.content == "Hello from the emulator."
    assert completion.usage is not None and completion.usage.completion_tokens == 5


def test_openai_stream_bytes_equal_the_upstreams(gateway, user, emulator):
    client = oai(gateway, user["token"])
    with client.chat.completions.with_streaming_response.create(model=MODEL, messages=MESSAGES, stream=True) as r:
        generation_id = r.headers["x-generation-id"]
        received = b"".join(r.iter_bytes())
    upstream = last_stream(emulator)
    assert upstream["generation_id"] == generation_id and upstream["complete"] is True
    assert received == upstream["bytes"]


def test_openai_stream_assembles_content_and_every_chunk(gateway, user, emulator):
    chunks = list(oai(gateway, user["token"]).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    upstream = last_stream(emulator)
    assert {c.id for c in chunks} == {upstream["generation_id"]}
    assert len(chunks) == len(data_events(upstream["bytes"]))  # the keep-alive comment is not a chunk
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the emulator."
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5


def test_openai_sees_a_midstream_error_as_an_api_error(gateway, user, emulator):
    emulator.control("midstream-error", {"after_chunks": 2, "code": 502, "message": "Provider disconnected"})
    received = []
    with pytest.raises(openai.APIError, match="Provider disconnected"):
        for chunk in oai(gateway, user["token"]).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
            received.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in received) == "Hello from"


def test_openai_legacy_completions_and_embeddings(gateway, user):
    client = oai(gateway, user["token"])
    text = client.completions.create(model=MODEL, prompt="Say hi")
    assert text.choices[0].text == "Hello from the emulator."
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="hi", stream=True)
                       if c.choices)
    assert streamed == "Hello from the emulator."
    vectors = client.embeddings.create(model="openai/text-embedding-3-small", input=["one", "two"])
    assert [item.index for item in vectors.data] == [0, 1] and len(vectors.data[0].embedding) == 16


def test_openai_errors_carry_status_and_message(gateway, user):
    with pytest.raises(openai.NotFoundError) as not_found:
        oai(gateway, user["token"]).chat.completions.create(model="emulator/data-policy", messages=MESSAGES)
    assert "https://openrouter.ai/settings/privacy" in not_found.value.message
    assert not_found.value.body["code"] == 404

    with pytest.raises(openai.AuthenticationError) as unauthorized:
        oai(gateway, "gw-not-a-token").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert "Invalid platform token" in unauthorized.value.message

    without_key = gateway.create_user(tier="starter")
    with pytest.raises(openai.APIStatusError) as payment:
        oai(gateway, without_key["token"]).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert payment.value.status_code == 402 and "openrouter-key" in payment.value.message


def test_openai_rate_limit_error_after_retries(gateway, user, emulator):
    emulator.control("fail", {"status": 429, "times": 3})  # the session gateway retries twice
    with pytest.raises(openai.RateLimitError) as limited:
        oai(gateway, user["token"]).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert limited.value.body["code"] == 429 and limited.value.response.headers["x-ratelimit-limit"] == "20"


# ---------------------------------------------------------------- openrouter


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_openrouter_sdk_chat_send(gateway, user):
    sent = orsdk(gateway, user["token"]).chat.send(model=MODEL, messages=MESSAGES)
    assert sent.id.startswith("gen-") and sent.choices[0].message.content == "Hello from the emulator."
    assert sent.usage.completion_tokens == 5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_openrouter_sdk_chat_send_stream(gateway, user, emulator):
    with orsdk(gateway, user["token"]).chat.send(model=MODEL, messages=MESSAGES, stream=True) as stream:
        chunks = list(stream)
    upstream = last_stream(emulator)
    assert {c.id for c in chunks} == {upstream["generation_id"]}
    assert len(chunks) == len(data_events(upstream["bytes"]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the emulator."
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_openrouter_sdk_passes_a_midstream_error_chunk_through(gateway, user, emulator):
    emulator.control("midstream-error", {"after_chunks": 1, "code": 502, "message": "Provider disconnected"})
    with orsdk(gateway, user["token"]).chat.send(model=MODEL, messages=MESSAGES, stream=True) as stream:
        chunks = list(stream)
    assert chunks[-1].error is not None and chunks[-1].error.code == 502
    assert chunks[-1].choices[0].finish_reason == "error"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_openrouter_sdk_typed_errors(gateway, user):
    with pytest.raises(or_errors.NotFoundResponseError) as not_found:
        orsdk(gateway, user["token"]).chat.send(model="emulator/data-policy", messages=MESSAGES)
    assert "https://openrouter.ai/settings/privacy" in str(not_found.value)
    with pytest.raises(or_errors.UnauthorizedResponseError):
        orsdk(gateway, "gw-not-a-token").chat.send(model=MODEL, messages=MESSAGES)
    with pytest.raises(or_errors.BadRequestResponseError) as bad:
        orsdk(gateway, user["token"]).chat.send(messages=MESSAGES)  # no model, and the key has no default
    assert "https://openrouter.ai/settings/preferences" in str(bad.value) and "PUT /v1/settings" in str(bad.value)
