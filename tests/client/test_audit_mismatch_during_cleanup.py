"""An audit that finds the NAS copy bad while the run's deletion is under way stops it.

Found by the torture harness (seed 13, round 12, mount, cleanup with one pass
and no age): a NAS byte of ``Run_0003/stack.raw`` flipped right after its
verification; the reaper planned the run's deletion and was killed part way;
after the restart the audit found the mismatch, saw the local ``stack.raw``
still there and sent the job back to QUEUED (``rewrite=stack.raw``), while
the reaper's resumed plan, which checked the job's state only before each
batch of unlinks, went on deleting: the local ``stack.raw`` (the only good
copy) and the tiles. The re-transfer then kept the flipped NAS copy under
``previous/`` and failed ``remote_conflict`` ("already holds 32 entries that
are not in this run": the run's own tiles). The verified bytes of
``stack.raw`` existed nowhere, and the job said something else.

Now the audit and a batch of one job's unlinks never interleave (a per-job
lock, held by the reaper from its state check through each batch and by the
audit through its transition), and a mismatch found with part of the run
deleted never sends the rest again: the deletion stops, the job is FAILED
``remote_changed_during_cleanup`` naming what was deleted, what the NAS
holds wrong and what is kept, and ``retry`` puts the deleted files back from
their verified NAS copies and sends the kept ``stack.raw`` over the bad one.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.sync.nas_client import RunIncompleteError
from exlab_wizard.sync.reaper import deletion, passes
from exlab_wizard.sync.remote import RemoteAccess
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock, flip_byte_keep_stat, wait_until
from tests.lab import Lab, cleanup_config, deletion_killed_after_two, ready, running

S = SyncJobState
# Planned in byte order of their paths: the frames go first, stack.raw last.
FRAMES = {f"frame_{i:02d}.tif": bytes([65 + i]) * 300 for i in range(6)}
FILES = {**FRAMES, "stack.raw": b"S" * 5000}


def _previous(nas: Path) -> list[str]:
    """Every file the NAS keeps under previous/ (moved there by a push)."""
    kept = nas / ".exlab-wizard" / "previous"
    return sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) if kept.exists() else []


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_a_mismatch_after_a_killed_deletion_stops_it_and_retry_repairs_the_nas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab.build(tmp_path)
    run = lab.make_run("Run_0003", files=FILES)
    nas = lab.nas_copy(run)
    clock = Clock()
    async with running(cleanup_config(lab, min_verify_passes=1, min_age_hours=0), clock) as client:
        job = await ready(client, clock, run)
        with deletion_killed_after_two(monkeypatch):
            await client.cleanup_once()  # the pass "dies" after two unlinks, its plan kept
        deleted = sorted(rel for rel in FILES if not (run / rel).exists())
        assert deleted == ["frame_00.tif", "frame_01.tif"]

        flip_byte_keep_stat(nas / "stack.raw")  # the NAS copy of a file not yet deleted rots
        clock.advance(7)
        await client.audit_once()
        for _ in range(2):
            await client.cleanup_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)

        # Nothing more deleted: the only good copy of stack.raw is the local one, and it is there.
        assert (run / "stack.raw").read_bytes() == FILES["stack.raw"]
        assert sorted(rel for rel in FILES if not (run / rel).exists()) == deleted
        assert _previous(nas) == []  # nothing moved aside for a push that could not go through
        assert job.state == S.FAILED, f"{job.state.value} {job.error_kind}: {job.last_error}"
        assert job.error_kind == "remote_changed_during_cleanup", job.last_error
        why = job.last_error or ""
        assert "audit mismatch" in why and "stack.raw" in why, why
        assert "cleanup was stopped" in why and "2 of 7 planned files were already deleted" in why, why
        assert "frame_00.tif" in why and "the other 5 are kept locally" in why, why
        assert f"exlab-sync retry {job.id}" in why, why
        assert lab.log_lines("cleanup_stopped"), "the equipment log names the stop"

        await client.retry(job.id)  # puts the deleted frames back from the NAS, sends stack.raw again
        await client.wait_idle(timeout=60)
        job = await client.job(run)

    assert job.state == S.VERIFIED, f"{job.state.value} {job.error_kind}: {job.last_error}"
    assert (nas / "stack.raw").read_bytes() == FILES["stack.raw"]  # repaired from the local copy
    for rel, data in FILES.items():
        assert (run / rel).read_bytes() == data, rel
        assert (nas / rel).read_bytes() == data, rel
    flipped = [p for p in _previous(nas) if p.endswith("/stack.raw")]
    assert flipped, "the NAS copy found different is kept under previous/, never written over"
    kept = nas / ".exlab-wizard" / "previous" / flipped[0]
    assert _sha(kept.read_bytes()) != _sha(FILES["stack.raw"])


async def test_a_mismatched_file_the_deletion_already_took_is_said_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab.build(tmp_path)
    run = lab.make_run("Run_0003", files=FILES)
    nas = lab.nas_copy(run)
    clock = Clock()
    async with running(cleanup_config(lab, min_verify_passes=1, min_age_hours=0), clock) as client:
        await ready(client, clock, run)
        with deletion_killed_after_two(monkeypatch):
            await client.cleanup_once()
        flip_byte_keep_stat(nas / "frame_01.tif")  # its local copy is deleted already
        clock.advance(7)
        await client.audit_once()
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "remote_changed_during_cleanup", job.last_error
        why = job.last_error or ""
        assert "frame_01.tif: deleted locally by this cleanup" in why, why
        assert "or nowhere" in why, why
        assert all((run / rel).exists() for rel in FILES if rel not in ("frame_00.tif", "frame_01.tif"))

        with pytest.raises(RunIncompleteError) as refused:
            await client.retry(job.id)
        assert refused.value.paths == ("frame_01.tif",)
        job = await client.job(run)
    assert job.state == S.FAILED
    assert _previous(nas) == []  # nothing moved aside: the bad NAS copy is all that is left of frame_01.tif
    assert (run / "frame_00.tif").read_bytes() == FILES["frame_00.tif"]  # put back: its NAS copy is good


async def test_the_audit_waits_for_a_batch_under_way_then_stops_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit's finding lands between two batches, never in one: the batch it waited for is counted."""
    lab = Lab.build(tmp_path)
    run = lab.make_run("Run_0003", files=FILES)
    nas = lab.nas_copy(run)
    clock = Clock()
    async with running(cleanup_config(lab, min_verify_passes=1, min_age_hours=0), clock) as client:
        await ready(client, clock, run)
        monkeypatch.setattr(passes, "_DELETE_BATCH", 2)
        real = deletion.delete_batch
        entered, go = threading.Event(), threading.Event()

        def held_batch(run_path: Path, batch: Any) -> Any:
            if not entered.is_set():  # the first batch waits, before any unlink, until the audit is at the lock
                entered.set()
                assert go.wait(30)
            return real(run_path, batch)

        monkeypatch.setattr(deletion, "delete_batch", held_batch)
        flip_byte_keep_stat(nas / "stack.raw")
        clock.advance(7)
        reaper = asyncio.create_task(client.cleanup_once())
        assert await asyncio.to_thread(entered.wait, 30)
        audit = asyncio.create_task(client.audit_once())
        # The mismatch is logged; the audit's next step, with no await between, is the job's lock.
        await wait_until(lambda: lab.log_lines("audit_failed"), 30, "the audit's finding")
        go.set()
        await asyncio.wait_for(asyncio.gather(reaper, audit), 60)
        await client.wait_idle(timeout=60)
        job = await client.job(run)

    assert sorted(rel for rel in FILES if not (run / rel).exists()) == ["frame_00.tif", "frame_01.tif"]
    assert (run / "stack.raw").read_bytes() == FILES["stack.raw"]
    assert job.state == S.FAILED and job.error_kind == "remote_changed_during_cleanup", (
        f"{job.state.value} {job.error_kind}: {job.last_error}"
    )
    assert "2 of 7 planned files were already deleted" in (job.last_error or ""), job.last_error
    # The reaper met the failure at its next batch and says so, with what its plan had deleted.
    aborted = [e.detail for e in job.events if e.kind == "cleanup_aborted"]
    assert aborted and "2 of 7 planned files were already deleted" in aborted[-1], aborted
    assert _previous(nas) == []


async def test_a_mismatch_found_while_the_last_batch_runs_says_the_file_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torture harness's timeline: the batch holding stack.raw was under way when the audit found it bad."""
    lab = Lab.build(tmp_path)
    run = lab.make_run("Run_0003", files=FILES)
    nas = lab.nas_copy(run)
    clock = Clock()
    async with running(cleanup_config(lab, min_verify_passes=1, min_age_hours=0), clock) as client:
        await ready(client, clock, run)
        real = deletion.delete_batch
        entered, go = threading.Event(), threading.Event()

        def held_batch(run_path: Path, batch: Any) -> Any:
            entered.set()
            assert go.wait(30)
            return real(run_path, batch)

        monkeypatch.setattr(deletion, "delete_batch", held_batch)
        flip_byte_keep_stat(nas / "stack.raw")
        reaper = asyncio.create_task(client.cleanup_once())
        assert await asyncio.to_thread(entered.wait, 30)
        audit = asyncio.create_task(client.audit_once())
        await wait_until(lambda: lab.log_lines("audit_failed"), 30, "the audit's finding")
        go.set()  # the one batch deletes all seven files, stack.raw with them
        await asyncio.wait_for(asyncio.gather(reaper, audit), 60)
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)

    assert job.state == S.FAILED and job.error_kind == "remote_changed_during_cleanup", (
        f"{job.state.value} {job.error_kind}: {job.last_error}"
    )
    why = job.last_error or ""
    assert "7 of 7 planned files were already deleted" in why, why
    assert "stack.raw: deleted locally by this cleanup" in why and "or nowhere" in why, why
    assert _previous(nas) == []  # no push moved the NAS copy aside for nothing
    assert (nas / "stack.raw").exists()  # the flipped copy left where it is, for a person to look at


async def test_a_mismatch_found_as_the_cleanup_finished_is_recorded_on_the_cleaned_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab.build(tmp_path)
    run = lab.make_run("Run_0003", files=FILES)
    nas = lab.nas_copy(run)
    clock = Clock()
    async with running(cleanup_config(lab, min_verify_passes=1, min_age_hours=0), clock) as client:
        await ready(client, clock, run)
        real = RemoteAccess.manifest
        read, release = asyncio.Event(), asyncio.Event()

        async def slow_manifest(self: RemoteAccess, run_path: Path) -> Any:
            answer = await real(self, run_path)
            read.set()
            await release.wait()  # the NAS read takes long: the reaper finishes meanwhile
            return answer

        monkeypatch.setattr(RemoteAccess, "manifest", slow_manifest)
        flip_byte_keep_stat(nas / "stack.raw")
        audit = asyncio.create_task(client.audit_once())
        await asyncio.wait_for(read.wait(), 30)
        await client.cleanup_once()
        assert (await client.job(run)).state == S.CLEANED
        release.set()
        await asyncio.wait_for(audit, 60)
        job = await client.job(run)

    assert job.state == S.CLEANED
    said = [e.detail for e in job.events if e.kind == "audit_failed"]
    assert said and "stack.raw" in said[-1] and "or nowhere" in said[-1], said
