"""Two runs that reach one NAS folder: the second never overwrites the first's verified copy.

The remote path of a run is the transport's root joined with the run's path
below ``<local_root>/<id>``: the equipment id is not part of it, so two
instruments on one share with a project and a run name in common reach one
NAS folder; so do two runs whose names differ only in letter case on a
share that folds case (SMB, exFAT, macOS), or two instrument PCs configured
alike. An instrument writes fixed file names, so the second run's push found
only names of its own there, took the first run's verified files for an
earlier attempt of its own, and wrote over them; with cleanup on, the
reaper then deleted the first run's local files (its last check compares
sizes). A run never verified now refuses a remote run folder whose
``.exlab-wizard/checksums.sha256`` is not its own (``remote_conflict``).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import (
    EQ,
    FILES,
    MARKER,
    TWIN_FILES,
    Lab,
    cleanup_config,
    everything_under,
    metadata_push_down,
    on_share,
    ready,
    retry_now,
    running,
    synced,
)

S = SyncJobState
OTHER = "FACS_02"
FOREIGN = TWIN_FILES  # another instrument's run: same names and sizes, other bytes
MANIFEST = ".exlab-wizard/checksums.sha256"


async def _moved_onto_as_share_and_sent_again(lab: Lab, cfg, clock: Clock, run_b: Path, nas_a: Path):
    """FACS_02 brought onto EQ's share (B's NAS folder is now A's); B gets a late file and is enqueued again."""
    moved = on_share(cfg, OTHER, lab.mount_path(EQ))
    assert lab.mount_path(EQ) / run_b.relative_to(lab.local_root / OTHER) == nas_a
    (run_b / "late.txt").write_bytes(b"late\n")
    async with running(moved, clock) as client:
        await client.enqueue(run_b)
        await client.wait_idle(timeout=60)
        return await client.job(run_b)


async def test_a_second_instrument_never_overwrites_the_first_ones_verified_copy(tmp_path: Path) -> None:
    lab = Lab.build(tmp_path, nas_per_equipment=False)  # both equipments on one share
    clock = Clock()
    run_a = lab.make_run("Run_2026-01-01", files=FILES, equipment=EQ)
    async with running(cleanup_config(lab), clock) as client:
        await ready(client, clock, run_a)  # verified, 2 passes, 25 h old
        nas = lab.nas_copy(run_a, EQ)

        run_b = lab.make_run("Run_2026-01-01", files=FOREIGN, equipment=OTHER)
        assert lab.nas_copy(run_b, OTHER) == nas  # one NAS folder for both
        await client.enqueue(run_b)
        await client.wait_idle(timeout=60)
        job_b = await client.job(run_b)
        assert job_b.state == S.FAILED and job_b.error_kind == "remote_conflict", (job_b.state, job_b.last_error)
        assert "verified copy of another run" in job_b.last_error
        assert all((nas / rel).read_bytes() == data for rel, data in FILES.items())  # rule 2

        await client.cleanup_once()
        job_a = await client.job(run_a)
        assert job_a.state == S.CLEANED  # its copy is the good one: its cleanup goes on
        assert all((nas / rel).read_bytes() == data for rel, data in FILES.items())  # rule 1: a copy remains
        assert all((run_b / rel).read_bytes() == data for rel, data in FOREIGN.items())  # B kept locally


@pytest.mark.network
async def test_on_rsync_ssh_too(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two PCs on one NAS folder over rsync_ssh: the second PC's run is refused, the first's copy kept."""
    from tests.lab import Site

    (tmp_path / "pc1").mkdir()
    first = Site.on(request, tmp_path / "pc1", "rsync_ssh")
    pc2 = tmp_path / "pc2"
    second = Site(pc2, pc2 / "lab", first.nas_root, pc2 / "state", (EQ,), kind="rsync_ssh")
    second.local_root.mkdir(parents=True)
    second.transport = dict(first.transport)
    run_a = first.make_run("Run_1", files=FILES)
    run_b = second.make_run("Run_1", files=FOREIGN)
    assert run_a.relative_to(first.local_root) == run_b.relative_to(second.local_root)  # one remote path
    async with running(first.config(), Clock()) as client:
        await client.enqueue(run_a)
        await client.wait_idle(timeout=60)
        assert (await client.job(run_a)).state == S.VERIFIED
    async with running(second.config(), Clock()) as client:
        await client.enqueue(run_b)
        await client.wait_idle(timeout=60)
        job_b = await client.job(run_b)
        assert job_b.state == S.FAILED and job_b.error_kind == "remote_conflict", (job_b.state, job_b.last_error)
    nas = first.nas_copy(run_a)
    assert all((nas / rel).read_bytes() == data for rel, data in FILES.items())


async def test_a_retry_never_moves_another_runs_verified_files_aside(tmp_path: Path) -> None:
    """The ownership check comes before the NAS copies of files sent again are kept (moved under previous/).

    B's first push went in before A had a manifest there; A pushed over it and was verified; B's
    verification found A's bytes, so B is QUEUED with its files to send again. B's retry must not
    move A's verified files aside before it is refused.
    """
    lab = Lab.build(tmp_path, nas_per_equipment=False)  # both equipments on one share
    clock = Clock()
    run_a = lab.make_run("Run_2026-01-01", files=FILES, equipment=EQ)
    run_b = lab.make_run("Run_2026-01-01", files=FOREIGN, equipment=OTHER)
    nas = lab.nas_copy(run_a, EQ)
    assert lab.nas_copy(run_b, OTHER) == nas
    async with running(cleanup_config(lab), clock) as client:
        queue = client._ctx.require_queue()
        # B: tried once, its verification mismatched (A's bytes), retry scheduled later.
        remote_b = client._ctx.remotes.transport(client.config.equipment_by_id(OTHER)).remote_run_path(run_b)
        job_b, _ = queue.get_or_create(str(run_b), OTHER, remote_b, now=clock())
        queue.update(
            job_b.id,
            S.QUEUED,
            now=clock(),
            attempts=1,
            mismatch_count=1,
            error_kind="hash_mismatch",
            last_error="hash mismatch: 3 different",
            rewrite_paths=tuple(sorted(FILES)),
            next_attempt_at=clock() + dt.timedelta(hours=1),
        )
        await synced(client, run_a)  # A verified, its manifest pushed
        assert (nas / ".exlab-wizard" / "checksums.sha256").is_file()
        # B's retry comes due.
        queue.update(job_b.id, S.QUEUED, now=clock(), next_attempt_at=clock())
        client._ctx.kick()
        await client.wait_idle(timeout=60)
        job_b = await client.job(run_b)
        assert job_b.state == S.FAILED and job_b.error_kind == "remote_conflict", (job_b.state, job_b.last_error)
        moved = [e.detail for e in job_b.events if e.kind == "previous_kept"]
        # Rule 2: A's verified copy must be untouched by B.
        assert all((nas / rel).is_file() and (nas / rel).read_bytes() == data for rel, data in FILES.items()), (
            f"A's verified NAS files were moved by never-verified job B: {moved}"
        )


async def test_a_run_verified_elsewhere_never_overwrites_another_runs_only_copy(tmp_path: Path) -> None:
    """A job verified before is no owner of a NAS folder holding another run's manifest.

    FACS_02 is moved in the config onto CONFOCAL_01's share, where CONFOCAL_01's run of the same
    project and name is verified and cleaned (``retain_cache: false``: the NAS copy is its only
    one). FACS_02's run, verified on its own share, gets a late file: its push must not write its
    unchanged files over the other run's copy (nothing would be kept: they did not change).
    """
    lab = Lab.build(tmp_path)  # nas/EQ and nas/FACS_02: one share each
    clock = Clock()
    cfg = cleanup_config(lab, retain_cache=False)
    run_a = lab.make_run("Run_2026-01-01", files=FILES, equipment=EQ)
    run_b = lab.make_run("Run_2026-01-01", files=FOREIGN, equipment=OTHER)
    nas_a = lab.nas_copy(run_a, EQ)
    async with running(cfg, clock) as client:
        await ready(client, clock, run_a)
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        assert (await client.job(run_a)).state == S.CLEANED
        await synced(client, run_b)  # B verified on its own share
    assert not any((run_a / rel).exists() for rel in FILES)  # A's only copy is now the NAS one
    assert all((nas_a / rel).read_bytes() == data for rel, data in FILES.items())

    # The lab brings FACS_02 onto EQ's share; B gets a late file and is enqueued again.
    job_b = await _moved_onto_as_share_and_sent_again(lab, cfg, clock, run_b, nas_a)
    for rel, data in FILES.items():
        assert data in everything_under(nas_a), (
            f"A's only copy of {rel} is gone from the NAS (B's job ended {job_b.state.value}: {job_b.last_error})"
        )
    assert job_b.state == S.FAILED and job_b.error_kind == "remote_conflict", (job_b.state, job_b.last_error)


async def test_a_second_instrument_never_overwrites_a_copy_whose_manifest_is_not_there_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the first run's VERIFIED and its metadata push, its NAS copy has no manifest.

    The metadata push that writes it may fail and wait for its retry (the NAS busy for a
    moment): the NAS folder then holds a verified copy with no ``checksums.sha256``. A second
    run's first push found only names of its own there and took them for an earlier attempt of
    its own. A job that never ran now refuses a NAS folder holding data files of its names.
    """
    lab = Lab.build(tmp_path, nas_per_equipment=False)  # both equipments on one share
    clock = Clock()
    run_a = lab.make_run("Run_2026-01-01", files=FILES, equipment=EQ)
    nas = lab.nas_copy(run_a, EQ)
    down = metadata_push_down(monkeypatch)
    async with running(cleanup_config(lab), clock) as client:
        job_a = await synced(client, run_a)
        assert job_a.metadata_push_due_at is not None  # owed, not sent
        assert not (nas / ".exlab-wizard" / "checksums.sha256").exists()

        run_b = lab.make_run("Run_2026-01-01", files=FOREIGN, equipment=OTHER)
        assert lab.nas_copy(run_b, OTHER) == nas
        await client.enqueue(run_b)
        await client.wait_idle(timeout=60)
        job_b = await client.job(run_b)
        assert all((nas / rel).read_bytes() == data for rel, data in FILES.items()), (
            f"the second run wrote over the first one's verified copy (B ended {job_b.state.value}: {job_b.last_error})"
        )
        assert job_b.state == S.FAILED and job_b.error_kind == "remote_conflict", (job_b.state, job_b.last_error)

        down.clear()  # the NAS answers again: A's metadata push goes through, its cleanup follows
        clock.advance(6)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        clock.advance(19)
        await client.cleanup_once()
        assert (await client.job(run_a)).state == S.CLEANED
        assert all((nas / rel).read_bytes() == data for rel, data in FILES.items())  # rule 1: a copy remains
        assert all((run_b / rel).read_bytes() == data for rel, data in FOREIGN.items())  # B kept locally


async def test_an_attempt_that_wrote_nothing_leaves_the_next_one_fresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second run's first attempt failed before it wrote (the share away, as for the first
    run's metadata push): its retry still takes no file of its names on the NAS for its own."""
    lab = Lab.build(tmp_path, nas_per_equipment=False)  # both equipments on one share
    clock = Clock()
    run_a = lab.make_run("Run_2026-01-01", files=FILES, equipment=EQ)
    run_b = lab.make_run("Run_2026-01-01", files=FOREIGN, equipment=OTHER)
    nas = lab.nas_copy(run_a, EQ)
    metadata_push_down(monkeypatch)
    async with running(cleanup_config(lab), clock) as client:
        await synced(client, run_a)  # verified; its manifest not on the NAS yet
        marker = lab.mount_path(EQ) / MARKER
        saved = marker.read_bytes()
        marker.unlink()  # the share away for a moment
        await client.enqueue(run_b)
        await client.wait_idle(timeout=60)
        job_b = await client.job(run_b)
        assert job_b.attempts >= 1 and job_b.error_kind == "network", (job_b.state, job_b.last_error)
        assert (await client.job(run_a)).state == S.VERIFIED
        marker.write_bytes(saved)
        job_b = await retry_now(client, clock, run_b)  # out of attempts: the operator's retry
        assert all((nas / rel).read_bytes() == data for rel, data in FILES.items()), (
            f"the second run's retry wrote over the first one's verified copy (B ended {job_b.state.value})"
        )
        assert job_b.state == S.FAILED and job_b.error_kind == "remote_conflict", (job_b.state, job_b.last_error)


async def test_a_verified_run_moved_in_the_config_never_moves_another_runs_copy_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B verified on its own share; FACS_02 is moved in the config onto CONFOCAL_01's share, where A's
    run of the same names is verified with its metadata push waiting (no manifest there yet). B gets a
    late file: its push (a 'claimed' job: verified, elsewhere) must not replace A's verified files."""
    lab = Lab.build(tmp_path)  # nas/EQ and nas/FACS_02: one share each
    clock = Clock()
    cfg = cleanup_config(lab)
    run_a = lab.make_run("Run_2026-01-01", files=FILES, equipment=EQ)
    run_b = lab.make_run("Run_2026-01-01", files=FOREIGN, equipment=OTHER)
    nas_a = lab.nas_copy(run_a, EQ)
    async with running(cfg, clock) as client:
        await synced(client, run_b)  # B verified on its own share, manifest pushed
    down = metadata_push_down(monkeypatch)
    async with running(cfg, clock) as client:
        await synced(client, run_a)  # A verified; its manifest not on the NAS yet
    assert not (nas_a / MANIFEST).exists()

    job_b = await _moved_onto_as_share_and_sent_again(lab, cfg, clock, run_b, nas_a)
    assert down  # A's metadata push still waits
    assert all((nas_a / rel).read_bytes() == data for rel, data in FILES.items()), (
        f"B (verified elsewhere) replaced A's verified NAS files (B ended {job_b.state.value}: {job_b.last_error})"
    )


async def test_a_metadata_push_after_a_config_move_never_writes_over_another_runs_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B verified on its own share with its metadata push waiting; FACS_02 is then moved onto
    CONFOCAL_01's share, where A is verified with its manifest there. B's metadata push (own_manifests
    None: no check) must not write B's checksums.sha256 over A's, which would also refuse A from its
    own folder for good."""
    lab = Lab.build(tmp_path)
    clock = Clock()
    cfg = cleanup_config(lab)
    run_a = lab.make_run("Run_2026-01-01", files=FILES, equipment=EQ)
    run_b = lab.make_run("Run_2026-01-01", files=FOREIGN, equipment=OTHER)
    nas_a = lab.nas_copy(run_a, EQ)
    async with running(cfg, clock) as client:
        await synced(client, run_a)  # A verified, manifest pushed
    a_manifest = (nas_a / MANIFEST).read_bytes()
    down = metadata_push_down(monkeypatch)
    async with running(cfg, clock) as client:
        await synced(client, run_b)  # B verified on its own share, metadata push waiting
    down.clear()

    moved = on_share(cfg, OTHER, lab.mount_path(EQ))
    async with running(moved, clock) as client:
        await client.wait_idle(timeout=60)  # B's pending metadata push is due now
        job_b = await client.job(run_b)
    assert (nas_a / MANIFEST).read_bytes() == a_manifest, (
        f"B's metadata push wrote its manifest over A's verified one (B: {job_b.state.value}, "
        f"metadata push pending={job_b.metadata_push_pending})"
    )


async def test_the_reaper_deletes_nothing_from_a_folder_another_runs_job_claimed(tmp_path: Path) -> None:
    """Two first pushes into one folder at the same instant both claim it, and the later bytes win.

    Neither push can see the other (both listed the folder empty), so the first run's copy was
    verified and then written over with bytes of its size. The reaper's last listing shows the
    other run's claim: it deletes nothing, and says why.
    """
    from exlab_wizard.sync.policy.cleanup import CleanupCode
    from exlab_wizard.sync.transports.conflict import claim_path

    lab = Lab.build(tmp_path, nas_per_equipment=False)  # both equipments on one share
    clock = Clock()
    run_a = lab.make_run("Run_2026-01-01", files=FILES, equipment=EQ)
    run_b = lab.make_run("Run_2026-01-01", files=FOREIGN, equipment=OTHER)
    async with running(cleanup_config(lab), clock) as client:
        await ready(client, clock, run_a)
        nas = lab.nas_copy(run_a, EQ)
        queue = client._ctx.require_queue()
        job_b, _ = queue.get_or_create(str(run_b), OTHER, str(nas), now=clock())
        (nas / claim_path(job_b.id)).write_bytes(b"FACS_02\n")  # B's claim, then its bytes over A's
        for rel, data in FOREIGN.items():
            (nas / rel).write_bytes(data)

        outcomes = await client.cleanup_once()
        job_a = await client.job(run_a)
        assert job_a.state != S.CLEANED
        codes = [o.code for o in outcomes if o.action != "promoted"]
        assert codes == [CleanupCode.NAS_FOLDER_CLAIMED], outcomes
        assert all((run_a / rel).read_bytes() == data for rel, data in FILES.items())  # rule 1
        refusal = next(o for o in outcomes if o.code == CleanupCode.NAS_FOLDER_CLAIMED)
        assert str(run_b) in refusal.reason
