"""An equipment folder ``<local_root>/<id>`` that is a symbolic link to the instrument's data disk.

A common lab layout (``/data/lab/CONFOCAL_01 -> /mnt/confocal_data``), and
what a lab that moved its data to a new disk leaves behind. The completion
watcher follows the link at the equipment folder (as doctor, enqueue and the
reaper do), never one below it. An equipment folder that is really missing
is said once in the log, not at every pass, and shown where the service
reports equipment (``local_root_missing``).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from exlab_wizard.service.app import ServiceContext
from exlab_wizard.service.run_signals import list_runs
from exlab_wizard.sync.doctor import run_checks
from tests.service.conftest import EQ, WatchLab, start, stop


async def test_runs_under_a_linked_equipment_folder_are_synced_or_doctor_says_why(wlab: WatchLab) -> None:
    disk = wlab.root / "confocal_disk"
    disk.mkdir()
    os.symlink(disk, wlab.equipment_root)  # /data/lab/CONFOCAL_01 -> the instrument's data disk
    wlab.sync = {"enabled": True}
    cfg = wlab.config()
    run = wlab.finished_run()  # written through the link, as the instrument does

    checks = [c for c in await run_checks(cfg) if c.equipment == EQ]
    doctor_ok = all(c.ok for c in checks if c.name == "local_root")

    w = await start(cfg)
    try:
        report = await w.watcher.scan_once()
        await w.client.wait_idle(timeout=30)
        status = await w.client.status(run)
    finally:
        await stop(w)
    assert status != "none" or not doctor_ok, (
        f"a finished run under the linked equipment folder was never enqueued (status {status!r}, "
        f"skipped_equipment={report.skipped_equipment}, runs_seen={report.runs_seen}) while doctor says "
        f"{[(c.name, c.ok, c.detail) for c in checks if c.name == 'local_root']}"
    )
    assert status != "none" and report.skipped_equipment == []


def test_list_runs_sees_through_a_linked_equipment_folder(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    (disk / "PROJ-1" / "Runs" / "Run_1").mkdir(parents=True)
    (tmp_path / "lab").mkdir()
    os.symlink(disk, tmp_path / "lab" / EQ)
    listing = list_runs(tmp_path / "lab" / EQ)
    assert listing.runs == [str(tmp_path / "lab" / EQ / "PROJ-1" / "Runs" / "Run_1")], (
        listing.runs,
        listing.root_missing,
    )


def test_links_below_the_equipment_folder_are_still_not_followed(tmp_path: Path) -> None:
    (tmp_path / "elsewhere" / "Runs" / "Run_1").mkdir(parents=True)
    (tmp_path / "lab" / EQ).mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", tmp_path / "lab" / EQ / "PROJ-1")
    assert list_runs(tmp_path / "lab" / EQ).runs == []


async def test_a_missing_equipment_folder_is_logged_once_and_shown(
    wlab: WatchLab, caplog: pytest.LogCaptureFixture
) -> None:
    disk = wlab.root / "confocal_disk"
    disk.mkdir()
    os.symlink(disk, wlab.equipment_root)
    run = wlab.finished_run()
    os.rename(disk, wlab.root / "unmounted")  # the link now leads nowhere: the disk is away
    wlab.sync = {"enabled": True}
    cfg = wlab.config()
    w = await start(cfg)
    try:
        with caplog.at_level(logging.INFO, logger="exlab_wizard.service.watcher"):
            for _ in range(3):
                report = await w.watcher.scan_once()
                assert report.skipped_equipment == [EQ]
        missing = [r for r in caplog.records if "is missing" in r.getMessage()]
        assert len(missing) == 1 and EQ in missing[0].getMessage(), [r.getMessage() for r in caplog.records]
        assert w.watcher.missing_roots() == {EQ: str(wlab.equipment_root)}
        ctx = SimpleNamespace(watcher=w.watcher)
        assert ServiceContext.local_root_missing(ctx, EQ) is True  # type: ignore[arg-type]
        assert ServiceContext.local_root_missing(SimpleNamespace(watcher=None), EQ) is None  # type: ignore[arg-type]

        shutil.move(wlab.root / "unmounted", disk)  # the disk is back
        report = await w.watcher.scan_once()
        await w.client.wait_idle(timeout=30)
        assert report.skipped_equipment == [] and w.watcher.missing_roots() == {}
        assert ServiceContext.local_root_missing(ctx, EQ) is False  # type: ignore[arg-type]
        assert await w.client.status(run) != "none"
    finally:
        await stop(w)
