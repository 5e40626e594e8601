"""The dashboard in a real browser: Debian's chromium driven by Playwright against a real `gateway serve`.

Seeded usage (two users, two tiers) must appear in the charts with the very strings the admin API returns;
a wrong token shows an error; the emergency stop toggled from the page refuses requests. A screenshot is
saved in the test's temporary folder. Without chromium the test skips loudly (fails under CI=true).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, Emulator, GatewayProcess, start_gateway

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


def _browser_or_skip() -> Any:
    reason = None
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium; .ci/services installs it)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        reason = "playwright is not installed (pip install -e '.[test]')"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(f"SKIPPED LOUDLY: {reason}")
    return sync_playwright


@pytest.fixture(scope="module")
def seeded(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, list[dict[str, Any]]]]:
    gateway = start_gateway(tmp_path_factory.mktemp("dashboard"), emulator)
    users = [gateway.create_user(tier="starter", key=emulator.new_key()),
             gateway.create_user(tier="professional", key=emulator.new_key())]
    for user, count in zip(users, (3, 2)):
        with gateway.client(user["token"]) as client:
            for _ in range(count):
                assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    deadline = time.monotonic() + 20
    while gateway.admin.get("/admin/v1/usage").json()["totals"]["requests"] < 5:
        assert time.monotonic() < deadline, "the seeded usage was not recorded"
        time.sleep(0.1)
    try:
        yield gateway, users
    finally:
        gateway.stop()


def test_dashboard_files_are_served_with_a_strict_policy(seeded: tuple[GatewayProcess, Any]) -> None:
    gateway, _ = seeded
    page = httpx.get(gateway.url + "/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(gateway.url + "/dashboard/vendor/chart.umd.js").text.startswith("/*!\n * Chart.js v4.4.9")
    assert "MIT" in httpx.get(gateway.url + "/dashboard/vendor/chart.js-LICENSE.md").text
    missing = httpx.get(gateway.url + "/dashboard/../gateway.db")
    assert missing.status_code == 404


def test_dashboard_in_chromium(seeded: tuple[GatewayProcess, list[dict[str, Any]]], tmp_path: Path) -> None:
    sync_playwright = _browser_or_skip()
    from playwright.sync_api import expect  # assertions that poll through selectors (the page's CSP forbids eval)

    gateway, users = seeded
    def exact(path: str) -> Any:  # money as the API wrote it: the JSON number's own digits
        return json.loads(gateway.admin.get(path).text, parse_float=str)

    daily = exact("/admin/v1/usage/daily?days=30&split=tier")
    top = exact("/admin/v1/usage/top-users?limit=10")
    models = exact("/admin/v1/usage/models?period=month")
    assert {s["key"] for s in daily["series"]} == {"starter", "professional"}

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1700})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(gateway.url + "/dashboard")

            # a wrong token: an error on the sign-in form, never a blank page
            page.fill("#token", "wrong-token")
            page.click("button[type=submit]")
            page.wait_for_selector("#sign-in-error:not([hidden])")
            assert "refused (401)" in page.inner_text("#sign-in-error")
            assert page.is_hidden("#main")
            assert page.evaluate("sessionStorage.length") == 0

            page.fill("#token", ADMIN_TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector("body[data-loaded]")
            assert page.is_hidden("#load-error"), page.inner_text("#load-error")
            assert ADMIN_TOKEN not in page.url
            assert page.evaluate("sessionStorage.getItem('gateway.adminToken')") == ADMIN_TOKEN
            assert page.evaluate("localStorage.length") == 0

            # the charts hold exactly what the admin API returned
            drawn = page.evaluate("""() => { const c = Chart.getChart('daily-chart');
                return {labels: c.data.labels, sets: c.data.datasets.map(d => ({label: d.label, api: d.apiValues,
                data: d.data}))}; }""")
            assert drawn["labels"] == daily["days"]
            for series in daily["series"]:
                shown = next(s for s in drawn["sets"] if s["label"] == f"{series['key']} cost (USD)")
                assert shown["api"] == series["total_cost"]
                assert shown["data"] == [float(v) for v in series["total_cost"]]
                assert any(v != "0" for v in shown["api"])
            requests_line = next(s for s in drawn["sets"] if s["label"] == "requests")
            assert requests_line["data"] == daily["totals"]["requests"] and sum(requests_line["data"]) == 5
            bars = page.evaluate("() => { const c = Chart.getChart('budget-chart'); "
                                 "return {labels: c.data.labels, spent: c.data.datasets[0].apiValues}; }")
            assert bars["labels"] == [row["user_id"] for row in top["data"]]
            assert bars["spent"] == [row["spent"] for row in top["data"]]
            assert set(bars["labels"]) == {u["id"] for u in users}
            models_text = page.inner_text("#models-table")
            for row in models["data"]:
                assert row["model"] in models_text and row["total_cost"] in models_text
            assert "monthly budget" in page.inner_text("#budget-table")

            # the emergency stop, confirmed from the page, refuses requests; off again, they pass
            with gateway.client(users[0]["token"]) as client:
                page.click("#stop-toggle")
                page.wait_for_selector("#stop-confirm:not([hidden])")
                page.fill("#stop-reason-input", "browser test")
                page.click("#stop-yes")
                expect(page.locator("#stop-state")).to_have_text(re.compile("^ON"))
                refused = client.post("/v1/chat/completions", json=CHAT)
                assert refused.status_code == 503 and "browser test" in refused.json()["error"]["message"]
                page.click("#refresh")
                expect(page.locator("#refusals-table tbody")).to_contain_text("emergency_stop")
                page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
                page.click("#stop-toggle")
                page.click("#stop-yes")
                expect(page.locator("#stop-state")).to_have_text("off")
                assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert not errors, errors
        finally:
            browser.close()
    shot = tmp_path / "dashboard.png"
    assert shot.stat().st_size > 20_000
    if os.environ.get("GATEWAY_SCREENSHOT_COPY"):  # the closing note's screenshot, kept outside pytest's tmp
        shutil.copy(shot, os.environ["GATEWAY_SCREENSHOT_COPY"])
