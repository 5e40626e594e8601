"""Limit overrides: strict on the way in, and a value an older version stored that breaks the rules is
reported at start-up and treated as unset (never a 500)."""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.accounts.directory import Directory, broken_overrides, report_broken_overrides
from gateway.core.config import Config
from gateway.core.errors import BadRequest
from gateway.limits.policy import Limits
from gateway.store import Store

pytestmark = pytest.mark.anyio
BROKEN = {"monthly_budget_usd": "1e-999999999", "daily_budget_usd": "1e999999999", "requests_per_minute": -1,
          "max_concurrent": 3}


async def test_broken_stored_overrides_are_reported_once_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    store = await Store.open(f"sqlite:///{tmp_path}/g.db")
    try:
        for user_id in ("a", "b", "c"):
            await store.users.create(user_id=user_id, email=None, tier="trial")
        await store.users.update("b", overrides=BROKEN)
        with caplog.at_level(logging.WARNING, logger="gateway.accounts.directory"):
            assert await report_broken_overrides(store, page=2) == 1
        [line] = [r.getMessage() for r in caplog.records]
        assert "user b" in line and "monthly_budget_usd" in line and "requests_per_minute" in line
        assert "max_concurrent" not in line and "1e999999999" not in line
        shown = await Directory(store, Config()).show_user("b")
        assert shown["limits"] == {"max_concurrent": 3}
    finally:
        await store.close()


def test_the_limiter_treats_broken_overrides_as_unset() -> None:
    config = Config()
    limits = Limits.of(config.tier("trial"), BROKEN)
    assert limits.monthly_budget_usd == Decimal("10") and limits.daily_budget_usd is None
    assert limits.requests_per_minute is None and limits.max_concurrent == 3
    assert broken_overrides(BROKEN) == ["monthly_budget_usd", "daily_budget_usd", "requests_per_minute"]


async def test_a_bad_override_changes_nothing(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path}/g.db")
    try:
        await store.users.create(user_id="a", email=None, tier="trial")
        directory = Directory(store, Config())
        with pytest.raises(BadRequest) as refused:
            await directory.update_user("a", {"limits": {"requests_per_minute": 5, "monthly_budget_usd": "1e9999"}})
        assert refused.value.param == "limits.monthly_budget_usd"
        assert (await store.users.get("a"))["overrides"] == {}
    finally:
        await store.close()
