"""Fixed (found by review): a send-back of a job whose local data the reaper has (partly) deleted leaves it FAILED for ever.

send_back_if_changed (called by enqueue for a VERIFIED/CLEANUP_ELIGIBLE job,
and by the audit after a pass) moves CLEANUP_ELIGIBLE -> QUEUED when a file was
added, without looking at the reaper's plan. The enqueue path does not even
check ``local_data_deleted_at`` (the audit does, but only before its long NAS
read). The reaper then drops its plan (``job left cleanup_eligible``), the
transfer sends the new file, and the verification finds the NAS holding the
verified copies of the deleted files: FAILED ``local_file_vanished``. A retry
does the same: the job never finishes (before the change, enqueue left a
CLEANUP_ELIGIBLE job alone and the reaper finished it).
"""

from __future__ import annotations

import time
from typing import Any

from exlab_wizard.sync.reaper import deletion
from exlab_wizard.sync.states import SyncJobState
from tests.client.test_audit_and_cleanup import first_final_push_fails
from tests.helpers import Clock
from tests.lab import FILES, Lab, acts, ready, running, write_files
from tests.lab import cleanup_config as config

S = SyncJobState
LATE = {"late/frame_0099.tif": b"L" * 4096}


async def _settle(client, run) -> Any:
    await client.wait_idle(timeout=60)
    await client.cleanup_once()
    await client.wait_idle(timeout=60)
    job = await client.job(run)
    if job.state == S.FAILED:
        await client.retry(job.id)
        await client.wait_idle(timeout=60)
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    return job


async def test_enqueue_after_the_data_was_deleted_does_not_strand_the_job(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, retain_cache=False)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        first_final_push_fails(client)  # the job waits in CLEANUP_ELIGIBLE, local data already deleted
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["waiting"]
        assert not any((run / rel).exists() for rel in FILES)

        write_files(run, LATE, mtime=time.time() + 2)  # a late frame lands in the folder
        await client.enqueue(run)  # the watcher / operator asks for it to be sent
        job = await _settle(client, run)
        assert job.state != S.FAILED, (
            f"stranded: job {job.state.value} {job.error_kind}: {job.last_error}; events: "
            + "; ".join(f"{e.kind}:{e.detail}" for e in job.events[-8:])
        )


async def test_enqueue_during_a_paused_deletion_does_not_strand_the_job(lab: Lab, monkeypatch) -> None:
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        real = deletion.delete_batch

        def power_cut(run_path, batch, *a: Any, **k: Any) -> Any:
            real(run_path, batch[:1], *a, **k)  # one file gone, then the power goes
            raise RuntimeError("power cut")

        monkeypatch.setattr(deletion, "delete_batch", power_cut)
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["error"]
        monkeypatch.setattr(deletion, "delete_batch", real)
        assert sum((run / rel).exists() for rel in FILES) == len(FILES) - 1

        write_files(run, LATE, mtime=time.time() + 2)
        await client.enqueue(run)
        job = await _settle(client, run)
        assert job.state != S.FAILED, (
            f"stranded: job {job.state.value} {job.error_kind}: {job.last_error}; events: "
            + "; ".join(f"{e.kind}:{e.detail}" for e in job.events[-8:])
        )
