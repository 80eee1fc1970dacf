"""A run with a file dated before 1970 or after 2106 still cleans over rclone sftp.

Found in review: SFTP version 3 (OpenSSH's sftp-server, under rclone sftp) carries
mtimes as unsigned 32-bit whole seconds, so such a file's NAS copy lands at another
time (1950 -> 2086, 2200 -> 2063). Interlock 4 compares each planned file's NAS
mtime with the times the push gave it; the run was sent back on every reaper pass
and never cleaned. The wrapped time now counts as one the push gave (the same as
the real one for times in between). Files dated so come from instrument PCs with a
broken clock; tests/client/test_file_dated_after_2262.py covers mount and rsync_ssh.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from tests.client.test_metadata_push_owner import make_site
from tests.helpers import Clock
from tests.lab import acts, running

S = SyncJobState
SYNC = {"audit_interval_s": 6 * 3600, "scan_interval_s": 3600}
CLEANUP = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True}
FILES = {"a.bin": b"a" * 10, "b.bin": b"b" * 20}
DATES = {
    "sub_second": 1_700_000_000.987654321,
    "before_1970": -631_152_000,  # 1950
    "after_2106": 7_258_118_400,  # 2200
}


async def _settle(client, run):
    for _ in range(50):
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        if job.state not in (S.QUEUED, S.RUNNING):
            return job
        await asyncio.sleep(0.05)
    return job


@pytest.mark.network
@pytest.mark.parametrize("date", list(DATES))
async def test_a_run_dated_outside_32_bit_seconds_cleans_over_rclone_sftp(
    request: pytest.FixtureRequest, tmp_path: Path, date: str
) -> None:
    site = make_site(request, tmp_path, "rclone")
    run = site.make_run("Run_1", files=FILES)
    os.utime(run / "a.bin", (DATES[date], DATES[date]))
    clock = Clock()
    seen: list[tuple[str, str]] = []
    async with running(site.config(sync=SYNC, cleanup=CLEANUP), clock) as client:
        await client.enqueue(run)
        job = await _settle(client, run)
        assert job.state == S.VERIFIED, (job.state, job.last_error)
        clock.advance(6)
        await client.audit_once()
        clock.advance(19)
        for _ in range(3):
            seen += [(o.action, o.reason) for o in acts(await client.cleanup_once())]
            job = await _settle(client, run)
            if job.state == S.CLEANED:
                break
    assert job.state == S.CLEANED, (job.state, job.last_error, seen)
    assert not (run / "a.bin").exists()
