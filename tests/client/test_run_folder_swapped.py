"""A run folder swapped during the verification: the other folder's bytes are never deleted on its stat.

The push hashes run A's files; while the NAS copy is read back for the
verification (minutes on a large run), the user renames the folder and puts
another run folder of the same name in its place (same instrument, fixed file
names, same sizes). The manifest then goes into that folder and the verified
stats are taken of *its* files; their times are older than the hashing, so
they were recorded as trusted, the reaper never read them, and it deleted
bytes that never reached the NAS (rule 1). A folder renamed or moved into
place since the hashing began has a new ctime: the files below it are now
recorded untrusted and read again before any deletion. The hook on ``_judge``
only places the renames in the verification's window.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from exlab_wizard.sync import job_runner
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, cleanup_config, running

S = SyncJobState
OTHER = {rel: bytes(255 - b for b in data) for rel, data in FILES.items()}  # same names and sizes


async def test_folder_swapped_during_verification_other_bytes_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab.build(tmp_path)
    clock = Clock()
    run = lab.make_run("Run_2026-01-01", files=FILES)
    other = lab.make_run("Run_2026-01-09", files=OTHER)  # not (yet) queued
    time.sleep(2.5)  # its files are older than the hashing by more than RACE_SLACK_NS

    real = job_runner._judge
    fired = []

    def hook(ctx, job, equipment, local_hashes, remote):  # type: ignore[no-untyped-def]
        if not fired and Path(job.run_path) == run:
            fired.append(1)
            os.rename(run, run.with_name("Run_2026-01-01_old"))
            os.rename(other, run)
        return real(ctx, job, equipment, local_hashes, remote)

    monkeypatch.setattr(job_runner, "_judge", hook)
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
        print([(o.action, getattr(o, "reason", None)) for o in outcomes], job.state, job.last_error)
        lost = [
            rel
            for rel, data in OTHER.items()
            if not (run / rel).exists() and not ((nas / rel).exists() and (nas / rel).read_bytes() == data)
        ]
        assert not lost, f"deleted with no NAS copy of their bytes: {lost}; job {job.state}"
