"""A full instrument disk is freed by the cleanup, whose equipment log lives on it.

The lab's local root sits on a small tmpfs; a run is synced and verified,
cleanup is on (one pass, no age), then the instrument fills the disk to the
last byte (which is why a lab turns cleanup on). The reaper's equipment-log
lines (``cleanup_planned`` before it deletes anything) go to that very disk:
they used to raise ENOSPC, an ``error`` outcome at every pass, and the disk
was never freed. The durable record is the plan in the queue (the state dir,
another disk): rule 1 holds through it, and when the state dir is the full
one nothing is deleted at all.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.config import Config
from tests.helpers import Clock
from tests.lab import Lab, running, synced

FILES = {"image_001.tif": b"A" * 200_000, "sub/stack.raw": b"B" * 100_000}
SCRATCH = "instrument_scratch.bin"


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    assert os.geteuid() == 0, "a tmpfs mount needs root"  # fails, never skips, without it


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path, log: Path | None = None) -> None:
    """Fill the file system of ``folder`` to the last byte, the last page of ``log`` too."""
    with open(folder / SCRATCH, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    if log is not None and log.exists():  # the log's last page: blank lines until no byte more fits
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\n")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)


def one_pass_config(lab: Lab) -> Config:
    cfg = lab.config(scan_interval_s=3600)
    return cfg.model_copy(
        update={
            "nas_cleanup": cfg.nas_cleanup.model_copy(
                update={"enabled": True, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": True}
            )
        }
    )


async def test_cleanup_frees_a_full_instrument_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="exlab_wizard")
    with small_tmpfs(tmp_path / "lab", "2m"):
        lab = Lab.build(tmp_path, equipment=("CONFOCAL_01",))
        cfg = one_pass_config(lab)
        run = lab.make_run(files=FILES)
        clock = Clock()
        async with running(cfg, clock) as client:
            await synced(client, run)
            log = lab.equipment_log()
            fill(lab.local_root, log)
            lines_before = log.read_bytes()
            free_before = shutil.disk_usage(lab.local_root).free
            outcomes = []
            for _ in range(3):  # three passes: a stuck job stays stuck
                outcomes.append([(o.action, o.reason) for o in await client.cleanup_once() if o.action != "promoted"])
            job = await client.job(run)
            free_after = shutil.disk_usage(lab.local_root).free
            after = log.read_bytes()
        assert (lab.local_root / SCRATCH).exists()  # the instrument's own file is not ours to touch
        # The log, kept whole: what the full disk refused is missing, what came once space was back is there.
        assert after.startswith(lines_before)
        added = after[len(lines_before) :].decode().splitlines()
        assert [line.split()[3] for line in added] == ["cleanup_deleted"], added
    # The cleanup went through: it is what frees the disk.
    assert job.state.value == "cleaned", (outcomes, [(e.kind, e.detail) for e in job.events][-6:])
    assert outcomes[0] == [("deleted", outcomes[0][0][1])], outcomes
    assert not (run / "image_001.tif").exists() and not (run / "sub/stack.raw").exists()
    # The run's bytes are free again (less the page the cleanup_deleted line then took).
    assert free_after - free_before >= sum(len(data) for data in FILES.values()) - 4096
    # Rule 1: the plan was recorded in the queue (its durable record) before the deletion.
    kinds = [e.kind for e in job.events]
    assert kinds.index("cleanup_planned") < kinds.index("cleanup_deleted")
    # The central log says the equipment log was unwritable, once, and that it is written again.
    messages = [r.getMessage() for r in caplog.records if r.name == "exlab_wizard.sync.equipment_log"]
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"equipment log {log} unwritable: No space left on device")
    assert messages[1].startswith(f"equipment log {log} written again")


async def test_nothing_is_deleted_when_the_state_dir_is_full(tmp_path: Path) -> None:
    # Rule 1 the other way round: the plan cannot be recorded (the state dir is full), so nothing goes.
    lab = Lab.build(tmp_path, equipment=("CONFOCAL_01",))
    with small_tmpfs(lab.state, "4m"):
        cfg = one_pass_config(lab)
        run = lab.make_run(files=FILES)
        clock = Clock()
        async with running(cfg, clock) as client:
            await synced(client, run)
            fill(lab.state)
            outcomes = [(o.action, o.reason) for o in await client.cleanup_once() if o.action != "promoted"]
            assert [action for action, _ in outcomes] == ["error"], outcomes
            assert "full" in outcomes[0][1], outcomes
            assert (run / "image_001.tif").read_bytes() == FILES["image_001.tif"], outcomes
            assert (run / "sub/stack.raw").read_bytes() == FILES["sub/stack.raw"], outcomes
            (lab.state / SCRATCH).unlink()  # space is back: the next pass cleans
            outcomes = [(o.action, o.reason) for o in await client.cleanup_once() if o.action != "promoted"]
            job = await client.job(run)
    assert job.state.value == "cleaned", outcomes
    assert not (run / "image_001.tif").exists()
