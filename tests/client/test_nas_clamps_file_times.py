"""A NAS filesystem whose timestamp range is narrower than the instrument's.

XFS made without ``bigtime`` (every RHEL 7/8 server, xfsprogs before 5.15),
ext4 with 128-byte inodes, and FAT/exFAT keep a narrower range of times than
the instrument PC's disk; the kernel clamps a time outside it (``utimensat``
succeeds, the inode reads the range's end). An instrument PC with a broken
clock writes files dated 2100. Such a file is pushed and verified (the bytes
are right), but the reaper's last look finds "another mtime than the push
gave" (2038-01-19), sends the job back for a re-transfer of the file, the
re-transfer keeps the (good) NAS copy under ``previous/`` and sends it again,
it is verified again, and the next cleanup finds the same: for ever, with a
false reason ("NAS copy changed since it was sent"), the NAS filling with a
kept copy per round. A push of the verified run (a file written late) sent
the clamped file again each time, keeping its good NAS copy under
``previous/`` once more.

Now a NAS time at the clamp of the time sent is the time the push gave
(docs/cleanup.md, interlock 4), for the reaper and the push's skip alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.states import SyncJobState
from tests.fixtures.sshd import RW_USER
from tests.helpers import Clock
from tests.lab import Site, acts, running, write_files

S = SyncJobState
YEAR_2100 = 4_102_444_800
YEAR_2037 = 2_114_380_800


@contextlib.contextmanager
def xfs_without_bigtime(point: Path) -> Iterator[Path]:
    image = Path(tempfile.mkdtemp(prefix="exlab-xfs-")) / "nas.img"
    subprocess.run(["truncate", "-s", "320M", str(image)], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-m", "bigtime=0", str(image)], check=True)
    point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False)
        shutil.rmtree(image.parent, ignore_errors=True)


@pytest.fixture
def remote_dir() -> Iterator[Path]:
    """The sshd's remote root, on XFS without bigtime."""
    base = Path(tempfile.mkdtemp(prefix="exlab-remote-xfs-"))
    base.chmod(0o755)
    with xfs_without_bigtime(base / "nas") as point:
        point.chmod(0o755)
        shutil.chown(point, RW_USER, RW_USER)
        yield point
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["mount", "rsync_ssh"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    if request.param == "mount":
        with xfs_without_bigtime(tmp_path / "nas"):
            yield Site.on(request, tmp_path, "mount")
    else:
        yield Site.on(request, tmp_path, "rsync_ssh")


async def test_a_file_dated_past_the_nas_range_is_cleaned_not_resent_for_ever(site: Site) -> None:
    files = {"a.bin": b"a" * 1000, "b.bin": b"b" * 2000}
    run = site.make_run("Run_1", files=files)
    os.utime(run / "a.bin", (YEAR_2100, YEAR_2100))  # an instrument PC whose clock reads 2100
    clock = Clock()
    cfg = site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
    )
    async with running(cfg, clock) as client:
        for _round in range(2):
            await client.enqueue(run)
            await client.wait_idle(timeout=60)
            job = await client.job(run)
            assert job.state == S.VERIFIED, (job.state, job.last_error)
            clock.advance(6)
            await client.audit_once()
            clock.advance(19)
            await client.cleanup_once()
            await client.wait_idle(timeout=60)
            job = await client.job(run)
            if job.state == S.CLEANED:
                break
        details = [e.detail or "" for e in job.events]
    kept = list((site.nas_copy(run) / ".exlab-wizard").glob("previous/*/a.bin"))
    assert job.state == S.CLEANED, (job.state, job.last_error, [d for d in details if "mtime" in d][:2], kept)


async def test_a_push_of_the_verified_run_does_not_send_the_clamped_file_again(site: Site) -> None:
    run = site.make_run("Run_2", files={"a.bin": b"a" * 1000, "b.bin": b"b" * 2000})
    os.utime(run / "a.bin", (YEAR_2100, YEAR_2100))
    cfg = site.config(sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600})
    async with running(cfg, Clock()) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        assert (await client.job(run)).state == S.VERIFIED
        write_files(run, {"late.bin": b"l" * 500}, mtime=time.time() + 2)  # the instrument was not done
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    nas = site.nas_copy(run)
    assert job.state == S.VERIFIED, (job.state, job.last_error)
    assert (nas / "late.bin").is_file()
    kept = sorted(p.relative_to(nas).as_posix() for p in (nas / ".exlab-wizard").glob("previous/*/*"))
    assert kept == [], kept  # the verified a.bin was not sent over and kept again


async def test_a_nas_copy_replaced_later_still_shows_as_changed(site: Site) -> None:
    """Rule 2's look still holds for a clamped file: other bytes at another time are not the copy sent."""
    run = site.make_run("Run_3", files={"a.bin": b"a" * 1000, "b.bin": b"b" * 2000})
    os.utime(run / "a.bin", (YEAR_2100, YEAR_2100))
    clock = Clock()
    cfg = site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
    )
    async with running(cfg, clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        clock.advance(6)
        await client.audit_once()
        clock.advance(19)
        nas = site.nas_copy(run) / "a.bin"  # restored from an older snapshot: same size, dated 2037
        nas.write_bytes(b"z" * 1000)
        os.utime(nas, (YEAR_2037, YEAR_2037))
        [outcome] = acts(await client.cleanup_once())
        assert outcome.action == "requeued" and outcome.code == CleanupCode.NAS_COPY_CHANGED, outcome
        assert outcome.paths == ("a.bin",)
        assert (run / "a.bin").read_bytes() == b"a" * 1000


def test_only_a_time_outside_a_nas_range_has_a_clamp() -> None:
    from exlab_wizard.sync.transports.base import clamped_times  # new with the fix

    ns = 1_000_000_000
    assert clamped_times(YEAR_2100 * ns) == {(2**31 - 1) * ns}  # 2038-01-19 03:14:07 on XFS without bigtime
    assert clamped_times(0) == {315_532_800 * ns}  # 1970 (no clock battery) reads 1980-01-01 on FAT/exFAT
    assert clamped_times(YEAR_2037 * ns) == set()
    assert clamped_times(5_000_000_000 * ns) == {(2**31 - 1) * ns, 4_354_819_198 * ns, 4_354_819_199 * ns}
