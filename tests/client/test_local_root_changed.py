"""A QUEUED job whose equipment's local_root was changed in the config fails at once, saying so.

The data moved to another disk and the config names the new local_root; a job queued for the run at
its old path can no longer name its NAS place. It failed ``unknown: ValueError: '...' is not in the
subpath of '...'`` (after backoffs); now FAILED at once with the audit's reason and the way back.
"""

from __future__ import annotations

from pathlib import Path

from exlab_wizard.config.models import Config
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Site, running

S = SyncJobState
SYNC = {"audit_interval_s": 6 * 3600, "scan_interval_s": 3600}


def _moved_root(cfg: Config, root: Path) -> Config:
    return cfg.model_copy(update={"equipment": [eq.model_copy(update={"local_root": root}) for eq in cfg.equipment]})


async def test_a_queued_job_whose_local_root_changed_fails_saying_so(site: Site, tmp_path: Path) -> None:
    run = site.make_run("Run_1", files=FILES)
    clock = Clock()
    cfg = site.config(sync=SYNC)
    async with running(cfg, clock) as client:
        queue = client._ctx.require_queue()
        equipment = cfg.equipment[0]
        remote = client._ctx.remotes.transport(equipment).remote_run_path(run)
        queue.get_or_create(str(run), equipment.id, remote, now=clock())
    (tmp_path / "elsewhere").mkdir()
    async with running(_moved_root(cfg, tmp_path / "elsewhere"), clock) as client:
        client._ctx.kick()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.FAILED, (job.state, job.last_error)
    assert "no longer under equipment" in (job.last_error or ""), job.last_error
    assert "ValueError" not in (job.last_error or ""), job.last_error
