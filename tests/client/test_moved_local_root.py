"""An equipment's local_root changed in the config (data copied to a new disk, the old one still mounted).

The old jobs keep their old run paths. The audit pass used to raise on the
first of them (``remote_relpath``: ValueError) and never reach a later job:
no job of the lab got another verify pass, so nothing was ever cleaned. Now
such a job is skipped with a note, and any one job's error ends its own
audit only.
"""

from __future__ import annotations

import shutil

from exlab_wizard.config import parse_config
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, cleanup_config, running, synced

S = SyncJobState


async def test_audit_pass_survives_a_job_outside_the_new_local_root(tmp_path) -> None:
    lab = Lab.build(tmp_path, equipment=(EQ,), nas_per_equipment=False)
    clock = Clock()
    old_run = lab.make_run("Run_2026-01-01", files=FILES)
    async with running(cleanup_config(lab), clock) as client:
        await synced(client, old_run)

    # The lab moves its data to a new disk (cp -a), keeps the old one mounted, edits local_root.
    new_root = tmp_path / "disk2"
    shutil.copytree(lab.local_root, new_root, symlinks=True)
    data = lab.config_data(sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 3600, "audit_interval_s": 6 * 3600})
    data["equipment"][0]["local_root"] = str(new_root)
    data["nas_cleanup"] = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24}
    cfg2 = parse_config(data)
    new_run = new_root / old_run.relative_to(lab.local_root)
    async with running(cfg2, clock) as client:
        await synced(client, new_run)  # same NAS folder, same bytes: verified
        clock.advance(7)
        await client.audit_once()  # serve's audit loop calls the same audit_pass
        job = await client.job(new_run)
        old = await client.job(old_run)
        assert any("no longer under" in (e.detail or "") for e in old.events if e.kind == "audit_skipped")
        assert job.verify_passes == 2, f"the run at the new root got no pass: verify_passes={job.verify_passes}"
