"""User settings: validation names the field, the preparer fills only absent fields, passthrough is byte-identical."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.accounts.settings import (
    DefaultsPreparer,
    SettingsBook,
    UserSettings,
    validate_changes,
)
from gateway.core.errors import BadRequest
from gateway.proxy.types import ProxyRequest
from gateway.store import Store
from tests.conftest import principal

PRINCIPAL = principal("u1", token_id="t1")


def request(raw: bytes, endpoint: str = "/chat/completions") -> ProxyRequest:
    body = orjson.loads(raw)
    return ProxyRequest(endpoint=endpoint, body=body, raw=raw, model=body.get("model"), stream=False, started=0.0,
                        request_id="req_1")


def preparer(**settings: Any) -> DefaultsPreparer:
    book = SettingsBook(store=None)  # type: ignore[arg-type]
    book._put("u1", UserSettings(**settings))
    return DefaultsPreparer(book)


# -- validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"default_modle": "x/y"}, "default_modle"),
        ({"default_model": 3}, "default_model"),
        ({"default_model": ""}, "default_model"),
        ({"default_model": "has space"}, "default_model"),
        ({"fallback_models": "openai/gpt-4o"}, "fallback_models"),
        ({"fallback_models": ["ok/model", 7]}, "fallback_models"),
        ({"fallback_models": ["m/x"] * 17}, "fallback_models"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"fallback_enabled": "yes"}, "fallback_enabled"),
        ({"fallback_enabled": 1}, "fallback_enabled"),
    ],
)
def test_bad_settings_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        validate_changes(body)
    assert caught.value.param == param
    assert param in caught.value.message


def test_valid_changes_and_null_resets() -> None:
    changes = validate_changes({"default_model": "openai/gpt-4o-mini", "fallback_models": ["a/b", "c/d:free"],
                                "temperature": 0, "max_tokens": 256, "fallback_enabled": False})
    assert changes == {"default_model": "openai/gpt-4o-mini", "fallback_models": ("a/b", "c/d:free"),
                       "temperature": 0, "max_tokens": 256, "fallback_enabled": False}
    assert validate_changes({"default_model": None, "fallback_models": None, "fallback_enabled": None}) == {
        "default_model": None, "fallback_models": (), "fallback_enabled": True}


# -- the preparer -------------------------------------------------------------------


def test_nothing_to_fill_returns_the_same_bytes_object() -> None:
    raw = b'{"model":"openai/gpt-4o", "temperature":0.25,"max_tokens":9,"models":["x/y"],"messages":[]}'
    req = request(raw)
    out = preparer(default_model="a/b", temperature=1, max_tokens=5, fallback_models=("c/d",)).prepare(PRINCIPAL, req)
    assert out is raw and req.raw is raw and req.model == "openai/gpt-4o"


def test_user_without_settings_passes_through() -> None:
    raw = b'{"messages": [{"role": "user", "content": "hi"}]}'
    req = request(raw)
    other = principal("u2", token_id="t2")
    assert preparer(default_model="a/b").prepare(other, req) is raw
    assert req.model is None


def test_defaults_fill_only_absent_fields_and_keep_the_clients_bytes() -> None:
    raw = b'{ "messages" : [{"role":"user","content":"h\\u00e9llo"}],\n "temperature": 1.0000, "extra": {"k": [1,2]} }'
    req = request(raw)
    out = preparer(default_model="openai/gpt-4o-mini", temperature=0.2, max_tokens=64,
                   fallback_models=("anthropic/claude-3.5-haiku", "meta-llama/llama-3.3-70b-instruct:free"),
                   ).prepare(PRINCIPAL, req)
    sent = orjson.loads(out)
    assert sent["model"] == "openai/gpt-4o-mini"
    assert sent["temperature"] == 1.0  # the client's own value wins
    assert sent["max_tokens"] == 64
    assert sent["models"] == ["anthropic/claude-3.5-haiku", "meta-llama/llama-3.3-70b-instruct:free"]
    assert out.endswith(raw[1:])  # the client's bytes follow untouched (no re-serialisation)
    assert req.model == "openai/gpt-4o-mini" and req.raw is out
    assert req.body["max_tokens"] == 64  # limits see the filled body


def test_fallback_disabled_or_client_models_are_left_alone() -> None:
    raw = b'{"model":"a/b","messages":[]}'
    assert preparer(fallback_models=("c/d",), fallback_enabled=False).prepare(PRINCIPAL, request(raw)) is raw
    raw2 = b'{"model":"a/b","models":[],"messages":[]}'
    assert preparer(fallback_models=("c/d",)).prepare(PRINCIPAL, request(raw2)) is raw2


def test_null_fields_count_as_absent() -> None:
    req = request(b'{"model":null,"temperature":null,"messages":[]}')
    out = preparer(default_model="a/b", temperature=0.5).prepare(PRINCIPAL, req)
    assert orjson.loads(out) == {"model": "a/b", "temperature": 0.5, "messages": []}
    assert req.model == "a/b"


def test_empty_body_gets_fields_without_a_dangling_comma() -> None:
    out = preparer(default_model="a/b").prepare(PRINCIPAL, request(b" {} "))
    assert orjson.loads(out) == {"model": "a/b"}


def test_max_completion_tokens_blocks_the_max_tokens_default() -> None:
    raw = b'{"model":"a/b","max_completion_tokens":10}'
    assert preparer(max_tokens=99).prepare(PRINCIPAL, request(raw)) is raw


def test_embeddings_are_never_filled() -> None:
    raw = b'{"input":"hello"}'
    assert preparer(default_model="a/b").prepare(PRINCIPAL, request(raw, "/embeddings")) is raw


# -- the book (real SQLite store) ------------------------------------------------------


@pytest.mark.anyio
async def test_book_stores_merges_and_reloads(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path}/g.db")
    try:
        await store.users.create(user_id="u1", email=None, tier="starter")
        book = SettingsBook(store)
        seq = await store.changes.latest()
        saved = await book.update("u1", {"default_model": "a/b", "max_tokens": 5})
        assert saved.default_model == "a/b" and book.get("u1").max_tokens == 5
        assert await store.changes.latest() > seq  # other instances hear of it
        await book.update("u1", {"temperature": 0.5})
        assert book.get("u1") == UserSettings(default_model="a/b", max_tokens=5, temperature=0.5)
        fresh = SettingsBook(store)
        await fresh.load_all()
        assert fresh.get("u1") == book.get("u1")
        await store.account.put_settings("u1", UserSettings().public())  # another instance resets them
        await fresh.reload("u1")
        assert "u1" not in fresh.entries and fresh.get("u1") == UserSettings()
    finally:
        await store.close()
