"""A NAS power cut after the reaper deleted the local copy loses nothing (mount, a share fsynced file by file).

POSIX only makes a directory entry (a mkdir, a rename) durable once its
folder is fsynced (or the whole filesystem synced). The mount transport
used to fsync, at the end of a push, only the folders *this* push touched. A push that
failed before that step (the share away during the folder fsyncs, or the
engine killed there) leaves its mkdirs and renames un-synced; the retry
skips the files already there (same size and mtime), so it touches neither
their folders nor the ancestors it finds existing, and never fsyncs them.
On a share whose syncfs is not trusted (SMB, FUSE, anything unknown) the
remote manifest fsyncs each file but no folder either. The job still goes
VERIFIED, and the reaper deletes the local files while their NAS names were
never made durable by anyone: a NAS power cut then loses both copies.
Every push now fsyncs every folder of the run and of the chain above it.

The test records every mkdir/rename under the NAS and every folder fsync /
syncfs, and models the power cut as "entries whose folder was not fsynced
since they were made are gone".
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import mount as mount_module
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.mount import MountTransport
from tests.helpers import Clock, Durability
from tests.lab import FILES, Lab, running
from tests.lab import cleanup_config as config

S = SyncJobState


@pytest.mark.parametrize("first_push", ["completes", "interrupted_before_folder_fsyncs"])
async def test_every_nas_entry_is_durable_before_the_local_copy_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_push: str
) -> None:
    lab = Lab.build(tmp_path)
    # A share whose syncfs is not trusted (SMB, FUSE, unknown): files are fsynced one by one.
    monkeypatch.setattr(mount_module, "filesystem_type", lambda path: "fuse.sshfs")
    model = Durability(lab.nas, monkeypatch)

    # The first push reaches the folder fsyncs and the share fails there (or the engine is killed
    # there): every file is already renamed into place, none of the folders is synced.
    real_sync_dir = MountTransport._sync_dir
    failing = {"on": first_push != "completes"}

    def sync_dir(self, folder):
        if failing["on"]:
            failing["on"] = False  # once: the share is back for the retry
            raise TransportError(TransportErrorKind.NETWORK, f"remote unreachable: {folder}")
        return real_sync_dir(self, folder)

    monkeypatch.setattr(MountTransport, "_sync_dir", sync_dir)

    cfg = config(lab, min_verify_passes=1, min_age_hours=0)
    clock = Clock()
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    async with running(cfg, clock) as client:
        await client.enqueue(run)
        for _ in range(500):
            await client.wait_idle(timeout=60)
            job = await client.job(run)
            if job.state == S.VERIFIED and not job.metadata_push_pending:
                break
            await asyncio.sleep(0.02)
        assert job.state == S.VERIFIED, (job.state, job.last_error)
        retried = [
            e for e in job.events if e.kind == "transition" and e.to_state == "queued" and e.from_state == "running"
        ]
        assert bool(retried) == (first_push != "completes")
        for _ in range(3):
            await client.cleanup_once()
        job = await client.job(run)
        assert job.state == S.CLEANED, (job.state, [e.detail for e in job.events][-5:])
    local_gone = [rel for rel in FILES if not (run / rel).exists()]
    assert local_gone == sorted(FILES) or set(local_gone) == set(FILES)
    # Rule 1: every local byte deleted must have a durable verified NAS copy.
    lost = model.lost(nas, FILES)
    never_synced = sorted(os.path.relpath(os.path.join(f, n), model.root) for f, n in model.pending)
    assert lost == [], (
        f"a NAS power cut now loses {lost}: deleted locally, their NAS entries never fsynced: {never_synced}"
    )
