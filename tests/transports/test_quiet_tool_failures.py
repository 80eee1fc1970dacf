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
