"""A property-based fuzz of every client and admin route against a real `gateway serve` (hypothesis).

Each example is one HTTP request built byte by byte: a route (or junk) with odd path parameters,
any method, a query string, headers (auth forms, content types, junk), and a body (JSON of any
shape, field names the routes know with hostile values, deep nesting, raw bytes, oversized),
sent with a Content-Length or chunked. For every one:

- no 5xx that the gateway made itself (an emergency stop the fuzzer switched on is a 503 by design);
- no secret in the response (tokens, OpenRouter keys, the admin token, the master key), and a
  user's request never shows another user's data;
- a refused request (4xx) writes no row (every table but the usage records, which background
  settlement writes; those are checked at the end: one per generation the gateway answered 2xx);
- the server still serves afterwards.

`GATEWAY_FUZZ_EXAMPLES` sets the number of requests (default 300; `make soak` runs 20,000, random).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import sqlite3
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, urlencode

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openrouter_emulator.app import DEMO_MANAGEMENT_KEY
from tests.conftest import ADMIN_TOKEN, Emulator, GatewayProcess, start_gateway

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "300"))
SOAK = EXAMPLES > 1000

CLIENT_ROUTES = [
    ("POST", "/chat/completions"), ("POST", "/completions"), ("POST", "/embeddings"), ("GET", "/models"),
    ("GET", "/models/free"), ("GET", "/generation"), ("GET", "/credits"), ("GET", "/key"), ("GET", "/auth/key"),
    ("GET", "/usage"), ("GET", "/limits"), ("GET", "/account"), ("PUT", "/account/openrouter-key"),
    ("DELETE", "/account/openrouter-key"), ("POST", "/account/sync"), ("GET", "/settings"), ("PUT", "/settings"),
]
ADMIN_ROUTES = [
    ("POST", "/users"), ("GET", "/users"), ("GET", "/users/{user}"), ("PATCH", "/users/{user}"),
    ("DELETE", "/users/{user}"), ("POST", "/users/{user}/tokens"), ("GET", "/users/{user}/tokens"),
    ("POST", "/tokens/{token}/rotate"), ("DELETE", "/tokens/{token}"), ("PUT", "/users/{user}/openrouter-key"),
    ("DELETE", "/users/{user}/openrouter-key"), ("POST", "/users/{user}/managed-key"),
    ("PATCH", "/users/{user}/managed-key"), ("POST", "/users/{user}/managed-key/rotate"), ("GET", "/usage"),
    ("GET", "/audit"), ("GET", "/emergency-stop"), ("PUT", "/emergency-stop"), ("GET", "/streams"),
    ("POST", "/credits/sync"),
]
OPS_ROUTES = [("GET", "/health"), ("GET", "/health/ready"), ("GET", "/metrics")]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT", "PROPFIND"]
FIELDS = ["model", "messages", "stream", "max_tokens", "max_completion_tokens", "prompt", "input", "models",
          "limits", "monthly_budget_usd", "daily_budget_usd", "requests_per_minute", "tier", "status", "email",
          "id", "name", "expires_at", "api_key", "enabled", "reason", "limit_usd", "disabled", "default_model",
          "fallback_models", "temperature", "fallback_enabled", "content", "role", "stream_options", "text"]
QUERY_NAMES = ["limit", "offset", "cursor", "period", "group_by", "format", "id", "user", "user_id", "action"]
NASTY = ["1e999999999", "1e-999999999", "1_000", "\u0663", " 5 ", "NaN", "Infinity", "-1", "", "null", "0",
         "9" * 40, "sk-or-v1-" + "f" * 64, "../../etc/passwd", "%00", "\x00", "\ud7ff", "' OR 1=1 --", "{{7*7}}",
         "<script>", "day", "month", "csv", "json", "user", "model", "tier", "openai/gpt-4o-mini", "a" * 5000]
NASTY_VALUES = [*NASTY, None, True, False, 0, -1, 2**63 - 1, -(2**63), 1e308, -0.0, 1.5, 10**9, 10**9 + 1, [], {}]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain",
                 "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", "application/jsonx",
                 "", "application/json;;;", "\u00e9"]


# -- the world the fuzzer acts in ----------------------------------------------------------------------


class World:
    """Two users (the fuzzer acts as `a`; `b`'s data must never reach `a`), a target for admin requests,
    and the secrets no response may contain."""

    def __init__(self, gw: GatewayProcess, tmp: Path, emulator: Emulator) -> None:
        self.gw, self.db = gw, tmp / "gateway.db"
        self.key_a, self.key_b = emulator.new_key(), emulator.new_key()
        self.a = gw.create_user(tier="starter", key=self.key_a)
        self.b = gw.create_user(tier="starter", key=self.key_b, email=f"b-{secrets.token_hex(6)}@private.example")
        self.b_email = gw.admin.get(f"/admin/v1/users/{self.b['id']}").json()["email"]
        self.b_model = f"bsecret/model-{secrets.token_hex(6)}"
        with gw.client(self.b["token"]) as client:
            assert client.put("/v1/settings", json={"default_model": self.b_model}).status_code == 200
        self.target = gw.create_user(tier="trial")
        self.master_key = (tmp / "master.key").read_text().strip()
        self.secrets = [ADMIN_TOKEN, self.a["token"], self.b["token"], self.key_a, self.key_b, self.master_key,
                        DEMO_MANAGEMENT_KEY]
        self.others = [self.b_email, self.b_model]  # b's data: never in a response to a's request
        self.requests = 0
        self.server_errors = 0
        self.statuses: dict[int, int] = {}  # 0: closed without an answer
        self.generations: set[str] = set()

    def table_digest(self) -> dict[str, str]:
        """Every table's content but the usage records and the columns background jobs touch."""
        volatile = {"last_used_at", "synced_at", "updated_at"}
        digest = {}
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                if table in ("usage_records", "account_credits", "schema_migrations"):
                    continue
                cursor = db.execute(f"SELECT * FROM {table} ORDER BY rowid")
                keep = [i for i, d in enumerate(cursor.description) if d[0] not in volatile]
                rows = [tuple(row[i] for i in keep) for row in cursor]
                digest[table] = hashlib.sha256(repr(rows).encode()).hexdigest()
        return digest


@pytest.fixture(scope="module")
def world(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("fuzz")
    gw = start_gateway(tmp, emulator, {"server": {"header_timeout_s": 5, "body_timeout_s": 5}},
                       extra_env={"GATEWAY_UPSTREAM__MANAGEMENT_KEY": DEMO_MANAGEMENT_KEY})
    try:
        yield World(gw, tmp, emulator)
    finally:
        gw.stop()


# -- strategies ----------------------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
                      st.sampled_from(NASTY_VALUES))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), inner,
                                                 max_size=5)), max_leaves=20)
field_object = st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=6)
chat_like = st.fixed_dictionaries(
    {"model": st.one_of(st.just("openai/gpt-4o-mini"), st.sampled_from(NASTY_VALUES)),
     "messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), json_value)},
    optional={"max_tokens": st.one_of(st.integers(-5, 20), st.sampled_from(NASTY_VALUES)),
              "stream": st.one_of(st.booleans(), st.sampled_from(NASTY_VALUES)),
              "limits": st.dictionaries(st.sampled_from(FIELDS[9:12]), st.sampled_from(NASTY_VALUES), max_size=3)})


KINDS = ["none", "json", "fields", "chat", "bytes", "deep", "big", "truncated"]


@st.composite
def bodies(draw: st.DrawFn, proxied: bool) -> bytes | None:
    """A body; a proxy route gets mostly chat-shaped and deeply nested ones (what its estimate walks)."""
    kind = draw(st.sampled_from(["chat", "chat", "deep", "deep", *KINDS] if proxied else KINDS))
    if kind == "none":
        return None
    if kind == "json":
        return orjson.dumps(draw(json_value))
    if kind == "fields":
        return orjson.dumps(draw(field_object))
    if kind == "chat":
        return orjson.dumps(draw(chat_like))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "deep":
        depth = draw(st.one_of(st.sampled_from([990, 1000, 1010, 1020, 1023, 1030]), st.integers(100, 1100)))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"content":', "}")]))
        inner = opener * depth + '"' + "x" * draw(st.sampled_from([0, 10, 5000])) + '"' + closer * depth
        return ('{"model":"openai/gpt-4o-mini","max_tokens":3,"messages":[{"role":"user","content":'
                + inner + "}]}").encode()
    if kind == "big":
        return b'{"a":"' + b"x" * draw(st.sampled_from([70_000, 200_000])) + b'"}'
    return orjson.dumps(draw(chat_like))[: draw(st.integers(0, 30))]


def path_values(world: World, admin: bool) -> st.SearchStrategy[str]:
    known = [world.target["id"], "nobody", world.b["token_id"]] if admin else [world.a["id"], world.b["id"]]
    return st.one_of(st.sampled_from(known), st.sampled_from(NASTY), st.text(max_size=30))


@st.composite
def requests(draw: st.DrawFn, world: World) -> tuple[bytes, bool]:
    """(the raw request, whether it was sent as user `a`)."""
    area = draw(st.sampled_from(["client", "client", "admin", "admin", "ops", "junk"]))
    matching = "admin" if area == "admin" else "a"
    auth = draw(st.sampled_from([matching] * 6 + ["a", "admin", "none", "junk", "basic", "lower", "bare", "long"]))
    routes = {"client": CLIENT_ROUTES, "admin": ADMIN_ROUTES, "ops": OPS_ROUTES}.get(area, [("GET", "/x")])
    method, template = draw(st.sampled_from(routes[:3] if area == "client" and draw(st.booleans()) else routes))
    if area == "client":
        template = draw(st.sampled_from(["/v1", "/api/v1"])) + template
    elif area == "admin":
        template = "/admin/v1" + template
    elif area == "junk":
        template = "/" + "/".join(quote(p, safe="") for p in draw(st.lists(st.text(max_size=12), max_size=4)))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.one_of(st.sampled_from(METHODS), st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1,
                                                                   max_size=12)))
    values = path_values(world, admin=auth == "admin")
    path = template.replace("{user}", quote(draw(values), safe="")).replace("{token}", quote(draw(values), safe=""))
    query = draw(st.dictionaries(st.one_of(st.sampled_from(QUERY_NAMES), st.text(max_size=8)),
                                 st.one_of(st.sampled_from(NASTY), st.text(max_size=20)), max_size=4))
    target = path + ("?" + urlencode(query) if query else "")
    token = {"a": world.a["token"], "admin": ADMIN_TOKEN}.get(auth, "")
    authorization = {"a": f"Bearer {token}", "admin": f"Bearer {token}", "none": None, "junk": "Bearer gw-nope",
                     "basic": "Basic dXNlcjpwYXNz", "lower": f"bearer {world.a['token']}", "bare": "Bearer",
                     "long": "Bearer " + "x" * 9000}[auth]
    headers = [("Host", "fuzz")]
    if authorization is not None:
        headers.append(("Authorization", authorization))
    proxied = template.endswith(("/chat/completions", "/completions", "/embeddings"))
    body = draw(bodies(proxied))
    if body is not None or draw(st.booleans()):
        headers.append(("Content-Type", draw(st.sampled_from(CONTENT_TYPES[:1] * (8 if proxied else 3) + CONTENT_TYPES))))
    for name, value in draw(st.dictionaries(st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True),
                                            st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=50),
                                            max_size=3)).items():
        headers.append((name, value))
    chunked = body is not None and draw(st.booleans())
    if body is not None and not chunked:
        headers.append(("Content-Length", str(len(body))))
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    headers.append(("Connection", "close"))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    raw = head.encode("utf-8", "surrogatepass")
    if body is not None:
        raw += (b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n" if chunked and body else b"0\r\n\r\n" if chunked
                else body)
    return raw, auth in ("a", "lower")


def send(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(raw)
        except OSError:  # refused before the whole request was sent (413, 431): the answer is still there
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


# -- the property ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_settings() -> settings:
    return settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not SOAK,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def test_no_request_makes_a_server_error_leaks_or_writes_when_refused(world: World, fuzz_settings: settings) -> None:
    @fuzz_settings
    @given(data=st.data())
    def property(data: st.DataObject) -> None:
        raw, as_a = data.draw(requests(world))
        before = world.table_digest()
        response = send(world.gw.port, raw)
        world.requests += 1
        assert world.gw.process.poll() is None, "the gateway exited"
        if not response:
            world.statuses[0] = world.statuses.get(0, 0) + 1
            return  # closed without an answer: a refused connection (e.g. a parse error in a reset race)
        assert response.startswith(b"HTTP/1.1 "), response[:200]
        status = int(response[9:12])
        world.statuses[status] = world.statuses.get(status, 0) + 1
        head, _, body = response.partition(b"\r\n\r\n")
        if status >= 500 and not (status == 503 and b"emergency" in body.lower()) and b"upstream_error" not in body:
            world.server_errors += 1
            raise AssertionError(f"{status} for {raw[:300]!r}: {body[:300]!r}")
        for secret in world.secrets:
            if secret.encode() not in raw:
                assert secret.encode() not in response, f"a secret in the answer to {raw[:200]!r}"
            assert secret[-24:].encode() not in body or secret.encode() in raw
        if as_a:
            for other in world.others:
                assert other.encode() not in response, f"user b's data in the answer to {raw[:200]!r}"
        if status >= 400:
            assert world.table_digest() == before, f"{status} for {raw[:300]!r} wrote to the database"
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"x-generation-id:") and 200 <= status < 300:
                world.generations.add(line.split(b":", 1)[1].strip().decode())
        if status == 204 and b"/account/openrouter-key" in raw.split(b"\r\n", 1)[0] and as_a:
            restored = world.gw.admin.put(f"/admin/v1/users/{world.a['id']}/openrouter-key",
                                          json={"api_key": world.key_a})  # keep the proxy routes reachable
            assert restored.status_code == 200, restored.text
        if 200 <= status < 300 and b'"id":"gen-' in body:
            world.generations.add(body.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode())

    try:
        property()
    finally:
        world.gw.admin.put("/admin/v1/emergency-stop", json={"enabled": False})
        print(f"\nfuzz: {world.requests} requests, {world.server_errors} server errors; "
              f"statuses {sorted(world.statuses.items())}")
    assert httpx.get(f"{world.gw.url}/health", timeout=5).status_code == 200
    with world.gw.client(world.a["token"]) as client:  # still serving the real thing
        chat = client.post("/v1/chat/completions", json={"model": "openai/gpt-4o-mini", "max_tokens": 3,
                                                         "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code in (200, 402, 429), chat.text
        if chat.status_code == 200:
            world.generations.add(chat.json()["id"])
    deadline = time.monotonic() + 10
    while True:  # every usage record belongs to a generation the gateway answered 2xx
        with sqlite3.connect(f"file:{world.db}?mode=ro", uri=True) as db:
            recorded = {r[0] for r in db.execute("SELECT generation_id FROM usage_records")}
        assert recorded <= world.generations, recorded - world.generations
        if recorded == world.generations or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # polling the flush, bounded by the deadline
