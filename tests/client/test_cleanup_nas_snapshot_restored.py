"""A NAS folder rolled back to an older snapshot after the last audit pass never loses the newer bytes.

A run is verified; the NAS takes its nightly snapshot. The lab then edits a data file (same
size: a fixed-size frame re-processed; new mtime): the run is sent again, the verified NAS copy
of that file kept under ``previous/<stamp>/``, verified, audited again 6 h later, and is 25 h
old. Then the NAS admin restores the run folder from the snapshot: the edited file is back to
its older bytes with its older mtime, and ``previous/<stamp>/`` is gone (the snapshot predates
it). The reaper's last look at the NAS compared sizes only, so it deleted the local edited file:
its bytes were then nowhere (rule 1). Now the listing's mtimes (``remote_stats``) are compared
with the ones the push gave: the file is sent again, nothing deleted.

A NAS that keeps mtimes coarsely still cleans: rsync lists whole seconds (every rsync_ssh case
here), and rclone's S3 backend keeps the mtime in the object's metadata.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, Site, acts, everything_under, rclone_s3_equipment, ready, running, synced

S = SyncJobState
CLEANUP = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True}
SYNC = {"audit_interval_s": 6 * 3600, "scan_interval_s": 3600}
EDITED_FILE = "sub/stack.raw"
EDITED = b"C" * len(FILES[EDITED_FILE])  # re-processed frame, same size


@pytest.mark.network
@pytest.mark.parametrize("kind", ["mount", "rsync_ssh"])
async def test_a_snapshot_restore_after_the_last_pass_never_lets_the_reaper_delete_the_newer_bytes(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    site = Site.on(request, tmp_path, kind)
    run = site.make_run("Run_1", files=FILES)
    for rel in FILES:  # acquired an hour ago
        os.utime(run / rel, (os.path.getmtime(run / rel) - 3600,) * 2)
    nas = site.nas_copy(run)
    snapshot = tmp_path / "snapshot"
    clock = Clock()
    async with running(site.config(cleanup=CLEANUP, sync=SYNC), clock) as client:
        await synced(client, run)
        subprocess.run(["cp", "-a", str(nas), str(snapshot)], check=True)  # the NAS's nightly snapshot

        (run / EDITED_FILE).write_bytes(EDITED)  # the lab's edit: same size, new mtime
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, job.last_error
        assert (nas / EDITED_FILE).read_bytes() == EDITED
        clock.advance(6)
        await client.audit_once()
        clock.advance(19)
        job = await client.job(run)
        assert job.verify_passes == 2, job.last_error

        shutil.rmtree(nas)  # the admin restores the folder from the snapshot
        subprocess.run(["cp", "-a", str(snapshot), str(nas)], check=True)
        assert (nas / EDITED_FILE).read_bytes() == FILES[EDITED_FILE]

        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)
        everywhere = [p.read_bytes() for p in nas.rglob("*") if p.is_file()]
        local = run / EDITED_FILE
        assert (local.is_file() and local.read_bytes() == EDITED) or EDITED in everywhere, (
            f"rule 1: the edited, verified bytes of {EDITED_FILE} are neither local nor on the NAS "
            f"({[(o.action, o.reason) for o in outcomes]}, job {job.state.value})"
        )
        [outcome] = outcomes
        assert outcome.action == "requeued" and outcome.code == CleanupCode.NAS_COPY_CHANGED, outcome
        assert outcome.paths == (EDITED_FILE,)
        assert all((run / rel).is_file() for rel in FILES)

        await client.wait_idle(timeout=60)  # sent again: the NAS holds the edit, the restored bytes kept aside
        job = await client.job(run)
        assert job.state == S.VERIFIED, job.last_error
    assert (nas / EDITED_FILE).read_bytes() == EDITED
    assert FILES[EDITED_FILE] in everything_under(nas / ".exlab-wizard" / "previous")


@pytest.mark.network
async def test_a_run_on_rclone_s3_still_cleans(tmp_path: Path, s3_server, s3_rclone_config) -> None:
    """The mtimes rclone lists for S3 objects are the ones it sent (kept in the metadata)."""
    lab = Lab.build(tmp_path)
    prefix = f"mtimes-{os.getpid()}-{time.monotonic_ns()}"
    data = lab.config_data(sync={"backoff_s": [0.01, 0.01], **SYNC})
    data["equipment"] = rclone_s3_equipment(lab, s3_server, s3_rclone_config, prefix)
    data["nas_cleanup"] = CLEANUP
    clock = Clock()
    run = lab.make_run("Run_1", files=FILES)
    async with running(parse_config(data), clock) as client:
        await ready(client, clock, run)
        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)
    assert [o.action for o in outcomes] == ["deleted"], [(o.action, o.reason) for o in outcomes]
    assert job.state == S.CLEANED
