"""A cleaned run whose queue database was put back from a nightly backup taken before the cleanup.

The backup (SQLite's online backup API, as ``sqlite3 queue.db .backup`` does) is taken while the job
is VERIFIED (or while the reaper's deletion plan is written); the service goes on (edits, cleanup:
CLEANED, ``retain_cache: true``), the PC's disk fails, and the state folder is put back from it.

Before: the reaper failed the job ``local_file_vanished`` naming no way out, and ``retry``/``enqueue``
then failed it ``remote_conflict`` ("holds files that are not this run's"): its own verified copy
taken for another run's, for ever (``restore`` left it FAILED ``remote_conflict``). With a backup from
before an edit and a second verification, the audit failed it ``local_file_vanished`` for ever. Now:
CLEANED (nothing sent, nothing deleted), or FAILED ``local_file_vanished`` naming ``restore``.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.sync.reaper.passes import Reaper
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, cleanup_config, data_intact, held_files, ready, running

S = SyncJobState


def backup(db: Path, to: Path) -> None:
    src = sqlite3.connect(db)
    dst = sqlite3.connect(to)
    src.backup(dst)
    dst.close()
    src.close()


def put_back(db: Path, copy: Path) -> None:
    for path in db.parent.iterdir():
        if path.name.startswith(db.name):
            path.unlink()
    shutil.copyfile(copy, db)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab.build(tmp_path, equipment=(EQ,))


async def _cleaned_with_backup_at_verified(lab: Lab, tmp_path: Path) -> tuple[Path, Path, Clock]:
    run = lab.make_run("Run_1", files=FILES)
    cfg = cleanup_config(lab)
    clock = Clock()
    saved = tmp_path / "nightly.db"
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        backup(cfg.queue_db, saved)
        await client.cleanup_once()
        assert (await client.job(run)).state == S.CLEANED
    assert held_files(lab.nas_copy(run)) == FILES
    put_back(cfg.queue_db, saved)
    return run, cfg.queue_db, clock


def _drop_local_cleaned(run: Path) -> dict[str, object]:
    creation = run / ".exlab-wizard" / "creation.json"
    raw = json.loads(creation.read_bytes())
    record = raw.pop("local_cleaned")
    creation.write_text(json.dumps(raw))
    return record


def _put_local_cleaned(run: Path, record: dict[str, object]) -> None:
    creation = run / ".exlab-wizard" / "creation.json"
    raw = json.loads(creation.read_bytes())
    raw["local_cleaned"] = record
    creation.write_text(json.dumps(raw))


async def test_cleaned_run_with_queue_from_a_backup_taken_while_verified(lab: Lab, tmp_path: Path) -> None:
    run, _db, clock = await _cleaned_with_backup_at_verified(lab, tmp_path)
    nas = lab.nas_copy(run)
    async with running(cleanup_config(lab), clock) as client:
        clock.advance(7)
        await client.audit_once()
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        if job.state == S.FAILED:  # the lab's way out: retry
            await client.retry(job.id)
            await client.wait_idle(timeout=60)
            job = await client.job(run)
            assert job.error_kind != "remote_conflict", (
                "the run's own verified NAS copy is refused as another run's data, for ever: " + str(job.last_error)
            )
    assert held_files(nas) == FILES
    assert job.state in (S.CLEANED,), (job.state, job.error_kind, job.last_error)


async def test_edited_then_cleaned_run_with_queue_from_a_backup(lab: Lab, tmp_path: Path) -> None:
    """Backup at VERIFIED (manifest M1); the run is then edited, synced again (M2), cleaned; backup put back."""
    run = lab.make_run("Run_1", files=FILES)
    cfg = cleanup_config(lab)
    clock = Clock()
    saved = tmp_path / "nightly.db"
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        backup(cfg.queue_db, saved)
        target = run / "image_001.tif"
        st = os.stat(target)
        target.write_bytes(b"EDITED" + FILES["image_001.tif"][6:])
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 60_000_000_000))
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, job.last_error
        clock.advance(6)
        await client.audit_once()
        clock.advance(19)
        await client.cleanup_once()
        assert (await client.job(run)).state == S.CLEANED, (await client.job(run)).last_error
    nas = lab.nas_copy(run)
    expect = dict(held_files(nas))
    put_back(cfg.queue_db, saved)
    async with running(cfg, clock) as client:
        clock.advance(7)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert held_files(nas) == expect
    assert job.state in (S.CLEANED,), (job.state, job.error_kind, job.last_error)


async def test_its_local_checksums_lost_too_the_queues_manifest_stands(lab: Lab, tmp_path: Path) -> None:
    """The run's local checksums.sha256 lost as well (after a failure): the queue's verified manifest, whose
    digest the NAS's checksums.sha256 has, stands for it on ``retry``."""
    run, _db, clock = await _cleaned_with_backup_at_verified(lab, tmp_path)
    record = _drop_local_cleaned(run)
    async with running(cleanup_config(lab), clock) as client:
        clock.advance(7)
        await client.audit_once()
        await client.cleanup_once()
        job = await client.job(run)
        assert (job.state, job.error_kind) == (S.FAILED, "local_file_vanished"), (job.state, job.last_error)
        (run / ".exlab-wizard" / "checksums.sha256").unlink()
        _put_local_cleaned(run, record)
        await client.retry(job.id)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.CLEANED, (job.state, job.error_kind, job.last_error)
    assert held_files(lab.nas_copy(run)) == FILES


async def test_without_its_local_cleaned_record_it_fails_naming_restore_then_retry_settles(
    lab: Lab, tmp_path: Path
) -> None:
    """No ``local_cleaned`` record: FAILED ``local_file_vanished`` naming ``restore`` (not cleaned on a guess);
    with the record back, ``retry`` (and ``enqueue``) settle the job CLEANED, nothing pushed."""
    run, _db, clock = await _cleaned_with_backup_at_verified(lab, tmp_path)
    nas = lab.nas_copy(run)
    record = _drop_local_cleaned(run)
    async with running(cleanup_config(lab), clock) as client:
        clock.advance(7)
        await client.audit_once()
        await client.cleanup_once()
        job = await client.job(run)
        assert (job.state, job.error_kind) == (S.FAILED, "local_file_vanished"), (job.state, job.last_error)
        assert "exlab-sync restore" in (job.last_error or ""), job.last_error
        await client.retry(job.id)  # still no record: the same clear failure, never remote_conflict
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert (job.state, job.error_kind) == (S.FAILED, "local_file_vanished"), (job.state, job.last_error)
        assert "exlab-sync restore" in (job.last_error or ""), job.last_error
        _put_local_cleaned(run, record)
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.CLEANED, (job.state, job.error_kind, job.last_error)
    assert held_files(nas) == FILES
    assert not any((run / rel).exists() for rel in FILES)


async def test_restore_brings_the_run_back_and_verifies_it(lab: Lab, tmp_path: Path) -> None:
    run, _db, clock = await _cleaned_with_backup_at_verified(lab, tmp_path)
    _drop_local_cleaned(run)
    async with running(cleanup_config(lab), clock) as client:
        clock.advance(7)
        await client.audit_once()
        await client.cleanup_once()
        assert (await client.job(run)).error_kind == "local_file_vanished"
        await client.restore(run)
        assert data_intact(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.VERIFIED, (job.state, job.error_kind, job.last_error)
    assert held_files(lab.nas_copy(run)) == FILES


@pytest.fixture
def backup_at_plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The queue backed up right after the reaper wrote its deletion plan, before a file was deleted."""
    saved = tmp_path / "nightly.db"
    real = Reaper._execute

    async def execute(self: Reaper, *args: object, **kwargs: object) -> object:
        if not saved.exists():
            backup(self.queue.db_path, saved)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Reaper, "_execute", execute)
    yield saved


async def test_an_old_deletion_plan_whose_files_are_gone_finishes(
    lab: Lab, tmp_path: Path, backup_at_plan: Path
) -> None:
    run = lab.make_run("Run_1", files=FILES)
    cfg = cleanup_config(lab)
    clock = Clock()
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        await client.cleanup_once()
        assert (await client.job(run)).state == S.CLEANED
    assert backup_at_plan.exists()
    put_back(cfg.queue_db, backup_at_plan)
    async with running(cfg, clock) as client:
        assert (await client.job(run)).state == S.CLEANUP_ELIGIBLE
        clock.advance(1)
        await client.audit_once()
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.CLEANED, (job.state, job.error_kind, job.last_error)
    assert held_files(lab.nas_copy(run)) == FILES
