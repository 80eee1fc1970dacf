"""Jobs whose equipment was renamed or removed in the config say so, and nothing is deleted for them.

The lab renames an equipment id (CONFOCAL_01 -> CONFOCAL_1, same share, same
disk) or removes it. The old jobs' NAS place can no longer be named. A
verified job used to wait for ever on "equipment log unavailable:
'CONFOCAL_01'" (a KeyError), skipped by the audit with no event.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exlab_wizard.config.models import Config
from exlab_wizard.sync.policy.cleanup import CleanupCode
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
