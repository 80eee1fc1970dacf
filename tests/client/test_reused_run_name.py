"""A run folder name reused for a new run while the old run's job is VERIFIED keeps the old NAS copy.

Sequence (cleanup off: the default; a lab then frees disk space by hand):

1. Run_A is synced and VERIFIED; its NAS copy is verified.
2. The lab deletes the local Run_A (the dashboard says verified) and the
   instrument later starts a new acquisition under the same name, writing
   files with the same names (image_001.tif, sub/stack.raw, notes.txt) and
   new content. The new folder has no ``.exlab-wizard/checksums.sha256``.
3. The completion watcher adopts the folder (it has a job) and never looks
   again. The audit loop finds "no recorded manifest" and sends the old job
   back to QUEUED with no ``rewrite_paths`` (audit.py: ``recorded = {}``,
   ``bad = ()``); the damage check counts the new files as "edits" (later
   mtime); the push overwrites the old run's verified NAS files with the
   new run's bytes, keeping nothing under ``previous/``.

Rule 2: the only copy of the old run (verified on the NAS) was overwritten
by foreign data. Now the audit checks the NAS against the hashes the queue
recorded when the local manifest is gone, finds the run changed locally, and
the re-transfer keeps every verified NAS file it replaces under previous/.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

import exlab_wizard.sync.job_runner as job_runner
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, running, synced, write_files

S = SyncJobState

NEW = {
    "image_001.tif": b"N" * 3500,
    "sub/stack.raw": b"M" * 5500,
    "notes.txt": b"second acquisition, other sample\n",
}


def _nas_bytes(root: Path) -> set[bytes]:
    out: set[bytes] = set()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                out.add(hashlib.sha256(path.read_bytes()).digest())
    return out


@pytest.mark.parametrize("record", ["recorded", "not_recorded"])
async def test_reused_run_name_does_not_overwrite_the_old_runs_verified_nas_copy(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, record: str
) -> None:
    """``not_recorded``: the queue's record of the verified hashes was never written (a kill right
    after VERIFIED, or the handled error path), so no verified manifest is left anywhere once the
    local run is gone: the transfer keeps every data file of the NAS copy (found by a second review)."""
    if record == "not_recorded":

        def broken(*_a: object, **_k: object) -> None:
            raise OSError(28, "No space left on device")  # "verified file stats not recorded"

        monkeypatch.setattr(job_runner, "record_verified_stat", broken)
    clock = Clock()
    cfg = lab.config(audit_interval_s=6 * 3600, scan_interval_s=3600)
    assert not cfg.nas_cleanup.enabled  # the default
    run = lab.make_run("Run_A", files=FILES)
    async with running(cfg, clock) as client:
        job = await synced(client, run)
        monkeypatch.undo()
        nas = lab.nas_copy(run)
        old = {hashlib.sha256(data).digest() for data in FILES.values()}
        assert old <= _nas_bytes(nas)

        # The lab frees the disk by hand (the run is verified), and the name comes back for a new run.
        shutil.rmtree(run)
        time.sleep(0.05)
        lab.make_run("Run_A", files={})
        write_files(run, NEW, mtime=time.time() + 5)

        clock.advance(7)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        after = await client.job(run)
        assert after.id == job.id

        # The old run's verified bytes must still be on the NAS somewhere (in place or kept under previous/).
        lost = old - _nas_bytes(nas)
        assert not lost, (
            f"old run's verified NAS copy overwritten by a new run reusing its name: job {after.state.value}, "
            f"{len(lost)} of {len(old)} verified files gone from the NAS; events: "
            + "; ".join(f"{e.kind}:{e.detail}" for e in after.events[-6:])
        )
