"""A run folder swapped during the verification: the other folder's bytes are never deleted on their stat.

The push hashes the run's files; while the NAS copy is read back for the
verification (minutes on a large run), the user puts another run folder of
the same name in its place (same instrument, fixed file names, same sizes):
the run folder itself renamed, or a folder above it (PROJ-1 and PROJ-2
swapped, each with a run of the same name). The manifest then went into that
folder and the verified stats were taken of *its* files; their times are
older than the hashing, so they were recorded as trusted, the reaper never
read them, and it deleted bytes that never reached the NAS (rule 1). Now a
folder of the run renamed or moved into place since the hashing began (a new
ctime), or another folder at the run's path (device, inode), makes the files
untrusted: read again before any deletion. The hook on ``_judge`` only places
the renames in the verification's window.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from exlab_wizard.sync import job_runner
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, act_once_in, cleanup_config, running, swap_folder

S = SyncJobState
OTHER = {rel: bytes(255 - b for b in data) for rel, data in FILES.items()}  # same names and sizes


@pytest.mark.parametrize("swapped", ["run folder", "project folder above it"])
async def test_a_folder_swapped_during_the_verification_never_has_its_bytes_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swapped: str
) -> None:
    lab = Lab.build(tmp_path)
    clock = Clock()
    run = lab.make_run("Run_2026-01-01", files=FILES)
    if swapped == "run folder":
        other = lab.make_run("Run_2026-01-09", files=OTHER)  # not queued
        mine, theirs = run, other
    else:
        lab.make_run("Run_2026-01-01", files=OTHER, project="PROJ-2")  # not queued
        mine, theirs = lab.local_root / EQ / "PROJ-1", lab.local_root / EQ / "PROJ-2"
    time.sleep(2.5)  # their files are older than the hashing by more than RACE_SLACK_NS

    fired = act_once_in(
        monkeypatch,
        job_runner,
        "_judge",
        lambda ctx, job, *_: Path(job.run_path) == run,
        lambda: swap_folder(mine, theirs),
    )
    async with running(cleanup_config(lab), clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert fired and job.state == S.VERIFIED, (job.state, job.last_error)
        nas = lab.nas_copy(run)
        clock.advance(6)
        await client.audit_once()
        clock.advance(19)
        await client.cleanup_once()
        job = await client.job(run)
        lost = [
            rel
            for rel, data in OTHER.items()
            if not (run / rel).exists() and not ((nas / rel).exists() and (nas / rel).read_bytes() == data)
        ]
        assert not lost, f"deleted with no NAS copy of their bytes: {lost}; job {job.state}"
