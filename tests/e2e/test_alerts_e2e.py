"""Alerts end to end: a real gateway, a local webhook receiver, a restart in between.

A user crossing 80% of their monthly budget yields exactly one signed delivery, even though the receiver
first fails, the gateway restarts before it recovers, and the restarted gateway checks again; an emergency
stop toggle is delivered too; a bad webhook URL stops start-up naming the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import ADMIN_TOKEN, ROOT, Emulator, GatewayProcess, start_gateway, write_config
from tests.conftest import wait_for as poll

SECRET = "whsec-test-0123456789abcdef"
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


class Receiver:
    """A webhook receiver on loopback: records every delivery, answers `status`."""

    def __init__(self) -> None:
        self.deliveries: list[dict[str, Any]] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.deliveries.append({"headers": dict(self.headers), "body": body, "answered": receiver.status})
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/gateway?token=receiver-secret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def accepted(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.deliveries if d["answered"] == 200 and json.loads(d["body"])["type"] == kind]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.server.shutdown()


def alerts(gateway: GatewayProcess) -> dict[str, Any]:
    response = gateway.admin.get("/admin/v1/alerts")
    assert response.status_code == 200, response.text
    return response.json()


def test_a_budget_threshold_is_delivered_once_signed_across_a_restart(
    emulator: Emulator, receiver: Receiver, tmp_path: Path
) -> None:
    overrides = {"alerts": {"webhooks": [{"url": receiver.url, "secret": SECRET}], "check_interval_s": 0.2,
                            "backoff_base_s": 0.2, "backoff_max_s": 0.5}}
    receiver.status = 500  # the first tries fail: the delivery must wait in the outbox
    first = start_gateway(tmp_path, emulator, overrides)
    user = first.create_user(tier="enterprise", key=emulator.new_key())
    with first.client(user["token"]) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        cost = Decimal(str(poll(lambda: first.admin.get("/admin/v1/usage").json()["totals"]["total_cost"],
                                "the first record")))
        budget = (cost * 2 / Decimal("0.9")).quantize(Decimal("0.000000000001"))  # two requests = 90% of it
        patched = first.admin.patch(f"/admin/v1/users/{user['id']}", json={"limits": {"monthly_budget_usd": str(budget)}})
        assert patched.status_code == 200, patched.text
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    failed_try = poll(lambda: [a for a in alerts(first)["data"] if a["attempts"] >= 1], "a failed delivery attempt")
    assert failed_try[0]["state"] == "pending" and failed_try[0]["last_status"] == 500
    assert "receiver-secret" not in json.dumps(alerts(first))  # the webhook's query is not shown
    first.stop()

    receiver.status = 200
    second = start_gateway(tmp_path, emulator, overrides, port=first.port)
    try:
        delivered = poll(lambda: receiver.accepted("budget.threshold"), "the delivery after the restart")
        restarted_at = time.time()
        # let the restarted instance check budgets twice more: still one delivery
        poll(lambda: (alerts(second)["checked_at"] or "") > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(restarted_at + 0.5)),
             "two more alert checks")
        assert len(receiver.accepted("budget.threshold")) == 1
        body = delivered[0]["body"]
        headers = {k.lower(): v for k, v in delivered[0]["headers"].items()}
        assert headers["x-gateway-signature"] == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        event = json.loads(body, parse_float=Decimal)
        assert headers["x-gateway-event-id"] == event["id"] and event["type"] == "budget.threshold"
        assert event["data"]["user_id"] == user["id"] and event["data"]["period"] == "month"
        assert Decimal(event["data"]["threshold"]) == Decimal("0.8") and Decimal(event["data"]["budget_usd"]) == budget
        assert Decimal(event["data"]["spent_usd"]) == cost * 2
        rows = [a for a in alerts(second)["data"] if a["event"] == "budget.threshold"]
        assert len(rows) == 1 and rows[0]["state"] == "delivered" and rows[0]["attempts"] >= 2

        # the emergency stop, toggled, is an event too
        assert second.admin.put("/admin/v1/emergency-stop", json={"enabled": True, "reason": "drill"}).status_code == 200
        stop = poll(lambda: receiver.accepted("emergency_stop.changed"), "the emergency stop alert")
        assert json.loads(stop[0]["body"])["data"] == {**json.loads(stop[0]["body"])["data"], "enabled": True,
                                                        "reason": "drill"}
    finally:
        second.admin.put("/admin/v1/emergency-stop", json={"enabled": False})
        second.stop()


@pytest.mark.parametrize("url", ["not a url", "ftp://hooks.example.com/x", "http://", "https://host:99999/x"])
def test_a_bad_webhook_url_stops_start_up_naming_the_key(emulator: Emulator, tmp_path: Path, url: str) -> None:
    config = write_config(tmp_path, emulator, {"alerts": {"webhooks": [{"url": url, "secret": SECRET}]}})
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), "serve", "--port", "0"],
        cwd=ROOT, env={"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "alerts.webhooks.0.url" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "gateway.db").exists()  # nothing written
