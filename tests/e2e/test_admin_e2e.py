"""The admin API end to end: users, tokens and BYOK over HTTP against a real `gateway serve`.

Every bad input gets a 400 (or 401/404/409/415) naming the parameter, and nothing is
written. Revocation reaches the next request within 1 s on the same instance and on a
second process sharing the SQLite file. No token or key is ever in a response, the
database file or the log.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, Emulator, GatewayProcess, start_gateway

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
UNKNOWN_KEY = "sk-or-v1-" + "0" * 64


def uid() -> str:
    return "u-" + secrets.token_hex(4)


def error_of(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


@pytest.fixture(scope="module")
def pair(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, GatewayProcess, Path]]:
    """Two gateway processes sharing one SQLite file, logging at debug with the access log on."""
    tmp = tmp_path_factory.mktemp("admin-e2e")
    overrides = {"logging": {"level": "debug", "access_log": True}}
    first = start_gateway(tmp, emulator, overrides)
    second = start_gateway(tmp, emulator, overrides)
    try:
        yield first, second, tmp
    finally:
        first.stop()
        second.stop()


@pytest.fixture(scope="module")
def gw(pair: tuple[GatewayProcess, GatewayProcess, Path]) -> GatewayProcess:
    return pair[0]


@pytest.fixture(scope="module")
def admin(gw: GatewayProcess) -> httpx.Client:
    return gw.admin


# -- admin token --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin/v1/users"), ("POST", "/admin/v1/users"), ("GET", "/admin/v1/users/x"),
     ("PATCH", "/admin/v1/users/x"), ("DELETE", "/admin/v1/users/x"), ("POST", "/admin/v1/users/x/tokens"),
     ("DELETE", "/admin/v1/tokens/tok_x"), ("POST", "/admin/v1/tokens/tok_x/rotate"),
     ("PUT", "/admin/v1/users/x/openrouter-key")],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN])
def test_missing_or_invalid_admin_token_is_401(gw: GatewayProcess, method: str, path: str,
                                               authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.request(method, gw.url + path, headers=headers, json={"id": "x"}, timeout=10)
    error_of(response, 401)


def test_a_platform_token_is_not_an_admin_token(gw: GatewayProcess) -> None:
    user = gw.create_user()
    error_of(httpx.get(gw.url + "/admin/v1/users", headers={"Authorization": f"Bearer {user['token']}"}), 401)


# -- users ----------------------------------------------------------------------------------


def test_user_crud(admin: httpx.Client) -> None:
    user_id = uid()
    created = admin.post("/admin/v1/users", json={"id": user_id, "email": f"{user_id}@example.com", "tier": "starter"})
    assert created.status_code == 201, created.text
    assert created.json()["tier"] == "starter" and created.json()["openrouter_key"] is None
    patched = admin.patch(f"/admin/v1/users/{user_id}", json={
        "tier": "professional", "status": "suspended", "limits": {"requests_per_minute": 5, "daily_budget_usd": "1.25"},
    })
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert (body["tier"], body["status"]) == ("professional", "suspended")
    assert body["limits"] == {"requests_per_minute": 5, "daily_budget_usd": "1.25"}
    cleared = admin.patch(f"/admin/v1/users/{user_id}", json={"limits": {"requests_per_minute": None}})
    assert cleared.json()["limits"] == {"daily_budget_usd": "1.25"}
    assert admin.get(f"/admin/v1/users/{user_id}").json()["status"] == "suspended"
    assert admin.delete(f"/admin/v1/users/{user_id}").status_code == 204
    error_of(admin.get(f"/admin/v1/users/{user_id}"), 404)


def test_users_list_pages_with_a_cursor(admin: httpx.Client) -> None:
    prefix = "p-" + secrets.token_hex(3)
    ids = [f"{prefix}-{n}" for n in range(3)]
    for user_id in ids:
        assert admin.post("/admin/v1/users", json={"id": user_id}).status_code == 201
    seen: list[str] = []
    cursor = f"{prefix}-"
    while True:
        page = admin.get("/admin/v1/users", params={"limit": 2, "cursor": cursor}).json()
        seen += [u["id"] for u in page["data"] if u["id"].startswith(prefix)]
        if not page["next_cursor"] or not page["next_cursor"].startswith(prefix):
            break
        cursor = page["next_cursor"]
    assert seen == ids


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tier": "platinum"}, "tier"),
        ({"tier": 5}, "tier"),
        ({"email": "not-an-email"}, "email"),
        ({"email": 5}, "email"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_user_is_refused_and_not_created(admin: httpx.Client, body: dict[str, Any], param: str) -> None:
    user_id = uid()
    error_of(admin.post("/admin/v1/users", json={"id": user_id, **body}), 400, param)
    error_of(admin.get(f"/admin/v1/users/{user_id}"), 404)


@pytest.mark.parametrize("bad_id", [5, "has space", "", "x" * 200, "-leading-dash"])
def test_bad_user_id_is_refused(admin: httpx.Client, bad_id: Any) -> None:
    before = admin.get("/admin/v1/users", params={"limit": 500}).json()["data"]
    error_of(admin.post("/admin/v1/users", json={"id": bad_id}), 400, "id")
    assert admin.get("/admin/v1/users", params={"limit": 500}).json()["data"] == before


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [(b"{not json", "application/json", 400), (b"[1, 2]", "application/json", 400),
     (b'{"tier": "trial"}', "text/plain", 415)],
)
def test_malformed_bodies_are_refused(admin: httpx.Client, content: bytes, content_type: str, status: int) -> None:
    error_of(admin.post("/admin/v1/users", content=content, headers={"Content-Type": content_type}), status)


def test_duplicate_id_or_email_is_409(admin: httpx.Client) -> None:
    user_id = uid()
    assert admin.post("/admin/v1/users", json={"id": user_id, "email": f"{user_id}@example.com"}).status_code == 201
    error_of(admin.post("/admin/v1/users", json={"id": user_id}), 409, "id")
    error_of(admin.post("/admin/v1/users", json={"email": f"{user_id}@example.com"}), 409, "email")


def test_patching_an_email_another_user_has_is_409_not_500(admin: httpx.Client) -> None:
    # Regression: the unique index raised an IntegrityError that became a 500.
    a, b = uid(), uid()
    admin.post("/admin/v1/users", json={"id": a, "email": f"{a}@example.com"})
    admin.post("/admin/v1/users", json={"id": b, "email": f"{b}@example.com"})
    error_of(admin.patch(f"/admin/v1/users/{b}", json={"email": f"{a}@example.com"}), 409, "email")
    assert admin.get(f"/admin/v1/users/{b}").json()["email"] == f"{b}@example.com"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tier": "platinum"}, "tier"),
        ({"status": "banned"}, "status"),
        ({"status": True}, "status"),
        ({"email": "nope"}, "email"),
        ({"limits": 5}, "limits"),
        ({"limits": {"requests_per_day": 5}}, "limits.requests_per_day"),
        ({"limits": {"requests_per_minute": -1}}, "limits.requests_per_minute"),
        ({"limits": {"requests_per_minute": True}}, "limits.requests_per_minute"),
        ({"limits": {"requests_per_minute": 1.5}}, "limits.requests_per_minute"),
        ({"limits": {"daily_budget_usd": "lots"}}, "limits.daily_budget_usd"),
        ({"limits": {"daily_budget_usd": -1}}, "limits.daily_budget_usd"),
        ({"limits": {"daily_budget_usd": "NaN"}}, "limits.daily_budget_usd"),
        ({"nickname": "x"}, "nickname"),
    ],
)
def test_bad_patch_is_refused_and_changes_nothing(admin: httpx.Client, body: dict[str, Any], param: str) -> None:
    user_id = uid()
    before = admin.post("/admin/v1/users", json={"id": user_id, "tier": "starter"}).json()
    error_of(admin.patch(f"/admin/v1/users/{user_id}", json=body), 400, param)
    assert admin.get(f"/admin/v1/users/{user_id}").json() == before


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/admin/v1/users/{u}", None), ("PATCH", "/admin/v1/users/{u}", {"tier": "starter"}),
     ("DELETE", "/admin/v1/users/{u}", None), ("GET", "/admin/v1/users/{u}/tokens", None),
     ("POST", "/admin/v1/users/{u}/tokens", {}), ("PUT", "/admin/v1/users/{u}/openrouter-key", {"api_key": UNKNOWN_KEY}),
     ("DELETE", "/admin/v1/users/{u}/openrouter-key", None), ("DELETE", "/admin/v1/tokens/tok_{u}", None),
     ("POST", "/admin/v1/tokens/tok_{u}/rotate", None)],
)
def test_unknown_user_or_token_is_404(admin: httpx.Client, method: str, path: str, body: Any) -> None:
    error_of(admin.request(method, path.format(u=uid()), json=body), 404)


# -- tokens --------------------------------------------------------------------------------


def test_token_is_shown_once_and_listed_without_its_secret(admin: httpx.Client) -> None:
    user_id = uid()
    admin.post("/admin/v1/users", json={"id": user_id})
    created = admin.post(f"/admin/v1/users/{user_id}/tokens", json={"name": "ci", "expires_at": "2031-05-01T00:00:00Z"})
    assert created.status_code == 201, created.text
    token = created.json()
    assert token["token"].startswith(token["prefix"]) and len(token["token"]) >= 46
    listed = admin.get(f"/admin/v1/users/{user_id}/tokens").json()["data"]
    assert [t["id"] for t in listed] == [token["id"]]
    assert set(listed[0]) >= {"id", "name", "prefix", "created_at", "last_used_at", "expires_at", "revoked"}
    assert token["token"] not in str(listed)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"expires_at": "soon"}, "expires_at"),
        ({"expires_at": 1893456000}, "expires_at"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"name": 7}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"scope": "all"}, "scope"),
    ],
)
def test_bad_token_request_is_refused_and_creates_nothing(admin: httpx.Client, body: dict[str, Any], param: str) -> None:
    user_id = uid()
    admin.post("/admin/v1/users", json={"id": user_id})
    error_of(admin.post(f"/admin/v1/users/{user_id}/tokens", json=body), 400, param)
    assert admin.get(f"/admin/v1/users/{user_id}/tokens").json()["data"] == []


def _wait_for_401(client: httpx.Client, budget_s: float = 1.0) -> float:
    """Seconds until the token is refused; fails if it still works after `budget_s`."""
    started = time.monotonic()
    while True:
        status = client.post("/v1/chat/completions", json=CHAT).status_code
        elapsed = time.monotonic() - started
        if status == 401:
            return elapsed
        assert status == 200, status
        assert elapsed < budget_s, f"the revoked token still worked after {elapsed:.2f}s"


def test_revocation_is_immediate_on_the_same_instance(gw: GatewayProcess, admin: httpx.Client,
                                                       emulator: Emulator) -> None:
    user = gw.create_user(key=emulator.new_key())
    with gw.client(user["token"]) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # now cached
        revoked = admin.delete(f"/admin/v1/tokens/{user['token_id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked"] is True
        error_of(client.post("/v1/chat/completions", json=CHAT), 401)


def test_revocation_reaches_a_second_process_within_a_second(
    pair: tuple[GatewayProcess, GatewayProcess, Path], emulator: Emulator
) -> None:
    first, second, _ = pair
    user = first.create_user(key=emulator.new_key())
    with second.client(user["token"]) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # cached on the second process
        assert first.admin.delete(f"/admin/v1/tokens/{user['token_id']}").status_code == 200
        _wait_for_401(client, budget_s=1.0)


def test_suspension_reaches_a_second_process(pair: tuple[GatewayProcess, GatewayProcess, Path],
                                             emulator: Emulator) -> None:
    first, second, _ = pair
    user = first.create_user(key=emulator.new_key())
    with second.client(user["token"]) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        first.admin.patch(f"/admin/v1/users/{user['id']}", json={"status": "suspended"})
        deadline = time.monotonic() + 1.0
        while (status := client.post("/v1/chat/completions", json=CHAT).status_code) == 200:
            assert time.monotonic() < deadline, "the suspended user could still call after 1 s"
        assert status == 403


def test_rotate_gives_a_new_secret_and_the_old_one_stops(gw: GatewayProcess, admin: httpx.Client,
                                                          emulator: Emulator) -> None:
    user = gw.create_user(key=emulator.new_key())
    rotated = admin.post(f"/admin/v1/tokens/{user['token_id']}/rotate")
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert new["token"] != user["token"] and new["id"] != user["token_id"]
    with gw.client(user["token"]) as old_client, gw.client(new["token"]) as new_client:
        error_of(old_client.post("/v1/chat/completions", json=CHAT), 401)
        assert new_client.post("/v1/chat/completions", json=CHAT).status_code == 200
    error_of(admin.post(f"/admin/v1/tokens/{user['token_id']}/rotate"), 409)


# -- BYOK -------------------------------------------------------------------------------------


def test_byok_is_verified_then_stored_masked(gw: GatewayProcess, admin: httpx.Client, emulator: Emulator) -> None:
    user_id = uid()
    admin.post("/admin/v1/users", json={"id": user_id})
    key = emulator.new_key()
    response = admin.put(f"/admin/v1/users/{user_id}/openrouter-key", json={"api_key": key})
    assert response.status_code == 200, response.text
    assert response.json()["last4"] == key[-4:] and key not in response.text
    shown = admin.get(f"/admin/v1/users/{user_id}")
    assert shown.json()["openrouter_key"]["kind"] == "byok" and key not in shown.text
    assert admin.delete(f"/admin/v1/users/{user_id}/openrouter-key").status_code == 204
    assert admin.get(f"/admin/v1/users/{user_id}").json()["openrouter_key"] is None
    error_of(admin.delete(f"/admin/v1/users/{user_id}/openrouter-key"), 404)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"api_key": UNKNOWN_KEY}, 400),  # well-formed, but OpenRouter (the emulator) rejects it
        ({"api_key": "sk-or-v1-emulator-management-key-000000000000"}, 400),  # cannot make completions
        ({"api_key": "pk-live-123456789012345678901234"}, 400),
        ({"api_key": 12345}, 400),
        ({}, 400),
        ({"api_key": UNKNOWN_KEY, "label": "mine"}, 400),
    ],
)
def test_bad_byok_stores_nothing(admin: httpx.Client, body: dict[str, Any], status: int) -> None:
    user_id = uid()
    admin.post("/admin/v1/users", json={"id": user_id})
    response = admin.put(f"/admin/v1/users/{user_id}/openrouter-key", json=body)
    message = error_of(response, status)
    assert response.json()["error"]["param"] in ("api_key", "label")
    if isinstance(body.get("api_key"), str):
        assert body["api_key"] not in message
    assert admin.get(f"/admin/v1/users/{user_id}").json()["openrouter_key"] is None


# -- secrets never at rest in plaintext, never in logs -------------------------------------------


def test_no_token_or_key_in_the_database_file_or_the_log(
    pair: tuple[GatewayProcess, GatewayProcess, Path], emulator: Emulator
) -> None:
    first, second, tmp = pair
    key = emulator.new_key()
    user = first.create_user(key=key)
    rejected = "sk-or-v1-" + secrets.token_hex(24)
    with first.client(user["token"]) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.post("/v1/chat/completions", json={**CHAT, "user": key}).status_code == 200
        client.post("/v1/chat/completions", content=b'{"api_key": "' + rejected.encode() + b'", oops',
                    headers={"Content-Type": "application/json"})
    first.admin.put(f"/admin/v1/users/{user['id']}/openrouter-key", json={"api_key": rejected})
    httpx.post(first.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {rejected}"})
    first.stop()  # shutdown writes everything still held: usage records, tokens' last-used times
    stored = b"".join(p.read_bytes() for p in tmp.glob("gateway.db*"))
    assert user["token"].encode() not in stored and key.encode() not in stored and rejected.encode() not in stored
    assert b"provider_keys" in stored  # really the database
    log = first.output()
    assert "chat/completions" in log, "the access log is on: the requests should be logged"
    for secret in (user["token"], key, rejected, ADMIN_TOKEN):
        assert secret not in log, "a secret reached the log"
