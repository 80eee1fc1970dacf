"""The equipment's NAS moved in the config: passes read at the old place vouch for nothing at the new one (rule 1).

The job records where its copy was verified (``verified_location``). After
the configured share, host or remote path changed, the reaper refuses
(``nas_location_changed``) even when the new place lists every file at its
size (a copy still being filled, say); the audit hashes the run there, and
its pass counts as the first at the new place. Only then may the reaper go on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import run_location
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, acts, data_intact, mark_nas, on_share, rclone_cleanup_config, ready, running
from tests.lab import cleanup_config as config

S = SyncJobState


async def test_a_moved_nas_is_verified_by_the_audit_before_anything_is_deleted(lab: Lab, tmp_path: Path) -> None:
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        job = await ready(client, clock, run)  # two passes on the first share
    assert job.verified_location == run_location(cfg.equipment_by_id(EQ), run)

    # The lab moves the equipment to a new share and copies its runs there; the copy of this
    # run is still being filled: every file at its final size, not yet its bytes.
    share = mark_nas(tmp_path / "nas2")
    new_copy = share / lab.nas_copy(run).relative_to(lab.mount_path(EQ))
    shutil.copytree(lab.nas_copy(run), new_copy)
    for rel, data in FILES.items():
        (new_copy / rel).write_bytes(b"\0" * len(data))
    moved = on_share(cfg, EQ, share)

    async with running(moved, clock) as client:
        [outcome] = acts(await client.cleanup_once())
        assert (outcome.action, outcome.code) == ("waiting", CleanupCode.NAS_LOCATION_CHANGED), outcome
        assert data_intact(run)

        # The audit reads the new place: the unfilled copy is a mismatch, never a pass.
        await client.audit_once()
        job = await client.job(run)
        assert job.verify_passes == 0 and job.state == S.QUEUED

    # The copy at the new place completed and verified (the re-sync the audit asked for ran).
    async with running(moved, clock) as client:
        job = await client.wait_idle(30) or await client.job(run)
        job = await client.job(run)
        assert job.state == S.VERIFIED and job.verified_location == run_location(moved.equipment_by_id(EQ), run)
        assert all((new_copy / rel).read_bytes() == data for rel, data in FILES.items())


async def test_an_audit_at_a_moved_nas_holding_the_copy_counts_as_its_first_pass(lab: Lab, tmp_path: Path) -> None:
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
    share = mark_nas(tmp_path / "nas2")
    shutil.copytree(lab.nas_copy(run), share / lab.nas_copy(run).relative_to(lab.mount_path(EQ)))
    moved = on_share(cfg, EQ, share)
    async with running(moved, clock) as client:
        await client.audit_once()
        job = await client.job(run)
        assert job.verify_passes == 1 and job.verified_location == run_location(moved.equipment_by_id(EQ), run)
        assert [o.code for o in acts(await client.cleanup_once())] == [CleanupCode.WAITING_PASSES]
        clock.advance(6)
        await client.audit_once()
        assert (await client.job(run)).verify_passes == 2
        [outcome] = acts(await client.cleanup_once())
        assert outcome.action == "deleted", outcome
    assert not any((run / rel).exists() for rel in FILES)
    assert (lab.nas_copy(run) / next(iter(FILES))).exists()  # the old share untouched


async def test_a_config_replaced_on_a_running_client_reads_the_new_share(lab: Lab, tmp_path: Path) -> None:
    """``client.config = ...`` (a reload) moves the equipment to a share whose copy is still being filled.

    The transport was kept by equipment id, built from the old settings: the audit hashed the
    old share and recorded its passes for the new place, and the reaper (given the old config
    at its start) then deleted on the strength of a listing of the new share, whose files held
    zeros at their final sizes (rule 1). Found by review.
    """
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    share = mark_nas(tmp_path / "nas2")
    new_copy = share / lab.nas_copy(run).relative_to(lab.mount_path(EQ))
    moved = on_share(cfg, EQ, share)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)  # two passes on the first share
        for rel, data in FILES.items():
            (new_copy / rel).parent.mkdir(parents=True, exist_ok=True)
            (new_copy / rel).write_bytes(b"\0" * len(data))
        client.config = moved
        for _ in range(2):
            clock.advance(6)
            await client.audit_once()
            await client.wait_idle(timeout=60)
        job = await client.job(run)
        here = run_location(moved.equipment_by_id(EQ), run)
        if job.verified_location == here:  # any pass counted for the new place was read there
            assert all((new_copy / rel).read_bytes() == data for rel, data in FILES.items())
        outcomes = acts(await client.cleanup_once())
        assert data_intact(run) or all((new_copy / rel).read_bytes() == data for rel, data in FILES.items()), (
            f"deleted locally while the new share holds zeros: {[(o.action, o.reason) for o in outcomes]}"
        )


@pytest.mark.network
async def test_an_rclone_remote_moved_in_its_config_file_deletes_nothing(lab: Lab, tmp_path: Path) -> None:
    """The lab points its rclone remote at a new NAS by editing rclone.conf (same remote name, same file).

    The place recorded named the config file only, so the move went unseen: the reaper listed
    the new NAS, whose copy was still being filled (zeros at the final sizes), and deleted
    (rule 1). Found by review. The remote's definition is part of the place now.
    """
    nas1, nas2 = tmp_path / "rnas1", tmp_path / "rnas2"
    nas1.mkdir()
    nas2.mkdir()
    conf = tmp_path / "rclone.conf"
    conf.write_text(f"[labnas]\ntype = alias\nremote = {nas1}\n")
    cfg = rclone_cleanup_config(lab, conf)
    clock = Clock()
    run = lab.make_run(files=FILES)
    rel = run.relative_to(lab.local_root / EQ)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        assert all((nas1 / rel / name).read_bytes() == body for name, body in FILES.items())
        for name, body in FILES.items():  # the new NAS, its copy being filled
            (nas2 / rel / name).parent.mkdir(parents=True, exist_ok=True)
            (nas2 / rel / name).write_bytes(b"\0" * len(body))
        conf.write_text(f"[labnas]\ntype = alias\nremote = {nas2}\n")
        outcomes = acts(await client.cleanup_once())
        assert data_intact(run), f"deleted with the new NAS holding zeros: {[(o.action, o.reason) for o in outcomes]}"
        assert any(o.code == CleanupCode.NAS_LOCATION_CHANGED for o in outcomes), outcomes


async def test_a_config_replaced_on_a_running_client_names_runs_by_the_new_local_root(lab: Lab, tmp_path: Path) -> None:
    """A reload that moves only ``local_root``: the transport built before named runs by the old root
    (``ValueError`` for every new run, jobs failing ``unknown``). Found by review."""
    clock = Clock()
    cfg = config(lab)
    first = lab.make_run("Run_2026-01-01", files=FILES)
    async with running(cfg, clock) as client:
        await client.enqueue(first)
        await client.wait_idle(timeout=60)
        new_root = tmp_path / "disk2"
        shutil.copytree(lab.local_root, new_root)
        eq = cfg.equipment_by_id(EQ).model_copy(update={"local_root": new_root})
        client.config = cfg.model_copy(update={"equipment": [eq]})
        run = new_root / first.relative_to(lab.local_root).parent / "Run_2026-01-02"
        shutil.copytree(first, run)
        (run / ".exlab-wizard" / "checksums.sha256").unlink(missing_ok=True)
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == SyncJobState.VERIFIED, (job.state, job.last_error)
