"""The job of a verified run whose folder was renamed or deleted: FAILED ``run_folder_missing`` after a day.

Run_A is verified, then renamed (Run_A -> Run_A_ok: a typo fixed); the new
name gets its own job. The old job used to stay VERIFIED or CLEANUP_ELIGIBLE
for ever, "run folder missing" at every audit, counted as verified and
reclaimable, and no command settled it (``retry`` wants FAILED, ``enqueue``
the folder). Now a run folder gone while its parent folder is there fails the
job after :data:`~exlab_wizard.sync.audit.RUN_FOLDER_GRACE`, nothing deleted;
``retry`` re-arms it once the folder is back, and refuses while it is not. A
missing parent (a disk or share away) is waited for however long it lasts,
and a job whose local data the reaper deleted is never failed for it.
"""

from __future__ import annotations

import os
import shutil

import pytest

from exlab_wizard.sync.audit import RUN_FOLDER_GRACE
from exlab_wizard.sync.nas_client import RunFolderMissingError
from exlab_wizard.sync.states import IllegalTransition, SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Site, data_intact, metadata_push_down, ready, running, synced

S = SyncJobState
GRACE_H = RUN_FOLDER_GRACE.total_seconds() / 3600


async def test_the_old_job_of_a_renamed_run_fails_after_a_day_and_not_before(site: Site) -> None:
    clock = Clock()
    cfg = site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": False},
    )
    run = site.make_run("Run_A", files=FILES)
    renamed = run.with_name("Run_A_ok")
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        os.rename(run, renamed)
        await ready(client, clock, renamed)
        await client.cleanup_once()
        assert (await client.job(renamed)).state == S.CLEANED
        hours = 0.0
        while hours < GRACE_H - 6:  # within the grace: it waits, as for a disk away
            clock.advance(3)
            hours += 3
            await client.audit_once()
            await client.cleanup_once()
        old = await client.job(run)
        assert old.state == S.CLEANUP_ELIGIBLE, (old.state, old.last_error)
        assert [e for e in old.events if e.code == "run_folder_missing"], [e.detail for e in old.events]
        for _ in range(4 * 7):  # the rest of a week of audits and cleanup passes
            clock.advance(6)
            await client.audit_once()
            await client.cleanup_once()
        old = await client.job(run)
        assert old.state == S.FAILED and old.error_kind == "run_folder_missing", (old.state, old.last_error)
        assert "the run folder is gone (renamed or deleted?) since " in old.last_error
        assert "nothing was deleted by the engine" in old.last_error
        assert f"exlab-sync retry {old.id}" in old.last_error
        assert sum(e.to_state == S.FAILED.value for e in old.events) == 1  # failed once, then left alone
        with pytest.raises(RunFolderMissingError):  # the folder is still not there: not re-armed
            await client.retry(old.id)
        assert (await client.job(run)).state == S.FAILED
    assert site.nas_copy(run).is_dir()  # the old job's NAS copy is left as it was


async def test_a_run_folder_that_comes_back_is_re_armed_by_retry(site: Site) -> None:
    clock = Clock()
    cfg = site.config(sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600})  # cleanup off
    run = site.make_run("Run_A", files=FILES)
    away = run.with_name("Run_A_elsewhere")
    async with running(cfg, clock) as client:
        await synced(client, run)
        os.rename(run, away)
        for _ in range(6):
            clock.advance(6)
            await client.audit_once()
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "run_folder_missing", (job.state, job.last_error)
        os.rename(away, run)
        await client.retry(job.id)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, job.last_error
    assert data_intact(run)


async def test_a_folder_back_within_the_grace_starts_the_wait_anew(site: Site) -> None:
    clock = Clock()
    cfg = site.config(sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600})
    run = site.make_run("Run_A", files=FILES)
    away = run.with_name("Run_A_elsewhere")
    async with running(cfg, clock) as client:
        await synced(client, run)
        for _ in range(2):  # away for most of a day, back for an audit, twice
            os.rename(run, away)
            for _ in range(3):
                clock.advance(6)
                await client.audit_once()
            os.rename(away, run)
            clock.advance(6)
            await client.audit_once()
        job = await client.job(run)
    assert job.state == S.VERIFIED, (job.state, job.last_error)


async def test_a_missing_parent_folder_is_a_disk_away_and_is_waited_for(site: Site) -> None:
    clock = Clock()
    cfg = site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
    )
    run = site.make_run("Run_A", files=FILES)
    parent = run.parent
    away = parent.with_name(parent.name + "_unplugged")
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        os.rename(parent, away)
        for _ in range(4 * 7):  # a week away
            clock.advance(6)
            await client.audit_once()
            await client.cleanup_once()
        job = await client.job(run)
        assert job.state == S.CLEANUP_ELIGIBLE, (job.state, job.last_error)
        with pytest.raises(IllegalTransition):
            await client.retry(job.id)
        os.rename(away, parent)
        await client.cleanup_once()
        job = await client.job(run)
    assert job.state == S.CLEANED, (job.state, job.last_error)


@pytest.mark.parametrize("site", ["mount"], indirect=True)  # the final push is held back on the mount transport
async def test_a_run_whose_local_data_the_reaper_deleted_is_never_failed_for_its_folder(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``retain_cache: false``, the final metadata push not through: the job waits in CLEANUP_ELIGIBLE with its
    data deleted. Its folder removed by hand then is the cleanup's own end, not a lost run."""
    clock = Clock()
    cfg = site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": False},
    )
    run = site.make_run("Run_A", files=FILES)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        metadata_push_down(monkeypatch)  # the final push: held back
        await client.cleanup_once()
        assert not any((run / rel).exists() for rel in FILES)
        shutil.rmtree(run)
        for _ in range(4 * 7):
            clock.advance(6)
            await client.audit_once()
        job = await client.job(run)
    assert job.state == S.CLEANUP_ELIGIBLE, (job.state, job.last_error)
