"""A run cleaned (part way or whole) whose queue was then lost is not taken for someone else's.

The reaper deletes two of a run's three data files and the process dies (power cut, kill); before
``serve`` comes back the state folder is lost (new PC / new user profile, same local_root and NAS).
The run is enqueued again (watcher or by hand). Its local ``.exlab-wizard/checksums.sha256`` is the
very file its NAS folder holds (docs/recovery.md: it "stands for" the lost verified manifest), and
the files it lacks locally are exactly ones that manifest lists, verified on the NAS.

Before: FAILED ``remote_conflict``, "the remote run folder holds files that are not this run's ...
never overwriting someone else's data" (false: they are this run's own verified files), and no
command got it out: ``restore`` said "no verified checksums.sha256 to restore against", ``retry``
and ``enqueue`` failed the same way again. Now: FAILED ``local_file_vanished`` naming the files and
``restore``, which brings them back; the transfer then verifies the run. A run cleaned whole
(``retain_cache: true``) whose ``creation.json`` records ``local_cleaned`` of that manifest is
CLEANED again, nothing sent. And a QUEUED job whose equipment's local_root changed fails at once
saying so (it failed ``unknown`` on a ``ValueError``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from exlab_wizard.sync.nas_client import NASSyncClient
from exlab_wizard.sync.states import SyncJobState
from tests.client.test_queue_lost_local_damage import lose_queue
from tests.helpers import Clock
from tests.lab import FILES, Site, data_intact, deletion_killed_after_two, held_files, ready_run, running

S = SyncJobState
CLEANUP = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True}
SYNC = {"audit_interval_s": 6 * 3600, "scan_interval_s": 3600}


async def _half_cleaned_then_queue_lost(site: Site, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Clock]:
    async with ready_run(site, site.config(cleanup=CLEANUP, sync=SYNC), name="Run_1") as (client, clock, run):
        with deletion_killed_after_two(monkeypatch):
            await client.cleanup_once()  # two of three data files deleted, then the process "dies"
    assert sum((run / rel).exists() for rel in FILES) == 1
    lose_queue(site.state)
    return run, clock


async def _cleaned_then_queue_lost(site: Site) -> tuple[Path, Clock]:
    async with ready_run(site, site.config(cleanup=CLEANUP, sync=SYNC), name="Run_1") as (client, clock, run):
        await client.cleanup_once()
        assert (await client.job(run)).state == S.CLEANED
    assert not any((run / rel).exists() for rel in FILES)
    lose_queue(site.state)
    return run, clock


@contextlib.asynccontextmanager
async def _enqueued_again(site: Site, clock: Clock, run: Path) -> AsyncIterator[NASSyncClient]:
    """A new client over the site whose queue was lost, the run enqueued again (watcher or by hand), idle."""
    async with running(site.config(cleanup=CLEANUP, sync=SYNC), clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        yield client


async def test_a_half_cleaned_run_whose_queue_was_lost_is_not_called_someone_elses(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, clock = await _half_cleaned_then_queue_lost(site, monkeypatch)
    nas = site.nas_copy(run)
    async with _enqueued_again(site, clock, run) as client:
        job = await client.job(run)
    assert held_files(nas) == FILES  # rule 2 holds: nothing written over the verified copy
    assert job.error_kind != "remote_conflict", (
        "the run's own verified NAS copy (its checksums.sha256 is the NAS's) is refused as another "
        f"run's data, with no way out: {job.last_error}"
    )
    assert (job.state, job.error_kind) == (S.FAILED, "local_file_vanished"), (job.state, job.last_error)
    gone = [rel for rel in FILES if not (run / rel).exists()]
    assert all(rel in (job.last_error or "") for rel in gone), job.last_error
    assert "exlab-sync restore" in (job.last_error or ""), job.last_error


async def test_restore_brings_back_the_files_a_stopped_cleanup_deleted_after_the_queue_was_lost(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, clock = await _half_cleaned_then_queue_lost(site, monkeypatch)
    nas = site.nas_copy(run)
    async with _enqueued_again(site, clock, run) as client:
        try:
            result = await client.restore(run)
            restored = (result.ok, result.restored)
        except Exception as exc:
            restored = (False, f"{type(exc).__name__}: {exc}")
        assert data_intact(run), f"restore left the run partial for ever: {restored}"
        job = await client.job(run)
        if job.state == S.FAILED:
            await client.retry(job.id)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.VERIFIED, (job.state, job.last_error)
    assert held_files(nas) == FILES


async def test_a_cleaned_run_whose_queue_was_lost_is_cleaned_again(site: Site) -> None:
    run, clock = await _cleaned_then_queue_lost(site)
    nas = site.nas_copy(run)
    async with _enqueued_again(site, clock, run) as client:
        job = await client.job(run)
    assert job.state == S.CLEANED, (job.state, job.error_kind, job.last_error)
    assert job.manifest_digest
    assert held_files(nas) == FILES
    assert not any((run / rel).exists() for rel in FILES)


async def test_a_cleaned_run_without_its_local_cleaned_record_fails_naming_restore(site: Site) -> None:
    """No ``local_cleaned`` of that manifest: not settled as cleaned on a guess, but the same clear failure."""
    run, clock = await _cleaned_then_queue_lost(site)
    creation = run / ".exlab-wizard" / "creation.json"
    raw = json.loads(creation.read_bytes())
    del raw["local_cleaned"]
    creation.write_text(json.dumps(raw))
    async with _enqueued_again(site, clock, run) as client:
        job = await client.job(run)
    assert (job.state, job.error_kind) == (S.FAILED, "local_file_vanished"), (job.state, job.last_error)
    assert "exlab-sync restore" in (job.last_error or ""), job.last_error
    assert held_files(site.nas_copy(run)) == FILES
