"""OpenAI's Responses API through the gateway: `client.responses.create`, streamed and not.

Each call must give exactly one usage record keyed by its generation id, with the tokens
and cost the upstream reported, the tier's markup, and settlement against `/generation`,
as chat completions do; a stream reaches the client byte for byte.
"""

from __future__ import annotations

import base64
import sqlite3
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Emulator, GatewayProcess, wait_for

MODEL = "openai/gpt-4o-mini"


def oai(gateway: GatewayProcess, token: str, prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}{prefix}", api_key=token, max_retries=0, timeout=30)


def records(gateway: GatewayProcess, generation_id: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(gateway.config_file.parent / "gateway.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM usage_records WHERE generation_id = ?", (generation_id,))]
    finally:
        conn.close()


def settled(gateway: GatewayProcess, token: str, generation_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        response = httpx.get(f"{gateway.url}/v1/generation", params={"id": generation_id},
                             headers={"Authorization": f"Bearer {token}"})
        return response.json()["data"] if response.status_code == 200 and response.json()["data"]["settled"] else None

    return wait_for(check, what=f"{generation_id} to settle")


def upstream_generation(emulator: Emulator, key: str, generation_id: str) -> dict[str, Any]:
    response = httpx.get(f"{emulator.base_url}/generation", params={"id": generation_id},
                         headers={"Authorization": f"Bearer {key}"})
    return httpx.Response(200, content=response.content).json(parse_float=Decimal)["data"]


def assert_one_exact_record(gateway: GatewayProcess, user: dict[str, Any], key: str, emulator: Emulator,
                            generation_id: str, *, streamed: bool, input_tokens: int) -> None:
    data = settled(gateway, user["token"], generation_id)
    truth = upstream_generation(emulator, key, generation_id)
    assert Decimal(str(data["provider_cost"])) == truth["total_cost"] > 0
    assert Decimal(str(data["markup"])) == truth["total_cost"] * Decimal("10") / 100  # starter: 10%
    assert data["markup_reason"] == "starter_tier_10pct" and data["streamed"] is streamed
    [row] = records(gateway, generation_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (input_tokens, 5)
    assert row["endpoint"] == "/responses" and row["finish_reason"] == "stop" and row["model"] == MODEL
    assert Decimal(row["provider_cost"]) == truth["total_cost"]


@pytest.fixture
def keyed_user(gateway: GatewayProcess, emulator: Emulator) -> tuple[dict[str, Any], str]:
    key = emulator.new_key()
    return gateway.create_user(tier="starter", key=key), key


def test_responses_create(gateway, keyed_user, emulator):
    user, key = keyed_user
    raw = oai(gateway, user["token"]).responses.with_raw_response.create(model=MODEL, input="Say hello, please!")
    response = raw.parse()
    assert response.id.startswith("gen-") and raw.headers["x-generation-id"] == response.id
    assert response.output_text == "Hello from the emulator." and response.status == "completed"
    assert response.usage.output_tokens == 5 and response.usage.total_tokens == response.usage.input_tokens + 5
    assert_one_exact_record(gateway, user, key, emulator, response.id, streamed=False,
                            input_tokens=response.usage.input_tokens)


def test_responses_create_streamed(gateway, keyed_user, emulator):
    user, key = keyed_user
    events = list(oai(gateway, user["token"], "/api/v1").responses.create(
        model=MODEL, input=[{"role": "user", "content": "Say hello, please!"}], instructions="Be brief.",
        stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello from the emulator."
    final = events[-1].response
    assert final.output_text == "Hello from the emulator." and final.usage.output_tokens == 5
    assert_one_exact_record(gateway, user, key, emulator, final.id, streamed=True,
                            input_tokens=final.usage.input_tokens)


def test_responses_stream_bytes_equal_the_upstreams(gateway, keyed_user, emulator):
    user, _ = keyed_user
    client = oai(gateway, user["token"])
    with client.responses.with_streaming_response.create(model=MODEL, input="hi", stream=True) as streamed:
        generation_id = streamed.headers["x-generation-id"]
        received = b"".join(streamed.iter_bytes())
    upstream = httpx.get(f"{emulator.url}/_emulator/last-stream", timeout=5).json()
    assert upstream["generation_id"] == generation_id and upstream["complete"] is True
    assert received == base64.b64decode(upstream["base64"])


def test_responses_failed_stream_is_recorded_as_an_error(gateway, keyed_user, emulator):
    user, _ = keyed_user
    emulator.control("midstream-error", {"after_chunks": 2, "code": 502, "message": "Provider disconnected"})
    events = list(oai(gateway, user["token"]).responses.create(model=MODEL, input="hi", stream=True))
    assert events[-1].type == "response.failed"
    generation_id = events[0].response.id
    row = wait_for(lambda: records(gateway, generation_id), what="the failed stream's record")[0]
    assert row["finish_reason"] == "error" and "Provider disconnected" in row["error"]


def test_responses_errors_are_typed(gateway, keyed_user):
    user, _ = keyed_user
    with pytest.raises(openai.BadRequestError) as stateful:
        oai(gateway, user["token"]).responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
    assert "previous_response_id" in stateful.value.message
    with pytest.raises(openai.AuthenticationError):
        oai(gateway, "gw-not-a-token").responses.create(model=MODEL, input="hi")
    without_key = gateway.create_user(tier="starter")
    with pytest.raises(openai.APIStatusError) as payment:
        oai(gateway, without_key["token"]).responses.create(model=MODEL, input="hi")
    assert payment.value.status_code == 402
