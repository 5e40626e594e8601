"""Credits look-up (where the key may read /credits, else its /key), the low-balance line, and the paced sync job."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from gateway.accounts.credit_sync import CreditSync, Pacer
from gateway.security.vault import Vault
from gateway.store import Store
from gateway.upstream.client import UpstreamConnectionError
from gateway.upstream.credits import (
    CreditsUnavailable,
    KeyRejected,
    credits_view,
    fetch_credits,
)


class FakeUpstream:
    """`call()` answers from a table per (path, key); records every call."""

    def __init__(self, answers: dict[tuple[str, str], Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str]] = []

    async def call(self, method: str, path: str, *, key: str, payload: Any = None, retry: bool = True) -> Any:
        self.calls.append((path, key))
        answer = self.answers.get((path, key), (404, {"error": {"code": 404, "message": "Not Found"}}))
        if isinstance(answer, Exception):
            raise answer
        return answer


def credits_ok(total: str, usage: str) -> tuple[int, Any]:
    return 200, {"data": {"total_credits": Decimal(total), "total_usage": Decimal(usage)}}


def key_ok(limit: str | None, usage: str) -> tuple[int, Any]:
    return 200, {"data": {"limit": None if limit is None else Decimal(limit), "usage": Decimal(usage)}}


FORBIDDEN = (403, {"error": {"code": 403, "message": "Only management keys can perform this operation"}})


@pytest.mark.anyio
async def test_credits_from_the_credits_endpoint_are_exact() -> None:
    upstream = FakeUpstream({("/credits", "k"): credits_ok("100.10", "25.75")})
    found = await fetch_credits(upstream, "k")  # type: ignore[arg-type]
    assert (found.total_credits, found.total_usage, found.source) == (Decimal("100.10"), Decimal("25.75"), "credits")
    assert found.balance == Decimal("74.35") and upstream.calls == [("/credits", "k")]


@pytest.mark.anyio
async def test_forbidden_credits_fall_back_to_the_keys_limit_and_usage() -> None:
    upstream = FakeUpstream({("/credits", "k"): FORBIDDEN, ("/key", "k"): key_ok("20", "3.5")})
    found = await fetch_credits(upstream, "k")  # type: ignore[arg-type]
    assert (found.total_credits, found.total_usage, found.source) == (Decimal("20"), Decimal("3.5"), "key")
    unlimited = FakeUpstream({("/credits", "k"): FORBIDDEN, ("/key", "k"): key_ok(None, "1")})
    assert (await fetch_credits(unlimited, "k")).balance is None  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("answers", "error"),
    [
        ({("/credits", "k"): (401, {"error": {"code": 401, "message": "User not found"}})}, KeyRejected),
        ({("/credits", "k"): FORBIDDEN, ("/key", "k"): (401, {})}, KeyRejected),
        ({("/credits", "k"): UpstreamConnectionError("down")}, CreditsUnavailable),
        ({("/credits", "k"): (500, {}), ("/key", "k"): (502, {})}, CreditsUnavailable),
    ],
)
async def test_failures_are_told_apart(answers: dict[tuple[str, str], Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        await fetch_credits(FakeUpstream(answers), "k")  # type: ignore[arg-type]


def test_low_balance_is_strictly_under_the_threshold_and_explained() -> None:
    threshold = Decimal("10")
    low = credits_view(Decimal("10"), Decimal("0.01"), source="credits", threshold=threshold)
    assert low["balance"] == Decimal("9.99") and low["low_balance"] is True and "latency" in low["note"]
    fine = credits_view(Decimal("10.01"), Decimal("0.01"), source="credits", threshold=threshold)
    assert fine["balance"] == Decimal("10.00") and fine["low_balance"] is False and fine["note"] is None
    unknown = credits_view(None, Decimal("1"), source="key", threshold=threshold)
    assert unknown["balance"] is None and unknown["low_balance"] is False and unknown["note"]


@pytest.mark.anyio
async def test_pacer_spaces_calls_at_the_configured_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = Pacer(4, monotonic=lambda: now[0], sleep=sleep)
    for _ in range(9):
        await pacer()
    assert pacer.calls == 9 and slept == [0.25] * 8  # evenly spaced: one call every 1/4 s
    now[0] += 10  # idle time is not banked into a burst
    await pacer()
    await pacer()
    assert slept[-1] == 0.25


@pytest.mark.anyio
async def test_sync_all_keeps_the_last_good_numbers_on_failure(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path}/g.db")
    vault = Vault([Fernet.generate_key().decode()])
    try:
        for user_id in ("a", "b", "c"):
            await store.users.create(user_id=user_id, email=None, tier="starter")
        await store.keys.put("a", kind="byok", ciphertext=vault.encrypt("key-a"), label="", last4="ey-a")
        await store.keys.put("b", kind="byok", ciphertext=vault.encrypt("key-b"), label="", last4="ey-b")
        await store.keys.put("c", kind="managed", ciphertext=vault.encrypt("key-c"), label="", last4="ey-c",
                             disabled=True)
        upstream = FakeUpstream({("/credits", "key-a"): credits_ok("50", "5"),
                                 ("/credits", "key-b"): credits_ok("8", "0")})
        now = [0.0]

        async def sleep(seconds: float) -> None:
            now[0] += seconds

        sync = CreditSync(store, vault, upstream, rate_per_s=2,  # type: ignore[arg-type]
                          pacer=Pacer(2, monotonic=lambda: now[0], sleep=sleep))
        seen: list[tuple[int, int]] = []
        report = await sync.sync_all(progress=lambda done, total: seen.append((done, total)))
        assert (report.users, report.synced, report.failed, report.skipped) == (3, 2, 0, 1)
        assert seen == [(1, 3), (2, 3), (3, 3)] and now[0] == 0.5  # 2 calls at 2/s
        row = await store.account.credits("b")
        assert row["total_credits"] == Decimal("8") and row["source"] == "credits" and row["error"] is None

        upstream.answers[("/credits", "key-b")] = UpstreamConnectionError("down")
        report = await sync.sync_all(user_id="b")
        assert (report.users, report.synced, report.failed) == (1, 0, 1)
        row = await store.account.credits("b")
        assert row["total_credits"] == Decimal("8") and "down" in row["error"]  # last good numbers kept
        assert await store.account.credits("c") is None  # disabled key: not asked
    finally:
        await store.close()
