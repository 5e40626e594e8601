"""`/metrics` and the logs against a real `gateway serve`: labels from route templates, escaped values,
a size that client paths cannot grow, and secrets in a URL redacted from every log field."""

from __future__ import annotations

import secrets
import socket
from typing import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Emulator, GatewayProcess, start_gateway


@pytest.fixture(scope="module")
def gw(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = start_gateway(tmp_path_factory.mktemp("metrics"), emulator, {"logging": {"access_log": True}})
    try:
        yield process
    finally:
        process.stop()


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every sample's name and labels (not its value): what grows when labels are unbounded."""
    return {(s.name, tuple(sorted(s.labels.items())))
            for family in text_string_to_metric_families(text) for s in family.samples}


def raw_get(gw: GatewayProcess, target: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_unknown_paths_leave_metrics_the_same_size(gw: GatewayProcess) -> None:
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        for i in range(3):  # every label the flood will touch exists before it
            client.get(f"/nope/{i}")
            client.get(f"/admin/v1/users/u{i}")
        client.get("/metrics")
        before = client.get("/metrics").text
        for i in range(600):
            client.get(f"/{secrets.token_hex(6)}/{i}")
            client.get(f"/admin/v1/users/{secrets.token_hex(6)}")
        after = client.get("/metrics").text
    assert series(after) == series(before)
    assert abs(len(after) - len(before)) < 200  # counters' digits only
    assert 'route="unmatched"' in after and 'route="/admin/v1/users/{user_id}"' in after


def test_a_path_cannot_forge_a_metrics_line(gw: GatewayProcess) -> None:
    raw_get(gw, b"/v1/%22%7D%0Ainjected_metric%201")
    raw_get(gw, b'/v1/"}\\ninjected_metric 2')
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    assert "injected_metric" not in text
    assert all(not line.startswith("injected") for line in text.splitlines())
    series(text)  # parses with the reference parser


def test_a_secret_in_the_url_is_in_no_log_field_and_no_label(gw: GatewayProcess) -> None:
    key = "sk-or-v1-" + secrets.token_hex(32)
    token = "gw-" + secrets.token_urlsafe(32)
    admin = "gwadmin-" + secrets.token_urlsafe(32)
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        for value in (key, token, admin):
            response = client.get(f"/v1/models/{value}", params={"api_key": value})
            assert value not in response.text
            client.get(f"/api/v1/{value}")
        metrics = client.get("/metrics").text
        client.get("/health")  # the log line of the requests above is written by now
    log = gw.output()
    for value in (key, token, admin):
        assert value not in log and value not in metrics
        assert value[-20:] not in log and value[-20:] not in metrics
    assert "sk-or-[redacted]" in log and "gw-[redacted]" in log and "gwadmin-[redacted]" in log
