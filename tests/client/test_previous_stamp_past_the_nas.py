"""A new round's ``previous/<stamp>/`` never names a folder the NAS already holds.

A round's stamp was unique only against the stamps the job's own events name.
After the queue was lost (docs/recovery.md: the run's own ``checksums.sha256``
on the NAS stands for the lost manifest, and an edit is sent with its NAS copy
kept under previous/), the new job has no such events: its stamp was just
``now``. With the PC's clock back at the second of an earlier round (a CMOS
battery resetting the date so every boot starts at the same instant), that
folder already holds the earlier round's kept copy:

- mount / rclone took the kept path as "kept by an earlier attempt of this
  round", left the NAS file in place, and the push wrote over it unkept;
- rsync_ssh's ``--backup-dir=previous/<stamp>`` replaced the earlier round's
  kept copy.

Now the push refuses a stamp whose folder the NAS holds, and the job keeps
under a stamp past every one the NAS run folder shows: every verified version
stays on the NAS.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from exlab_wizard.sync.states import SyncJobState
from tests.lab import Site, ready, running

S = SyncJobState
X = "image_001.tif"
V1, V2, V3 = (bytes([65 + i]) * 4000 for i in range(3))


class SetClock:
    """The PC's wall clock: set by hand (a CMOS reset, an operator), moved on by ``advance``."""

    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def __call__(self) -> dt.datetime:
        return self.at

    def advance(self, hours: float) -> None:
        self.at += dt.timedelta(hours=hours)


def _edit(path: Path, data: bytes, later_s: int) -> None:
    before = os.stat(path)
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + later_s * 1_000_000_000))


def _versions_on_nas(nas: Path) -> list[bytes]:
    found = [(nas / X).read_bytes()] if (nas / X).is_file() else []
    kept = nas / ".exlab-wizard" / "previous"
    found += [p.read_bytes() for p in sorted(kept.glob(f"*/{X}"))] if kept.exists() else []
    return found


def _lose_queue(state: Path) -> None:
    for path in state.iterdir():
        if path.name.startswith("queue.db"):
            path.unlink()


async def test_a_clock_back_at_an_earlier_rounds_second_keeps_every_verified_nas_copy(site: Site) -> None:
    boot = dt.datetime(2000, 1, 1, 0, 0, 40, tzinfo=dt.UTC)  # where a dead CMOS battery starts the clock
    clock = SetClock(boot)
    cfg = site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
    )
    run = site.make_run("Run_2026-01-01", files={X: V1, "notes.txt": b"ok\n"})
    nas = site.nas_copy(run)

    # Round 1 (queue 1): V1 verified; an edit V2 sent, V1 kept under previous/<stamp of this second>/.
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        _edit(run / X, V2, 60)
        edit_push_at = clock()
        await client.cleanup_once()  # the reaper sees the edit and re-queues the run
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, (job.state, job.last_error)
    assert (nas / X).read_bytes() == V2
    assert V1 in _versions_on_nas(nas)

    # The state folder is reset (docs/recovery.md, "If the queue itself was lost"), and the PC's
    # clock is back at the second of round 1's push (the same boot instant after a CMOS reset).
    _lose_queue(site.state)
    clock.at = edit_push_at
    _edit(run / X, V3, 120)  # a later edit: sent as an edit, its NAS copy (V2, verified) to be kept

    async with running(cfg, clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)

    versions = _versions_on_nas(nas)
    names = {V1: "V1", V2: "V2", V3: "V3"}
    assert V1 in versions and V2 in versions, (
        "a verified NAS copy was replaced without being kept",
        [names.get(v, "?") for v in versions],
        sorted(str(p.relative_to(nas)) for p in (nas / ".exlab-wizard" / "previous").rglob("*")),
        job.state.value,
        [e.detail for e in job.events if e.kind.startswith("previous")],
    )
