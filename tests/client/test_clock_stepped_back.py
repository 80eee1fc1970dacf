"""A wall clock stepped back during a job never lets an edit made after the hashing pass for verified.

After VERIFIED the client records each file's stat as "trusted" when the
file was last changed before the hashing began: the reaper then deletes it
on that stat alone, without reading it again. "Before the hashing began"
used to be the time of the job's RUNNING event, stamped by the wall clock.
A clock that ran an hour ahead when the job started and was stepped back
by NTP during it dates every later change before that event: a frame
rewritten (same size) after the push had read it was recorded as trusted
beside the hash of its old bytes, and the reaper deleted the only copy of
the new ones. The hashing is now timed by a clock never stepped (CLOCK_BOOTTIME)
(``record_verified_stat(hashing_for_s=...)``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time

import pytest

from exlab_wizard.sync.reaper import load_verified_stats
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, cleanup_config, running, write_files

S = SyncJobState
EDITED = "image_001.tif"


@pytest.mark.parametrize("step_h", [0, 1], ids=["no step", "stepped back 1 h"])
async def test_an_edit_after_the_hashing_is_never_trusted_whatever_the_clock_did(lab: Lab, step_h: int) -> None:
    clock = Clock()
    clock.offset = dt.timedelta(hours=step_h)  # the client's clock runs ahead ...
    old = dt.datetime.now(dt.UTC).timestamp() - 3 * 24 * 3600
    run = lab.make_run("Run_clock", files=FILES)
    for rel in FILES:
        os.utime(run / rel, (old, old))
    edit = bytes(255 - b for b in FILES[EDITED])  # a frame acquired again: same size, other bytes
    assert len(edit) == len(FILES[EDITED])

    async with running(cleanup_config(lab), clock) as client:

        def on_event(event: dict) -> None:
            if event.get("type") == "state" and event.get("state") == "awaiting_verify":
                clock.offset = dt.timedelta(0)  # ... until NTP steps it back, while the job runs
                write_files(run, {EDITED: edit}, mtime=time.time())  # rewritten after the push read it

        client.add_listener(on_event)
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, job.last_error  # the NAS holds the bytes the push read
        assert (lab.nas_copy(run) / EDITED).read_bytes() == FILES[EDITED]

        stats = load_verified_stats(client._ctx.require_queue(), job.id)
        assert stats[EDITED].sha256 == hashlib.sha256(FILES[EDITED]).hexdigest()
        assert not stats[EDITED].trusted, "a file changed after the hashing began was recorded as trusted"

        # Two days of audits and cleanup passes: the edit is sent, never deleted unsent.
        for _ in range(8):
            clock.advance(6)
            await client.audit_once()
            await client.cleanup_once()
            await client.wait_idle(timeout=60)
        local = (run / EDITED).read_bytes() if (run / EDITED).exists() else None
        assert local == edit or (lab.nas_copy(run) / EDITED).read_bytes() == edit, (
            f"rule 1: the edit of {EDITED} was deleted locally and is not on the NAS"
        )
