"""JSON-line logs with secrets redacted in every field: no `sk-or-…` key, platform or admin token, or
Authorization value survives, wherever a client put it (a path, a query string, a header)."""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Callable

import orjson

_SECRETS = [
    (re.compile(r"sk-or-[A-Za-z0-9_-]+"), "sk-or-[redacted]"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1[redacted]"),
    (re.compile(r"gw-[A-Za-z0-9_-]{20,}"), "gw-[redacted]"),
    (re.compile(r"gwadmin-[A-Za-z0-9_-]{20,}"), "gwadmin-[redacted]"),
]
FIELDS = ("request_id", "method", "path", "query", "status", "duration_ms", "user_id")
NOISY_LOGGERS = ("asyncio", "uvicorn.error", "gateway.connections")  # accept() errors, refused connections


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["error"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


class OncePerSecond(logging.Filter):
    """At most one record per second per message template; the next one says how many were dropped.

    Out of file descriptors, the event loop reports every failed accept() (117 MB of log in 15 s);
    this keeps it to one line a second while the condition lasts."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._dropped: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg).partition("\n")[0][:200])  # asyncio puts the details on later lines
        now = self._clock()
        if now - self._last.get(key, -1e9) < 1.0:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        if len(self._last) > 1000:  # bounded whatever the templates
            self._last.clear()
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like this in the last second(s) not logged)"
        return True


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    once = OncePerSecond()
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, OncePerSecond)]
        logger.addFilter(once)
