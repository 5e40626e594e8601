"""Logs: secrets redacted from every field, and a flood of one message kept to a line a second."""

from __future__ import annotations

import logging

import orjson

from gateway.core.logs import JsonFormatter, OncePerSecond


def record(msg: str, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, msg, (), None)
    for name, value in extra.items():
        setattr(entry, name, value)
    return entry


def test_every_field_is_redacted() -> None:
    key, token, admin = "sk-or-v1-" + "a" * 64, "gw-" + "b" * 43, "gwadmin-" + "c" * 43
    line = JsonFormatter().format(record(f"GET /v1/models/{token}", path=f"/v1/models/{key}",
                                         query=f"token={admin}&x=1", method="GET", status=404))
    entry = orjson.loads(line)
    assert entry["path"] == "/v1/models/sk-or-[redacted]" and entry["query"] == "token=gwadmin-[redacted]&x=1"
    assert entry["message"] == "GET /v1/models/gw-[redacted]" and entry["status"] == 404
    assert key not in line and token not in line and admin not in line


def test_a_flood_of_one_message_is_one_line_a_second_with_the_count() -> None:
    now = [100.0]
    once = OncePerSecond(clock=lambda: now[0])
    kept = [once.filter(record("socket.accept() out of system resource\nsocket: fd=%d" % i))  # noqa: UP031 (asyncio's own words)
            for i in range(500)]
    assert kept.count(True) == 1
    other = record("another message")
    assert once.filter(other)
    now[0] += 1.0
    again = record("socket.accept() out of system resource\nsocket: fd=9")
    assert once.filter(again) and "499 more like this" in again.getMessage()
