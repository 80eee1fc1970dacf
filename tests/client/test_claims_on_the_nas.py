"""A job's push names it on the NAS (``.exlab-wizard/claims/<job id>``) before its first write.

Two runs reaching one NAS folder (two instruments on one share with a project and a run name in
common, a share folding case, two PCs set up alike). A claim recorded in the queue alone said that
a push got past its checks, not that it wrote: a push that claimed the folder and then wrote
nothing (the share gone, the NAS full) let its job's retry take another run's verified copy,
pushed there since and not yet given its manifest, for its own and write over it; the other
run's reaper then deleted its local files (rules 2 and 1). Found by review. The NAS itself now
says who wrote there: a folder holding another job's claim is that job's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.mount import MountTransport
from tests.helpers import Clock
from tests.lab import (
    EQ,
    FILES,
    TWIN_FILES,
    Lab,
    cleanup_config,
    metadata_push_down,
    on_share,
    retry_now,
    running,
    synced,
)

S = SyncJobState
OTHER = "FACS_02"
FOREIGN = TWIN_FILES  # another instrument's run: same names and sizes, other bytes
NAS_MANIFEST = ".exlab-wizard/checksums.sha256"


def _share_drops_after_the_listing(monkeypatch: pytest.MonkeyPatch, run: Path) -> list[bool]:
    """While the list returned is not empty, a data push of ``run`` fails right after its conflict checks
    and its claim, before it writes anything (the share drops between the listing and the first mkdir)."""
    real = MountTransport._make_dirs
    down = [True]

    def make_dirs(self: MountTransport, job: object, pushed: Path, *args: object, **kwargs: object) -> object:
        if down and Path(pushed) == run:
            raise TransportError(TransportErrorKind.NETWORK, "the share went away")
        return real(self, job, pushed, *args, **kwargs)

    monkeypatch.setattr(MountTransport, "_make_dirs", make_dirs)
    return down


async def test_a_claim_that_wrote_nothing_never_makes_another_runs_copy_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's push claims the folder, then the share drops before it writes a byte. Later A (another
    instrument, same NAS folder) is pushed and verified; its metadata push waits. B's retry must not
    take A's manifest-less verified copy for a partial push of its own."""
    lab = Lab.build(tmp_path, nas_per_equipment=False)  # both equipments on one share
    clock = Clock()
    run_a = lab.make_run("Run_2026-01-01", files=FILES, equipment=EQ)
    run_b = lab.make_run("Run_2026-01-01", files=FOREIGN, equipment=OTHER)
    nas = lab.nas_copy(run_a, EQ)
    assert lab.nas_copy(run_b, OTHER) == nas
    dropped = _share_drops_after_the_listing(monkeypatch, run_b)
    metadata_push_down(monkeypatch)
    async with running(cleanup_config(lab), clock) as client:
        await client.enqueue(run_b)
        await client.wait_idle(timeout=60)
        job_b = await client.job(run_b)
        assert job_b.error_kind == "network", (job_b.state, job_b.last_error)
        assert any(e.kind == "nas_claimed" for e in job_b.events)
        assert not nas.exists() or not any(p.is_file() for p in nas.rglob("*")), "B wrote nothing"

        # A (B's retries still fail the same way, after their claims, meanwhile): verified, the only
        # NAS copy of its bytes; its manifest not there yet.
        await synced(client, run_a)
        assert not (nas / NAS_MANIFEST).exists()
        dropped.clear()  # the share answers B again
        job_b = await retry_now(client, clock, run_b)
        assert all((nas / rel).read_bytes() == data for rel, data in FILES.items()), (
            f"B, whose only push wrote nothing, wrote over A's verified copy (B ended {job_b.state.value})"
        )


async def test_then_the_first_runs_reaper_deletes_its_only_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same story to its end, with the default ``min_verify_passes: 1``: A's reaper (its last look
    compares sizes) deletes A's local files while the NAS holds B's bytes under A's names (rule 1)."""
    lab = Lab.build(tmp_path, nas_per_equipment=False)
    clock = Clock()
    run_a = lab.make_run("Run_2026-01-01", files=FILES, equipment=EQ)
    run_b = lab.make_run("Run_2026-01-01", files=FOREIGN, equipment=OTHER)
    nas = lab.nas_copy(run_a, EQ)
    dropped = _share_drops_after_the_listing(monkeypatch, run_b)
    down = metadata_push_down(monkeypatch)
    async with running(cleanup_config(lab, min_verify_passes=1), clock) as client:
        await client.enqueue(run_b)
        await client.wait_idle(timeout=60)
        await synced(client, run_a)
        dropped.clear()
        await retry_now(client, clock, run_b)
        down.clear()  # the NAS answers every push again
        clock.advance(25)
        client._ctx.kick()
        await client.wait_idle(timeout=60)
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        job_a = await client.job(run_a)
        on_nas = [p.read_bytes() for p in nas.rglob("*") if p.is_file()]
        lost = [rel for rel, data in FILES.items() if not (run_a / rel).exists() and data not in on_nas]
        assert not lost, f"A ({job_a.state.value}) deleted locally, and no NAS copy holds their bytes: {lost}"


async def test_a_job_verified_at_another_place_never_takes_another_runs_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same hole, second way in, through an audit send-back: a job verified on its own share counts
    as having written to *any* NAS folder (``_claimed_before`` is ``bool(job.manifest_digest)``).
    FACS_02 is moved onto CONFOCAL_01's share while A's manifest is not there yet. B's audit at the
    new place finds A's bytes (a mismatch) and sends B back; B's push keeps A's files under
    previous/ and writes its own over them. A's metadata push then goes through, and A's reaper
    deletes A's local copy: at A's verified location the NAS holds B's bytes."""
    from exlab_wizard.sync.audit import audit_job

    lab = Lab.build(tmp_path)  # nas/EQ and nas/FACS_02: one share each
    clock = Clock()
    cfg = cleanup_config(lab)
    run_a = lab.make_run("Run_2026-01-01", files=FILES, equipment=EQ)
    run_b = lab.make_run("Run_2026-01-01", files=FOREIGN, equipment=OTHER)
    nas_a = lab.nas_copy(run_a, EQ)
    async with running(cfg, clock) as client:
        await synced(client, run_b)  # B verified on its own share
    busy = [True]
    real_meta = MountTransport.push_metadata

    async def push_metadata(self, run_path, **kwargs):  # type: ignore[no-untyped-def]
        if busy and Path(run_path) == run_a:
            raise TransportError(TransportErrorKind.NETWORK, "the NAS is busy")
        return await real_meta(self, run_path, **kwargs)

    monkeypatch.setattr(MountTransport, "push_metadata", push_metadata)
    moved = on_share(cfg, OTHER, lab.mount_path(EQ))  # FACS_02 now on CONFOCAL_01's share
    assert lab.mount_path(EQ) / run_b.relative_to(lab.local_root / OTHER) == nas_a
    async with running(moved, clock) as client:
        ctx = client._ctx
        await synced(client, run_a)  # A verified; its manifest not on the NAS yet
        clock.advance(6)
        await audit_job(ctx, await client.job(run_a), moved.equipment_by_id(EQ))  # A's second pass
        assert (await client.job(run_a)).verify_passes == 2
        clock.advance(13)
        await audit_job(ctx, await client.job(run_b), moved.equipment_by_id(OTHER))  # B at its new place
        await client.wait_idle(timeout=60)
        job_b = await client.job(run_b)
        clock.advance(6)
        busy.clear()
        ctx.kick()
        await client.wait_idle(timeout=60)
        await client.cleanup_once()
        job_a = await client.job(run_a)
    for rel, data in FILES.items():
        assert (run_a / rel).exists() or (nas_a / rel).read_bytes() == data, (
            f"A's {rel} deleted locally (A {job_a.state.value}); at A's verified location the NAS holds "
            f"B's bytes (B ended {job_b.state.value}: {job_b.last_error})"
        )
