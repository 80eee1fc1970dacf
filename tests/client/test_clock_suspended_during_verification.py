"""An edit after the hashing, a clock stepped back, and a suspend before the verification ends.

``record_verified_stat`` trusts a file (the reaper then deletes it on its stat
alone, never reading it again) when its mtime and ctime are before the earlier
of the job's RUNNING event (wall clock) and ``now - hashing_for_s``. That
length was measured with ``time.monotonic()``: on Linux CLOCK_MONOTONIC, which
stops while the PC is suspended, so after a suspend of S hours the "hashing
began" bound lay S hours too late. With the wall clock also ahead when the job
entered RUNNING (stepped back by NTP since: tests/client/test_clock_stepped_back.py),
both bounds were after a frame rewritten just after the push read it: its new
stat was recorded as trusted beside the hash of its old bytes, and the reaper
deleted the only copy of the new bytes (rule 1). The length is now measured on
CLOCK_BOOTTIME (``context.elapsed_s``), which counts a suspend.

Emulation: the client's wall clock is ``Clock`` (tests/helpers.py); a suspend
is that clock and CLOCK_BOOTTIME moving on while ``time.monotonic()`` does
not. The files' clock is the kernel's, which on a local disk *is* the wall
clock: the test gives ``filesystem_now_ns`` the emulated wall clock (the real
kernel clock cannot be moved here).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time

from exlab_wizard.sync.reaper import load_verified_stats, local_check
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, cleanup_config, running, write_files

S = SyncJobState
EDITED = "image_001.tif"
SUSPEND_H = 2


class _KernelClocks:
    """``time.clock_gettime`` on a PC that was suspended for ``suspended_s``: CLOCK_BOOTTIME counts it,
    every other clock (CLOCK_MONOTONIC, what ``time.monotonic`` reads) does not."""

    def __init__(self) -> None:
        self.suspended_s = 0.0
        self.real = time.clock_gettime

    def __call__(self, which: int) -> float:
        extra = self.suspended_s if which == getattr(time, "CLOCK_BOOTTIME", None) else 0.0
        return self.real(which) + extra


async def test_an_edit_before_a_suspend_is_never_trusted(lab: Lab, monkeypatch) -> None:
    clock = Clock()
    clock.offset = dt.timedelta(hours=1)  # the PC's clock runs an hour ahead when the job starts
    kernel = _KernelClocks()
    monkeypatch.setattr(time, "clock_gettime", kernel)
    monkeypatch.setattr(local_check, "filesystem_now_ns", lambda folder: int(clock().timestamp() * 1e9))
    old = dt.datetime.now(dt.UTC).timestamp() - 3 * 24 * 3600
    run = lab.make_run("Run_suspend", files=FILES)
    for rel in FILES:
        os.utime(run / rel, (old, old))
    edit = bytes(255 - b for b in FILES[EDITED])  # a frame acquired again: same size, other bytes

    async with running(cleanup_config(lab), clock) as client:

        def on_event(event: dict) -> None:
            if event.get("type") == "state" and event.get("state") == "awaiting_verify":
                clock.offset = dt.timedelta(0)  # NTP steps the clock back, while the job runs
                # Rewritten after the push read it, copied in with its acquisition time kept (cp -p):
                # only its ctime tells the write, and interlock 4's mtime comparison cannot see it.
                write_files(run, {EDITED: edit}, mtime=old)
                clock.advance(SUSPEND_H)  # the PC sleeps before the verification ends: monotonic stands still
                kernel.suspended_s += SUSPEND_H * 3600

        client.add_listener(on_event)
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, job.last_error
        assert (lab.nas_copy(run) / EDITED).read_bytes() == FILES[EDITED]  # the NAS holds the old frame
        stats = load_verified_stats(client._ctx.require_queue(), job.id)
        assert stats[EDITED].sha256 == hashlib.sha256(FILES[EDITED]).hexdigest()
        trusted = stats[EDITED].trusted

        for _ in range(8):  # two days of audits and cleanup passes
            clock.advance(6)
            await client.audit_once()
            await client.cleanup_once()
            await client.wait_idle(timeout=60)
        job = await client.job(run)
        local = (run / EDITED).read_bytes() if (run / EDITED).exists() else None
        assert local == edit or (lab.nas_copy(run) / EDITED).read_bytes() == edit, (
            f"rule 1: the rewritten {EDITED} was deleted locally (job {job.state.value}) and the NAS holds "
            "only its old bytes: recorded as trusted because the monotonic clock did not count the suspend"
        )
        assert not trusted, (
            "a file rewritten after the hashing began was recorded as trusted: the monotonic clock did not "
            "count the suspend, and the wall clock was stepped back"
        )
