"""A folder bind-mounted over a run's subfolder during the verification never has its files deleted (rule 1).

The push hashes the run's files; while the NAS copy is read back, someone on
the instrument PC bind-mounts another folder (same file names and sizes,
other bytes, files and folder older than the hashing) over ``<run>/sub``.
A bind mount changes no ctime and, on the same file system, shows the
source folder's own (device, inode): the folder-ctime and run-folder checks
of ``record_verified_stat`` both passed, the other folder's stats were
recorded as trusted beside the run's hashes, the reaper never read those
files, and it unlinked them through the mount point: bytes that never
reached the NAS, job CLEANED. Now the verified stats below a mount point are
not trusted and the reaper waits while the run holds one
(``run holds a mount point: sub``).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from exlab_wizard.sync import job_runner
from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, act_once_in, cleanup_config, running

S = SyncJobState
OTHER = {rel: bytes(255 - b for b in data) for rel, data in FILES.items()}  # same names and sizes


async def test_a_subfolder_bind_mounted_during_the_verification_never_has_its_bytes_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert os.geteuid() == 0, "a bind mount needs root"  # fails, never skips, without it
    lab = Lab.build(tmp_path)
    clock = Clock()
    run = lab.make_run("Run_2026-01-01", files=FILES)
    elsewhere = tmp_path / "elsewhere" / "sub"  # e.g. another disk's analysis folder
    elsewhere.mkdir(parents=True)
    (elsewhere / "stack.raw").write_bytes(OTHER["sub/stack.raw"])
    time.sleep(2.5)  # older than the hashing by more than RACE_SLACK_NS
    mounted: list[Path] = []

    def mount_over_sub() -> None:
        subprocess.run(["mount", "--bind", str(elsewhere), str(run / "sub")], check=True)
        mounted.append(run / "sub")

    fired = act_once_in(
        monkeypatch, job_runner, "_judge", lambda ctx, job, *_: Path(job.run_path) == run, mount_over_sub
    )
    try:
        async with running(cleanup_config(lab), clock) as client:
            await client.enqueue(run)
            await client.wait_idle(timeout=60)
            job = await client.job(run)
            assert fired and job.state == S.VERIFIED, (job.state, job.last_error)
            nas = lab.nas_copy(run)
            clock.advance(6)
            await client.audit_once()
            clock.advance(19)
            outcomes = await client.cleanup_once()
            job = await client.job(run)
            theirs = elsewhere / "stack.raw"
            nas_has_them = (nas / "sub/stack.raw").is_file() and (nas / "sub/stack.raw").read_bytes() == OTHER[
                "sub/stack.raw"
            ]
            assert theirs.exists() or nas_has_them, (
                f"{theirs} (bytes never sent to the NAS) was deleted through the bind mount; job {job.state}"
            )
            assert theirs.read_bytes() == OTHER["sub/stack.raw"]
            assert job.state != S.CLEANED
            last = [o for o in outcomes if o.run_path == str(run)][-1]
            assert (last.action, last.code, last.reason) == (
                "waiting",
                CleanupCode.RUN_HOLDS_MOUNT,
                "run holds a mount point: sub",
            )
    finally:
        for target in mounted:
            subprocess.run(["umount", str(target)], check=False)
