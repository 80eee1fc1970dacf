"""A run holding a file dated after 2262-04-11 is verified, audited and cleaned like any other.

Such an mtime in nanoseconds (``st_mtime_ns``) is past 2**63 - 1; ext4, xfs
and btrfs keep it (``touch -d 2300-01-01``; instrument PCs with a broken
clock write such stamps). It used to leave the run CLEANUP_ELIGIBLE for
ever: the verified stats and the deletion plan were bound as SQLite INTEGER
(signed 64 bits), every reaper pass ended ``cleanup error: OverflowError``,
and nothing told the lab. The mount transport's first push attempt failed
too (``argument out of range``: its stat key packed the times as signed 64
bits). A file dated before 1970 (a negative mtime) rides along.
"""

from __future__ import annotations

import asyncio
import os

from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import Site, data_intact, running

S = SyncJobState

YEAR_2302 = 10_500_000_000  # seconds since 1970; * 10**9 ns is past 2**63
YEAR_1950 = -631_152_000


async def test_a_file_dated_after_2262_does_not_leave_its_run_eligible_for_ever(site: Site) -> None:
    files = {"a.bin": b"a" * 10, "b.bin": b"b" * 20, "c.bin": b"c" * 30}
    run = site.make_run("Run_1", files=files)
    os.utime(run / "a.bin", (YEAR_2302, YEAR_2302))
    os.utime(run / "c.bin", (YEAR_1950, YEAR_1950))
    assert os.stat(run / "a.bin").st_mtime_ns > 2**63 - 1
    assert os.stat(run / "c.bin").st_mtime_ns < 0
    clock = Clock()
    cfg = site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
    )
    async with running(cfg, clock) as client:
        await client.enqueue(run)
        for _ in range(50):  # a failed first attempt would be retried: wait for the job to settle
            await client.wait_idle(timeout=60)
            job = await client.job(run)
            if job.state not in (S.QUEUED, S.RUNNING):
                break
            await asyncio.sleep(0.05)
        assert job.state == S.VERIFIED, (job.state, job.last_error)
        clock.advance(6)
        await client.audit_once()
        clock.advance(19)
        assert (await client.job(run)).verify_passes == 2
        for _ in range(3):  # pass after pass
            await client.cleanup_once()
            await client.wait_idle(timeout=60)
        job = await client.job(run)
    details = [e.detail or "" for e in job.events]
    errors = [d for d in details if "Overflow" in d or "out of range" in d or "not recorded" in d]
    assert not errors, errors
    assert job.state == S.CLEANED, (job.state, job.last_error, details[-5:])
    for rel, data in files.items():
        assert (site.nas_copy(run) / rel).read_bytes() == data
    assert not data_intact(run, files)
