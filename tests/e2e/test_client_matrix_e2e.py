"""The client matrix: third-party clients, unchanged, against a real gateway in front of the emulator.

Node clients (the openai SDK, `@openrouter/sdk`, the Vercel AI SDK with
`@ai-sdk/openai-compatible` and `@openrouter/ai-sdk-provider`) run in one `node` process
(tests/clients/matrix.mjs, packages pinned by tests/clients/package-lock.json and installed
here with `npm ci`); LangChain's `ChatOpenAI`, LiteLLM and curl run from here. Each check
asserts what the emulator answers (the reply, its usage, a typed error, the vectors).
Without Node.js the Node checks skip loudly, except under CI=true, where that is a failure.
The official Python SDKs are covered in test_sdks_e2e.py, test_responses_e2e.py and
test_model_endpoints_e2e.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ROOT, GatewayProcess

pytestmark = pytest.mark.filterwarnings("ignore:Item .* is using the `ReadOnly` qualifier:UserWarning")  # LiteLLM's
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM would fetch its price list at import
CLIENTS = ROOT / "tests" / "clients"
MODEL = "openai/gpt-4o-mini"
EMBEDDER = "openai/text-embedding-3-small"
REFUSED = "emulator/data-policy"  # answers OpenRouter's 404 "No endpoints found matching your data policy"
REPLY = "Hello from the emulator."
MESSAGES = [{"role": "user", "content": "Say hello, please!"}]
NODE_CHECKS = [
    f"{client} {check}"
    for client, checks in {
        "openai-node": ("chat", "stream", "errors", "embeddings", "responses"),
        "openrouter-ts": ("chat", "stream", "errors", "embeddings", "responses", "models"),
        "ai-sdk-compatible": ("chat", "stream", "errors", "embeddings"),
        "ai-sdk-openrouter": ("chat", "stream", "errors", "embeddings"),
    }.items()
    for check in checks
]


def _node_or_skip() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node and npm:
        return node
    reason = "Node.js (node and npm) is not installed, so the Node clients of the matrix cannot run"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}: install Node.js 20")
    pytest.skip(f"SKIPPED LOUDLY: {reason}; install Node.js 20 to run them")


def _install_node_clients() -> None:
    """`npm ci` from the lockfile, once per lockfile content (a stamp in node_modules remembers it)."""
    lock = (CLIENTS / "package-lock.json").read_bytes()
    stamp = CLIENTS / "node_modules" / ".gateway-lock-sha256"
    digest = hashlib.sha256(lock).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest:
        return
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CLIENTS,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"npm ci in {CLIENTS} failed:\n{done.stderr[-3000:]}"
    stamp.write_text(digest)


@pytest.fixture(scope="module")
def matrix_user(gateway: GatewayProcess, emulator: Any) -> dict[str, Any]:
    return gateway.create_user(tier="starter", key=emulator.new_key())


@pytest.fixture(scope="module")
def node_results(gateway: GatewayProcess, matrix_user: dict[str, Any]) -> dict[str, Any]:
    node = _node_or_skip()
    _install_node_clients()
    env = {**os.environ, "GATEWAY_URL": gateway.url, "GATEWAY_TOKEN": matrix_user["token"]}
    done = subprocess.run([node, "matrix.mjs"], cwd=CLIENTS, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip(), f"matrix.mjs failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


@pytest.mark.parametrize("check", NODE_CHECKS)
def test_node_client(node_results: dict[str, Any], check: str) -> None:
    assert check in node_results, f"matrix.mjs has no check {check!r}"
    result = node_results[check]
    assert result["ok"], result["detail"]


def test_every_node_check_is_listed(node_results: dict[str, Any]) -> None:
    assert sorted(node_results) == sorted(NODE_CHECKS)


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_node_fails_under_ci_and_skips_loudly_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               ci: str, outcome: type[BaseException]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no node on it
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="Node.js"):
        _node_or_skip()


# ---------------------------------------------------------------- LangChain


def _chat_openai(gateway: GatewayProcess, token: str, **options: Any) -> Any:
    from langchain_openai import ChatOpenAI

    options = {"model": MODEL, **options}
    return ChatOpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, timeout=30, **options)


def test_langchain_chat(gateway, matrix_user):
    reply = _chat_openai(gateway, matrix_user["token"]).invoke("Say hello, please!")
    assert reply.content == REPLY and reply.usage_metadata["output_tokens"] == 5


def test_langchain_stream(gateway, matrix_user):
    chunks = list(_chat_openai(gateway, matrix_user["token"], stream_usage=True).stream("Say hello, please!"))
    assert "".join(c.content for c in chunks) == REPLY
    assert sum((c.usage_metadata or {}).get("output_tokens", 0) for c in chunks) == 5


def test_langchain_errors(gateway, matrix_user):
    import openai

    with pytest.raises(openai.NotFoundError, match="data policy"):
        _chat_openai(gateway, matrix_user["token"], model=REFUSED).invoke("hi")
    with pytest.raises(openai.AuthenticationError):
        _chat_openai(gateway, "gw-not-a-token").invoke("hi")


def test_langchain_embeddings(gateway, matrix_user):
    from langchain_openai import OpenAIEmbeddings

    embedder = OpenAIEmbeddings(model=EMBEDDER, base_url=f"{gateway.url}/v1", api_key=matrix_user["token"],
                                check_embedding_ctx_length=False, max_retries=0)  # no tiktoken download
    vectors = embedder.embed_documents(["one", "two"])
    assert len(vectors) == 2 and len(vectors[0]) == 16


def test_langchain_responses(gateway, matrix_user):
    llm = _chat_openai(gateway, matrix_user["token"], use_responses_api=True)
    reply = llm.invoke("Say hello, please!")
    assert reply.text == REPLY and reply.usage_metadata["output_tokens"] == 5
    assert "".join(c.text for c in llm.stream("Say hello, please!")) == REPLY


# ---------------------------------------------------------------- LiteLLM


def _litellm_kwargs(gateway: GatewayProcess, token: str) -> dict[str, Any]:
    return {"api_base": f"{gateway.url}/api/v1", "api_key": token, "num_retries": 0, "timeout": 30}


def test_litellm_chat(gateway, matrix_user):
    import litellm

    reply = litellm.completion(model=f"openrouter/{MODEL}", messages=MESSAGES,
                               **_litellm_kwargs(gateway, matrix_user["token"]))
    assert reply.choices[0].message.content == REPLY and reply.usage.completion_tokens == 5


def test_litellm_stream(gateway, matrix_user):
    import litellm

    chunks = list(litellm.completion(model=f"openrouter/{MODEL}", messages=MESSAGES, stream=True,
                                     **_litellm_kwargs(gateway, matrix_user["token"])))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY


def test_litellm_errors(gateway, matrix_user):
    import litellm

    with pytest.raises(litellm.NotFoundError, match="data policy"):
        litellm.completion(model=f"openrouter/{REFUSED}", messages=MESSAGES,
                           **_litellm_kwargs(gateway, matrix_user["token"]))
    with pytest.raises(litellm.AuthenticationError):
        litellm.completion(model=f"openrouter/{MODEL}", messages=MESSAGES, **_litellm_kwargs(gateway, "gw-nope"))


def test_litellm_embeddings(gateway, matrix_user):
    import litellm

    vectors = litellm.embedding(model=f"openai/{EMBEDDER}", input=["one", "two"], api_base=f"{gateway.url}/v1",
                                api_key=matrix_user["token"], num_retries=0, timeout=30)
    assert len(vectors.data) == 2 and len(vectors.data[0]["embedding"]) == 16


def test_litellm_responses(gateway, matrix_user):
    import litellm

    reply = litellm.responses(model=f"openai/{MODEL}", input="Say hello, please!", api_base=f"{gateway.url}/v1",
                              api_key=matrix_user["token"], num_retries=0, timeout=30)
    text = "".join(part.text for item in reply.output for part in getattr(item, "content", None) or [])
    assert text == REPLY and reply.usage.output_tokens == 5


# ---------------------------------------------------------------- curl


def _curl(gateway: GatewayProcess, token: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    if shutil.which("curl") is None:
        pytest.skip("SKIPPED LOUDLY: curl is not installed")
    done = subprocess.run(
        ["curl", "-sS", "-N", "-o", "-", "-w", "\n%{http_code}", f"{gateway.url}{path}",
         "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/json", "-d", orjson.dumps(body)],
        capture_output=True, timeout=60)
    payload, _, status = done.stdout.rpartition(b"\n")
    return int(status), payload


def test_curl_chat_stream_errors_embeddings_responses(gateway, matrix_user):
    token = matrix_user["token"]
    status, raw = _curl(gateway, token, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})
    assert status == 200 and orjson.loads(raw)["choices"][0]["message"]["content"] == REPLY
    status, raw = _curl(gateway, token, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "stream": True})
    events = [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    assert status == 200 and "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) \
        == REPLY and raw.rstrip().endswith(b"data: [DONE]")
    status, raw = _curl(gateway, token, "/v1/chat/completions", {"model": REFUSED, "messages": MESSAGES})
    assert status == 404 and "data policy" in orjson.loads(raw)["error"]["message"]
    status, raw = _curl(gateway, token, "/v1/embeddings", {"model": EMBEDDER, "input": "one"})
    assert status == 200 and len(orjson.loads(raw)["data"][0]["embedding"]) == 16
    status, raw = _curl(gateway, token, "/api/v1/responses", {"model": MODEL, "input": "hi"})
    assert status == 200 and orjson.loads(raw)["output"][0]["content"][0]["text"] == REPLY
