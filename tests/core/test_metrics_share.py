"""Worker files: what one worker publishes, what another's scrape takes from them (live, fresh, this
run's, well-formed), and what it deletes (the files of processes that have exited)."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from gateway.core.metrics import Metrics
from gateway.core.metrics_share import STALE_AFTER_S, SnapshotPublisher, WorkerFiles
from tests.conftest import FakeClock

LIVE_PID = os.getppid()  # stands in for another worker: a process that is certainly alive


def exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def worker_metrics(requests: int, cost: str) -> Metrics:
    metrics = Metrics()
    for _ in range(requests):
        metrics.observe_request("/v1/chat/completions", 200, 0.01)
    metrics.observe_generation("starter", 3, 4, Decimal(cost))
    return metrics


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def files(tmp_path: Path, clock: FakeClock, pid: int, group: str = "run-1") -> WorkerFiles:
    return WorkerFiles(tmp_path / "metrics", group, pid=pid, clock=clock)


def test_a_scrape_adds_the_other_workers_files_to_its_own_figures(tmp_path: Path, clock: FakeClock) -> None:
    other = files(tmp_path, clock, LIVE_PID)
    other.write(other.encode(worker_metrics(2, "0.2").snapshot()))
    mine = files(tmp_path, clock, os.getpid())
    mine.write(mine.encode(worker_metrics(100, "9").snapshot()))  # its own file is never read back: live instead
    text = worker_metrics(1, "0.1").render(mine.snapshots())
    assert 'gateway_requests_total{route="/v1/chat/completions",status="2xx"} 3\n' in text
    assert 'gateway_cost_usd_total{tier="starter"} 0.3\n' in text
    assert 'gateway_tokens_total{tier="starter",kind="prompt"} 6\n' in text


def test_the_files_of_exited_workers_are_ignored_and_deleted(tmp_path: Path, clock: FakeClock) -> None:
    dead = files(tmp_path, clock, exited_pid())
    dead.write(dead.encode(worker_metrics(5, "1").snapshot()))
    dead.path.with_name(dead.path.name + ".tmp").write_bytes(b'{"gro')  # it died while writing, too
    live = files(tmp_path, clock, LIVE_PID)
    live.write(live.encode(worker_metrics(2, "1").snapshot()))
    assert len(files(tmp_path, clock, os.getpid()).snapshots()) == 1
    assert sorted(os.listdir(tmp_path / "metrics")) == [f"worker-{LIVE_PID}.json"]


@pytest.mark.parametrize("content", [
    b"", b'{"group": "run-1", "pid": 1, "at": 1800000000.0, "snapsh', b"\x00\xff garbage", b"[]", b"null",
    b'{"group": "run-1", "at": 1800000000.0, "snapshot": {"counters": {"gateway_requests_total": 7}}}',
    b'{"group": "run-1", "at": "now", "snapshot": {"counters": {}, "histograms": {}, "gauges": {}}}',
])
def test_a_damaged_file_is_skipped_and_the_scrape_still_renders(tmp_path: Path, clock: FakeClock,
                                                                 content: bytes) -> None:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / f"worker-{LIVE_PID}.json").write_bytes(content)
    mine = files(tmp_path, clock, os.getpid())
    assert mine.snapshots() == []
    assert 'status="2xx"} 1\n' in worker_metrics(1, "0").render(mine.snapshots())
    assert (tmp_path / "metrics" / f"worker-{LIVE_PID}.json").exists()  # its process is alive: left alone


def test_another_runs_and_stale_files_are_not_counted(tmp_path: Path, clock: FakeClock) -> None:
    earlier = files(tmp_path, clock, LIVE_PID, group="run-0")  # a supervisor before this one, same data_dir
    earlier.write(earlier.encode(worker_metrics(1, "1").snapshot()))
    assert files(tmp_path, clock, os.getpid()).snapshots() == []
    current = files(tmp_path, clock, LIVE_PID)
    current.write(current.encode(worker_metrics(1, "1").snapshot()))
    mine = files(tmp_path, clock, os.getpid())
    clock.now += STALE_AFTER_S
    assert len(mine.snapshots()) == 1
    clock.now += 1  # not rewritten for longer than STALE_AFTER_S: a worker that stopped publishing
    assert mine.snapshots() == []


def test_stray_names_in_the_directory_are_left_alone(tmp_path: Path, clock: FakeClock) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    for name in ("worker-0.json", "worker-.json", "worker-12x.json", "worker-99999999999.json", "notes.txt"):
        (directory / name).write_text("{}")
    assert files(tmp_path, clock, os.getpid()).snapshots() == []
    assert len(os.listdir(directory)) == 5
    assert WorkerFiles(tmp_path / "absent", "run-1").snapshots() == []


@pytest.mark.anyio
async def test_the_publisher_writes_the_snapshot_whole_and_scrape_reads_the_peers(tmp_path: Path,
                                                                                  clock: FakeClock) -> None:
    other = files(tmp_path, clock, LIVE_PID)
    metrics = worker_metrics(2, "0.000000000001")
    await SnapshotPublisher(metrics.snapshot, other).publish()
    content = orjson.loads(other.path.read_bytes())
    assert content["group"] == "run-1" and content["pid"] == LIVE_PID and content["at"] == clock.now
    assert content["snapshot"] == orjson.loads(orjson.dumps(metrics.snapshot()))
    assert os.listdir(tmp_path / "metrics") == [f"worker-{LIVE_PID}.json"]  # no temporary file left
    scraped = await Metrics(peers=files(tmp_path, clock, os.getpid())).scrape()
    assert 'gateway_requests_total{route="/v1/chat/completions",status="2xx"} 2\n' in scraped
    assert 'gateway_cost_usd_total{tier="starter"} 0.000000000001\n' in scraped


@pytest.mark.anyio
async def test_a_publisher_that_cannot_write_says_so_once_and_keeps_going(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "metrics").write_text("a file where the directory should be")
    publisher = SnapshotPublisher(Metrics().snapshot, files(tmp_path, clock, os.getpid()))
    for _ in range(3):
        await publisher.publish()
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "cannot write this worker's metrics" in caplog.records[0].message
