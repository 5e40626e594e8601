"""OpenRouter's model endpoints through the gateway, validated by the official Python SDK (`openrouter`).

The TypeScript SDK checks the same endpoints in tests/e2e/test_client_matrix_e2e.py. Each
answer must pass the SDK's response models (a missing required field is a
ResponseValidationError) and say what the emulator's catalogue says.
"""

from __future__ import annotations

import httpx
import pytest
from openrouter import OpenRouter
from openrouter import errors as or_errors

from tests.conftest import Emulator, GatewayProcess

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
DATA_POLICY_MODEL = "emulator/data-policy"  # the emulator's keys' data policy refuses it


def orsdk(gateway: GatewayProcess, token: str) -> OpenRouter:
    return OpenRouter(api_key=token, server_url=f"{gateway.url}/api/v1", timeout_ms=30_000)


def upstream(emulator: Emulator, path: str) -> dict:
    return httpx.get(f"{emulator.base_url}{path}", headers={"Authorization": f"Bearer {emulator.new_key()}"},
                     timeout=10).json()


def test_count_matches_the_catalogue(gateway, user, emulator):
    count = orsdk(gateway, user["token"]).models.count()
    assert count.data.count == upstream(emulator, "/models/count")["data"]["count"]
    assert count.data.count == len(upstream(emulator, "/models")["data"]) > 0
    embeddings = httpx.get(f"{gateway.url}/v1/models/count", params={"output_modalities": "embeddings"},
                           headers={"Authorization": f"Bearer {user['token']}"}).json()
    assert embeddings == {"data": {"count": 1}}


def test_models_for_user_apply_the_keys_account_settings(gateway, user):
    sdk = orsdk(gateway, user["token"])
    mine = sdk.models.list_for_user(security={"bearer": user["token"]})
    everything = sdk.models.list()
    mine_ids = [m.id for m in mine.result.data]
    all_ids = [m.id for m in everything.result.data]
    assert DATA_POLICY_MODEL in all_ids and DATA_POLICY_MODEL not in mine_ids
    assert mine_ids == [i for i in all_ids if i != DATA_POLICY_MODEL]  # the catalogue's rows, in its order
    assert mine.result.total_count == len(mine_ids)


def test_models_for_user_needs_a_connected_key(gateway):
    without_key = gateway.create_user(tier="starter")
    with pytest.raises(or_errors.OpenRouterError) as refused:
        orsdk(gateway, without_key["token"]).models.list_for_user(security={"bearer": without_key["token"]})
    assert refused.value.status_code == 402 and "openrouter-key" in str(refused.value)


def test_embedding_models(gateway, user):
    listed = orsdk(gateway, user["token"]).embeddings.list_models()
    assert [m.id for m in listed.result.data] == ["openai/text-embedding-3-small"]


def test_get_one_model_with_and_without_a_variant(gateway, user, emulator):
    sdk = orsdk(gateway, user["token"])
    model = sdk.models.get(author="openai", slug="gpt-4o-mini")
    assert model.data.id == "openai/gpt-4o-mini"
    assert model.data.pricing.prompt == upstream(emulator, "/model/openai/gpt-4o-mini")["data"]["pricing"]["prompt"]
    assert sdk.models.get(author="meta-llama", slug="llama-3.3-70b-instruct:free").data.pricing.prompt == "0"
    assert sdk.models.get(author="openai", slug="gpt-4o-mini:nitro").data.id == "openai/gpt-4o-mini"
    with pytest.raises(or_errors.NotFoundResponseError) as missing:
        sdk.models.get(author="nobody", slug="no-such-model")
    assert "GET /v1/models" in str(missing.value)


def test_model_endpoints(gateway, user, emulator):
    listed = orsdk(gateway, user["token"]).endpoints.list(author="meta-llama", slug="llama-3.3-70b-instruct")
    assert listed.data.id == "meta-llama/llama-3.3-70b-instruct"
    assert [e.model_id for e in listed.data.endpoints] == ["meta-llama/llama-3.3-70b-instruct:free"]
    assert listed.data.endpoints[0].pricing.prompt == "0"
    with pytest.raises(or_errors.NotFoundResponseError):
        orsdk(gateway, user["token"]).endpoints.list(author="nobody", slug="no-such-model")


def test_model_endpoints_are_cached_per_model(gateway, user, emulator):
    before = emulator.stats()["requests"].get("/models/openai/gpt-4o/endpoints", 0)
    for _ in range(3):
        assert orsdk(gateway, user["token"]).endpoints.list(author="openai", slug="gpt-4o").data.id == "openai/gpt-4o"
    assert emulator.stats()["requests"].get("/models/openai/gpt-4o/endpoints", 0) - before <= 1


def test_new_endpoints_need_a_platform_token(gateway):
    for path in ("/v1/models/count", "/api/v1/models/user", "/v1/embeddings/models", "/api/v1/model/openai/gpt-4o",
                 "/api/v1/models/openai/gpt-4o/endpoints"):
        response = httpx.get(gateway.url + path, headers={"Authorization": "Bearer gw-not-a-token"})
        assert response.status_code == 401, path


def test_bad_paging_is_refused_before_any_fetch(gateway, user):
    response = httpx.get(f"{gateway.url}/api/v1/models/user", params={"limit": "0"},
                         headers={"Authorization": f"Bearer {user['token']}"})
    assert response.status_code == 400 and "limit" in response.json()["error"]["message"]


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/v1/chat/completions", "POST"),
    ("GET", "/api/v1/responses", "POST"),
    ("PUT", "/v1/embeddings", "POST"),
    ("POST", "/v1/models", "GET"),
    ("DELETE", "/api/v1/models/count", "GET"),
])
def test_wrong_method_on_a_known_path_is_405_with_allow(gateway, user, method, path, allow):
    response = httpx.request(method, gateway.url + path, headers={"Authorization": f"Bearer {user['token']}"})
    assert response.status_code == 405, response.text
    assert allow in [m.strip() for m in response.headers["allow"].split(",")]
    error = response.json()["error"]
    assert error["code"] == 405 and allow in error["message"]


def test_unknown_path_stays_404(gateway, user):
    response = httpx.get(f"{gateway.url}/v1/no-such-thing", headers={"Authorization": f"Bearer {user['token']}"})
    assert response.status_code == 404
