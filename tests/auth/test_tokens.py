"""The auth path: platform token → principal from memory; invalidation here at once, elsewhere by the feed."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from cryptography.fernet import Fernet

from gateway.accounts.directory import Directory
from gateway.auth.admin import AdminAuth
from gateway.auth.tokens import Authenticator, bearer
from gateway.core.config import Config
from gateway.core.errors import Unauthorized
from gateway.security.vault import Vault
from gateway.store import Store
from gateway.store.database import Database
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio
KEY = "sk-or-v1-" + "a1b2c3d4" * 8




class CountingDb:
    """Delegates to the real database, counting reads and optionally pausing one."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.dialect = db.dialect
        self.reads = 0
        self.pause: asyncio.Event | None = None
        self.paused = asyncio.Event()

    async def execute(self, sql: str, params: Any = ()) -> int:
        return await self._db.execute(sql, params)

    async def executemany(self, sql: str, rows: Any) -> None:
        await self._db.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Any = ()) -> Any:
        self.reads += 1
        if self.pause is not None and "token_hash" in sql:
            self.paused.set()
            await self.pause.wait()
        return await self._db.fetchone(sql, params)

    async def fetchall(self, sql: str, params: Any = ()) -> Any:
        self.reads += 1
        return await self._db.fetchall(sql, params)

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        return self._db.transaction()

    def translate(self, sql: str) -> str:
        return self._db.translate(sql)  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self._db.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def vault() -> Vault:
    return Vault([Fernet.generate_key().decode()])


@pytest.fixture
async def world(tmp_path: Path, clock: FakeClock, vault: Vault) -> AsyncIterator[dict[str, Any]]:
    """Two 'instances' (each its own connection and Authenticator) over one SQLite file."""
    url = f"sqlite:///{tmp_path}/gateway.db"
    stores = [await Store.open(url, clock) for _ in range(2)]
    counted = [Store.over(CountingDb(s.db), clock) for s in stores]  # type: ignore[arg-type]
    auths = [Authenticator(s, vault, clock=clock) for s in counted]
    directory = Directory(counted[0], Config(), forget_user=auths[0].forget_user,
                          forget_token=auths[0].forget_token, clock=clock)
    await directory.add_user(user_id="alice", tier="starter")
    await counted[0].keys.put("alice", kind="byok", ciphertext=vault.encrypt(KEY), label="l", last4=KEY[-4:])
    token = await directory.create_token("alice", name="t")
    for auth in auths:
        await auth.start_feed()
    try:
        yield {"auth": auths[0], "other": auths[1], "dir": directory, "db": counted[0].db,
               "other_db": counted[1].db, "token": token, "header": f"Bearer {token['token']}", "store": counted[0]}
    finally:
        for s in stores:
            await s.close()


async def test_principal_carries_user_tier_and_decrypted_key(world: dict[str, Any]) -> None:
    principal = await world["auth"].authenticate(world["header"])
    assert (principal.user_id, principal.tier, principal.status) == ("alice", "starter", "active")
    assert principal.token_id == world["token"]["id"]
    assert principal.key is not None and principal.key.secret == KEY and principal.key.kind == "byok"
    assert KEY not in repr(principal)


async def test_second_request_is_served_from_memory(world: dict[str, Any]) -> None:
    await world["auth"].authenticate(world["header"])
    reads = world["db"].reads
    for _ in range(5):
        await world["auth"].authenticate(world["header"])
    assert world["db"].reads == reads


async def test_concurrent_first_requests_share_one_load(world: dict[str, Any]) -> None:
    db = world["db"]
    db.pause = asyncio.Event()
    tasks = [asyncio.create_task(world["auth"].authenticate(world["header"])) for _ in range(20)]
    await db.paused.wait()
    reads = db.reads
    db.pause.set()
    principals = await asyncio.gather(*tasks)
    assert {p.user_id for p in principals} == {"alice"}
    assert db.reads - reads <= 2  # the user and the key, once: 19 requests waited on the first load


async def test_revocation_takes_effect_at_once_on_this_instance(world: dict[str, Any]) -> None:
    await world["auth"].authenticate(world["header"])
    await world["dir"].revoke_token(world["token"]["id"])
    with pytest.raises(Unauthorized, match="unknown or revoked"):
        await world["auth"].authenticate(world["header"])


async def test_revocation_reaches_another_instance_through_the_feed(world: dict[str, Any]) -> None:
    other = world["other"]
    await other.authenticate(world["header"])
    await world["dir"].revoke_token(world["token"]["id"])
    await other.authenticate(world["header"])  # still cached until it polls
    assert await other.poll_changes() == 1
    with pytest.raises(Unauthorized):
        await other.authenticate(world["header"])


async def test_a_change_is_applied_once_not_on_every_poll(world: dict[str, Any]) -> None:
    # Regression: the feed re-reads a window below the last seq, and every poll re-applied it,
    # dropping the same users' cache entries every 0.5 s (a database read on their next request).
    other = world["other"]
    await world["dir"].update_user("alice", {"tier": "professional"})
    assert await other.poll_changes() == 1
    await other.authenticate(world["header"])
    reads = world["other_db"].reads
    assert await other.poll_changes() == 0
    await other.authenticate(world["header"])
    assert world["other_db"].reads == reads + 1  # the poll's own read; the principal stayed cached


async def test_suspension_and_tier_change_reach_another_instance(world: dict[str, Any]) -> None:
    other = world["other"]
    seen: list[str] = []
    other.on_user_change(seen.append)
    await other.authenticate(world["header"])
    await world["dir"].update_user("alice", {"status": "suspended", "tier": "enterprise"})
    await other.poll_changes()
    principal = await other.authenticate(world["header"])
    assert (principal.status, principal.tier) == ("suspended", "enterprise")
    assert seen == ["alice"]


async def test_rotated_token_stops_working_and_new_one_works(world: dict[str, Any]) -> None:
    await world["auth"].authenticate(world["header"])
    new = await world["dir"].rotate_token(world["token"]["id"])
    with pytest.raises(Unauthorized):
        await world["auth"].authenticate(world["header"])
    assert (await world["auth"].authenticate(f"Bearer {new['token']}")).token_id == new["id"]


async def test_unknown_tokens_are_remembered_briefly(world: dict[str, Any]) -> None:
    with pytest.raises(Unauthorized, match="unknown or revoked"):
        await world["auth"].authenticate("Bearer gw-nope")
    reads = world["db"].reads
    for _ in range(10):
        with pytest.raises(Unauthorized):
            await world["auth"].authenticate("Bearer gw-nope")
    assert world["db"].reads == reads


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic abc", "gw-token-without-scheme"])
async def test_missing_token_says_how_to_send_one(world: dict[str, Any], header: str | None) -> None:
    with pytest.raises(Unauthorized, match="Authorization: Bearer"):
        await world["auth"].authenticate(header)


async def test_expired_token_is_refused_even_from_cache(world: dict[str, Any], clock: FakeClock) -> None:
    token = await world["dir"].create_token("alice", expires_at="2027-01-15T09:00:00Z")
    assert (await world["auth"].authenticate(f"Bearer {token['token']}")).expires_at is not None
    clock.now = 1_800_000_000.0 + 3600
    with pytest.raises(Unauthorized, match="expired"):
        await world["auth"].authenticate(f"Bearer {token['token']}")


async def test_an_invalidation_during_a_load_is_not_cached_stale(world: dict[str, Any]) -> None:
    auth, db = world["auth"], world["db"]
    db.pause = asyncio.Event()
    first = asyncio.create_task(auth.authenticate(world["header"]))
    await db.paused.wait()
    auth.forget_user("alice")  # e.g. a suspension landed while the row was being read
    db.pause.set()
    db.pause = None
    await first
    reads = db.reads
    await auth.authenticate(world["header"])
    assert db.reads > reads, "the racing load was cached and would hide the change"


async def test_undecryptable_key_gives_no_key_and_logs_no_secret(
    world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    stranger = Authenticator(world["store"], Vault([Fernet.generate_key().decode()]))
    principal = await stranger.authenticate(world["header"])
    assert principal.key is None
    assert "cannot be decrypted" in caplog.text and KEY not in caplog.text


async def test_last_used_is_collected_for_the_background_flush(world: dict[str, Any], clock: FakeClock) -> None:
    await world["auth"].authenticate(world["header"])
    assert world["auth"].take_last_used() == {world["token"]["id"]: clock.now}
    assert world["auth"].take_last_used() == {}


def test_bearer_parsing() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer  abc ") == "abc"
    assert bearer("Token abc") is None and bearer(None) is None


def test_admin_token_checked_against_its_hash() -> None:
    admin = AdminAuth.from_token("gwadmin-secret")
    admin.check("Bearer gwadmin-secret")
    with pytest.raises(Unauthorized, match="Invalid admin token"):
        admin.check("Bearer gwadmin-secreT")
    with pytest.raises(Unauthorized, match="Missing admin token"):
        admin.check(None)
    with pytest.raises(Unauthorized):
        AdminAuth(None).check("Bearer anything")  # no admin token configured: nobody is admin
