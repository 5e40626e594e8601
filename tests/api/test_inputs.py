"""api.inputs: one declaration validates a body or query (400 naming the field, in the established words)
and gives the JSON Schema that /openapi.json publishes; everything that schema allows is accepted."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from starlette.requests import Request

from gateway.accounts.settings import FIELDS, validate_changes
from gateway.api import account, admin, admin_keys
from gateway.api.inputs import (
    Body,
    Choice,
    Count,
    Field,
    IntParam,
    Money,
    Nested,
    Query,
    Text,
    accepted,
    accepts,
    read_body,
    read_query,
)
from gateway.core.errors import BadRequest

STOP = Body(Field("enabled", "boolean", required=True), Field("reason", "string", max_length=5))
LIMITS = Body(
    Field("name", "string", nullable=False),
    Nested("limits", nullable=False, message="limits must be an object.",
           body=Body(Money("budget_usd", hint="; null removes it"), Count("per_minute"),
                     unknown="Unknown limit {name!r}; limits are: {allowed}.", sort_allowed=False)),
    Field("tags", "array", max_items=2, items=Field("tag", "string", nullable=False, max_length=3)),
)
PAGE = Query(IntParam("limit", default=50, low=1, high=500), Choice("period", allowed=("day", "month"), default="month"),
             Text("cursor", pattern="[0-9]{1,18}", message="cursor must be the next_cursor value."),
             Text("user", aliases=("user_id",)))


def refusal(spec: Body, body: dict[str, Any]) -> tuple[str, str | None]:
    with pytest.raises(BadRequest) as refused:
        spec.parse(body)
    return refused.value.message, refused.value.param


# -- bodies -----------------------------------------------------------------------------


def test_an_unknown_field_is_refused_naming_it_and_the_allowed_ones() -> None:
    assert refusal(STOP, {"enabled": True, "colour": "red"}) == (
        "Unknown field 'colour'; allowed fields are: enabled, reason.", "colour")
    assert refusal(LIMITS, {"limits": {"burst": 1}}) == (
        "Unknown limit 'burst'; limits are: budget_usd, per_minute.", "limits.burst")


@pytest.mark.parametrize("body, message, param", [
    ({}, "Field 'enabled' is required.", "enabled"),
    ({"enabled": None}, "Field 'enabled' is required.", "enabled"),
    ({"enabled": "yes"}, "Field 'enabled' must be a boolean, got str.", "enabled"),
    ({"enabled": True, "reason": 5}, "Field 'reason' must be a string, got int.", "reason"),
    ({"enabled": True, "reason": "too long"}, "Field 'reason' must be at most 5 characters.", "reason"),
])
def test_a_missing_or_wrong_field_is_a_400_naming_it(body: dict[str, Any], message: str, param: str) -> None:
    assert refusal(STOP, body) == (message, param)


def test_present_fields_come_back_checked_and_absent_ones_stay_absent() -> None:
    assert STOP.parse({"enabled": False}) == {"enabled": False}
    assert STOP.parse({"enabled": True, "reason": None}) == {"enabled": True, "reason": None}
    assert LIMITS.parse({"limits": {"budget_usd": "12.50", "per_minute": Decimal("60.0")}}) == {
        "limits": {"budget_usd": Decimal("12.50"), "per_minute": 60}}  # JSON Schema's integers include 60.0


@pytest.mark.parametrize("body, message, param", [
    ({"name": None}, "Field 'name' must be a string, got null.", "name"),
    ({"name": True}, "Field 'name' must be a string, not a boolean.", "name"),
    ({"limits": None}, "limits must be an object.", "limits"),
    ({"limits": {"budget_usd": "1e3"}}, "limits.budget_usd must be a plain number of US dollars from 0 to "
     "1,000,000,000, at most 12 decimal places (e.g. 25 or \"12.50\"); null removes it.", "limits.budget_usd"),
    ({"limits": {"per_minute": 1.5}}, "limits.per_minute must be a whole number from 0 to 1,000,000,000.",
     "limits.per_minute"),
    ({"limits": {"per_minute": True}}, "limits.per_minute must be a whole number from 0 to 1,000,000,000.",
     "limits.per_minute"),
    ({"tags": ["a", "b", "c"]}, "Field 'tags' must have at most 2 items.", "tags"),
    ({"tags": ["a", 5]}, "Field 'tags[1]' must be a string, got int.", "tags"),
])
def test_money_counts_nested_objects_and_lists_are_checked(body: dict[str, Any], message: str, param: str) -> None:
    assert refusal(LIMITS, body) == (message, param)


def test_a_field_message_replaces_the_generic_one() -> None:
    spec = Body(Field("status", "string", enum=("active", "suspended"), message="status must be 'active' or 'suspended'."))
    assert refusal(spec, {"status": "gone"}) == ("status must be 'active' or 'suspended'.", "status")
    assert refusal(spec, {"status": 1}) == ("status must be 'active' or 'suspended'.", "status")


def test_the_schema_is_the_declaration() -> None:
    schema = STOP.schema()
    assert schema == {
        "type": "object",
        "properties": {"enabled": {"type": "boolean"}, "reason": {"type": ["string", "null"], "maxLength": 5}},
        "additionalProperties": False,
        "required": ["enabled"],
    }
    limits = LIMITS.schema()["properties"]["limits"]
    assert limits["type"] == "object" and limits["additionalProperties"] is False
    money = limits["properties"]["budget_usd"]["anyOf"]
    assert {"type": "null"} in money and money[1] == {"type": "number", "minimum": 0, "maximum": 1_000_000_000}
    assert limits["properties"]["per_minute"]["type"] == ["integer", "null"]
    assert LIMITS.schema()["properties"]["tags"]["items"] == {"type": "string", "maxLength": 3}


def _operation(schema: dict[str, Any]) -> Any:
    document = {"openapi": "3.1.0", "info": {"title": "one body", "version": "0"}, "paths": {"/x": {"post": {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {"200": {"description": "ok"}}}}}}
    return next(iter(schemathesis.openapi.from_dict(document).get_all_operations())).ok()


def _at_most_12_places(value: Any) -> bool:
    """JSON Schema cannot say "at most 12 decimal places" of a number exactly (multipleOf is float arithmetic)."""
    if isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        return not isinstance(exponent, int) or exponent >= -12
    if isinstance(value, dict):
        return all(_at_most_12_places(v) for v in value.values())
    if isinstance(value, list):
        return all(_at_most_12_places(v) for v in value)
    return True


BODIES = {
    "new user": admin.NEW_USER, "user changes": admin.USER_CHANGES, "new token": admin.NEW_TOKEN,
    "emergency stop": admin.STOP, "byok": account.BYOK, "settings": account.SETTINGS,
    "new managed key": admin_keys.NEW_KEY, "managed key changes": admin_keys.KEY_CHANGES,
}


@pytest.mark.parametrize("name", list(BODIES))
def test_every_body_the_published_schema_allows_is_accepted(name: str) -> None:
    """The bodies schemathesis draws from the schema (as the gateway parses JSON: decimals exact) all pass."""
    body = BODIES[name]
    operation = _operation(body.schema())

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def accepted_as_published(case: Any) -> None:
        data = json.loads(json.dumps(case.body), parse_float=Decimal)
        assume(_at_most_12_places(data))
        checked = body.parse(data)
        if body is account.SETTINGS:
            validate_changes(checked)  # the service's own rules allow it too

    accepted_as_published()


def test_the_settings_body_declares_every_stored_setting() -> None:
    assert tuple(account.SETTINGS.fields) == FIELDS


# -- queries ----------------------------------------------------------------------------


@accepts(GET=PAGE, POST=STOP)
async def endpoint(request: Request) -> None:
    """A handler that declares what it reads."""


def request(query: str, method: str = "GET", handler: Any = endpoint) -> Request:
    return Request({"type": "http", "method": method, "path": "/x", "query_string": query.encode(), "headers": [],
                    "endpoint": handler})


def test_a_query_gives_defaults_and_checked_values() -> None:
    assert read_query(request(""), PAGE) == {"limit": 50, "period": "month", "cursor": None, "user": None}
    assert read_query(request("limit=5&period=day&cursor=12&user_id=u1"), PAGE) == {
        "limit": 5, "period": "day", "cursor": "12", "user": "u1"}


@pytest.mark.parametrize("query, message, param", [
    ("limit=lots", "Query parameter 'limit' must be an integer, got 'lots'.", "limit"),
    ("limit=0", "Query parameter 'limit' must be between 1 and 500.", "limit"),
    ("limit=501", "Query parameter 'limit' must be between 1 and 500.", "limit"),
    ("period=year", "Unknown period 'year'; use one of: day, month.", "period"),
    ("cursor=%C2%B3", "cursor must be the next_cursor value.", "cursor"),  # "³" is str.isdigit(), not int()-able
    ("cursor=" + "9" * 19, "cursor must be the next_cursor value.", "cursor"),
    ("user=" + "u" * 257, "Query parameter 'user' must be at most 256 characters.", "user"),
])
def test_a_bad_query_parameter_is_a_400_naming_it(query: str, message: str, param: str) -> None:
    with pytest.raises(BadRequest) as refused:
        read_query(request(query), PAGE)
    assert (refused.value.message, refused.value.param) == (message, param)


def test_the_query_parameters_are_published() -> None:
    described = {p["name"]: p for p in PAGE.parameters()}
    assert described["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}
    assert described["period"]["schema"] == {"type": "string", "enum": ["day", "month"], "default": "month"}
    assert described["cursor"]["schema"] == {"type": "string", "maxLength": 256, "pattern": "^(?:[0-9]{1,18})$"}
    assert set(described) == {"limit", "period", "cursor", "user", "user_id"}
    assert all(p["in"] == "query" and p["required"] is False for p in described.values())


def test_a_handler_validates_only_with_what_it_publishes() -> None:
    declared = accepted(endpoint)
    assert declared is not None and declared.queries == {"GET": PAGE} and declared.bodies == {"POST": STOP}
    assert read_body(request("", "POST"), STOP, {"enabled": True}) == {"enabled": True}
    assert read_query(request("limit=2", "HEAD"), PAGE)["limit"] == 2  # HEAD is served by the GET handler
    with pytest.raises(AssertionError, match="does not publish"):
        read_body(request("", "POST"), LIMITS, {})
    with pytest.raises(AssertionError, match="does not publish"):
        read_query(request("", "GET", handler=None), PAGE)
