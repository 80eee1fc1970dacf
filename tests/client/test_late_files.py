"""Files an instrument writes after the run was judged finished are sent, or reported (they used not to be).

docs/engine.md: "A run edited after it was verified goes back to QUEUED
through the reaper or the audit loop". The audit compares only the NAS copy
with the recorded manifest; the reaper's local check (interlock 6) runs only
for CLEANUP_ELIGIBLE jobs, and a job is promoted only with cleanup enabled.
With ``nas_cleanup.enabled: false`` (the default) a file added after
VERIFIED is never sent, the job stays VERIFIED ("synced" on the dashboard),
no event says anything, and ``enqueue`` by hand answers "queued" while
doing nothing ("re-arms only a FAILED job"). The same after CLEANED with
``retain_cache: true`` (the run folder stays): a file added later is never
sent and never reported.

Now the audit (and a manual enqueue) sends a verified run whose files were
added to or edited back to QUEUED, cleanup on or off; a cleaned run's new data
files are reported (``late_data``) at every audit pass.
"""

from __future__ import annotations

import time

from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, ready, running, synced, write_files
from tests.lab import cleanup_config as config

S = SyncJobState
LATE = {"late/frame_0099.tif": b"L" * 4096}


async def test_file_written_after_verified_is_sent_or_reported_with_cleanup_off(lab: Lab) -> None:
    clock = Clock()
    cfg = lab.config(audit_interval_s=6 * 3600, scan_interval_s=3600)
    assert not cfg.nas_cleanup.enabled  # the default
    run = lab.make_run("Run_late", files=FILES)
    async with running(cfg, clock) as client:
        job = await synced(client, run)
        n_events = len(job.events)

        # The instrument was not done: one more frame lands in a new subfolder after VERIFIED.
        write_files(run, LATE, mtime=time.time() + 2)

        for _ in range(8):  # two days of audits and cleanup passes
            clock.advance(6)
            await client.audit_once()
            await client.cleanup_once()
        handle = await client.enqueue(run)  # the operator asks for it to be sent
        await client.wait_idle(timeout=60)
        after = await client.job(run)

        sent = (lab.nas_copy(run) / "late" / "frame_0099.tif").is_file()
        told = after.state != S.VERIFIED or any("late/frame_0099.tif" in (e.detail or "") for e in after.events)
        assert sent or told, (
            f"late file never sent and never reported: job {after.state.value}, enqueue answered "
            f"{handle.state.value}; events since: {[e.kind for e in after.events[n_events:]]}"
        )


async def test_file_written_after_cleaned_is_sent_or_reported(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab)  # cleanup on, retain_cache: true (the run folder stays)
    run = lab.make_run("Run_late2", files=FILES)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        await client.cleanup_once()
        job = await client.job(run)
        assert job.state == S.CLEANED
        write_files(run, LATE, mtime=time.time() + 2)
        for _ in range(8):
            clock.advance(6)
            await client.audit_once()
            await client.cleanup_once()
        handle = await client.enqueue(run)
        await client.wait_idle(timeout=60)
        after = await client.job(run)

        sent = (lab.nas_copy(run) / "late" / "frame_0099.tif").is_file()
        told = after.state != S.CLEANED or after.events[-1] != job.events[-1]
        assert sent or told, (
            f"file added after CLEANED never sent and never reported; enqueue answered {handle.state.value} "
            f"for a {after.state.value} job"
        )
