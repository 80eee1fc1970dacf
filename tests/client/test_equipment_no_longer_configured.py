"""Jobs whose equipment was renamed or removed in the config say so, and nothing is deleted for them.

The lab renames an equipment id (CONFOCAL_01 -> CONFOCAL_1, same share, same
disk) or removes it. The old jobs' NAS place can no longer be named. A
verified job used to wait for ever on "equipment log unavailable:
'CONFOCAL_01'" (a KeyError), skipped by the audit with no event; a job
awaiting its verification stayed AWAITING_VERIFY with no event at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exlab_wizard.config.models import Config
from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, acts, ready, running
from tests.lab import cleanup_config as config

S = SyncJobState


def _renamed(cfg: Config) -> Config:
    return cfg.model_copy(
        update={
            "equipment": [
                eq.model_copy(update={"id": "CONFOCAL_1"}) if eq.id == "CONFOCAL_01" else eq for eq in cfg.equipment
            ]
        }
    )


@pytest.mark.parametrize("state", [S.VERIFIED, S.CLEANUP_ELIGIBLE])
async def test_a_renamed_equipment_id_is_named_as_the_reason(lab: Lab, tmp_path: Path, state: SyncJobState) -> None:
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        job = await ready(client, clock, run)
        if state == S.CLEANUP_ELIGIBLE:  # promoted by a pass that stopped there
            client._ctx.require_queue().transition(job.id, S.VERIFIED, S.CLEANUP_ELIGIBLE, now=clock())
    async with running(_renamed(cfg), clock) as client:
        outcomes = []
        for _ in range(3):
            clock.advance(7)
            await client.audit_once()
            outcomes += acts(await client.cleanup_once())
        job = await client.job(run)
    assert job.state == state  # not promoted: CLEANUP_ELIGIBLE means about to be deleted
    assert all((run / rel).read_bytes() == data for rel, data in FILES.items())  # rule 1 holds
    mine = [o for o in outcomes if o.job_id == job.id]
    assert mine and all(o.action == "waiting" for o in mine), mine
    assert all(o.code == CleanupCode.EQUIPMENT_UNCONFIGURED for o in mine), mine
    assert "no longer configured" in mine[-1].reason, (mine[-1].action, mine[-1].code, mine[-1].reason)
    # Said once each while it lasts, not on every pass.
    skipped = [e for e in job.events if e.kind == "audit_skipped" and "no longer configured" in (e.detail or "")]
    refused = [e for e in job.events if e.kind == "cleanup_refused" and e.code == CleanupCode.EQUIPMENT_UNCONFIGURED]
    assert len(skipped) == 1, [(e.kind, e.code, e.detail) for e in job.events][-8:]
    assert len(refused) == 1, [e.detail for e in job.events]


async def test_a_job_awaiting_verification_of_a_removed_equipment_fails_saying_why(lab: Lab, tmp_path: Path) -> None:
    """serve stopped between a push and its verification (AWAITING_VERIFY); the equipment is removed before
    the restart. It is FAILED as a QUEUED job of a removed equipment is, with the way back: retry."""
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        queue = client._ctx.require_queue()
        remote = client._ctx.remotes.transport(cfg.equipment_by_id("CONFOCAL_01")).remote_run_path(run)
        job, _ = queue.get_or_create(str(run), "CONFOCAL_01", remote, now=clock())
    # The state a kill leaves between the push and the verification.
    with JobQueue(cfg.queue_db) as queue:
        queue.transition(job.id, S.QUEUED, S.RUNNING, now=clock())
        queue.transition(job.id, S.RUNNING, S.AWAITING_VERIFY, now=clock())
    removed = cfg.model_copy(update={"equipment": [eq for eq in cfg.equipment if eq.id != "CONFOCAL_01"]})
    async with running(removed, clock) as client:
        for _ in range(3):
            clock.advance(1)
            client._ctx.kick()
            await client.wait_idle(timeout=10)
            await client.audit_once()
            await client.cleanup_once()
        job = await client.job(run)
    assert job.state == S.FAILED, (job.state.value, [e.detail for e in job.events][-1:])
    assert "equipment CONFOCAL_01 is no longer configured" in (job.last_error or ""), job.last_error
    assert "exlab-sync retry" in (job.last_error or ""), job.last_error
    assert all((run / rel).read_bytes() == data for rel, data in FILES.items())
    # The way back the reason names: the entry configured again, then retry.
    async with running(cfg, clock) as client:
        await client.retry(job.id)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.VERIFIED, job.last_error
