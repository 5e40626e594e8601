"""api.openapi: the description is built from the route table and the handlers' own input declarations."""

from __future__ import annotations

from typing import Any

import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from gateway.api import admin
from gateway.api.inputs import accepted
from gateway.api.openapi import build_openapi
from gateway.app import API_ROUTES

# routes whose POST takes no body: the action is the path itself
BODYLESS = {"/admin/v1/tokens/{token_id}/rotate", "/admin/v1/users/{user_id}/managed-key/rotate",
            "/admin/v1/credits/sync", "/v1/account/sync", "/api/v1/account/sync"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    document = build_openapi(API_ROUTES, ["/v1/chat/completions"], version="1")
    validate(document)
    return document


def test_a_body_is_the_handlers_declaration(spec: dict[str, Any]) -> None:
    body = spec["paths"]["/admin/v1/users"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert schema == admin.NEW_USER.schema()
    assert schema["additionalProperties"] is False and set(schema["properties"]) == {"id", "email", "tier"}
    assert body["required"] is True
    patch = spec["paths"]["/admin/v1/users/{user_id}"]["patch"]["requestBody"]["content"]["application/json"]["schema"]
    assert patch["properties"]["limits"]["additionalProperties"] is False
    assert "anyOf" in patch["properties"]["limits"]["properties"]["monthly_budget_usd"]
    optional = spec["paths"]["/admin/v1/users/{user_id}/managed-key"]["post"]["requestBody"]
    assert optional["required"] is False


def test_query_parameters_are_listed_after_the_path_ones(spec: dict[str, Any]) -> None:
    audit = spec["paths"]["/admin/v1/audit"]["get"]["parameters"]
    assert [(p["name"], p["in"]) for p in audit] == [
        ("limit", "query"), ("cursor", "query"), ("user", "query"), ("user_id", "query"), ("action", "query")]
    models = {p["name"]: p for p in spec["paths"]["/api/v1/models"]["get"]["parameters"]}
    assert set(models) == {"offset", "limit", "output_modalities"}
    generation = spec["paths"]["/v1/generation"]["get"]["parameters"]
    assert generation[0]["name"] == "id" and generation[0]["required"] is True
    daily = spec["paths"]["/admin/v1/usage/daily"]["get"]["parameters"]
    assert daily[0]["schema"] == {"type": "integer", "minimum": 1, "maximum": 90, "default": 30}
    tokens = spec["paths"]["/admin/v1/users/{user_id}/tokens"]["get"]["parameters"]
    assert [p["name"] for p in tokens] == ["user_id"]


def test_declared_responses_and_the_error_envelope(spec: dict[str, Any]) -> None:
    users = spec["paths"]["/admin/v1/users"]
    assert users["post"]["responses"]["2XX"]["content"]["application/json"]["schema"] == admin.USER
    assert users["get"]["responses"]["2XX"]["content"]["application/json"]["schema"] == admin.USERS
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation["responses"]["default"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"}, (method, path)


def test_every_route_taking_a_body_declares_it_and_only_for_methods_it_serves() -> None:
    for route in API_ROUTES:
        if not isinstance(route, Route):
            continue
        declared = accepted(route.endpoint)
        methods = route.methods or set()
        if declared is not None:
            assert set(declared.bodies) | set(declared.queries) | set(declared.returns) <= methods, route.path
        for method in methods & {"POST", "PUT", "PATCH"}:
            if route.path not in BODYLESS:
                assert declared is not None and method in declared.bodies, (method, route.path)
