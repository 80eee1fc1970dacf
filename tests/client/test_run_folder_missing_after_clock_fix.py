"""A run folder found gone while the PC's clock ran ahead: the one-day grace is not the clock's error.

``audit._run_folder_missing`` times the absence from the first
``run_folder_missing`` marker. A marker stamped while the clock ran ahead (set
back since) lies after now, and the audit used to wait until ``now - since``
reached the grace: the whole error of the clock. A clock that ran a year ahead
(a bad NTP source, a mistyped year, an RTC gone wrong) kept the job VERIFIED,
counted as verified and reclaimable, for a year instead of a day. As elsewhere
(``attempt_due``, ``audit._recent``, ``age_start``), a time after now is taken
for one stamped by a clock set back since: the audit writes a new marker at now
and the grace counts anew from the corrected clock.
"""

from __future__ import annotations

import datetime as dt
import os

from exlab_wizard.sync.audit import RUN_FOLDER_GRACE
from exlab_wizard.sync.states import SyncJobState
from tests.client.test_clock_ahead_then_corrected import SetClock
from tests.lab import Lab, running, synced

S = SyncJobState
GRACE_H = RUN_FOLDER_GRACE.total_seconds() / 3600


async def test_a_missing_run_folder_fails_a_day_after_the_clock_was_set_right(lab: Lab) -> None:
    clock = SetClock(dt.timedelta(days=365))  # the PC's clock runs a year ahead
    cfg = lab.config(audit_interval_s=6 * 3600, scan_interval_s=3600)  # cleanup off
    run = lab.make_run(files={"a.dat": b"a" * 1000})
    async with running(cfg, clock) as client:
        await synced(client, run)
        os.rename(run, run.with_name(run.name + "_renamed"))
        clock.advance(7)
        await client.audit_once()  # sees the folder gone: the grace starts (stamped a year ahead)
        assert [e for e in (await client.job(run)).events if e.code == "run_folder_missing"]

        clock.offset = dt.timedelta(0)  # NTP sets the clock right
        clock.advance(6)
        await client.audit_once()  # the first audit after the correction: the grace starts again
        assert (await client.job(run)).state == S.VERIFIED, "failed before the grace of the corrected clock"
        for _ in range(4 * 3 - 1):  # three days of audits in all, every 6 h
            clock.advance(6)
            await client.audit_once()
        job = await client.job(run)
    assert job.state == S.FAILED and job.error_kind == "run_folder_missing", (
        f"the run folder has been gone for 3 days of the corrected clock, the grace is {GRACE_H:g} h; the job "
        f"is still {job.state.value}, waiting out the year the clock ran ahead when it was first seen gone",
        job.last_error,
    )
