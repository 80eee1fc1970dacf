"""A run whose cleanup stopped part way is synced again after ``restore`` and ``retry``.

Found by review: it could never be synced again.

docs/cleanup.md: a planned file changed while the reaper deleted (an
instrument writing a late correction into f04.bin) stops the deletion:
FAILED ``local_changed_during_cleanup``, "every one of them has a verified
NAS copy". The job then waits for a person, but none of the operator's
actions ends it:

- ``exlab-sync retry`` re-arms it; the push first moves the verified NAS
  copy of the edited file under ``previous/``, then refuses the run's own
  folder as someone else's (``remote_conflict``: "holds 4 entries that are
  not in this run" -- the run's own verified files the reaper deleted
  locally), nothing sent; again on every retry;
- ``exlab-sync restore`` restores only damaged files: "nothing to restore";
- the documented way out of ``remote_conflict`` (docs/recovery.md: rename
  the NAS folder aside, retry, "remove the renamed folder once you have
  compared it") leaves the deleted files' only copies in the folder the
  operator is told to remove.

So the edit never reached the NAS and the job was FAILED for ever in a
legitimate situation. Now: after ``restore`` (bringing back the files
the stopped cleanup deleted, from their verified NAS copies) and/or
``retry``, the job is verified again with the edit on the NAS, and every
file the cleanup deleted still has its verified copy in the NAS run folder.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from exlab_wizard.sync.nas_client import RestoreError
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import Lab, cleanup_config, deletion_killed_after_two, ready, running

S = SyncJobState
FILES = {f"f{i:02d}.bin": bytes([65 + i]) * 100 for i in range(6)}
EDIT = b"corrected by the instrument while the reaper deleted"


async def test_a_run_whose_cleanup_stopped_part_way_can_be_synced_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab.build(tmp_path)
    run = lab.make_run("Run_2026-01-01", files=FILES)
    clock = Clock()
    async with running(cleanup_config(lab), clock) as client:
        await ready(client, clock, run)
        with deletion_killed_after_two(monkeypatch):
            await client.cleanup_once()
        (run / "f04.bin").write_bytes(EDIT)  # a planned file edited before the deletion resumes
        await client.cleanup_once()
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "local_changed_during_cleanup", job.last_error
        deleted = sorted(rel for rel in FILES if not (run / rel).exists())
        assert deleted  # part of the run is gone locally, verified on the NAS

        # The operator's ways out, each tried a few times.
        for _ in range(3):
            with contextlib.suppress(RestoreError):
                await client.restore(run)
            job = await client.job(run)
            if job.state == S.FAILED:
                await client.retry(job.id)
            await client.wait_idle(timeout=60)
        job = await client.job(run)

    nas = lab.nas_copy(run)
    for rel in deleted:  # nothing lost meanwhile
        assert (nas / rel).is_file() and (nas / rel).read_bytes() == FILES[rel], rel
    assert job.state == S.VERIFIED, (
        f"job stuck {job.state.value} {job.error_kind}: {job.last_error}; "
        f"the edit on the NAS: {(nas / 'f04.bin').exists() and (nas / 'f04.bin').read_bytes() == EDIT}"
    )
    assert (nas / "f04.bin").read_bytes() == EDIT
