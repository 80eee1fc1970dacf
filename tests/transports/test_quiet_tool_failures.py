"""A quiet tool step (a probe, a listing asked on every reaper pass) writes the same failure once an hour at most.

A NAS run folder that cannot be listed (its permissions changed on the NAS)
keeps a cleanup waiting for weeks, and the reaper lists it on every pass
(``scan_interval_s``, 30 s): one ``tool_exit`` line each time, 2,880 a day a
run, on the instrument's own disk. The queue records that wait once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.transports import _process
from exlab_wizard.sync.transports._process import run_tool


@pytest.fixture
def log(tmp_path: Path) -> EquipmentLog:
    (tmp_path / "lab" / "EQ_01").mkdir(parents=True)
    cfg = parse_config(
        {
            "equipment": [
                {
                    "id": "EQ_01",
                    "local_root": str(tmp_path / "lab"),
                    "transport": {"type": "mount", "mount_path": str(tmp_path / "nas")},
                }
            ],
            "state_dir": str(tmp_path / "state"),
        }
    )
    return EquipmentLog(cfg.equipment[0])


def _exits(log: EquipmentLog) -> list[str]:
    return [line for line in log.path.read_text().splitlines() if " tool_exit " in line] if log.path.exists() else []


async def _run(log: EquipmentLog, script: str, run: str = "/lab/EQ_01/P/Runs/R1", step: str = "remote_stats") -> int:
    result = await run_tool(["sh", "-c", script], log=log, run_path=run, step=step, quiet=True)
    return result.returncode


async def test_the_same_failure_is_written_once_then_again_when_it_changes_or_clears(log: EquipmentLog) -> None:
    for _ in range(5):
        assert await _run(log, "echo 'permission denied' >&2; exit 23") == 23
    assert len(_exits(log)) == 1
    await _run(log, "echo 'connection refused' >&2; exit 255")  # another failure: written
    assert len(_exits(log)) == 2
    await _run(log, "exit 0")  # a success writes nothing (quiet) and forgets the failure ...
    await _run(log, "echo 'connection refused' >&2; exit 255")  # ... so the next outage is written
    assert len(_exits(log)) == 3
    await _run(log, "echo 'connection refused' >&2; exit 255", run="/lab/EQ_01/P/Runs/R2")  # another run
    await _run(log, "echo 'connection refused' >&2; exit 255", step="conflict_check")  # another step
    assert len(_exits(log)) == 5


async def test_the_same_failure_is_written_again_after_an_hour(
    log: EquipmentLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_process, "QUIET_REPEAT_S", 0.0)
    for _ in range(3):
        await _run(log, "exit 23")
    assert len(_exits(log)) == 3


def test_what_differs_between_two_runs_of_the_same_failure_is_left_out_of_the_comparison() -> None:
    def same(a: str, b: str) -> bool:
        return _process.failure_text(a) == _process.failure_text(b)

    # rclone's clock, plain and in a JSON log record
    assert same(
        "2026/12/06 14:30:22 ERROR : error listing: directory not found\n"
        "2026/12/06 14:30:22 NOTICE: Failed to lsjson with 2 errors",
        "2026/12/07 09:01:02.123456 ERROR : error listing: directory not found\n"
        "2026/12/07 09:01:03 NOTICE: Failed to lsjson with 2 errors",
    )
    assert same(
        '{"level":"error","msg":"directory not found","source":"x.go:1","time":"2026-12-06T14:30:22.1+01:00"}',
        '{"level":"error","msg":"directory not found","source":"x.go:1","time":"2026-12-06T15:00:00.9+01:00"}',
    )
    # a connection's local port, bytes received before it dropped, an S3 request's ids
    assert same(
        "read tcp 10.0.0.2:54321->10.0.0.1:22: read: connection reset by peer",
        "read tcp 10.0.0.2:40000->10.0.0.1:22: read: connection reset by peer",
    )
    assert same(
        "rsync: connection unexpectedly closed (0 bytes received so far) [Receiver]",
        "rsync: connection unexpectedly closed (1234 bytes received so far) [Receiver]",
    )
    assert same(
        "StatusCode: 403, RequestID: 17A2B3C4D5E6F, HostID: abc=, api error AccessDenied",
        "StatusCode: 403, RequestID: 99FF00AA11BB2, HostID: xyz=, api error AccessDenied",
    )
    # what tells one failure from another stays
    assert not same("StatusCode: 403, api error AccessDenied", "StatusCode: 503, api error SlowDown")
    assert not same(
        "rsync error: some files could not be transferred (code 23) at main.c(1338) [sender=3.2.7]",
        "rsync error: error in rsync protocol data stream (code 12) at io.c(232) [sender=3.2.7]",
    )
    assert not same("ssh: connect to host nas port 22: Connection refused", "ssh: connect to host nas port 2222: x")


async def test_the_failures_remembered_are_capped(log: EquipmentLog, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run that ends without a later success (deleted, moved) is forgotten once others crowd it out.
    monkeypatch.setattr(_process, "QUIET_FAILURES_KEPT", 3)
    for n in range(5):
        await _run(log, "exit 23", run=f"/lab/EQ_01/P/Runs/R{n}")
    assert len(_process._QUIET_FAILURES) == 3
    assert len(_exits(log)) == 5
    await _run(log, "exit 23", run="/lab/EQ_01/P/Runs/R4")  # remembered: not written again
    assert len(_exits(log)) == 5
    await _run(log, "exit 23", run="/lab/EQ_01/P/Runs/R0")  # forgotten: written again
    assert len(_exits(log)) == 6
