"""A cleanup with ``retain_cache: false`` killed after it deleted the data, finished by an upgraded engine.

The killed engine's queue is at version 1 (before pending metadata pushes),
its reaper's tables made on first use. Queue migration 2 marks every VERIFIED
or CLEANUP_ELIGIBLE job as owing a metadata push: this one too, though its
local data are deleted and (after the verified final push) its
``.exlab-wizard/`` may be gone. Such a push has nothing to send: it is
cleared, and the cleanup ends CLEANED. While ``checksums.sha256`` is still
there, the push is owed and made as for any run, and the final push is
proved before ``.exlab-wizard/`` goes.
"""

from __future__ import annotations

import pytest

from exlab_wizard.sync.reaper import deletion
from exlab_wizard.sync.states import SyncJobState
from tests.client.upgrade import as_version
from tests.helpers import Clock
from tests.lab import FILES, Lab, events, ready, running
from tests.lab import cleanup_config as config

S = SyncJobState


class Killed(BaseException):
    """The engine killed at that line."""


@pytest.mark.parametrize("where", ["remove_run_folder", "remove_run_folder_done", "remove_metadata"])
async def test_a_cleanup_cut_short_under_a_version_1_queue_ends_cleaned(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    clock = Clock()
    cfg = config(lab, retain_cache=False)
    run = lab.make_run(files=FILES)
    real = getattr(deletion, where.removesuffix("_done"))

    def killed(*args):
        if where.endswith("_done"):
            real(*args)  # the run folder removed too, CLEANED not recorded
        raise Killed()

    monkeypatch.setattr(deletion, where.removesuffix("_done"), killed)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        with pytest.raises(Killed):
            await client.cleanup_once()
    monkeypatch.setattr(deletion, where.removesuffix("_done"), real)
    assert not any((run / rel).exists() for rel in FILES)
    metadata_left = (run / ".exlab-wizard" / "checksums.sha256").exists()
    assert metadata_left == (where == "remove_metadata")
    local_manifest = (run / ".exlab-wizard" / "checksums.sha256").read_bytes() if metadata_left else None
    pushed_before = len(events(lab.job(run), "metadata_pushed"))
    as_version(lab.state / "queue.db", 1, ad_hoc_reaper=True)

    async with running(cfg, clock) as client:
        for _ in range(4):
            await client.wait_idle(timeout=60)
            out = await client.cleanup_once()
            clock.advance(1)
        job = await client.job(run)
    assert job.state == S.CLEANED, (job.state, job.metadata_push_error, [(o.action, o.reason) for o in out])
    assert not job.metadata_push_pending
    nas = lab.nas_copy(run)
    for rel, data in FILES.items():
        assert (nas / rel).read_bytes() == data
    assert not run.exists() or not any(run.iterdir())
    if metadata_left:
        # Something left to send: sent, never cleared, and proved on the NAS before it went.
        assert len(events(job, "metadata_pushed")) > pushed_before and not events(job, "metadata_push_cleared")
        assert (nas / ".exlab-wizard" / "checksums.sha256").read_bytes() == local_manifest
    else:
        assert [e.detail for e in events(job, "metadata_push_cleared")], job.events
        assert not events(job, "metadata_push_failed")


async def test_a_run_whose_disk_is_away_keeps_its_push_pending(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run folder and its parent gone (a disk away): not taken for removed; cleared once the disk is back."""
    clock = Clock()
    cfg = config(lab, retain_cache=False)
    run = lab.make_run(files=FILES)

    def killed(run_path):
        raise Killed()

    real = deletion.remove_run_folder
    monkeypatch.setattr(deletion, "remove_run_folder", killed)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        with pytest.raises(Killed):
            await client.cleanup_once()
    monkeypatch.setattr(deletion, "remove_run_folder", real)
    as_version(lab.state / "queue.db", 1, ad_hoc_reaper=True)
    away = run.parent.with_name(run.parent.name + ".away")
    run.parent.rename(away)
    async with running(cfg, clock) as client:
        await client.wait_idle(timeout=60)
        await client.cleanup_once()
        job = await client.job(run)
        assert job.state == S.CLEANUP_ELIGIBLE and job.metadata_push_pending
        assert not events(job, "metadata_push_cleared")
        away.rename(run.parent)
        clock.advance(3600)  # the push's retry due
        for _ in range(3):
            await client.wait_idle(timeout=60)
            await client.cleanup_once()
            clock.advance(3600)
        job = await client.job(run)
    assert job.state == S.CLEANED and events(job, "metadata_push_cleared")
