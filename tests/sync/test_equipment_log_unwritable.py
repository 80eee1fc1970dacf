"""An equipment log that cannot be written stops nothing, and the central log says so once.

The equipment log is a human-readable trail on the instrument's disk; the
queue holds the durable records. A line the log cannot take (a full, read-only
or failing disk) is dropped: ``write`` returns False and never raises, the
central log (``logging``) says "equipment log X unwritable: <reason>" at most
once an interval, and once more when the log can be written again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync import equipment_log
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.states import SyncJobState
from tests.lab import VERIFIED_FILES, VerifiedLab

LOGGER = "exlab_wizard.sync.equipment_log"


def equipment(local_root: Path) -> EquipmentConfig:
    return EquipmentConfig.model_validate(
        {"id": "CONF_01", "local_root": str(local_root), "transport": {"type": "mount", "mount_path": "/nas"}}
    )


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def block(log: EquipmentLog) -> None:
    """Make the log's path a folder: every write fails (EISDIR), as for root on a read-only disk."""
    log.path.mkdir(parents=True)


def unblock(log: EquipmentLog) -> None:
    log.path.rmdir()


def test_a_line_that_cannot_be_written_is_dropped_and_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    log = EquipmentLog(equipment(tmp_path / "lab"))
    block(log)
    assert [log.info("/run", "tool_exit", rc=255) for _ in range(50)] == [False] * 50
    assert log.last_error == os.strerror(errno.EISDIR)
    assert messages(caplog) == [
        f"equipment log {log.path} unwritable: Is a directory (its lines are dropped until it can be written "
        f"again; the queue keeps the records)"
    ]
    unblock(log)
    assert log.warning("/run", "cleanup_deleted", files=2) is True
    assert log.last_error is None
    assert messages(caplog)[1:] == [
        f"equipment log {log.path} written again (49 more lines were dropped after the last report)"
    ]
    assert log.path.read_text().split()[1:4] == ["WARNING", "/run", "cleanup_deleted"]


def test_an_unwritable_log_is_reported_again_after_the_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    log = EquipmentLog(equipment(tmp_path / "lab"))
    block(log)
    try:
        log.info("/run", "a")
        log.info("/run", "b")
        monkeypatch.setattr(equipment_log, "UNWRITABLE_REPORT_INTERVAL_S", 0.0)
        log.info("/run", "c")
        assert messages(caplog)[1] == (
            f"equipment log {log.path} still unwritable: Is a directory (2 lines dropped since the last report)"
        )
        # Another EquipmentLog of the same file shares what was reported (one report per log file).
        monkeypatch.setattr(equipment_log, "UNWRITABLE_REPORT_INTERVAL_S", 3600.0)
        assert EquipmentLog(equipment(tmp_path / "lab")).info("/run", "d") is False
        assert len(messages(caplog)) == 2
    finally:
        unblock(log)
        log.info("/run", "back")


@contextlib.contextmanager
def small_tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_line_cut_short_by_a_full_disk_leaves_the_next_one_whole(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "a tmpfs mount needs root"  # fails, never skips
    with small_tmpfs(tmp_path / "lab") as root:
        log = EquipmentLog(equipment(root))
        assert log.info("/run", "first")
        scratch = root / "scratch.bin"
        with open(scratch, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        # The log's last page keeps 10 bytes free: a line is taken in part, the rest refused.
        page = os.statvfs(root).f_bsize
        with open(log.path, "ab") as f:
            f.write(b"\n" * (page - log.path.stat().st_size % page - 10))
        assert log.info("/run", "cut_short", path="a name with spaces") is False
        assert log.last_error == os.strerror(errno.ENOSPC)
        scratch.unlink()
        assert log.info("/run", "whole", path="a name with spaces") is True
        lines = [line for line in log.path.read_text().splitlines() if line]
    assert lines[-1].split()[1:4] == ["INFO", "/run", "whole"]
    assert json.loads(lines[-1].split("path=", 1)[1]) == "a name with spaces"
    assert len(lines[-2]) == 10 and lines[-2][:4].isdigit()  # the cut line alone on its own line


def test_the_reaper_frees_the_disk_when_the_equipment_log_cannot_be_written(tmp_path: Path) -> None:
    lab = VerifiedLab.build(tmp_path)
    try:
        run, job_id = lab.make_run(eligible=True)
        log = lab.log_for(lab.EQ)
        shutil.rmtree(log.path.parent, ignore_errors=True)
        block(log)
        outcomes = lab.run_pass()
        assert [o.action for o in outcomes] == ["deleted"], [(o.action, o.reason) for o in outcomes]
        job = lab.job(job_id)
        assert job.state == SyncJobState.CLEANED
        assert not any((run / rel).exists() for rel in VERIFIED_FILES)
        events = lab.queue.events(job_id)
        kinds = [e.kind for e in events]
        assert kinds.index("cleanup_planned") < kinds.index("cleanup_deleted")
        # The queue's deletion event is the record, and says the equipment log could not hold it.
        deleted = next(e for e in events if e.kind == "cleanup_deleted")
        assert deleted.detail.endswith(f"; equipment log {log.path} unwritable (Is a directory): this is the record")
    finally:
        lab.queue.close()
