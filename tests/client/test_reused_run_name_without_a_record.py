"""Fixed (found by review): a reused run name overwrites the old run's verified NAS copy when the verified stats were not recorded.

Fix (3) makes the audit check the NAS against the queue-recorded hashes when
the local checksums.sha256 is gone. But the queue's record is written *after*
the VERIFIED transition (job_runner._promote -> record_verified_stat) and may
be missing: a kill in between, or the handled error path ("verified file stats
not recorded ...; the reaper re-hashes"). Then, with the local run deleted and
its name reused:

- audit: _verified_record -> verified_manifest None, local manifest None -> {}
  -> compare({}, NAS) -> every NAS file "extra" -> "audit: no recorded manifest"
  -> QUEUED, rewrite_paths=(), verified_at cleared;
- run_job: check_local -> None (no verified manifest) -> keep = () -> the push
  overwrites the old run's verified NAS files with the new run's bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import exlab_wizard.sync.job_runner as job_runner
from tests.helpers import Clock
from tests.lab import FILES, Lab, running, synced, write_files

NEW = {
    "image_001.tif": b"N" * 3500,
    "sub/stack.raw": b"M" * 5500,
    "notes.txt": b"second acquisition, other sample\n",
}


def _nas_bytes(root: Path) -> set[bytes]:
    out: set[bytes] = set()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                out.add(hashlib.sha256(path.read_bytes()).digest())
    return out


async def test_reused_name_after_stats_not_recorded_keeps_old_verified_copy(lab: Lab, monkeypatch) -> None:
    def broken(*_a, **_k):
        raise OSError(28, "No space left on device")  # the handled path: "verified file stats not recorded"

    monkeypatch.setattr(job_runner, "record_verified_stat", broken)
    clock = Clock()
    cfg = lab.config(audit_interval_s=6 * 3600, scan_interval_s=3600)
    run = lab.make_run("Run_A", files=FILES)
    async with running(cfg, clock) as client:
        await synced(client, run)
        monkeypatch.undo()
        nas = lab.nas_copy(run)
        old = {hashlib.sha256(data).digest() for data in FILES.values()}
        assert old <= _nas_bytes(nas)

        shutil.rmtree(run)
        time.sleep(0.05)
        lab.make_run("Run_A", files={})
        write_files(run, NEW, mtime=time.time() + 5)

        clock.advance(7)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        after = await client.job(run)
        lost = old - _nas_bytes(nas)
        assert not lost, (
            f"rule 2: the old run's verified NAS copy was overwritten ({len(lost)} of {len(old)} files gone); "
            f"job {after.state.value}; events: " + "; ".join(f"{e.kind}:{e.detail}" for e in after.events[-6:])
        )
