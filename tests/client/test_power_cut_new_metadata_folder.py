"""A local power cut after VERIFIED: the run's new ``.exlab-wizard/`` folder survives it (found by review).

A run without a creation.json (an "orphan", a soft finding: it syncs) gets
its ``.exlab-wizard/`` folder from the engine: ``CreationWriter._ensure_metadata_dir``
(``folder.mkdir``) and ``Verifier.write_manifest`` (``target.parent.mkdir``).
The files written inside it are durable (``atomic_write_bytes``: fsync of
the file and of ``.exlab-wizard/``), but the folder's own entry in the run
folder is never made durable: nobody fsyncs the run folder. POSIX makes a new
directory entry durable only once its parent is fsynced.

The model (as in ``test_power_cut_folders.py``): every mkdir / rename under
the lab's local root is "pending" until its folder is fsynced; a power cut
removes what is still pending. Syncfs is not used (the share is made to look
like SMB/FUSE), so nothing here syncs the local disk by accident.

After the cut the queue (SQLite WAL, synchronous=FULL: durable) still says
VERIFIED with the manifest digest, but the run's checksums.sha256 is gone:
the reaper refuses ``no recorded manifest`` (MANIFEST_MISSING) on every pass,
and nothing in the engine ever writes that manifest again (the audit goes on
passing against the queue's per-file record). The job waits for ever, its
local copy never freed, though the NAS copy is verified and complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import mount as mount_module
from tests.helpers import Clock, Durability
from tests.lab import FILES, Lab, running
from tests.lab import cleanup_config as config

S = SyncJobState


async def test_local_power_cut_after_verified_leaves_the_run_cleanable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab.build(tmp_path)
    # A share fsynced file by file (SMB, FUSE): no syncfs that would also sync the test's local disk.
    monkeypatch.setattr(mount_module, "filesystem_type", lambda path: "fuse.sshfs")
    run = lab.make_run(files=FILES, creation=False)  # an orphan run: it has no .exlab-wizard/ yet
    for folder in (run, *run.parents):  # what existed before the engine ran is durable
        if str(folder).startswith(str(tmp_path)):
            fd = os.open(folder, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    model = Durability(lab.local_root, monkeypatch)

    cfg = config(lab, min_verify_passes=1, min_age_hours=0)
    clock = Clock()
    async with running(cfg, clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED and not job.metadata_push_pending, (job.state, job.last_error)
        assert (run / ".exlab-wizard" / "checksums.sha256").is_file()
        digest = job.manifest_digest

    # The power goes. What the engine never made durable is gone; the queue (WAL, FULL) is intact.
    lost = model.power_cut()

    async with running(cfg, clock) as client:
        job = await client.job(run)
        assert job.state == S.VERIFIED and job.manifest_digest == digest  # the durable record
        for _ in range(4):
            clock.advance(1)
            await client.audit_once()
            await client.cleanup_once()
            await client.wait_idle(timeout=60)
        job = await client.job(run)
    refusals = [e.detail for e in job.events if e.kind == "cleanup_refused"]
    assert job.state == S.CLEANED, (
        f"stuck {job.state.value} after a local power cut; entries the engine never made durable: {lost}; "
        f"cleanup refusals: {refusals}"
    )
