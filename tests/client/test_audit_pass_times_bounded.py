"""A job's ``pass_times`` stay bounded however many audit passes it gets; interlock 3 decides as before.

With cleanup off (the default) a run stays VERIFIED for ever and is audited
every ``audit_interval_s`` (a day by default). Each pass used to append its
time to the row's JSON ``pass_times`` for ever: a year of daily audits, 365
times per job, parsed on every read of the row (the reaper reads every
VERIFIED row each scan). The row now keeps the earliest time and the latest
15; ``verify_passes`` still counts every pass, and the age interlock 3 counts
from (the earliest) is the same as with every time kept, also after the clock
was set back.
"""

from __future__ import annotations

import datetime as dt

from exlab_wizard.config import parse_config
from exlab_wizard.sync.policy.cleanup import (
    PASS_TIMES_KEPT,
    CleanupFacts,
    LocalCheck,
    RemoteCheck,
    add_pass_time,
    age_start,
    decide,
    promotion_refusal,
)
from tests.helpers import Clock
from tests.lab import Lab, running, synced

AUDITS = 40
HOUR = dt.timedelta(hours=1)
NOW = dt.datetime(2024, 5, 6, 12, 0, tzinfo=dt.UTC)


async def test_pass_times_stay_bounded_over_many_audits(lab: Lab) -> None:
    cfg = lab.config(scan_interval_s=3600, audit_interval_s=86400)  # cleanup off: the default
    run = lab.make_run()
    clock = Clock()
    async with running(cfg, clock) as client:
        await synced(client, run)
        for _ in range(AUDITS):
            clock.advance(25)
            await client.audit_once()
        job = await client.job(run)
    assert job.verify_passes == AUDITS + 1
    assert len(job.pass_times) <= 16, f"{len(job.pass_times)} pass times kept in the row after {AUDITS} audits"


async def test_a_clock_set_back_keeps_the_pass_the_age_counts_from(lab: Lab) -> None:
    """Verified while the clock ran a year ahead, then audited after it was set right: the age still counts
    from the first pass after the correction, many passes later, and promotion decides as with every time."""
    cleanup = parse_config(lab.config_data(nas_cleanup={"enabled": True, "min_age_hours": 24 * 30})).nas_cleanup
    cfg = lab.config(scan_interval_s=3600, audit_interval_s=3600)
    run = lab.make_run()
    clock = Clock()
    clock.offset = dt.timedelta(days=365)
    async with running(cfg, clock) as client:
        first = await synced(client, run)
        every = list(first.pass_times)
        clock.offset = dt.timedelta(0)  # set right
        for _ in range(AUDITS):
            clock.advance(24)
            await client.audit_once()
            every.append((await client.job(run)).pass_times[-1])
        job = await client.job(run)
    assert job.verify_passes == AUDITS + 1 and len(every) == AUDITS + 1
    assert len(job.pass_times) == PASS_TIMES_KEPT
    assert job.pass_times[1:] == tuple(every[-(PASS_TIMES_KEPT - 1) :])
    corrected = every[1]  # the first pass after the correction
    assert age_start(job.verified_at, job.pass_times, clock()) == corrected
    for days in (-1, 0, 1, 20, 29, 30, 31, 400):
        now = corrected + dt.timedelta(days=days, minutes=1)
        trimmed, full = (
            promotion_refusal(job, cleanup, now),
            promotion_refusal(_with(job, tuple(every)), cleanup, now),
        )
        assert trimmed == full, (days, trimmed, full)
    assert promotion_refusal(job, cleanup, corrected + dt.timedelta(days=30, minutes=1)) is None


class _with:
    """``job`` with other pass times (``SyncJobRow`` is frozen)."""

    def __init__(self, job: object, pass_times: tuple[dt.datetime, ...]) -> None:
        self._job, self.pass_times = job, pass_times

    def __getattr__(self, name: str) -> object:
        return getattr(self._job, name)


def _facts(
    verified_at: dt.datetime, passes: int, pass_times: tuple[dt.datetime, ...], now: dt.datetime
) -> CleanupFacts:
    return CleanupFacts(
        enabled=True,
        verify_passes=passes,
        min_verify_passes=2,
        verified_at=verified_at,
        min_age_hours=24 * 20,
        now=now,
        remote_reachable=True,
        overrides_no_longer_active=(),
        local=LocalCheck(),
        remote=RemoteCheck(),
        pass_times=pass_times,
    )


def test_the_decision_is_the_same_with_the_trimmed_times() -> None:
    """Daily passes in order, and the same after a verification stamped a year ahead, and with the clock
    set back a second time mid-way: ``decide`` answers the same at every hour with the kept times."""
    ahead = NOW + dt.timedelta(days=365)
    cases = {
        "in order": [NOW + i * 24 * HOUR for i in range(100)],
        "clock set back once": [ahead] + [NOW + i * 24 * HOUR for i in range(1, 100)],
        "set back twice": [ahead]
        + [NOW + i * 24 * HOUR for i in range(1, 40)]
        + [NOW - 10 * 24 * HOUR + i * 24 * HOUR for i in range(60)],
    }
    for name, every in cases.items():
        kept: tuple[dt.datetime, ...] = ()
        for count, at in enumerate(every, 1):
            kept = add_pass_time(kept, at)
            assert len(kept) == min(count, PASS_TIMES_KEPT), name
            assert kept[-1] == at and min(kept) == min(every[:count]), name
        assert kept[1:] == tuple(every[-(PASS_TIMES_KEPT - 1) :]), name
        for hours in range(-24 * 20, 24 * 420, 7):
            now = NOW + hours * HOUR
            full = decide(_facts(every[0], len(every), tuple(every), now))
            trimmed = decide(_facts(every[0], len(every), kept, now))
            assert (trimmed.action, trimmed.code, trimmed.reason) == (full.action, full.code, full.reason), (
                name,
                now,
            )
            assert age_start(every[0], kept, now) == age_start(every[0], tuple(every), now), (name, now)
