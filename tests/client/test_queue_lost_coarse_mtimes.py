"""Damage made while the queue was lost is refused on a NAS that keeps coarse mtimes (10 ms, 1 ms).

A NAS that keeps mtimes in 10 ms steps (exFAT: the Linux driver's ``s_time_gran``, so ``lstat`` on
the share shows the sent mtime truncated to 10 ms; rclone backends keeping milliseconds likewise)
lists the verified copy a few ms *before* the local file's own, never-touched mtime. The first
version of the check, with the push's ``same_mtime`` (1 us, or 2 s of a whole-second copy), read
the file as "edited after its copy was sent": never hashed, never refused, its damaged bytes sent
over the verified NAS copy (rule 2) and the job VERIFIED on them (review of this session's fixes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import RemoteFile
from exlab_wizard.sync.transports.mount import MountTransport
from tests.client.test_queue_lost_local_damage import lose_queue
from tests.helpers import Clock, flip_byte_keep_stat
from tests.lab import FILES, Site, ready, running

SECOND = 1_000_000_000
T = 1_767_268_800 * SECOND
TEN_MS = 10_000_000


DAMAGED = "image_001.tif"


@pytest.fixture
def mount_site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    return Site.on(request, tmp_path, "mount")


async def test_queue_lost_damage_on_an_exfat_share_is_sent_over_the_verified_copy(
    mount_site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = mount_site
    real = MountTransport.remote_stats

    async def exfat_stats(self: MountTransport, run_path: Path) -> dict[str, RemoteFile]:
        # What lstat shows on an exFAT share: every mtime truncated to 10 ms.
        return {
            rel: RemoteFile(f.size, f.mtime_ns - f.mtime_ns % TEN_MS) for rel, f in (await real(self, run_path)).items()
        }

    monkeypatch.setattr(MountTransport, "remote_stats", exfat_stats)
    clock = Clock()
    run = site.make_run("Run_2026-01-01", files=FILES)
    os.utime(run / DAMAGED, ns=(T + 123_456_789, T + 123_456_789))  # an mtime off the 10 ms grid, as nearly all are
    cfg = site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
    )
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
    flip_byte_keep_stat(run / DAMAGED, offset=100)
    lose_queue(site.state)
    nas = site.nas_copy(run)
    async with running(cfg, clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert (nas / DAMAGED).read_bytes() == FILES[DAMAGED], (
        "the damaged local bytes replaced the verified NAS copy",
        job.state.value,
        job.last_error,
    )
    assert job.state == SyncJobState.FAILED and job.error_kind == "local_damage", (job.state, job.last_error)
