"""Metrics across `--workers N`: each worker publishes its figures to a file; a scrape on any worker adds
them up.

uvicorn's worker processes share nothing but the listening socket, so each counts only what it served.
Every worker writes its `Metrics.snapshot()` to `<server.data_dir>/metrics/worker-<pid>.json` every
second and once more at shutdown, atomically (a temporary file, then `os.replace`) and off the event
loop; a scrape renders the worker's own live figures plus the other workers' files. Nothing of this runs
on the request path, and with one process there are neither files nor a task.

Another worker's file counts while it belongs to this run (the supervisor's group, `WORKER_GROUP_ENV`),
its process is alive and it is fresh (written within `STALE_AFTER_S`). The files of processes that have
exited are deleted by the next scrape, so a worker that exits takes its counts out of the sum (Prometheus
reads the drop as a counter reset). A file that does not parse, or parses into anything but a snapshot,
is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

import orjson

from gateway.core.clock import Clock, system_clock
from gateway.core.metrics import is_snapshot

log = logging.getLogger("gateway")

# set by the supervisor of `--workers N` for its workers: the run their metrics files belong to
WORKER_GROUP_ENV = "GATEWAY_WORKER_GROUP"
PUBLISH_EVERY_S = 1.0
# a file not rewritten for this long is not counted (its pid may belong to another process by now)
STALE_AFTER_S = 15.0
_PREFIX, _SUFFIX = "worker-", ".json"


def metrics_directory(data_dir: str | Path) -> Path:
    return Path(data_dir) / "metrics"


class WorkerFiles:
    """The snapshot files of the workers of one run, in one directory; `pid` is this worker's."""

    def __init__(self, directory: Path, group: str, *, pid: int | None = None, clock: Clock = system_clock,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        self.directory = directory
        self.group = group
        self.pid = os.getpid() if pid is None else pid
        self._clock = clock
        self._stale_after_s = stale_after_s
        # one write at a time: the shutdown's write may start while a cancelled periodic one still runs
        self._writing = threading.Lock()

    @property
    def path(self) -> Path:
        return self.directory / f"{_PREFIX}{self.pid}{_SUFFIX}"

    def encode(self, snapshot: dict[str, Any]) -> bytes:
        return orjson.dumps({"group": self.group, "pid": self.pid, "at": self._clock(), "snapshot": snapshot})

    def write(self, content: bytes) -> None:
        """Replace this worker's file at once: a reader sees the previous content or this, never a part."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        with self._writing:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(content)
            os.replace(temporary, self.path)

    def snapshots(self) -> list[dict[str, Any]]:
        """The other live workers' latest snapshots; the files of exited processes are deleted."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            pid = _pid_of(name)
            if pid is None or pid == self.pid:
                continue
            if not _alive(pid):
                (self.directory / name).unlink(missing_ok=True)  # its temporary file too
                continue
            if name.endswith(_SUFFIX):
                snapshot = self._read(self.directory / name)
                if snapshot is not None:
                    found.append(snapshot)
        return found

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            content = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        if not isinstance(content, dict) or content.get("group") != self.group:
            return None  # damaged, or another run's (a supervisor before this one, or another gateway's)
        at = content.get("at")
        if not isinstance(at, (int, float)) or not self._clock() - at <= self._stale_after_s:
            return None
        snapshot = content.get("snapshot")
        return snapshot if is_snapshot(snapshot) else None


class SnapshotPublisher:
    """Writes this worker's snapshot to its file: every `every_s` in the background, and on demand."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], files: WorkerFiles,
                 every_s: float = PUBLISH_EVERY_S) -> None:
        self._snapshot = snapshot
        self._files = files
        self._every_s = every_s
        self._failing = False

    async def publish(self) -> None:
        """Take the snapshot on the event loop (the counters change there), write it in a thread."""
        try:
            content = self._files.encode(self._snapshot())
            await asyncio.to_thread(self._files.write, content)
        except Exception as exc:  # noqa: BLE001 - logged; the next second tries again
            if not self._failing:  # said once, not every second
                log.warning("cannot write this worker's metrics to %s (%s): other workers' scrapes miss its "
                            "counts until it can", self._files.path, exc)
            self._failing = True
            return
        if self._failing:
            log.info("this worker's metrics are written to %s again", self._files.path)
            self._failing = False

    async def run(self) -> None:
        while True:
            await self.publish()
            await asyncio.sleep(self._every_s)


def _pid_of(name: str) -> int | None:
    """The pid in `worker-<pid>.json` (or its temporary `worker-<pid>.json.tmp`)."""
    if not name.startswith(_PREFIX):
        return None
    digits = name[len(_PREFIX):].split(".", 1)[0]
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 9):
        return None
    pid = int(digits)
    return pid if pid > 0 else None  # never 0: os.kill(0, …) would mean this process group


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
