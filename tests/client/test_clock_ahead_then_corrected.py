"""Times recorded while the PC's clock ran ahead do not hold a job back once the clock is set right.

A clock that ran ahead (a bad NTP source, a mistyped year, an RTC gone wrong) and is then
set right leaves ``next_attempt_at``, ``last_verify_at`` and ``verified_at`` in the future.
Taken at face value, each would hold its job back by the whole error of the clock (a year
here): a QUEUED job backing off from a network error would wait it out (``retry`` re-arms
FAILED jobs only, ``enqueue`` returns the same job), a VERIFIED job would get no audit pass
and its cleanup would wait for ``verified_at`` plus ``min_age_hours``.

No backoff is longer than ``max(backoff_s)`` (nor a gate hold than ``scan_interval_s``) and no
audit is owed later than ``audit_interval_s`` after the last one: a recorded time further
ahead can only be a clock that was set back. The age of interlock 3 then counts from the
first verify pass made after the correction, never from earlier.
"""

from __future__ import annotations

import asyncio
import datetime as dt

from exlab_wizard.sync import audit
from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.states import SyncJobState
from tests.lab import MARKER, Lab, acts, cleanup_config, data_intact, running, synced

S = SyncJobState
AHEAD = dt.timedelta(days=365)


class SetClock:
    """The PC's wall clock: real time plus an offset an operator or NTP sets."""

    def __init__(self, offset: dt.timedelta) -> None:
        self.offset = offset

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def advance(self, hours: float) -> None:
        self.offset += dt.timedelta(hours=hours)


async def test_a_backoff_set_while_the_clock_ran_ahead_is_not_waited_out_after_it_is_corrected(lab: Lab) -> None:
    clock = SetClock(AHEAD)
    cfg = lab.config(backoff_s=[30, 120])
    run = lab.make_run(files={"a.dat": b"a" * 1000})
    marker = lab.mount_path() / MARKER
    marker.unlink()  # the share is not mounted yet: a network error, retried after 30 s
    async with running(cfg, clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=30)
        job = await client.job(run)
        assert job.state == S.QUEUED and job.next_attempt_at is not None, (job.state, job.last_error)

    marker.write_text("mounted\n")  # the share is back
    clock.offset = dt.timedelta(0)  # NTP sets the clock right
    clock.advance(0.1)  # six minutes on: longer than any backoff of this config
    async with running(cfg, clock) as client:  # even a restart of the service
        client._ctx.kick()
        await asyncio.sleep(0.3)
        await client.wait_idle(timeout=30)
        job = await client.job(run)
    assert job.state == S.VERIFIED, (
        "the job waits out the clock's error",
        job.state.value,
        job.next_attempt_at,
        clock(),
    )


async def test_a_backoff_set_while_the_clock_ran_ahead_is_due_without_a_restart(lab: Lab) -> None:
    clock = SetClock(AHEAD)
    cfg = lab.config(backoff_s=[30, 120])
    run = lab.make_run(files={"a.dat": b"a" * 1000})
    marker = lab.mount_path() / MARKER
    marker.unlink()
    async with running(cfg, clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=30)
        job = await client.job(run)
        assert job.state == S.QUEUED and job.next_attempt_at is not None, (job.state, job.last_error)

        marker.write_text("mounted\n")
        clock.offset = dt.timedelta(0)  # set right while the service runs
        # What `enqueue --wait` shows: no "next attempt" a year away, the job is due.
        assert "next attempt" not in (await client.waiting_for([job.id]))[job.id]
        client._ctx.kick()
        await asyncio.sleep(0.3)
        await client.wait_idle(timeout=30)
        job = await client.job(run)
    assert job.state == S.VERIFIED, (job.state.value, job.next_attempt_at, clock())


async def test_an_audit_owed_after_the_clock_was_corrected_is_made(lab: Lab) -> None:
    clock = SetClock(AHEAD)
    cfg = lab.config(audit_interval_s=6 * 3600, scan_interval_s=3600)
    run = lab.make_run(files={"a.dat": b"a" * 1000})
    async with running(cfg, clock) as client:
        await synced(client, run)  # verified while the clock ran a year ahead
        clock.offset = dt.timedelta(0)  # NTP sets the clock right
        clock.advance(7)  # an audit interval (6 h) and more since the verification
        await audit.audit_pass(client._ctx, force=False)  # what the audit loop runs
        job = await client.job(run)
        assert job.verify_passes == 2, (
            "no audit pass for as long as the clock was ahead",
            job.verify_passes,
            job.last_verify_at,
            clock(),
        )
        await audit.audit_pass(client._ctx, force=False)  # the pass just made is recent: no other
        assert (await client.job(run)).verify_passes == 2


async def test_cleanup_counts_the_age_from_the_first_pass_after_the_correction(lab: Lab) -> None:
    clock = SetClock(AHEAD)
    cfg = cleanup_config(lab)  # two passes, 24 h, audits every 6 h
    files = {"a.dat": b"a" * 1000}
    run = lab.make_run(files=files)
    async with running(cfg, clock) as client:
        await synced(client, run)  # verified_at a year ahead
        clock.offset = dt.timedelta(0)
        await audit.audit_pass(client._ctx, force=False)  # the second pass, after the correction
        assert (await client.job(run)).verify_passes == 2
        clock.advance(23)  # not yet 24 h since that pass: nothing deleted
        waiting = await client.cleanup_once()
        assert [(o.action, o.code) for o in waiting] == [("waiting", CleanupCode.WAITING_AGE)], waiting
        assert "waiting: 23" in waiting[0].reason, waiting[0].reason  # hours since that pass, not -8,737
        assert data_intact(run, files)
        clock.advance(1.5)  # 24.5 h since the first pass the corrected clock saw
        await audit.audit_pass(client._ctx, force=False)  # a third pass is due (6 h interval)
        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)
    assert [o.action for o in outcomes] == ["deleted"], [(o.action, o.reason) for o in outcomes]
    assert job.state == S.CLEANED
    assert all((lab.nas_copy(run) / rel).read_bytes() == data for rel, data in files.items())
