"""The emulator's state: keys, generations, failure plans and counters.

Kept apart from the HTTP layer (``gateway/emulator.py``) so that the rules the emulator
imitates (who may read what, when a key is refused, what a key has spent) read on their
own. Money is ``Decimal`` throughout; nothing here is global, one ``EmulatorState`` per app.
"""

from __future__ import annotations

import base64
import hashlib
import random
import secrets
import string
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from openrouter_emulator.catalogue import (
    DATA_POLICY_MODEL,
    ZERO,
    Catalogue,
    CatalogueModel,
)

WORKSPACE_ID = "default"
_ALNUM = string.ascii_letters + string.digits
_ERROR_TYPES = {
    400: "invalid_request", 401: "authentication", 402: "payment_required", 403: "permission_denied",
    404: "not_found", 408: "timeout", 413: "payload_too_large", 422: "unprocessable",
    429: "rate_limit_exceeded", 500: "server", 502: "provider_unavailable", 503: "provider_overloaded",
    504: "timeout", 524: "timeout", 529: "provider_overloaded",
}
DATA_POLICY_MESSAGE = ("No endpoints found matching your data policy (Paid model training). "
                       "Configure: https://openrouter.ai/settings/privacy")


class EmulatorError(Exception):
    """An error answered in OpenRouter's envelope, HTTP status == ``code``."""

    def __init__(self, status: int, message: str, *, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []

    def payload(self) -> dict[str, Any]:
        error_type = _ERROR_TYPES.get(self.status, "server" if self.status >= 500 else "unmapped")
        return {"error": {"code": self.status, "message": self.message, "metadata": {"error_type": error_type}}}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id(prefix: str, n: int = 20) -> str:
    return f"{prefix}-{int(time.time())}-{''.join(random.choices(_ALNUM, k=n))}"


def parse_money(value: Any, what: str) -> Decimal | None:
    """A JSON number or numeric string as an exact Decimal (400 if it is not one)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise EmulatorError(400, f"{what} must be a number")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise EmulatorError(400, f"{what} must be a number") from None
    if not amount.is_finite() or amount < 0:
        raise EmulatorError(400, f"{what} must be a non-negative number")
    return amount


def key_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Validated ``limit``/``limit_reset``/``include_byok_in_limit``/``expires_at`` of a key API body."""
    fields: dict[str, Any] = {}
    if "limit" in body:
        fields["limit"] = parse_money(body["limit"], "limit")
    if "limit_reset" in body:
        if body["limit_reset"] not in (None, "daily", "weekly", "monthly"):
            raise EmulatorError(400, "limit_reset must be one of daily, weekly, monthly or null")
        fields["limit_reset"] = body["limit_reset"]
    if "include_byok_in_limit" in body:
        if not isinstance(body["include_byok_in_limit"], bool):
            raise EmulatorError(400, "include_byok_in_limit must be a boolean")
        fields["include_byok_in_limit"] = body["include_byok_in_limit"]
    if body.get("expires_at") is not None:
        try:
            expires = datetime.fromisoformat(str(body["expires_at"]))
        except ValueError:
            raise EmulatorError(400, "expires_at must be an ISO 8601 UTC timestamp") from None
        if expires.tzinfo is None or expires.utcoffset() != timedelta(0):
            raise EmulatorError(400, "expires_at must be in UTC")
        if expires.timestamp() <= time.time():
            raise EmulatorError(400, "expires_at must be in the future")
        fields["expires_at"] = expires.timestamp()
    return fields


# ---------------------------------------------------------------- records


@dataclass(slots=True, eq=False)
class KeyRecord:
    """One API key (inference or management); ``usage`` is lifetime spend in USD."""

    key: str
    name: str
    is_management: bool = False
    disabled: bool = False
    limit: Decimal | None = None
    limit_reset: str | None = None
    include_byok_in_limit: bool = False
    expires_at: float | None = None
    credits: Decimal = Decimal(100)
    default_model: str | None = None
    creator_user_id: str | None = None
    workspace_id: str = WORKSPACE_ID
    created_at: float = field(default_factory=time.time)
    updated_at: float | None = None
    last_used_at: float | None = None
    usage: Decimal = ZERO
    usage_by_day: dict[int, Decimal] = field(default_factory=dict)  # UTC day number → USD
    free_requests_by_day: dict[int, int] = field(default_factory=dict)
    hash: str = ""

    def __post_init__(self) -> None:
        self.hash = hashlib.sha256(self.key.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.key[:12]}...{self.key[-3:]}"

    def windows(self) -> tuple[Decimal, Decimal, Decimal]:
        """(daily, weekly, monthly) usage for the current UTC day, Monday-week and month."""
        today = int(time.time() // 86400)
        week_start = today - (today + 3) % 7  # 1970-01-01 was a Thursday
        month_start = today - ((date(1970, 1, 1) + timedelta(days=today)).day - 1)
        daily = weekly = monthly = ZERO
        for day, amount in self.usage_by_day.items():
            daily += amount if day == today else ZERO
            weekly += amount if day >= week_start else ZERO
            monthly += amount if day >= month_start else ZERO
        return daily, weekly, monthly

    def limit_usage(self) -> Decimal:
        """The spend that counts against ``limit`` under its ``limit_reset`` period."""
        if self.limit_reset is None:
            return self.usage
        daily, weekly, monthly = self.windows()
        return {"daily": daily, "weekly": weekly}.get(self.limit_reset, monthly)

    def limit_remaining(self) -> Decimal | None:
        return None if self.limit is None else max(self.limit - self.limit_usage(), ZERO)

    def _usage_fields(self) -> dict[str, Any]:
        daily, weekly, monthly = self.windows()
        return {
            "limit": self.limit, "limit_remaining": self.limit_remaining(), "limit_reset": self.limit_reset,
            "include_byok_in_limit": self.include_byok_in_limit,
            "usage": self.usage, "usage_daily": daily, "usage_weekly": weekly, "usage_monthly": monthly,
            "byok_usage": ZERO, "byok_usage_daily": ZERO, "byok_usage_weekly": ZERO, "byok_usage_monthly": ZERO,
        }

    def row(self) -> dict[str, Any]:
        """The ``/keys`` row (OPENROUTER.md §8 plus the fields the pinned SDKs require)."""
        return {
            "hash": self.hash, "name": self.name, "label": self.label, "disabled": self.disabled,
            **self._usage_fields(),
            "created_at": _iso(self.created_at), "updated_at": _iso(self.updated_at),
            "expires_at": _iso(self.expires_at), "last_used_at": _iso(self.last_used_at),
            "creator_user_id": self.creator_user_id, "external_user": None, "workspace_id": self.workspace_id,
        }

    def info(self, account_credits: Decimal) -> dict[str, Any]:
        """The ``GET /key`` body (OPENROUTER.md §6)."""
        free_used = self.free_requests_by_day.get(int(time.time() // 86400), 0)
        free_limit = 1000 if account_credits >= 10 else 50
        return {
            "label": self.label, **self._usage_fields(),
            "is_free_tier": False, "is_management_key": self.is_management,
            "is_provisioning_key": self.is_management, "expires_at": _iso(self.expires_at),
            "creator_user_id": self.creator_user_id, "organization_id": None, "workspace_id": self.workspace_id,
            "allowed_data_regions": ["global"],
            "free_model_daily_requests": {"used": free_used, "limit": free_limit,
                                          "remaining": max(free_limit - free_used, 0)},
            "rate_limit": {"requests": -1, "interval": "10s",
                           "note": "This field is deprecated and safe to ignore."},
            "budgets": [], "effective_budget": None,
        }


@dataclass(slots=True, eq=False)
class Generation:
    """What ``GET /generation`` reports about one completion or embedding."""

    id: str
    key_hash: str
    model: CatalogueModel
    api_type: str
    streamed: bool
    tokens_prompt: int
    started: float
    http_referer: str | None = None
    user_agent: str | None = None
    external_user: str | None = None
    session_id: str | None = None
    tokens_completion: int = 0
    cost: Decimal = ZERO
    cancelled: bool = False
    finish_reason: str | None = None
    status: int = 200
    latency_ms: int | None = None
    generation_time_ms: int | None = None
    upstream_id: str = field(default_factory=lambda: "chatcmpl-" + "".join(random.choices(_ALNUM, k=24)))
    lookups: int = 0

    def finish(self, completion_tokens: int, finish_reason: str | None, *, cancelled: bool = False,
               status: int = 200) -> tuple[Decimal, Decimal, Decimal]:
        """Fix tokens, outcome and timing; returns (cost, prompt cost, completion cost)."""
        now = time.time()
        self.tokens_completion = completion_tokens
        self.finish_reason = finish_reason
        self.cancelled = cancelled
        self.status = status
        self.generation_time_ms = int((now - self.started) * 1000)
        if self.latency_ms is None:
            self.latency_ms = self.generation_time_ms
        costs = self.model.cost(self.tokens_prompt, completion_tokens)
        self.cost = costs[0]
        return costs

    def data(self) -> dict[str, Any]:
        m = self.model
        return {
            "id": self.id, "request_id": "req-" + self.id[4:], "upstream_id": self.upstream_id,
            "session_id": self.session_id, "preset_id": None, "workspace_id": WORKSPACE_ID, "app_id": None,
            "external_user": self.external_user, "response_cache_source_id": None,
            "model": m.id, "provider_name": m.provider, "router": None, "api_type": self.api_type,
            "data_region": "global", "service_tier": None, "web_search_engine": None,
            "provider_responses": [{
                "id": self.upstream_id, "endpoint_id": f"emulator:{m.id}", "model_permaslug": m.row["canonical_slug"],
                "provider_name": m.provider, "status": self.status, "latency": self.latency_ms, "is_byok": False,
            }],
            "total_cost": self.cost, "usage": self.cost, "cache_discount": None, "upstream_inference_cost": None,
            "is_byok": False,
            "tokens_prompt": self.tokens_prompt, "tokens_completion": self.tokens_completion,
            "native_tokens_prompt": self.tokens_prompt, "native_tokens_completion": self.tokens_completion,
            "native_tokens_reasoning": 0, "native_tokens_cached": 0, "native_tokens_completion_images": 0,
            "num_media_prompt": None, "num_media_completion": None, "num_input_audio_prompt": None,
            "num_search_results": None, "num_fetches": None,
            "created_at": _iso(self.started), "latency": self.latency_ms,
            "generation_time": self.generation_time_ms, "moderation_latency": None,
            "streamed": self.streamed, "cancelled": self.cancelled,
            "finish_reason": self.finish_reason, "native_finish_reason": self.finish_reason,
            "origin": self.http_referer or "", "http_referer": self.http_referer, "user_agent": self.user_agent,
        }


@dataclass(slots=True, eq=False)
class StreamRecord:
    """The exact bytes of one streamed response body, so tests can compare what a proxy passed on."""

    generation_id: str
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False

    def data(self) -> dict[str, Any]:
        return {"generation_id": self.generation_id, "complete": self.complete, "length": len(self.body),
                "base64": base64.b64encode(bytes(self.body)).decode()}


@dataclass(slots=True)
class Plan:
    """One injected misbehaviour, consumed ``times`` times."""

    times: int = 1
    status: int = 0
    delay_ms: int = 0
    retry_after: int | None = None
    message: str | None = None
    after_chunks: int = 0


# ---------------------------------------------------------------- state


class EmulatorState:
    """Keys, generations, the catalogue, failure plans and counters of one emulator."""

    def __init__(self, *, extra_models: int = 0, chunk_delay_ms: float = 0, generation_not_ready_lookups: int = 0,
                 account_credits: Decimal | int | str = 1000, max_generations: int = 200_000) -> None:
        self.catalogue = Catalogue(extra_models)
        self.keys: dict[str, KeyRecord] = {}       # plaintext key → record
        self.by_hash: dict[str, KeyRecord] = {}
        self.generations: OrderedDict[str, Generation] = OrderedDict()
        self.max_generations = max_generations
        self.account_credits = Decimal(account_credits)
        self.account_usage = ZERO
        self.default_chunk_delay_ms = chunk_delay_ms  # what reset() returns to
        self.default_generation_not_ready_lookups = generation_not_ready_lookups
        self.chunk_delay_ms = chunk_delay_ms
        self.generation_not_ready_lookups = generation_not_ready_lookups
        self.failures: dict[str, deque[Plan]] = {}
        self.delays: dict[str, deque[Plan]] = {}
        self.midstream: deque[Plan] = deque()
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.models_fetches = 0
        self.generation_lookups = 0
        self.left_during_delay: list[float] = []  # when a caller hung up during an injected delay (epoch s)
        self.requests: dict[str, int] = {}
        self.last_request: tuple[str, dict[str, str], bytes] | None = None
        self.last_stream: StreamRecord | None = None  # the most recently started streamed response

    def reset(self) -> None:
        """Forget failure plans and counters; keys, generations and catalogue stay."""
        self.failures.clear()
        self.delays.clear()
        self.midstream.clear()
        self.chunk_delay_ms = self.default_chunk_delay_ms
        self.generation_not_ready_lookups = self.default_generation_not_ready_lookups
        self._reset_counters()

    # keys ---------------------------------------------------------------

    def add_key(self, key: str | None = None, *, name: str = "emulator key", management: bool = False,
                **fields: Any) -> KeyRecord:
        """Issue ``key`` (or a fresh ``sk-or-v1-<64 hex>``); an existing key is updated in place."""
        key = key or "sk-or-v1-" + secrets.token_hex(32)
        record = self.keys.get(key)
        if record is None:
            record = KeyRecord(key=key, name=name, is_management=management)
            self.keys[key] = self.by_hash[record.hash] = record
        for attr, value in fields.items():
            setattr(record, attr, value)
        return record

    def delete_key(self, record: KeyRecord) -> None:
        del self.keys[record.key], self.by_hash[record.hash]

    def authenticate(self, authorization: str | None, *, management: bool | None) -> KeyRecord:
        """The key behind a ``Bearer`` header; ``management`` True/False demands that key type."""
        if not authorization:
            raise EmulatorError(401, "No auth credentials found")
        scheme, _, token = authorization.partition(" ")
        record = self.keys.get(token.strip()) if scheme.lower() == "bearer" else None
        if record is None:
            raise EmulatorError(401, "User not found")
        if record.disabled:
            raise EmulatorError(401, "API key is disabled")
        if record.expires_at is not None and record.expires_at <= time.time():
            raise EmulatorError(401, "API key has expired")
        if management and not record.is_management:
            raise EmulatorError(403, "Only management keys can perform this operation")
        if management is False and record.is_management:
            raise EmulatorError(403, "Management keys cannot be used for inference; use an inference API key")
        return record

    def inference_keys(self) -> list[KeyRecord]:
        return [k for k in self.keys.values() if not k.is_management]

    # inference ------------------------------------------------------------

    def route(self, body: dict[str, Any], key: KeyRecord) -> CatalogueModel:
        """Serve the first usable of ``[model] + models`` (the key's default model if none)."""
        candidates = [body["model"]] if body.get("model") is not None else []
        if isinstance(body.get("models"), list):
            candidates += body["models"]
        if not candidates:
            if key.default_model is None:
                raise EmulatorError(400, "No models provided")
            candidates = [key.default_model]
        first_error: EmulatorError | None = None
        for candidate in candidates:
            entry = self.catalogue.get(candidate) if isinstance(candidate, str) else None
            if entry is not None and entry.id != DATA_POLICY_MODEL:
                return entry
            if first_error is None:
                first_error = (EmulatorError(404, DATA_POLICY_MESSAGE) if entry is not None
                               else EmulatorError(400, f"{candidate} is not a valid model ID"))
        assert first_error is not None
        raise first_error

    def check_spend(self, key: KeyRecord, model: CatalogueModel) -> None:
        """402 when the key's limit is used up, or its credits are (paid models only)."""
        if key.limit is not None and key.limit_usage() >= key.limit:
            raise EmulatorError(402, f"Key limit exceeded ({key.limit_reset or 'total'} limit). "
                                     "Manage it using https://openrouter.ai/settings/keys")
        balance = key.credits - key.usage
        if balance < 0 or (balance == 0 and not model.is_free):
            raise EmulatorError(402, "Insufficient credits. Add more using https://openrouter.ai/credits")

    def record(self, gen: Generation, key: KeyRecord) -> None:
        """Keep the generation (oldest dropped beyond ``max_generations``) and charge its key."""
        self.generations[gen.id] = gen
        if len(self.generations) > self.max_generations:
            self.generations.popitem(last=False)
        day = int(gen.started // 86400)
        if gen.cost:
            key.usage += gen.cost
            key.usage_by_day[day] = key.usage_by_day.get(day, ZERO) + gen.cost
            self.account_usage += gen.cost
        if gen.model.id.endswith(":free"):
            key.free_requests_by_day[day] = key.free_requests_by_day.get(day, 0) + 1
        key.last_used_at = time.time()

    def lookup_generation(self, gen_id: str, key: KeyRecord) -> Generation:
        """The caller's own generation; 404 for others' and for the first N lookups of each."""
        self.generation_lookups += 1
        gen = self.generations.get(gen_id)
        if gen is None or gen.key_hash != key.hash:
            raise EmulatorError(404, "Generation not found")
        gen.lookups += 1
        if gen.lookups <= self.generation_not_ready_lookups:
            raise EmulatorError(404, "Generation not found")
        return gen

    # misbehaviour -------------------------------------------------------------

    @staticmethod
    def _next(queue: deque[Plan] | None) -> Plan | None:
        if not queue:
            return None
        plan = queue[0]
        plan.times -= 1
        if plan.times <= 0:
            queue.popleft()
        return plan

    def take_failure(self, path: str) -> Plan | None:
        """The next injected failure for ``path`` (or for ``*``), if any."""
        return self._next(self.failures.get(path)) or self._next(self.failures.get("*"))

    def take_delay(self, path: str) -> Plan | None:
        return self._next(self.delays.get(path)) or self._next(self.delays.get("*"))

    def take_midstream(self) -> Plan | None:
        return self._next(self.midstream)

    def stats(self) -> dict[str, Any]:
        last = None
        if self.last_request is not None:
            path, headers, body = self.last_request
            last = {"path": path, "headers": headers, "body": body.decode("utf-8", "replace")}
        return {
            "models_fetches": self.models_fetches, "generation_lookups": self.generation_lookups,
            "requests": dict(self.requests), "keys": [k.hash for k in self.inference_keys()],
            "generations": len(self.generations), "last_request": last,
            "left_during_delay": list(self.left_during_delay),
        }
