"""Managed keys against the emulator's key API in-process (no network): upstream failures
leave local state unchanged, and a rotation or provisioning interrupted at any step is
completed or rolled back by recovery with no key orphaned upstream or lost locally."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping

import httpx
import pytest
from cryptography.fernet import Fernet

from gateway.accounts.provisioning import Provisioner
from gateway.core.config import Config
from gateway.core.errors import GatewayError
from gateway.core.money import dumps
from gateway.security.vault import Vault
from gateway.store import Store
from gateway.store.managed_keys import ManagedKeyOperations
from gateway.upstream.client import (
    HttpxTransport,
    UpstreamClient,
    UpstreamConnectionError,
)
from gateway.upstream.key_api import KeyApi
from openrouter_emulator.app import DEMO_MANAGEMENT_KEY, create_emulator_app
from openrouter_emulator.state import EmulatorState, Plan
from tests.conftest import FakeClock

BASE = "http://emulator.test/api/v1"




class LosesCreateAnswers:
    """Forwards every request but loses the answer to `POST /keys`: created upstream, unknown here."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> Any:
        response = await self.inner.send(method, url, headers, body)
        if method == "POST" and url.endswith("/keys"):
            await response.close()
            raise UpstreamConnectionError("connection reset")
        return response

    async def close(self) -> None:
        await self.inner.close()


class World:
    def __init__(self, store: Store, state: EmulatorState, upstream: UpstreamClient, vault: Vault, clock: FakeClock):
        self.store, self.state, self.upstream, self.vault, self.clock = store, state, upstream, vault, clock
        self.forgotten: list[str] = []
        self.prov = self.provisioner()

    def provisioner(self, management_key: str | None = DEMO_MANAGEMENT_KEY, upstream: Any = None,
                    rotation_grace_s: float = 0) -> Provisioner:
        """Grace 0 (the old key deleted at once) unless a test is about the grace."""
        config = Config.model_validate({"keys": {"rotation_grace_s": rotation_grace_s}})
        return Provisioner(self.store, self.vault, KeyApi(upstream or self.upstream, management_key), config,
                           clock=self.clock, forget_user=self.forgotten.append)

    def fail(self, path: str, status: int, times: int = 1) -> None:
        self.state.failures.setdefault(path, __import__("collections").deque()).append(
            Plan(times=times, status=status))

    def upstream_keys(self) -> dict[str, Any]:
        return {k.hash: k for k in self.state.inference_keys()}

    async def local(self, user_id: str = "u1") -> dict[str, Any] | None:
        return await self.store.keys.get(user_id)

    def secret(self, row: dict[str, Any]) -> str:
        return self.vault.decrypt(row["ciphertext"])


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    state = EmulatorState()
    app = create_emulator_app(state, seed_keys=["sk-or-v1-seed-" + "0" * 40])
    upstream = UpstreamClient(HttpxTransport(transport=httpx.ASGITransport(app=app)), BASE, retries=0)
    clock = FakeClock(1_750_000_000.0)
    store = await Store.open(f"sqlite:///{tmp_path}/gateway.db", clock)
    await store.users.create(user_id="u1", email=None, tier="starter")
    await store.users.create(user_id="u2", email=None, tier="enterprise")
    w = World(store, state, upstream, Vault([Fernet.generate_key().decode()]), clock)
    try:
        yield w
    finally:
        await upstream.close()
        await store.close()


async def expect_error(status: int, work: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        await work
    assert caught.value.status == status, caught.value.message
    return caught.value


async def audit_actions(w: World) -> list[str]:
    return [r["action"] for r in await w.store.audit.page(limit=100)]


# -- provisioning ------------------------------------------------------------------


@pytest.mark.anyio
async def test_provision_uses_the_tier_budget_and_stores_only_ciphertext(world: World) -> None:
    described = await world.prov.provision("u1", actor="admin")
    row = await world.local()
    assert row is not None and row["kind"] == "managed"
    upstream = world.upstream_keys()[row["upstream_hash"]]
    assert upstream.limit == Decimal("50") and upstream.limit_reset == "monthly"
    assert upstream.name.startswith("gateway:u1:")
    assert world.secret(row) == upstream.key and upstream.key not in row["ciphertext"]
    assert upstream.key not in str(described) and described["limit_usd"] == "50"
    assert "u1" in world.forgotten
    audit = await world.store.audit.page(limit=10)
    assert audit[0]["action"] == "key.managed.provision" and upstream.key not in str(audit)
    assert await world.prov.ops.all() == []


@pytest.mark.anyio
async def test_provision_with_an_explicit_limit_and_an_unlimited_tier(world: World) -> None:
    await world.prov.provision("u1", limit_usd="12.50", actor="admin")
    await world.prov.provision("u2", actor="admin")  # enterprise: no monthly budget
    keys = world.upstream_keys()
    assert keys[(await world.local("u1"))["upstream_hash"]].limit == Decimal("12.50")
    assert keys[(await world.local("u2"))["upstream_hash"]].limit is None


@pytest.mark.parametrize("bad", [-1, "abc", True, [], "NaN", "1e12"])
@pytest.mark.anyio
async def test_bad_limits_are_refused_before_anything_is_created(world: World, bad: Any) -> None:
    before = len(world.upstream_keys())
    error = await expect_error(400, world.prov.provision("u1", limit_usd=bad, actor="admin"))
    assert error.param == "limit_usd"
    assert len(world.upstream_keys()) == before and await world.local() is None


@pytest.mark.anyio
async def test_provision_refuses_unknown_users_and_users_with_a_key(world: World) -> None:
    await expect_error(404, world.prov.provision("nobody", actor="admin"))
    await world.prov.provision("u1", actor="admin")
    before = len(world.upstream_keys())
    await expect_error(409, world.prov.provision("u1", actor="admin"))
    assert len(world.upstream_keys()) == before


@pytest.mark.parametrize("status, ours", [(401, 502), (429, 503), (500, 502), (503, 503)])
@pytest.mark.anyio
async def test_upstream_failures_leave_local_state_unchanged(world: World, status: int, ours: int) -> None:
    before = len(world.upstream_keys())
    world.fail("/keys", status)
    error = await expect_error(ours, world.prov.provision("u1", actor="admin"))
    assert str(status) in error.message
    assert await world.local() is None and await world.prov.ops.all() == []
    assert len(world.upstream_keys()) == before
    assert "key.managed.provision" not in await audit_actions(world)


@pytest.mark.anyio
async def test_wrong_or_missing_management_key(world: World) -> None:
    error = await expect_error(502, world.provisioner("sk-or-v1-wrong-management").provision("u1", actor="admin"))
    assert "401" in error.message and "management_key" in error.message and "sk-or-v1-wrong" not in error.message
    error = await expect_error(503, world.provisioner(None).provision("u1", actor="admin"))
    assert "GATEWAY_UPSTREAM__MANAGEMENT_KEY" in error.message and "management_key_file" in error.message
    assert await world.local() is None


@pytest.mark.anyio
async def test_a_lost_create_answer_is_rolled_back_at_once(world: World) -> None:
    lossy = UpstreamClient(LosesCreateAnswers(world.upstream.transport), BASE, retries=0)
    before = len(world.upstream_keys())
    await expect_error(503, world.provisioner(upstream=lossy).provision("u1", actor="admin"))
    assert len(world.upstream_keys()) == before  # created upstream, found by its unique name, deleted
    assert await world.local() is None and await world.prov.ops.all() == []


# -- update, rotate, remove ------------------------------------------------------------


@pytest.mark.anyio
async def test_update_changes_upstream_then_local(world: World) -> None:
    await world.prov.provision("u1", actor="admin")
    row = await world.local()
    described = await world.prov.update("u1", {"limit_usd": Decimal("7.25"), "disabled": True}, actor="admin")
    upstream = world.upstream_keys()[row["upstream_hash"]]
    assert upstream.limit == Decimal("7.25") and upstream.disabled is True
    assert described["limit_usd"] == "7.25" and described["disabled"] is True
    await world.prov.update("u1", {"disabled": False}, actor="admin")
    assert upstream.disabled is False
    await world.prov.update("u1", {"limit_usd": None}, actor="admin")
    assert upstream.limit is None and (await world.local())["limit_usd"] is None
    assert {"key.managed.update", "key.managed.enable"} <= set(await audit_actions(world))


@pytest.mark.anyio
async def test_update_failures_and_bad_input_change_nothing(world: World) -> None:
    await world.prov.provision("u1", actor="admin")
    row = await world.local()
    world.fail(f"/keys/{row['upstream_hash']}", 500)
    await expect_error(502, world.prov.update("u1", {"disabled": True}, actor="admin"))
    assert (await world.local())["disabled"] == 0
    assert world.upstream_keys()[row["upstream_hash"]].disabled is False
    for bad, param in (({"disabled": "yes"}, "disabled"), ({"limit_usd": -5}, "limit_usd"), ({"colour": 1}, "colour"),
                       ({}, "limit_usd")):
        assert (await expect_error(400, world.prov.update("u1", bad, actor="admin"))).param == param
    assert await world.local() == row
    await expect_error(404, world.prov.update("u2", {"disabled": True}, actor="admin"))


@pytest.mark.anyio
async def test_rotate_swaps_in_a_new_key_and_deletes_the_old_one(world: World) -> None:
    await world.prov.provision("u1", limit_usd="20", actor="admin")
    old = await world.local()
    await world.prov.rotate("u1", actor="admin")
    new = await world.local()
    keys = world.upstream_keys()
    assert old["upstream_hash"] not in keys and new["upstream_hash"] in keys
    assert world.secret(new) == keys[new["upstream_hash"]].key != world.secret(old)
    assert keys[new["upstream_hash"]].limit == Decimal("20") and new["limit_usd"] == "20"
    assert "key.managed.rotate" in await audit_actions(world)
    assert await world.prov.ops.all() == []


@pytest.mark.anyio
async def test_a_rotated_out_key_stays_usable_for_the_grace_then_is_deleted_even_after_a_restart(
        world: World) -> None:
    prov = world.provisioner(rotation_grace_s=60)
    await prov.provision("u1", actor="admin")
    old = await world.local()
    await prov.rotate("u1", actor="admin")
    new = await world.local()
    assert {old["upstream_hash"], new["upstream_hash"]} <= set(world.upstream_keys())  # both valid now
    assert await prov.ops.all() == []  # the operation is done; the retirement is stored apart
    world.clock.now += 59
    assert await prov.delete_retired() == world.clock.now + 1  # not yet: due in a second
    assert old["upstream_hash"] in world.upstream_keys()
    world.clock.now += 2
    restarted = world.provisioner(rotation_grace_s=60)  # a new process finishes what the old one left
    assert await restarted.delete_retired() is None
    assert old["upstream_hash"] not in world.upstream_keys() and new["upstream_hash"] in world.upstream_keys()
    assert await restarted.ops.retired() == []


@pytest.mark.anyio
async def test_rotating_a_disabled_key_keeps_it_disabled(world: World) -> None:
    await world.prov.provision("u1", actor="admin")
    await world.prov.update("u1", {"disabled": True}, actor="admin")
    await world.prov.rotate("u1", actor="admin")
    new = await world.local()
    assert new["disabled"] == 1 and world.upstream_keys()[new["upstream_hash"]].disabled is True


@pytest.mark.anyio
async def test_a_failed_rotation_keeps_the_old_key(world: World) -> None:
    await world.prov.provision("u1", actor="admin")
    old = await world.local()
    before = len(world.upstream_keys())
    world.fail("/keys", 500)
    await expect_error(502, world.prov.rotate("u1", actor="admin"))
    assert await world.local() == old and len(world.upstream_keys()) == before
    assert await world.prov.ops.all() == []


@pytest.mark.anyio
async def test_remove_deletes_upstream_first(world: World) -> None:
    await world.prov.provision("u1", actor="admin")
    row = await world.local()
    world.fail(f"/keys/{row['upstream_hash']}", 500)
    await expect_error(502, world.prov.remove("u1", actor="admin"))
    assert await world.local() == row  # upstream refused: still here
    assert await world.prov.remove("u1", actor="admin") is True
    assert await world.local() is None and row["upstream_hash"] not in world.upstream_keys()
    assert await world.prov.remove("u1", actor="admin") is False
    assert "key.managed.delete" in await audit_actions(world)


@pytest.mark.anyio
async def test_remove_of_a_key_already_gone_upstream_still_removes_it(world: World) -> None:
    await world.prov.provision("u1", actor="admin")
    row = await world.local()
    world.state.delete_key(world.upstream_keys()[row["upstream_hash"]])
    assert await world.prov.remove("u1", actor="admin") is True and await world.local() is None


# -- crash recovery ------------------------------------------------------------------


class CrashAt(ManagedKeyOperations):
    """The operations table, but the process 'dies' (raises) when it reaches `step`."""

    def __init__(self, inner: ManagedKeyOperations, step: str) -> None:
        self.__dict__.update(inner.__dict__)
        self.step = step

    async def created(self, *args: Any, **kwargs: Any) -> bool:
        if self.step == "created":
            raise SystemExit("crash before recording the new key")
        return await super().created(*args, **kwargs)

    async def swap_in(self, *args: Any, **kwargs: Any) -> bool:
        if self.step == "swap":
            raise SystemExit("crash before the swap")
        return await super().swap_in(*args, **kwargs)

    async def finish(self, *args: Any, **kwargs: Any) -> None:
        if self.step == "finish":
            raise SystemExit("crash before deleting the old key")
        await super().finish(*args, **kwargs)


async def crash_rotation(world: World, step: str) -> tuple[dict[str, Any], Provisioner]:
    await world.prov.provision("u1", actor="admin")
    old = await world.local()
    doomed = world.provisioner()
    doomed.ops = CrashAt(doomed.ops, step)
    with pytest.raises(SystemExit):
        await doomed.rotate("u1", actor="admin")
    assert len(await world.prov.ops.all()) == 1
    return old, world.provisioner()  # the restarted gateway


def check_consistent(world: World, row: dict[str, Any]) -> None:
    """Exactly one managed key upstream (plus the seed key), and it is the one stored locally."""
    keys = world.upstream_keys()
    managed = {h for h, k in keys.items() if k.name.startswith("gateway:")}
    assert managed == {row["upstream_hash"]}, "orphaned or lost key"
    assert world.secret(row) == keys[row["upstream_hash"]].key


@pytest.mark.anyio
async def test_crash_before_the_new_key_is_recorded_is_rolled_back(world: World) -> None:
    old, restarted = await crash_rotation(world, "created")
    assert len([k for k in world.upstream_keys().values() if k.name.startswith("gateway:")]) == 2
    assert await restarted.recover(only_stale=False) == {"u1": "rolled_back"}
    assert await world.local() == old
    check_consistent(world, old)
    assert await restarted.ops.all() == []


@pytest.mark.anyio
async def test_crash_before_the_swap_is_rolled_forward(world: World) -> None:
    old, restarted = await crash_rotation(world, "swap")
    assert await world.local() == old  # not swapped yet: requests still use the old key
    assert await restarted.recover(only_stale=False) == {"u1": "completed"}
    new = await world.local()
    assert new["upstream_hash"] != old["upstream_hash"]
    check_consistent(world, new)
    assert "key.managed.recover" in await audit_actions(world)


@pytest.mark.anyio
async def test_crash_after_the_swap_is_finished_on_the_next_rotate(world: World) -> None:
    old, restarted = await crash_rotation(world, "finish")
    swapped = await world.local()
    assert swapped["upstream_hash"] != old["upstream_hash"]
    await restarted.rotate("u1", actor="admin")  # settles the pending operation first
    check_consistent(world, await world.local())
    assert await restarted.ops.all() == []


@pytest.mark.anyio
async def test_old_key_delete_refused_upstream_is_retried_by_recovery(world: World) -> None:
    await world.prov.provision("u1", actor="admin")
    old = await world.local()
    world.fail(f"/keys/{old['upstream_hash']}", 500)
    await expect_error(502, world.prov.rotate("u1", actor="admin"))
    new = await world.local()
    assert new["upstream_hash"] != old["upstream_hash"]  # swapped: new requests use the new key
    assert old["upstream_hash"] in world.upstream_keys()
    assert await world.prov.recover(only_stale=False) == {"u1": "completed"}
    check_consistent(world, new)


@pytest.mark.anyio
async def test_fresh_unrecorded_creation_blocks_until_stale(world: World) -> None:
    old, restarted = await crash_rotation(world, "created")
    await expect_error(409, restarted.rotate("u1", actor="admin"))
    assert await restarted.recover(only_stale=True) == {}  # might still be in flight elsewhere
    world.clock.now += restarted.stale_after_s
    await restarted.rotate("u1", actor="admin")
    check_consistent(world, await world.local())


@pytest.mark.anyio
async def test_a_key_removed_mid_rotation_rolls_the_new_key_back(world: World) -> None:
    old, restarted = await crash_rotation(world, "swap")
    await world.store.keys.delete("u1")  # e.g. the user disconnected it on another instance
    assert await restarted.recover(only_stale=False) == {"u1": "rolled_back"}
    assert not [k for k in world.upstream_keys().values() if k.name.startswith("gateway:")
                and k.hash != old["upstream_hash"]]


@pytest.mark.anyio
async def test_failed_recovery_is_retried_and_keeps_the_record(world: World) -> None:
    old, restarted = await crash_rotation(world, "finish")
    world.fail(f"/keys/{old['upstream_hash']}", 500)
    assert await restarted.recover(only_stale=False) == {"u1": "failed"}
    assert len(await restarted.ops.all()) == 1
    assert await restarted.recover(only_stale=False) == {"u1": "completed"}
    check_consistent(world, await world.local())


def test_limits_are_sent_as_exact_json_numbers() -> None:
    assert dumps({"name": "gateway:u", "limit": Decimal("0.10"), "limit_reset": None}) == (
        b'{"name":"gateway:u","limit":0.10,"limit_reset":null}')
