"""Fixed (found by review): on an rsync host that refuses commands, an edited verified run can never be sent again.

run_job now keeps (keep_previous) every file check_local calls changed since the
verification, on every attempt, whatever the NAS holds. rsync_ssh.keep_previous
always runs an ssh command for a non-empty list, so a host that refuses
commands (rrsync, internal-sftp) answers REMOTE_WRITE_REFUSED. docs/recovery.md
tells the operator to "move the NAS copy aside ... then exlab-sync retry: a file
missing on the NAS is simply sent". It is not: check_local still counts the
local edit as changed against the verified manifest, keep is called again and
refused again. The job is FAILED for ever unless the local edit is thrown away.

The refusing host is simulated by making the mount transport's keep_previous
raise what rsync_ssh._keep_batch raises there.
"""

from __future__ import annotations

import shutil
import time

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.mount import MountTransport
from tests.helpers import Clock
from tests.lab import FILES, Lab, running, synced, write_files

S = SyncJobState
EDIT = {"notes.txt": b"acquired ok\nplus a note written after the verification\n"}


async def test_documented_way_out_works_on_a_host_that_refuses_commands(lab: Lab, monkeypatch) -> None:
    async def refused(self, run, paths, stamp):
        if not paths:
            return []
        raise TransportError(
            TransportErrorKind.REMOTE_WRITE_REFUSED,
            "nas refuses commands: the verified files cannot be kept (needs a remote that runs mv)",
        )

    monkeypatch.setattr(MountTransport, "keep_previous", refused)
    clock = Clock()
    cfg = lab.config(audit_interval_s=6 * 3600, scan_interval_s=3600)
    run = lab.make_run("Run_E", files=FILES)
    async with running(cfg, clock) as client:
        job = await synced(client, run)
        write_files(run, EDIT, mtime=time.time() + 5)
        clock.advance(7)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "remote_write_refused", (job.state, job.last_error)

        # docs/recovery.md: decide which copy is right; the edit is: move the NAS copy aside, then retry.
        nas = lab.nas_copy(run)
        aside = lab.root / "aside"
        aside.mkdir()
        shutil.move(str(nas / "notes.txt"), str(aside / "notes.txt"))
        await client.retry(job.id)
        await client.wait_idle(timeout=60)
        after = await client.job(run)
        assert after.state == S.VERIFIED, (
            f"stuck: after moving the NAS copy aside and retrying, job {after.state.value} {after.error_kind}: "
            f"{after.last_error}"
        )
        assert (nas / "notes.txt").read_bytes() == EDIT["notes.txt"]
