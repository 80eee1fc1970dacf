"""The reaper's final metadata push never sends a damaged local checksums.sha256 over the verified one (rule 2).

With ``retain_cache: false`` the local data are deleted before the final
push; the NAS's ``checksums.sha256`` is then the last full record of the
verified hashes. Before, a local one damaged while the job waited for the
NAS was pushed over it, "proved" by reading it back, and the local copy
deleted. ``final_push`` now refuses as ``send_pending`` does.
"""

from __future__ import annotations

import hashlib
from typing import Any

from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock, flip_byte_keep_stat
from tests.lab import FILES, Lab, acts, ready, running
from tests.lab import cleanup_config as config

S = SyncJobState


async def test_final_push_never_replaces_the_verified_manifest_on_the_nas(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, retain_cache=False)
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    async with running(cfg, clock) as client:
        job = await ready(client, clock, run)
        nas_manifest = nas / ".exlab-wizard" / "checksums.sha256"
        assert hashlib.sha256(nas_manifest.read_bytes()).hexdigest() == job.manifest_digest  # the verified one
        reaper = client._reaper
        real_push = reaper.push_metadata
        calls: list[int] = []

        async def push(job_row: Any) -> bool:
            calls.append(1)
            if len(calls) == 1:
                return False  # the NAS is away for the first final push: the job waits, data already deleted
            return await real_push(job_row)

        reaper.push_metadata = push
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["waiting"]
        assert not any((run / rel).exists() for rel in FILES)  # local data gone, .exlab-wizard/ kept

        # While the job waits, the local checksums.sha256 rots (one byte, size and mtime kept).
        flip_byte_keep_stat(run / ".exlab-wizard" / "checksums.sha256", offset=3)

        await client.cleanup_once()
        job = await client.job(run)
    assert hashlib.sha256(nas_manifest.read_bytes()).hexdigest() == job.manifest_digest, (
        f"the NAS's verified checksums.sha256 was replaced by the damaged local one (job {job.state}, "
        f"local run folder exists: {run.exists()})"
    )
