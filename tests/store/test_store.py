"""The repositories against BOTH backends: SQLite (a temp file) and PostgreSQL (a fresh schema).

PostgreSQL comes from `.ci/services` (or `GATEWAY_TEST_POSTGRES_URL`); when it is not
reachable the PostgreSQL cases are skipped with the reason, except under `CI=true`,
where a missing service is a failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from gateway.store import Store, connect
from gateway.store.database import IntegrityError
from gateway.store.migrate import _migrations, migrate
from gateway.store.postgres import _count, _numbered
from tests.conftest import FakeClock

PG_URL = os.environ.get("GATEWAY_TEST_POSTGRES_URL", "postgresql://gateway:gateway@127.0.0.1:5432/gateway_test")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")




async def _postgres_schema() -> tuple[Any, str, str]:
    """A fresh schema in the test database: (admin connection, schema, URL whose search_path is it)."""
    import asyncpg

    try:
        conn = await asyncpg.connect(PG_URL, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        reason = f"PostgreSQL unreachable at {PG_URL.split('@')[-1]} ({type(exc).__name__}: {exc}); run `bash .ci/services`"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(f"SKIPPED LOUDLY: {reason}")
    schema = "test_" + secrets.token_hex(6)
    await conn.execute(f"CREATE SCHEMA {schema}")
    joiner = "&" if "?" in PG_URL else "?"
    return conn, schema, f"{PG_URL}{joiner}search_path={schema}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/gateway.db"
        return
    conn, schema, url = await _postgres_schema()
    try:
        yield url
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(database_url: str, clock: FakeClock) -> AsyncIterator[Store]:
    opened = await Store.open(database_url, clock)
    try:
        yield opened
    finally:
        await opened.close()


pytestmark = pytest.mark.anyio


# -- migrations -----------------------------------------------------------------


async def test_migrations_apply_once_and_record_iso_times(store: Store) -> None:
    rows = await store.db.fetchall("SELECT name, applied_at FROM schema_migrations ORDER BY name")
    assert [r["name"] for r in rows] == [name for name, _ in _migrations()]
    # Regression: CURRENT_TIMESTAMP wrote '2026-01-01 10:00:00.1+00' on PostgreSQL, not our ISO text.
    assert all(ISO.match(r["applied_at"]) for r in rows), rows
    assert await migrate(store.db) == []


async def test_instances_starting_together_migrate_without_error(database_url: str) -> None:
    # Regression: on PostgreSQL, concurrent `CREATE TABLE IF NOT EXISTS` raised a unique violation.
    first, second = await asyncio.gather(connect(database_url), connect(database_url))
    try:
        names = await first.fetchall("SELECT name FROM schema_migrations")
        assert len(names) == len(_migrations())
    finally:
        await first.close()
        await second.close()


def test_migration_files_are_numbered_in_order() -> None:
    names = [name for name, _ in _migrations()]
    assert names == sorted(names)
    assert all(re.match(r"^\d{3}_[a-z0-9_]+\.sql$", n) for n in names), names
    assert len({n[:3] for n in names}) == len(names), "two migrations share a number"


def test_placeholders_become_numbered_outside_quotes_only() -> None:
    assert _numbered("SELECT * FROM t WHERE a = ? AND b = '?' AND c = ?") == (
        "SELECT * FROM t WHERE a = $1 AND b = '?' AND c = $2"
    )


@pytest.mark.parametrize(
    ("status", "count"), [("UPDATE 3", 3), ("DELETE 0", 0), ("INSERT 0 1", 1), ("CREATE TABLE", 0), ("", 0)]
)
def test_postgres_status_line_gives_rows_changed(status: str, count: int) -> None:
    assert _count(status) == count


# -- users ----------------------------------------------------------------------


async def test_user_round_trip_and_pagination(store: Store, clock: FakeClock) -> None:
    for n in range(5):
        await store.users.create(user_id=f"u{n}", email=None if n % 2 else f"u{n}@x.io", tier="trial")
    user = await store.users.get("u0")
    assert user is not None
    assert user["email"] == "u0@x.io" and user["status"] == "active" and user["overrides"] == {}
    assert ISO.match(user["created_at"])
    first = await store.users.list(limit=2, cursor=None)
    rest = await store.users.list(limit=10, cursor=first[-1]["id"])
    assert [u["id"] for u in first + rest] == ["u0", "u1", "u2", "u3", "u4"]
    assert await store.users.exists(user_id="u3") and await store.users.exists(email="u2@x.io")
    assert not await store.users.exists(user_id="nobody", email="nobody@x.io")
    assert await store.users.get("nobody") is None


async def test_user_update_changes_fields_and_publishes(store: Store, clock: FakeClock) -> None:
    await store.users.create(user_id="u", email=None, tier="trial")
    before = await store.changes.latest()
    clock.now += 10
    updated = await store.users.update("u", tier="starter", overrides={"requests_per_minute": 5, "daily_budget_usd": "1.50"})
    assert updated is not None
    assert updated["tier"] == "starter"
    assert updated["overrides"] == {"requests_per_minute": 5, "daily_budget_usd": "1.50"}
    assert updated["updated_at"] > updated["created_at"]
    assert [(r["kind"], r["subject"]) for r in await store.changes.since(before)] == [("user", "u")]
    assert await store.users.update("nobody", tier="starter") is None


async def test_duplicate_user_id_or_email_raises_integrity_error(store: Store) -> None:
    await store.users.create(user_id="u", email="same@x.io", tier="trial")
    with pytest.raises(IntegrityError):
        await store.users.create(user_id="u", email=None, tier="trial")
    with pytest.raises(IntegrityError):
        await store.users.create(user_id="v", email="same@x.io", tier="trial")
    await store.users.create(user_id="w", email=None, tier="trial")  # many users may have no email
    await store.users.create(user_id="z", email=None, tier="trial")
    assert [u["id"] for u in await store.users.list(limit=10, cursor=None)] == ["u", "w", "z"]


async def test_deleting_a_user_removes_tokens_and_key(store: Store) -> None:
    await store.users.create(user_id="u", email=None, tier="trial")
    row, secret = await store.tokens.create("u", name=None, expires_at=None)
    await store.keys.put("u", kind="byok", ciphertext="c", label="sk-or-v1-abc...wxyz", last4="wxyz")
    assert await store.users.delete("u") is True
    assert await store.users.get("u") is None
    assert await store.tokens.get(row["id"]) is None
    assert await store.tokens.by_hash(hashlib.sha256(secret.encode()).hexdigest()) is None
    assert await store.keys.get("u") is None
    assert await store.users.delete("u") is False


# -- tokens ---------------------------------------------------------------------


async def test_token_is_random_and_stored_only_as_its_hash(store: Store) -> None:
    await store.users.create(user_id="u", email=None, tier="trial")
    row, secret = await store.tokens.create("u", name="ci", expires_at=None)
    other_row, other = await store.tokens.create("u", name="ci", expires_at=None)
    assert secret != other and row["id"] != other_row["id"]
    assert secret.startswith("gw-") and len(secret) >= 3 + 43  # 32 random bytes, url-safe base64
    assert "token_hash" not in row and row["prefix"] == secret[:10]
    stored = await store.db.fetchall("SELECT * FROM tokens")
    assert all(secret not in str(value) for r in stored for value in r.values())
    found = await store.tokens.by_hash(hashlib.sha256(secret.encode()).hexdigest())
    assert found is not None and found["id"] == row["id"] and found["user_id"] == "u"
    assert [t["id"] for t in await store.tokens.list_for_user("u")] == [row["id"], other_row["id"]]


async def test_token_for_unknown_user_is_refused(store: Store) -> None:
    with pytest.raises(IntegrityError):
        await store.tokens.create("ghost", name=None, expires_at=None)
    assert await store.db.fetchall("SELECT id FROM tokens") == []


async def test_revoke_reports_rows_changed_and_publishes_once(store: Store) -> None:
    await store.users.create(user_id="u", email=None, tier="trial")
    row, _ = await store.tokens.create("u", name=None, expires_at=None)
    before = await store.changes.latest()
    assert await store.tokens.revoke(row["id"]) is True
    assert await store.tokens.revoke(row["id"]) is False  # already revoked: 0 rows, no second change
    assert await store.tokens.revoke("tok_missing") is False
    revoked = await store.tokens.get(row["id"])
    assert revoked is not None and ISO.match(revoked["revoked_at"])
    assert [(r["kind"], r["subject"]) for r in await store.changes.since(before)] == [("token", row["id"])]


async def test_rotate_revokes_the_old_token_and_keeps_name_and_expiry(store: Store) -> None:
    await store.users.create(user_id="u", email=None, tier="trial")
    row, secret = await store.tokens.create("u", name="laptop", expires_at="2030-01-01T00:00:00.000000Z")
    rotated = await store.tokens.rotate(row["id"])
    assert rotated is not None
    new_row, new_secret = rotated
    assert new_secret != secret and new_row["id"] != row["id"]
    assert (new_row["name"], new_row["user_id"], new_row["expires_at"]) == ("laptop", "u", row["expires_at"])
    old = await store.tokens.get(row["id"])
    assert old is not None and old["revoked_at"] is not None
    assert await store.tokens.rotate(row["id"]) is None  # a revoked token cannot be rotated
    assert await store.tokens.rotate("tok_missing") is None


async def test_touch_records_last_used_in_one_batch(store: Store, clock: FakeClock) -> None:
    await store.users.create(user_id="u", email=None, tier="trial")
    a, _ = await store.tokens.create("u", name=None, expires_at=None)
    b, _ = await store.tokens.create("u", name=None, expires_at=None)
    await store.tokens.touch({a["id"]: clock.now + 5})
    await store.tokens.touch({})
    assert (await store.tokens.get(a["id"]))["last_used_at"] == "2027-01-15T08:00:05.000000Z"  # type: ignore[index]
    assert (await store.tokens.get(b["id"]))["last_used_at"] is None  # type: ignore[index]


# -- keys -----------------------------------------------------------------------


async def test_key_put_replaces_update_and_delete_report_changes(store: Store) -> None:
    await store.users.create(user_id="u", email=None, tier="trial")
    await store.keys.put("u", kind="byok", ciphertext="c1", label="l1", last4="1111")
    await store.keys.put("u", kind="managed", ciphertext="c2", label="l2", last4="2222", upstream_hash="h",
                         limit_usd="12.50")
    key = await store.keys.get("u")
    assert key is not None
    assert (key["kind"], key["ciphertext"], key["limit_usd"], key["disabled"]) == ("managed", "c2", "12.50", 0)
    assert await store.keys.update("u", disabled=1) is True
    assert (await store.keys.get("u"))["disabled"] == 1  # type: ignore[index]
    assert await store.keys.update("nobody", disabled=1) is False
    assert await store.keys.delete("u") is True
    assert await store.keys.delete("u") is False
    assert await store.keys.get("u") is None


async def test_replace_ciphertexts_skips_rows_changed_meanwhile(store: Store) -> None:
    for name in ("a", "b", "c"):
        await store.users.create(user_id=name, email=None, tier="trial")
        await store.keys.put(name, kind="byok", ciphertext=f"old-{name}", label="l", last4="0000")
    page = await store.keys.page(after_user_id="", limit=2)
    assert [r["user_id"] for r in page] == ["a", "b"]
    assert [r["user_id"] for r in await store.keys.page(after_user_id="b", limit=2)] == ["c"]
    await store.keys.put("b", kind="byok", ciphertext="changed-b", label="l", last4="0000")
    await store.keys.replace_ciphertexts([("a", "old-a", "new-a"), ("b", "old-b", "new-b")])
    assert (await store.keys.get("a"))["ciphertext"] == "new-a"  # type: ignore[index]
    assert (await store.keys.get("b"))["ciphertext"] == "changed-b"  # type: ignore[index]


# -- change feed, state, audit ----------------------------------------------------


async def test_change_feed_reads_what_happened_after_a_sequence_number(store: Store) -> None:
    assert await store.changes.latest() == 0
    await store.users.create(user_id="u", email=None, tier="trial")
    await store.users.update("u", status="suspended")
    mark = await store.changes.latest()
    await store.state.set("emergency_stop", '{"enabled": true}')
    changes = await store.changes.since(mark)
    assert [(c["kind"], c["subject"]) for c in changes if int(c["seq"]) > mark] == [("state", "emergency_stop")]
    assert await store.changes.latest() > mark


async def test_state_value_is_overwritten(store: Store) -> None:
    assert await store.state.get("emergency_stop") is None
    await store.state.set("emergency_stop", "one")
    await store.state.set("emergency_stop", "two")
    assert await store.state.get("emergency_stop") == "two"


async def test_audit_pages_newest_first_with_filters(store: Store) -> None:
    for n in range(5):
        await store.audit.append(actor="admin", action="token.create" if n % 2 else "user.create",
                                 user_id=f"u{n % 2}", details={"n": n, "amount": "0.10"})
    page = await store.audit.page(limit=2)
    assert [r["details"]["n"] for r in page] == [4, 3]
    nxt = await store.audit.page(limit=10, before_id=int(page[-1]["id"]))
    assert [r["details"]["n"] for r in nxt] == [2, 1, 0]
    assert [r["details"]["n"] for r in await store.audit.page(limit=10, user_id="u1")] == [3, 1]
    assert [r["details"]["n"] for r in await store.audit.page(limit=10, action="user.create")] == [4, 2, 0]
    assert ISO.match(page[0]["at"]) and page[0]["details"]["amount"] == "0.10"


async def test_transaction_rolls_back_as_a_whole(store: Store) -> None:
    with pytest.raises(RuntimeError):
        async with store.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO gateway_state (name, value, updated_at) VALUES (?, ?, ?)", ("x", "1", "2030-01-01")
            )
            raise RuntimeError("boom")
    assert await store.state.get("x") is None


@pytest.mark.anyio
async def test_sqlite_transaction_cancelled_while_waiting_for_the_lock_leaves_no_orphan(tmp_path: Path) -> None:
    """Two workers on one file: a flush cancelled in BEGIN IMMEDIATE must not poison the next (issue 14)."""
    from gateway.store.sqlite import SqliteDatabase

    path = str(tmp_path / "two-workers.db")
    first, second = await SqliteDatabase.open(path), await SqliteDatabase.open(path)
    try:
        await first.execute("CREATE TABLE t (n INTEGER)")
        holding = asyncio.Event()
        release = asyncio.Event()

        async def hold_the_write_lock() -> None:
            async with first.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
                holding.set()
                await release.wait()

        holder = asyncio.create_task(hold_the_write_lock())
        await holding.wait()

        async def flush() -> None:
            async with second.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (2)")

        waiting = asyncio.create_task(flush())
        await asyncio.sleep(0.2)  # second's BEGIN IMMEDIATE is now blocked in SQLite's busy wait
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        await holder
        await flush()  # formerly: "cannot start a transaction within a transaction"
        await second.execute("INSERT INTO t VALUES (3)")
        rows = await first.fetchall("SELECT n FROM t ORDER BY n")
        assert [r["n"] for r in rows] == [1, 2, 3]
    finally:
        await first.close()
        await second.close()


# -- job leases and the change feed's pruning ----------------------------------------


async def test_a_job_lease_is_held_by_one_owner_until_it_runs_out(store: Store) -> None:
    assert await store.leases.claim("job", "a", until_iso="2030-01-01T00:01:00.000000Z",
                                    now_iso="2030-01-01T00:00:00.000000Z")
    assert not await store.leases.claim("job", "b", until_iso="2030-01-01T00:02:00.000000Z",
                                        now_iso="2030-01-01T00:00:30.000000Z")
    assert await store.leases.claim("job", "a", until_iso="2030-01-01T00:02:00.000000Z",
                                    now_iso="2030-01-01T00:00:30.000000Z")  # renewed by its holder
    assert await store.leases.claim("job", "b", until_iso="2030-01-01T00:04:00.000000Z",
                                    now_iso="2030-01-01T00:03:00.000000Z")  # run out: taken over
    assert not await store.leases.claim("job", "a", until_iso="2030-01-01T00:05:00.000000Z",
                                        now_iso="2030-01-01T00:03:01.000000Z")


async def test_the_change_feed_prunes_only_rows_older_than_the_cut(store: Store, clock: FakeClock) -> None:
    from gateway.auth.feed_pruning import FeedPruning
    from gateway.store.changes import publish

    async with store.db.transaction() as tx:
        await publish(tx, "user", "old", clock.now - 7200)
        await publish(tx, "user", "new", clock.now - 10)
    first, second = (FeedPruning(store, retention_s=3600, clock=clock) for _ in range(2))
    assert await first.prune_once() == 1
    assert await second.prune_once() is None  # one instance prunes
    assert [r["subject"] for r in await store.changes.since(0)] == ["new"]
