"""A parent folder of the run swapped during the verification: the other run's bytes are never deleted on their stat.

As tests/client/test_run_folder_swapped.py, but the project folder is swapped
(PROJ-1 <-> PROJ-2, each holding a run of the same name, fixed file names and
sizes): the run folder now at the job's path was never renamed itself, so its
ctime and its files' times are older than the hashing. The record now
compares the run folder's (device, inode) with the one the hashing began in.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from exlab_wizard.sync import job_runner
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, cleanup_config, running

S = SyncJobState
OTHER = {rel: bytes(255 - b for b in data) for rel, data in FILES.items()}  # same names and sizes


async def test_parent_folder_swapped_during_verification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab.build(tmp_path)
    clock = Clock()
    run = lab.make_run("Run_2026-01-01", files=FILES)
    other = lab.make_run("Run_2026-01-01", files=OTHER, project="PROJ-2")  # not queued
    proj1 = lab.local_root / EQ / "PROJ-1"
    proj2 = lab.local_root / EQ / "PROJ-2"
    assert run.is_relative_to(proj1) and other.is_relative_to(proj2)
    time.sleep(2.5)  # older than the hashing by more than RACE_SLACK_NS

    real = job_runner._judge
    fired = []

    def hook(ctx, job, equipment, local_hashes, remote):  # type: ignore[no-untyped-def]
        if not fired and Path(job.run_path) == run:
            fired.append(1)
            os.rename(proj1, proj1.with_name("PROJ-1_old"))
            os.rename(proj2, proj1)  # the run folder now at `run` was never renamed itself
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
