"""What a handler accepts, declared once: the declaration validates the input and describes it.

A JSON body is a `Body` of fields (`Field`, `Money`, `Count`, `Nested`), the query a `Query` of
parameters (`IntParam`, `Choice`, `Text`). `Body.parse` and `Query.parse` are the handlers' only
input validation (unknown field, wrong type, missing, out of range: a 400 naming the field); `schema()`
and `parameters()` are what `/openapi.json` publishes for the same objects, found through `accepts`,
which attaches them to the endpoint. So the description cannot drift from what is enforced.

Services keep their own rules (a tier must exist in the config, an email must not be taken); the
declarations here say the shape, the bounds and the messages a caller needs to fix a request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Mapping, TypeVar

from starlette.requests import Request

from gateway.core.amounts import COUNT_RULE, MAX_COUNT, MAX_PLACES, MAX_USD, AmountError, parse_count, parse_usd
from gateway.core.errors import BadRequest

ENDPOINT_ATTRIBUTE = "accepts"
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

# the JSON types a field may have, as Python sees them after `common.parse_json_object` (decimals are Decimal)
_PYTHON: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, Decimal, float), "boolean": (bool,),
    "object": (dict,), "array": (list,), "null": (type(None),),
}
_ARTICLE = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean",
            "object": "an object", "array": "a list", "null": "null"}
MAX_WHOLE = 10**18
# core.amounts' plain decimals up to MAX_USD (it also takes leading zeros, as in "0999999999")
MONEY_PATTERN = (rf"^(?:[0-9]{{1,9}}(?:\.[0-9]{{0,{MAX_PLACES}}})?|\.[0-9]{{1,{MAX_PLACES}}}"
                 rf"|{MAX_USD:f}(?:\.0{{0,{MAX_PLACES}}})?)$")
MONEY_RULE = f"US dollars from 0 to {MAX_USD:,}, at most {MAX_PLACES} decimal places, as a string or a number"


@dataclass(frozen=True)
class Field:
    """One member of a JSON object: its JSON type(s), whether it may be left out or null, and its bounds.

    `message` replaces every generic refusal of the field (a service's established wording)."""

    name: str
    kind: str | tuple[str, ...]
    required: bool = False
    nullable: bool = True
    description: str = ""
    minimum: int | Decimal | None = None
    maximum: int | Decimal | None = None
    max_length: int | None = None
    pattern: str | None = None
    enum: tuple[str, ...] | None = None
    items: "Field | None" = None  # what each item of an array is (its name is not used)
    max_items: int | None = None
    format: str | None = None
    message: str | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.kind if isinstance(self.kind, tuple) else (self.kind,)

    def refuse(self, param: str, generic: str) -> BadRequest:
        return BadRequest(self.message or generic, param=param)

    def parse(self, value: Any, param: str) -> Any:
        """The value, checked (and converted where a subclass says so); a refusal names `param`."""
        if value is None:
            if self.required:
                raise self.refuse(param, f"Field {param!r} is required.")
            if self.nullable:
                return None
        kinds = self.kinds
        if "integer" in kinds:
            value = _whole(value)
        if isinstance(value, bool) and "boolean" not in kinds:
            raise self.refuse(param, f"Field {param!r} must be {_names(kinds)}, not a boolean.")
        if not any(isinstance(value, _PYTHON[k]) for k in kinds):
            got = "null" if value is None else type(value).__name__
            raise self.refuse(param, f"Field {param!r} must be {_names(kinds)}, got {got}.")
        return self.bounded(value, param)

    def bounded(self, value: Any, param: str) -> Any:
        if isinstance(value, str):
            if self.max_length is not None and len(value) > self.max_length:
                raise self.refuse(param, f"Field {param!r} must be at most {self.max_length} characters.")
            if self.pattern is not None and not re.search(self.pattern, value):
                raise self.refuse(param, f"Field {param!r} must match {self.pattern}.")
            if self.enum is not None and value not in self.enum:
                raise self.refuse(param, f"Field {param!r} must be one of: {', '.join(self.enum)}.")
        elif isinstance(value, list):
            if self.max_items is not None and len(value) > self.max_items:
                raise self.refuse(param, f"Field {param!r} must have at most {self.max_items} items.")
            if self.items is not None:
                try:
                    value = [self.items.parse(item, f"{param}[{i}]") for i, item in enumerate(value)]
                except BadRequest as exc:
                    raise self.refuse(param, exc.message) from None
        elif isinstance(value, (int, Decimal, float)) and not isinstance(value, bool):
            if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
                raise self.refuse(param, f"Field {param!r} must be from {self.minimum} to {self.maximum}.")
        return value

    def schema(self) -> dict[str, Any]:
        kinds = list(self.kinds) + (["null"] if self.nullable and not self.required else [])
        schema: dict[str, Any] = {"type": kinds[0] if len(kinds) == 1 else kinds}
        if self.description:
            schema["description"] = self.description
        bounds = {"minimum": self.minimum, "maximum": self.maximum, "maxLength": self.max_length,
                  "pattern": self.pattern, "maxItems": self.max_items, "format": self.format}
        schema.update({k: _number(v) for k, v in bounds.items() if v is not None})
        if self.enum is not None:
            schema["enum"] = list(self.enum) + ([None] if "null" in kinds else [])
        if self.items is not None:
            schema["items"] = self.items.schema()
        return schema


@dataclass(frozen=True)
class Money(Field):
    """An amount of US dollars as `core.amounts.parse_usd` reads it: a plain decimal, string or number."""

    kind: str | tuple[str, ...] = ("string", "number")
    hint: str = ""  # what follows the rule in a refusal, e.g. ", or null for no limit"

    def parse(self, value: Any, param: str) -> Any:
        if value is None and self.nullable and not self.required:
            return None
        try:
            return parse_usd(value)
        except AmountError as exc:
            raise BadRequest(f"{param} {exc}{self.hint}.", param=param) from None

    def schema(self) -> dict[str, Any]:
        variants: list[dict[str, Any]] = [
            {"type": "string", "pattern": MONEY_PATTERN, "maxLength": 24},
            {"type": "number", "minimum": 0, "maximum": _number(MAX_USD)},
        ]
        if self.nullable and not self.required:
            variants.append({"type": "null"})
        return {"anyOf": variants, "description": f"{self.description}: {MONEY_RULE}" if self.description else MONEY_RULE}


@dataclass(frozen=True)
class Count(Field):
    """A whole-number limit as `core.amounts.parse_count` reads it (0 to `MAX_COUNT`)."""

    kind: str | tuple[str, ...] = "integer"
    minimum: int | Decimal | None = 0
    maximum: int | Decimal | None = MAX_COUNT
    hint: str = ""

    def parse(self, value: Any, param: str) -> Any:
        if value is None and self.nullable and not self.required:
            return None
        try:
            return parse_count(_whole(value))
        except AmountError as exc:
            raise BadRequest(f"{param} {exc}{self.hint}.", param=param) from None

    def schema(self) -> dict[str, Any]:
        return super().schema() | {"description": self.description or COUNT_RULE}


@dataclass(frozen=True)
class Nested(Field):
    """An object member that is itself a `Body` (its refusals name `parent.member`)."""

    kind: str | tuple[str, ...] = "object"
    body: "Body | None" = None

    def parse(self, value: Any, param: str) -> Any:
        checked = super().parse(value, param)
        if checked is None or self.body is None:
            return checked
        return self.body.parse(checked, prefix=param + ".")

    def schema(self) -> dict[str, Any]:
        schema = super().schema()
        if self.body is not None:
            schema.update(self.body.schema())
            schema["type"] = ["object", "null"] if self.nullable and not self.required else "object"
        return schema


class Body:
    """A JSON object's fields; any other member is refused (`unknown` words the refusal)."""

    def __init__(self, *fields: Field, unknown: str = "Unknown field {name!r}; allowed fields are: {allowed}.",
                 sort_allowed: bool = True, required: bool = True, description: str = "") -> None:
        self.fields = {f.name: f for f in fields}
        self.unknown = unknown
        self.allowed = ", ".join(sorted(self.fields) if sort_allowed else self.fields)
        self.required = required  # False: the request may have no body at all
        self.description = description

    def parse(self, body: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
        """The members present, each checked: unknown members first, then missing ones, then each value."""
        for name in body:
            if name not in self.fields:
                raise BadRequest(self.unknown.format(name=name, allowed=self.allowed), param=prefix + name)
        checked: dict[str, Any] = {}
        for name, spec in self.fields.items():
            if name in body:
                checked[name] = spec.parse(body[name], prefix + name)
            elif spec.required:
                raise spec.refuse(prefix + name, f"Field {prefix + name!r} is required.")
        return checked

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {name: spec.schema() for name, spec in self.fields.items()},
            "additionalProperties": False,
        }
        required = [name for name, spec in self.fields.items() if spec.required]
        if required:
            schema["required"] = required
        if self.description:
            schema["description"] = self.description
        return schema


# -- query parameters -------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One query parameter. `check`, when given, reads the raw value (None when absent) with a service's rules."""

    name: str
    description: str = ""
    required: bool = False
    check: Callable[[str | None], Any] | None = None
    max_length: int | None = None
    pattern: str | None = None
    message: str | None = None
    aliases: tuple[str, ...] = field(default=())

    def raw(self, request: Request) -> str | None:
        for name in (self.name, *self.aliases):
            value = request.query_params.get(name)
            if value:
                return value
        return request.query_params.get(self.name)

    def parse(self, raw: str | None) -> Any:
        if self.check is not None:
            return self.check(raw)
        if raw is None or raw == "":
            if self.required:
                raise BadRequest(self.message or f"Query parameter {self.name!r} is required.", param=self.name)
            return None
        if self.max_length is not None and len(raw) > self.max_length:
            raise BadRequest(self.message or f"Query parameter {self.name!r} must be at most {self.max_length} "
                             "characters.", param=self.name)
        if self.pattern is not None and not re.fullmatch(self.pattern, raw):
            raise BadRequest(self.message or f"Query parameter {self.name!r} must match {self.pattern}, "
                             f"got {raw[:100]!r}.", param=self.name)
        return raw

    def value_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string"}
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        if self.pattern is not None:
            schema["pattern"] = f"^(?:{self.pattern})$"
        return schema

    def parameters(self) -> list[dict[str, Any]]:
        described = {"in": "query", "required": self.required, "schema": self.value_schema()}
        if self.description:
            described["description"] = self.description
        return [{"name": name, **described, "required": self.required and name == self.name}
                for name in (self.name, *self.aliases)]


@dataclass(frozen=True)
class Text(Param):
    """A free-text parameter (a filter, a cursor); absent or empty is None, at most 256 characters."""

    max_length: int | None = 256


@dataclass(frozen=True)
class IntParam(Param):
    """A whole number from `low` to `high`; `default` when absent."""

    default: int | None = None
    low: int = 0
    high: int = MAX_COUNT

    def parse(self, raw: str | None) -> Any:
        if raw is None:
            return self.default
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None and self.message is None:
            raise BadRequest(f"Query parameter {self.name!r} must be an integer, got {raw[:100]!r}.",
                             param=self.name)
        if value is None or not self.low <= value <= self.high:
            raise BadRequest(
                (self.message or "Query parameter {name!r} must be between {low} and {high}.").format(
                    name=self.name, low=self.low, high=self.high, raw=raw[:100]), param=self.name)
        return value

    def value_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "integer", "minimum": self.low, "maximum": self.high}
        if self.default is not None:
            schema["default"] = self.default
        return schema


@dataclass(frozen=True)
class Choice(Param):
    """One of `allowed`; `default` when absent or empty (the refusal lists the allowed values)."""

    allowed: tuple[str, ...] = ()
    default: str | None = None

    def parse(self, raw: str | None) -> Any:
        if raw is None or raw == "":
            return self.default
        if raw not in self.allowed:
            raise BadRequest(f"Unknown {self.name} {raw!r}; use one of: {', '.join(self.allowed)}.", param=self.name)
        return raw

    def value_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string", "enum": list(self.allowed)}
        if self.default is not None:
            schema["default"] = self.default
        return schema


class Query:
    """A handler's query parameters; others are ignored (SDKs add their own), as HTTP APIs usually do."""

    def __init__(self, *params: Param) -> None:
        self.params = {p.name: p for p in params}

    def parse(self, request: Request) -> dict[str, Any]:
        """Every parameter's value (its default when absent), checked in the declared order."""
        return {name: param.parse(param.raw(request)) for name, param in self.params.items()}

    def parameters(self) -> list[dict[str, Any]]:
        return [described for param in self.params.values() for described in param.parameters()]


# -- the link to the endpoint -----------------------------------------------------------


@dataclass(frozen=True)
class Accepts:
    """What an endpoint takes, per HTTP method, and the JSON Schema of its success responses per method."""

    bodies: dict[str, Body]
    queries: dict[str, Query]
    returns: dict[str, dict[str, Any]]


def accepts(*, returns: Mapping[str, dict[str, Any]] | None = None,
            **by_method: Body | Query) -> Callable[[Endpoint], Endpoint]:
    """Declare what the decorated handler takes, e.g. `@accepts(GET=LIST_QUERY, POST=NEW_USER)`, and
    optionally what it answers (`returns={"POST": USER}`, a JSON Schema).

    The handler validates with the same objects (`read_body`, `read_query` check that it does)."""
    bodies = {m.upper(): spec for m, spec in by_method.items() if isinstance(spec, Body)}
    queries = {m.upper(): spec for m, spec in by_method.items() if isinstance(spec, Query)}
    answers = {m.upper(): schema for m, schema in (returns or {}).items()}

    def attach(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, ENDPOINT_ATTRIBUTE, Accepts(bodies, queries, answers))
        return endpoint

    return attach


def accepted(endpoint: Any) -> Accepts | None:
    found = getattr(endpoint, ENDPOINT_ATTRIBUTE, None)
    return found if isinstance(found, Accepts) else None


def _declared(request: Request, spec: Body | Query) -> None:
    declared = accepted(request.scope.get("endpoint"))
    specs = {**declared.bodies, **declared.queries} if declared else {}
    method = "GET" if request.method == "HEAD" else request.method  # Starlette serves HEAD with the GET handler
    assert specs.get(method) is spec, f"{request.url.path}: the handler validates with a spec it does not publish"


def read_query(request: Request, query: Query) -> dict[str, Any]:
    """`query.parse(request)`, checked to be what the endpoint publishes for this method."""
    _declared(request, query)
    return query.parse(request)


def read_body(request: Request, body: Body, data: Mapping[str, Any]) -> dict[str, Any]:
    """`body.parse(data)`, checked to be what the endpoint publishes for this method."""
    _declared(request, body)
    return body.parse(data)


def _whole(value: Any) -> Any:
    """JSON Schema's integers include 5.0 and 1e3 (parsed as Decimal): such a value is that int, if not huge."""
    if isinstance(value, Decimal) and value.is_finite() and abs(value) <= MAX_WHOLE and value == value.to_integral_value():
        return int(value)
    return value


def _names(kinds: tuple[str, ...]) -> str:
    return " or ".join(_ARTICLE[k] for k in kinds if k != "null")


def _number(value: Any) -> Any:
    """A schema bound as JSON writes it: a whole Decimal as an int, any other stays Decimal (the API's
    `dumps` writes it exactly; it never passes through float)."""
    return int(value) if isinstance(value, Decimal) and value == value.to_integral_value() else value
