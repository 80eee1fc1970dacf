"""A NAS run folder refilled by another PC's run of the same names never lets the reaper delete.

A lab member deletes run A's NAS folder (or renames it away); another instrument PC, set up with
the same equipment id, then pushes its own ``Run_1`` into the now free path (its job is fresh: the
folder is missing, nothing to conflict with), verifies it and writes its manifest and claim there.
Instruments write fixed names and sizes, so the folder lists every file of A's manifest at A's
sizes. A's reaper, whose passes and age were all in order, took one listing of sizes and deleted
A's local data: A's bytes were then nowhere (rule 1). The listing shows what it needs: the folder's
only claim is a job A's queue does not know, and A's own claim (written by each of its data pushes)
is gone. Now nothing is deleted (``nas_folder_claimed``).

Still cleaned: a run whose queue was lost, enqueued again under a new job id (its claim beside the
old job's, which the new queue does not know), and a job whose engine wrote no claim.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.conflict import CLAIMS_DIR
from tests.client.test_queue_lost_local_damage import lose_queue
from tests.helpers import Clock
from tests.lab import EQ, FILES, TWIN_FILES, Site, acts, data_intact, ready, running

S = SyncJobState
CLEANUP = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True}
SYNC = {"audit_interval_s": 6 * 3600, "scan_interval_s": 3600}
KINDS = pytest.mark.parametrize("kind", ["mount", "rsync_ssh"])


def two_pcs(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> tuple[Site, Site]:
    (tmp_path / "pc1").mkdir()
    first = Site.on(request, tmp_path / "pc1", kind)
    pc2 = tmp_path / "pc2"
    second = Site(pc2, pc2 / "lab", first.nas_root, pc2 / "state", (EQ,), kind=kind)
    second.local_root.mkdir(parents=True)
    second.transport = dict(first.transport)
    return first, second


def claims(nas: Path) -> set[str]:
    folder = nas / CLAIMS_DIR
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@pytest.mark.network
@KINDS
async def test_a_nas_folder_refilled_by_another_pc_never_lets_the_reaper_delete(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    first, second = two_pcs(request, tmp_path, kind)
    run_a = first.make_run("Run_1", files=FILES)
    run_b = second.make_run("Run_1", files=TWIN_FILES)  # same names and sizes, other bytes
    nas = first.nas_copy(run_a)
    assert run_a.relative_to(first.local_root) == run_b.relative_to(second.local_root)  # one NAS path

    clock = Clock()
    async with running(first.config(cleanup=CLEANUP, sync=SYNC), clock) as client:
        job = await ready(client, clock, run_a)  # verified, audited once more, 25 h old
        assert claims(nas) == {job.id}

        shutil.rmtree(nas)  # a lab member deletes A's NAS folder
        async with running(second.config(sync=SYNC), Clock()) as other:  # the other PC's engine
            await other.enqueue(run_b)
            await other.wait_idle(timeout=60)
            theirs = await other.job(run_b)
            assert theirs.state == S.VERIFIED
        assert all((nas / rel).read_bytes() == data for rel, data in TWIN_FILES.items())
        assert claims(nas) == {theirs.id}

        outcomes = acts(await client.cleanup_once())
        job = await client.job(run_a)
    assert data_intact(run_a), (
        f"rule 1: A's local data deleted, its NAS folder holds only the other PC's run "
        f"({[(o.action, o.reason) for o in outcomes]}, job {job.state.value})"
    )
    [outcome] = outcomes
    assert outcome.action == "waiting" and outcome.code == CleanupCode.NAS_FOLDER_CLAIMED, outcome
    assert theirs.id in outcome.reason and "does not know" in outcome.reason
    assert job.state == S.CLEANUP_ELIGIBLE


@pytest.mark.network
@KINDS
async def test_a_run_enqueued_again_after_its_queue_was_lost_still_cleans(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    """Its new job's claim stands beside the lost job's: the folder is still the run's own."""
    site = Site.on(request, tmp_path, kind)
    run = site.make_run("Run_1", files=FILES)
    nas = site.nas_copy(run)
    clock = Clock()
    cfg = site.config(cleanup=CLEANUP, sync=SYNC)
    async with running(cfg, clock) as client:
        old = await ready(client, clock, run)
    lose_queue(site.state)
    async with running(cfg, clock) as client:
        new = await ready(client, clock, run)
        assert new.id != old.id and claims(nas) == {old.id, new.id}
        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)
    assert [o.action for o in outcomes] == ["deleted"], outcomes
    assert job.state == S.CLEANED and not any((run / rel).exists() for rel in FILES)


@pytest.mark.network
@KINDS
async def test_a_job_whose_engine_wrote_no_claim_still_cleans(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    site = Site.on(request, tmp_path, kind)
    run = site.make_run("Run_1", files=FILES)
    nas = site.nas_copy(run)
    clock = Clock()
    async with running(site.config(cleanup=CLEANUP, sync=SYNC), clock) as client:
        await ready(client, clock, run)
        shutil.rmtree(nas / CLAIMS_DIR)  # verified by an engine before claims
        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)
    assert [o.action for o in outcomes] == ["deleted"], outcomes
    assert job.state == S.CLEANED
