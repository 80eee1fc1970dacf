"""retain_cache false: the final metadata push goes after a NAS move to a copy of the share.

``metadata_push.try_push`` refused a place other than the verified one "until
the run is verified there (the audit's pass at the new place ...)". But once the reaper has
deleted the local data, the audit skips the job ("local data already deleted: the cleanup
is finishing"), so no pass at the new place can ever come: the final push of a run whose
first final push failed (the NAS away a moment) is refused on every pass for ever, though
the new place holds the run's verified copy and manifest (the lab copied its share over).
The job never reached CLEANED (found by review). It now goes to a moved place that holds the
run's own verified manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from exlab_wizard.sync.states import SyncJobState
from tests.client.test_audit_and_cleanup import first_final_push_fails
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, acts, mark_nas, on_share, ready, running
from tests.lab import cleanup_config as config

S = SyncJobState


async def test_final_push_after_a_nas_move_is_not_refused_for_ever(lab: Lab, tmp_path: Path) -> None:
    clock = Clock()
    cfg = config(lab, retain_cache=False)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        job = await ready(client, clock, run)
        first_final_push_fails(client)  # the NAS away for a moment: the job waits, local data deleted
        [outcome] = acts(await client.cleanup_once())
        assert outcome.action == "waiting", outcome
        assert not any((run / rel).exists() for rel in FILES)

    # The lab moves to a new NAS, copying the whole share (verified copy, manifest, claims).
    share = mark_nas(tmp_path / "nas2")
    shutil.copytree(lab.mount_path(EQ), share, dirs_exist_ok=True)
    moved = on_share(cfg, EQ, share)
    reasons = []
    async with running(moved, clock) as client:
        for _ in range(4):
            clock.advance(7)
            await client.audit_once()
            reasons += [o.reason for o in acts(await client.cleanup_once())]
        job = await client.job(run)
    assert job.state == S.CLEANED, (job.state.value, reasons[-1:], [e.detail for e in job.events][-3:])
