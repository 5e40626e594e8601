"""The user's proxy preferences (`/v1/settings`) and the body preparer that applies them.

Preferences: `default_model`, `fallback_models`, `temperature`, `max_tokens`,
`fallback_enabled`. On the proxy path they only fill what the client left out (absent or
null): `model`, `temperature`, `max_tokens`, and OpenRouter's `models` fallback list when
fallback is enabled. Everything else is forwarded as sent.

Why it is shaped like this:
- The preparer is on the hot path, so it never waits: every stored preference set is
  loaded when the gateway starts (only users who saved some have a row), a local write
  updates the cache at once, and any change named in the change feed (another
  instance's write) reloads that user in the background.
- When nothing needs filling, the client's bytes go upstream untouched (the same
  object, no re-serialisation). When something does, the new fields are spliced in after
  the opening brace, so the client's own bytes still go through unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import asdict, dataclass, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from gateway.core.amounts import MAX_COUNT
from gateway.core.errors import BadRequest

if TYPE_CHECKING:
    from gateway.auth.tokens import Principal
    from gateway.proxy.types import ProxyRequest
    from gateway.store import Store

log = logging.getLogger("gateway.settings")

FIELDS = ("default_model", "fallback_models", "temperature", "max_tokens", "fallback_enabled")
MAX_FALLBACK_MODELS = 16
MAX_MODEL_ID_CHARS = 200
FILLED_ENDPOINTS = frozenset({"/chat/completions", "/completions"})  # not embeddings: a chat default is no embedder


@dataclass(frozen=True, slots=True)
class UserSettings:
    default_model: str | None = None
    fallback_models: tuple[str, ...] = ()
    temperature: float | int | None = None
    max_tokens: int | None = None
    fallback_enabled: bool = True

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["fallback_models"] = list(self.fallback_models)
        return data

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> "UserSettings":
        known = {k: v for k, v in stored.items() if k in FIELDS}
        if "fallback_models" in known:
            known["fallback_models"] = tuple(known["fallback_models"] or ())
        return cls(**known)

    @property
    def fills_anything(self) -> bool:
        return (self.default_model is not None or self.temperature is not None or self.max_tokens is not None
                or (self.fallback_enabled and bool(self.fallback_models)))


DEFAULTS = UserSettings()


# -- validation ---------------------------------------------------------------------


def _model_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_MODEL_ID_CHARS or any(
        c.isspace() for c in value
    ):
        raise BadRequest(
            f"Field {name!r} must be an OpenRouter model id such as \"openai/gpt-4o-mini\" "
            f"(a non-empty string without spaces, at most {MAX_MODEL_ID_CHARS} characters); see GET /v1/models.",
            param=name,
        )
    return value


def validate_changes(body: dict[str, Any]) -> dict[str, Any]:
    """The fields to change, checked; an unknown field or a wrong type is a 400 naming it.

    A field left out keeps its value; `null` resets it to the default.
    """
    for name in body:
        if name not in FIELDS:
            raise BadRequest(f"Unknown setting {name!r}; the settings are: {', '.join(FIELDS)}.", param=name)
    changes: dict[str, Any] = {}
    for name, value in body.items():
        if value is None:
            changes[name] = getattr(DEFAULTS, name)
        elif name == "default_model":
            changes[name] = _model_id(value, name)
        elif name == "fallback_models":
            if not isinstance(value, list) or len(value) > MAX_FALLBACK_MODELS:
                raise BadRequest(
                    f"Field 'fallback_models' must be a list of at most {MAX_FALLBACK_MODELS} model ids, "
                    "tried in order when the requested model fails; e.g. [\"anthropic/claude-3.5-haiku\"].",
                    param=name,
                )
            changes[name] = tuple(_model_id(item, name) for item in value)
        elif name == "temperature":
            if isinstance(value, Decimal):  # JSON API bodies parse decimals exactly; a temperature is no money
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
                0 <= value <= 2
            ):
                raise BadRequest("Field 'temperature' must be a number from 0 to 2, or null for no default.",
                                 param=name)
            changes[name] = value
        elif name == "max_tokens":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
                raise BadRequest(f"Field 'max_tokens' must be a whole number from 1 to {MAX_COUNT:,}, "
                                 "or null for no default.", param=name)
            changes[name] = value
        elif name == "fallback_enabled":
            if not isinstance(value, bool):
                raise BadRequest("Field 'fallback_enabled' must be true or false.", param=name)
            changes[name] = value
    return changes


# -- the per-user cache -------------------------------------------------------------


class SettingsBook:
    """Every user's preferences in memory; users without a row have the defaults."""

    def __init__(self, store: "Store") -> None:
        self._store = store
        self.entries: dict[str, UserSettings] = {}
        self._versions: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def load_all(self) -> None:
        for user_id, stored in (await self._store.account.all_settings()).items():
            self._put(user_id, UserSettings.from_stored(stored))

    def get(self, user_id: str) -> UserSettings:
        return self.entries.get(user_id, DEFAULTS)

    def _put(self, user_id: str, settings: UserSettings) -> None:
        if settings != DEFAULTS:
            self.entries[user_id] = settings
        else:
            self.entries.pop(user_id, None)

    async def update(self, user_id: str, changes: dict[str, Any]) -> UserSettings:
        """Apply validated changes, store them (naming the user in the change feed), cache them."""
        self._versions[user_id] = self._versions.get(user_id, 0) + 1
        stored = await self._store.account.settings(user_id)
        current = UserSettings.from_stored(stored) if stored is not None else DEFAULTS
        new = replace(current, **changes)
        await self._store.account.put_settings(user_id, {**new.public()})
        self._versions[user_id] = self._versions.get(user_id, 0) + 1
        self._put(user_id, new)
        return new

    async def reload(self, user_id: str) -> None:
        version = self._versions.get(user_id, 0)
        stored = await self._store.account.settings(user_id)
        if self._versions.get(user_id, 0) != version:
            return  # a local write landed meanwhile and is newer than what was read
        self._put(user_id, UserSettings.from_stored(stored) if stored is not None else DEFAULTS)

    def on_user_change(self, user_id: str) -> None:
        """Auth-cache listener: any change to the user (here or on another instance) reloads them."""
        try:
            task = asyncio.get_running_loop().create_task(self._reload_logged(user_id))
        except RuntimeError:
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_logged(self, user_id: str) -> None:
        try:
            await self.reload(user_id)
        except Exception:
            log.exception("reloading the settings of user %s failed", user_id)


# -- the proxy hook -----------------------------------------------------------------


class DefaultsPreparer:
    """`BodyPreparer`: fills the user's defaults into absent fields; otherwise returns `request.raw`."""

    def __init__(self, book: SettingsBook) -> None:
        self._entries = book.entries

    def prepare(self, principal: "Principal", request: "ProxyRequest") -> bytes:
        settings = self._entries.get(principal.user_id)
        if settings is None or request.endpoint not in FILLED_ENDPOINTS:
            return request.raw
        body = request.body
        fill: dict[str, Any] = {}
        if settings.default_model is not None and body.get("model") is None:
            fill["model"] = settings.default_model
        if settings.temperature is not None and body.get("temperature") is None:
            fill["temperature"] = settings.temperature
        if (settings.max_tokens is not None and body.get("max_tokens") is None
                and body.get("max_completion_tokens") is None):
            fill["max_tokens"] = settings.max_tokens
        if settings.fallback_enabled and settings.fallback_models and body.get("models") is None:
            fill["models"] = list(settings.fallback_models)
        if not fill:
            return request.raw
        raw = request.raw
        if any(name in body for name in fill):  # present as null: replace it, so re-serialise
            body.update(fill)
            raw = orjson.dumps(body)
        else:
            start = raw.index(b"{") + 1
            fields = b",".join(orjson.dumps(name) + b":" + orjson.dumps(value) for name, value in fill.items())
            raw = raw[:start] + fields + (b"," if body else b"") + raw[start:]
            body.update(fill)
        if "model" in fill:
            request.model = fill["model"]
        request.raw = raw
        return raw
