"""Cleanup of runs whose local_root is the instrument's removable disk: exFAT (exfat-fuse) and NTFS (ntfs-3g).

exFAT keeps no change time (exfat-fuse reports ctime = mtime), stamps whole
seconds rounded down, and numbers inodes anew after a remount or when the
kernel lets them go; NTFS through ntfs-3g keeps a real ctime and stable
inodes. ``native`` is the test machine's own filesystem (ext4).

1. A frame rewritten in place after its verification, size and mtime put
   back (``exiftool -P``, ``touch -r``): never deleted without its new bytes
   reaching the NAS. On ext4 and NTFS the ctime moves; on exFAT nothing in
   the stat does, so the files of such a disk are read again at cleanup.
2. A frame appended to a file the push already read, in the second its
   hashing began: an edit, never "local damage" that ``restore`` cuts off.
3. Inodes renumbered (a reboot or a replug between two deletion passes, the
   kernel's inode cache dropped): the deletion finishes, nothing changed.

Needs root, /dev/fuse and ntfs-3g, exfat-fuse, exfatprogs (fails without).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from exlab_wizard.config import Config
from exlab_wizard.sync import job_runner
from exlab_wizard.sync.reaper import deletion
from exlab_wizard.sync.states import SyncJobState
from tests.fixtures.local_disks import LocalDisk, drop_inode_cache, local_disk, run_on_disk
from tests.helpers import Clock
from tests.lab import (
    FILES,
    Site,
    act_once_in,
    cleanup_config,
    deletion_killed_after_two,
    ready,
    ready_client,
    rewrite_in_place,
    running,
    synced,
)

S = SyncJobState


async def _verdict(client, run: Path) -> tuple:
    job = await client.job(run)
    return job.state.value, job.error_kind, job.last_error


async def _cleanup_after_a_reboot(disk: LocalDisk, cfg: Config, clock: Clock, run: Path) -> tuple:
    """The PC boots again (the disk mounted anew) and a new client runs a cleanup pass: the job's verdict."""
    disk.remount()
    async with running(cfg, clock) as client:
        await client.cleanup_once()
        return await _verdict(client, run)


# --------------------------------------------------------------------------- 1. an edit keeping size and mtime

FRAMES = {"frame_001.tif": b"A" * 4096, "frame_002.tif": b"B" * 4096, "acquisition_complete.flag": b""}
EDITED = "frame_002.tif"
NEW = b"b" * 4096  # the same size


@pytest.mark.parametrize("fs", ["native", "ntfs", "exfat"])
async def test_an_edit_that_kept_size_and_mtime_is_never_deleted(tmp_path: Path, fs: str) -> None:
    with run_on_disk(fs, tmp_path, FRAMES) as (_disk, lab, run):
        async with ready_client(lab, run) as (client, _clock):
            rewrite_in_place(run / EDITED, NEW)
            await client.cleanup_once()
            job = await client.job(run)
            local = (run / EDITED).read_bytes() if (run / EDITED).exists() else None
            nas = (lab.nas_copy(run) / EDITED).read_bytes()
    assert local == NEW or nas == NEW, (
        f"[{fs}] the edited bytes are on neither side: job {job.state.value} {job.error_kind}; "
        f"local file {'deleted' if local is None else 'other bytes'}; NAS holds the old bytes: {nas != NEW}"
    )


RUN_FILES = {f"f{i:02d}.bin": bytes([65 + i]) * 4096 for i in range(6)}
CLEANUP = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True}
SYNC = {"audit_interval_s": 6 * 3600, "scan_interval_s": 3600}


@pytest.mark.network
@pytest.mark.parametrize("kind", ["mount", "rsync_ssh"])
async def test_exfat_edit_keeping_size_and_mtime_is_never_deleted(request, tmp_path: Path, kind: str) -> None:
    site = Site.on(request, tmp_path, kind)
    with local_disk("exfat", site.local_root):
        run = site.make_run("Run_1", files=RUN_FILES)
        time.sleep(2.5)
        clock = Clock()
        async with running(site.config(cleanup=CLEANUP, sync=SYNC), clock) as client:
            await ready(client, clock, run)
            rewrite_in_place(run / "f03.bin", b"z" * 4096)
            await client.cleanup_once()
            job = await client.job(run)
            local = (run / "f03.bin").read_bytes() if (run / "f03.bin").exists() else None
    nas = (site.nas_copy(run) / "f03.bin").read_bytes()
    assert local == b"z" * 4096 or nas == b"z" * 4096, (
        f"[{kind}] the edited bytes are on neither side: job {job.state.value} {job.error_kind}; "
        f"local file {'deleted' if local is None else 'other bytes'}"
    )


# --------------------------------------------------------------------------- 2. a frame appended during the push

GROWN = "sub/stack.raw"


def _start_of_a_second() -> None:
    """Wait until just after a second boundary: the push below ends within that same second."""
    time.sleep(1.0 - time.time() % 1.0 + 0.02)


@pytest.mark.parametrize("fs", ["native", "exfat"])
async def test_a_frame_appended_during_the_push_is_never_cut_back(tmp_path: Path, monkeypatch, fs: str) -> None:
    frame = os.urandom(4096)
    with run_on_disk(fs, tmp_path, {**FILES, "acquisition_complete.flag": b""}) as (_disk, lab, run):

        def append() -> None:
            with open(run / GROWN, "ab") as fh:  # the instrument's last frame, after the file was copied
                fh.write(frame)

        act_once_in(monkeypatch, job_runner, "record_verified_stat", lambda *a, **k: True, append)
        clock = Clock()
        async with running(cleanup_config(lab), clock) as client:
            _start_of_a_second()
            started = time.time()
            await synced(client, run)
            took = time.time() - started
            for _ in range(5):  # the reaper's local check comes once the run is 24 h old
                clock.advance(6)
                await client.audit_once()
                await client.cleanup_once()
                await client.wait_idle(timeout=60)
            verdict = await _verdict(client, run)
            if verdict[1] == "local_damage":
                await client.restore(run)  # what recovery.md tells the operator to do about local damage
            after = (run / GROWN).read_bytes() if (run / GROWN).exists() else b""
            on_nas = (lab.nas_copy(run) / GROWN).read_bytes()
    assert took < 0.95, f"the push took {took:.2f} s: the frame was not appended within the second it began"
    assert frame in after or frame in on_nas, (
        f"[{fs}] the appended frame is on neither side: job went {verdict}; local file now {len(after)} bytes, "
        f"NAS {len(on_nas)} bytes"
    )
    assert verdict[1] != "local_damage", f"[{fs}] a file that only grew was called local damage: {verdict}"


# --------------------------------------------------------------------------- 3. inodes renumbered

SMALL = {f"f{i:02d}.bin": bytes([65 + i]) * 1000 for i in range(6)}


@pytest.mark.parametrize("fs", ["ntfs", "exfat"])
async def test_a_deletion_cut_by_a_reboot_finishes_after_it(tmp_path: Path, monkeypatch, fs: str) -> None:
    with run_on_disk(fs, tmp_path, SMALL) as (disk, lab, run):
        async with ready_client(lab, run) as (client, clock):
            with deletion_killed_after_two(monkeypatch):
                await client.cleanup_once()  # two files deleted, then the power cut
        verdict = await _cleanup_after_a_reboot(disk, cleanup_config(lab), clock, run)
        left = sorted(p.name for p in run.iterdir() if p.is_file())
    nas = lab.nas_copy(run)
    assert all((nas / rel).read_bytes() == data for rel, data in SMALL.items())
    assert verdict[0] == S.CLEANED.value, f"[{fs}] the resumed deletion failed: {verdict}; local files left {left}"


async def test_a_deletion_after_the_kernel_let_the_inodes_go(tmp_path: Path, monkeypatch) -> None:
    """Memory pressure between the plan and its first batch (a large run: minutes of hashing). Writes the
    machine-wide ``vm.drop_caches``: the one test that does."""
    with run_on_disk("exfat", tmp_path, SMALL) as (_disk, lab, run):
        async with ready_client(lab, run) as (client, _clock):
            fired = act_once_in(monkeypatch, deletion, "delete_batch", lambda *a, **k: True, drop_inode_cache)
            await client.cleanup_once()
            assert fired
            verdict = await _verdict(client, run)
    assert verdict[0] == S.CLEANED.value, f"the deletion failed: {verdict}"


@pytest.mark.parametrize("fs", ["ntfs", "exfat"])
async def test_a_reboot_between_verification_and_cleanup(tmp_path: Path, fs: str) -> None:
    """The local check re-hashes every file whose inode moved, and plans with the new numbers."""
    with run_on_disk(fs, tmp_path, SMALL) as (disk, lab, run):
        async with ready_client(lab, run) as (_client, clock):
            pass  # synced, audited, 25 h old
        verdict = await _cleanup_after_a_reboot(disk, cleanup_config(lab), clock, run)
    assert verdict[0] == S.CLEANED.value, verdict


@pytest.mark.network
@pytest.mark.parametrize("kind", ["mount", "rsync_ssh"])
async def test_exfat_deletion_cut_by_a_reboot_finishes(request, tmp_path: Path, monkeypatch, kind: str) -> None:
    site = Site.on(request, tmp_path, kind)
    with local_disk("exfat", site.local_root) as disk:
        run = site.make_run("Run_1", files=RUN_FILES)
        time.sleep(2.5)
        clock = Clock()
        cfg = site.config(cleanup=CLEANUP, sync=SYNC)
        async with running(cfg, clock) as client:
            await ready(client, clock, run)
            with deletion_killed_after_two(monkeypatch):
                await client.cleanup_once()
        verdict = await _cleanup_after_a_reboot(disk, cfg, clock, run)
    nas = site.nas_copy(run)
    assert all((nas / rel).read_bytes() == data for rel, data in RUN_FILES.items())
    assert verdict[0] == S.CLEANED.value, f"[{kind}] {verdict}"
