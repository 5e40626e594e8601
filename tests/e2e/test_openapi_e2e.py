"""`GET /openapi.json` against a live gateway: a valid OpenAPI 3.1 document of the routes it serves, and
schemathesis's generated requests (a few per operation here, many under `make soak`) answered with no
internal error (500) and in the documented shapes (the error envelope for every error).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import ADMIN_TOKEN, Emulator, GatewayProcess, start_gateway

SOAK = os.environ.get("GATEWAY_SOAK") == "1"
EXAMPLES = 150 if SOAK else 4


@pytest.fixture(scope="module")
def live(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    gateway = start_gateway(tmp_path_factory.mktemp("openapi"), emulator, {"logging": {"access_log": False}})
    user = gateway.create_user(tier="enterprise", key=emulator.new_key())
    try:
        yield gateway, user["token"]
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def spec(live: tuple[GatewayProcess, str]) -> dict[str, Any]:
    response = httpx.get(live[0].url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    return response.json()


def test_the_description_is_valid_openapi_31_of_the_served_routes(spec: dict[str, Any]) -> None:
    validate(spec)  # raises on an invalid document
    assert spec["openapi"] == "3.1.0"
    paths = spec["paths"]
    for path, method in [("/v1/chat/completions", "post"), ("/api/v1/chat/completions", "post"),
                         ("/admin/v1/users/{user_id}", "patch"), ("/admin/v1/alerts", "get"),
                         ("/v1/models", "get"), ("/dashboard", "get"), ("/admin/v1/emergency-stop", "put")]:
        assert method in paths[path], (path, method)
    assert paths["/admin/v1/users/{user_id}"]["get"]["parameters"][0]["name"] == "user_id"
    assert paths["/admin/v1/users"]["post"]["security"] == [{"adminToken": []}]
    assert paths["/v1/usage"]["get"]["security"] == [{"platformToken": []}]
    assert paths["/health"]["get"]["security"] == []
    assert set(spec["components"]["securitySchemes"]) == {"platformToken", "adminToken"}
    assert paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]["stream"] == {"type": "boolean"}


def test_bodies_and_queries_are_the_ones_the_handlers_validate_with(spec: dict[str, Any]) -> None:
    paths = spec["paths"]
    new_user = paths["/admin/v1/users"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert new_user["additionalProperties"] is False and set(new_user["properties"]) == {"id", "email", "tier"}
    stop = paths["/admin/v1/emergency-stop"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert stop["required"] == ["enabled"] and stop["properties"]["reason"]["maxLength"] == 500
    settings = paths["/v1/settings"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(settings["properties"]) == {"default_model", "fallback_models", "temperature", "max_tokens",
                                           "fallback_enabled"}
    listing = {p["name"]: p["schema"] for p in paths["/admin/v1/users"]["get"]["parameters"]}
    assert listing["limit"] == {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}
    usage = {p["name"]: p["schema"] for p in paths["/admin/v1/usage"]["get"]["parameters"]}
    assert usage["group_by"]["enum"] == ["user", "model", "tier", "day"] and "user_id" in usage
    assert "requestBody" not in paths["/admin/v1/tokens/{token_id}/rotate"]["post"]  # the path is the action


def test_a_body_outside_its_schema_is_refused_in_the_documented_words(live: tuple[GatewayProcess, str]) -> None:
    gateway, _ = live
    response = gateway.admin.post("/admin/v1/users", json={"tier": "enterprise", "colour": "red"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Unknown field 'colour'; allowed fields are: email, id, tier."
    assert response.json()["error"]["param"] == "colour"
    response = gateway.admin.put("/admin/v1/emergency-stop", json={"enabled": "yes"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "enabled"
    assert response.json()["error"]["message"] == "Field 'enabled' must be a boolean, got str."
    response = gateway.admin.get("/admin/v1/audit", params={"cursor": "\u00b3"})  # str.isdigit(), yet no int
    assert response.status_code == 400 and response.json()["error"]["param"] == "cursor"


def test_generated_requests_get_no_internal_error(spec: dict[str, Any], live: tuple[GatewayProcess, str],
                                                  tmp_path: Path) -> None:
    """Each example draws one schemathesis case per operation and sends it to the live gateway."""
    gateway, token = live
    operations = [result.ok() for result in schemathesis.openapi.from_dict(spec).get_all_operations()]
    calls = {"requests": 0}

    def send(case: Any) -> None:
        path = case.operation.path
        if path.startswith("/admin/"):
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        elif path.startswith(("/v1", "/api/v1")):
            headers = {"Authorization": f"Bearer {token}"}
        else:
            headers = {}
        response = case.call(base_url=gateway.url, headers=headers, timeout=30)
        calls["requests"] += 1
        assert response.status_code != 500, f"{case.method} {case.formatted_path}: {response.text[:500]}"
        if response.status_code >= 400:
            assert "error" in response.json(), response.text[:300]
        case.validate_response(response, checks=[response_schema_conformance])

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not SOAK, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def every_operation(data: st.DataObject) -> None:
        for operation in operations:
            send(data.draw(operation.as_strategy(), label=operation.label))

    every_operation()
    count = os.environ.get("GATEWAY_SCHEMATHESIS_COUNT")
    (Path(count) if count else tmp_path / "schemathesis.count").write_text(str(calls["requests"]))
    print(f"schemathesis sent {calls['requests']} requests over {len(operations)} operations")
    assert calls["requests"] >= len(operations) * EXAMPLES
