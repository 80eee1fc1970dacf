"""The forked remote hashing (a run of 2,000 files or more, one process a core) misses no damage.

Through the real client and rsync over ssh to the loopback sshd: a run of
2,100 files is synced and verified; one NAS file gets another byte under its
size and mtime. The audit's remote manifest (the forked hasher) must name
that file, send the job back, count no pass; cleanup deletes nothing; the next
push puts the verified bytes back (the bad NAS copy kept under previous/).
"""

from __future__ import annotations

import os

import pytest

from exlab_wizard.sync.states import SyncJobState
from tests.client.test_cleanup_nas_copy import nas_setup
from tests.helpers import Clock
from tests.lab import Lab, acts, data_intact, events, running, synced

S = SyncJobState
MANY = {f"tiles/row{i % 30:02d}/t{i:05d}.tif": os.urandom(64 + i % 200) for i in range(2100)}
DAMAGED = "tiles/row07/t01057.tif"


@pytest.mark.network
async def test_the_audit_of_a_run_of_many_files_finds_the_one_nas_byte_that_changed(
    lab: Lab, request: pytest.FixtureRequest
) -> None:
    clock = Clock()
    cfg, nas_copy = nas_setup(lab, request, "rsync_ssh")
    run = lab.make_run(files=MANY)
    nas = nas_copy(run)
    async with running(cfg, clock) as client:
        job = await synced(client, run)
        assert job.state == S.VERIFIED and job.verify_passes == 1, job.last_error
        target = nas / DAMAGED
        st = target.stat()
        data = bytearray(target.read_bytes())
        data[10] ^= 0xFF
        target.write_bytes(bytes(data))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime kept
        clock.advance(6)
        await client.audit_once()
        job = await client.job(run)
        assert not any(e.kind == "verify_pass" for e in job.events)
        back = [e for e in events(job, "transition") if e.from_state == "verified" and e.to_state == "queued"]
        assert back and "1 different" in back[-1].detail and DAMAGED in back[-1].detail, [e.detail for e in back]
        outcomes = acts(await client.cleanup_once())
        assert all(o.action != "deleted" for o in outcomes), outcomes
        assert data_intact(run, MANY)
        await client.wait_idle(timeout=120)
        job = await client.job(run)
    assert job.state == S.VERIFIED, job.last_error
    assert (nas / DAMAGED).read_bytes() == MANY[DAMAGED]
