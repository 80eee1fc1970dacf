"""Writes a verified file's stat does not show, on an instrument PC's btrfs or XFS disk, end to end through cleanup.

Stores through a memory mapping into a page still dirty stamp no time; a
power cut can keep an in-place save's bytes and lose its new times. Either
leaves other bytes under the very stat recorded at verification: the reaper
must read them before it deletes; it calls them damage (never sent over the
verified NAS copy: a bad sector looks alike), naming ``retry --accept-local``.
A loop image per test, mounted at the lab's local_root. Needs root and
mkfs.btrfs / mkfs.xfs (fails, never skips, without them).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from exlab_wizard.sync.reaper import store
from exlab_wizard.sync.states import SyncJobState
from tests.fixtures.local_disks import fs_disk
from tests.helpers import Clock
from tests.lab import Lab, cleanup_config, ready, running, synced

S = SyncJobState
LIVE = "live.dat"
V = b"A" * 65536  # the bytes the push hashes and verifies
FILES = {LIVE: V, "image_001.tif": b"I" * 3000, "acquisition_complete.flag": b""}


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def _verdict(job) -> tuple:
    return job.state.value, job.error_kind, job.last_error


# --------------------------------------------------------------------------- writes through a shared mapping


@pytest.mark.parametrize("fs", ["btrfs", "xfs"])
async def test_bytes_written_through_a_mapping_after_the_hashing_are_never_deleted(tmp_path: Path, fs: str) -> None:
    """The acquisition program holds ``live.dat`` mapped (``numpy.memmap``, a camera SDK's ring file).

    Its first store into a page stamps mtime/ctime (``page_mkwrite``); later
    stores into that still-dirty page stamp nothing until writeback has
    cleaned it (up to ``dirty_expire_centisecs`` + ``dirty_writeback``, ~35 s
    by default). The push hashes the file 2.5 s after the stamp: the stat is
    recorded as trusted. The program then stores its last bytes into the same
    page, msyncs and unmaps: on disk the file holds other bytes than the
    verified ones, with the very stat recorded at verification. The reaper
    trusts the stat, never reads the file, and deletes bytes the NAS never had.

    A ``sync`` anywhere on the machine meanwhile (another test's) cleans the
    page, and the last store is stamped after all: the case is tried again,
    up to three times, before its precondition fails the test.
    """
    for attempt in range(3):
        outcome = await _mapped_store_after_the_hashing(tmp_path / f"try{attempt}", fs)
        if outcome is not None:
            break
    assert outcome is not None, "precondition: the stores through the mapping stamped no time (3 tries)"
    job, local, nas = outcome
    assert (local is not None and local[:8] == b"LASTDATA") or nas[:8] == b"LASTDATA", (
        f"[{fs}] bytes never verified were deleted: local {'deleted' if local is None else local[:8]!r}, "
        f"NAS holds {nas[:8]!r}; job {_verdict(job)}"
    )
    # Damage to the engine (a bad sector looks alike): nothing sent, the way to keep an unstamped save named.
    assert (job.state, job.error_kind) == (S.FAILED, "local_damage"), f"[{fs}] {_verdict(job)}"
    assert "memory map" in (job.last_error or ""), job.last_error


async def _mapped_store_after_the_hashing(root: Path, fs: str) -> tuple | None:
    """(job, local bytes or None, NAS bytes) after the case, or None when the last store was stamped after all."""
    root.mkdir()
    with fs_disk(fs, root / "lab"):
        lab = Lab.build(root)
        run = lab.make_run("Run_2026-01-01", files=FILES)
        fh = open(run / LIVE, "r+b")  # noqa: SIM115 - held open (and mapped) across the push, closed below
        os.fsync(fh.fileno())  # the file's blocks allocated and written: the program overwrites them in place
        mapping = mmap.mmap(fh.fileno(), 0)
        try:
            mapping[0:1] = b"A"  # the program's store (same byte): the page is made writable and stamped
            time.sleep(2.5)  # older than the hashing by more than RACE_SLACK_NS
            clock = Clock()
            async with running(cleanup_config(lab), clock) as client:
                await synced(client, run)  # V hashed, sent, read back, verified; stat recorded
                before = os.stat(run / LIVE)
                mapping[0:8] = b"LASTDATA"  # the final frame header, into the still-dirty page
                mapping.flush()  # msync: durable on disk
                mapping.close()
                fh.close()
                after = os.stat(run / LIVE)
                assert (run / LIVE).read_bytes()[:8] == b"LASTDATA"
                fields = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino")
                if any(getattr(before, f) != getattr(after, f) for f in fields):
                    return None
                clock.advance(6)
                await client.audit_once()
                clock.advance(19)
                await client.cleanup_once()
                job = await client.job(run)
                local = (run / LIVE).read_bytes() if (run / LIVE).exists() else None
                nas = (lab.nas_copy(run) / LIVE).read_bytes()
        finally:
            if not mapping.closed:
                mapping.close()
            fh.close()
    return job, local, nas


# --------------------------------------------------------------------------- a power cut after an in-place save


def _reboot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The PC boots again: a new boot id."""
    boot = tmp_path / "boot_id"
    boot.write_text(f"{uuid.uuid4()}\n")
    monkeypatch.setattr(store, "BOOT_ID_FILE", str(boot), raising=False)  # the old code has none


def _write_back_data_only(fd: int) -> None:
    """What the kernel's flusher does ~30 s after a write, with no fsync: the data pages written, nothing else."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    assert libc.sync_file_range(fd, 0, 0, 1 | 2 | 4) == 0, ctypes.get_errno()


@pytest.mark.parametrize("case", ["xfs-fdatasync", "btrfs-nodatacow-writeback"])
async def test_a_power_cut_after_an_in_place_save_never_gets_its_bytes_deleted(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XFS logs an inode's new mtime/ctime lazily (its log is forced every ~30 s), and ``fdatasync`` makes
    the data durable without them: after a verified file is overwritten in place and fdatasync-ed
    (an instrument's database, a frame store updating a header), a power cut in the next ~30 s
    leaves the NEW bytes on disk under the OLD size, mtime, ctime and inode: exactly the stat recorded
    at verification. btrfs: a ``nodatacow`` file (``chattr +C``, databases, VM images, the mount option)
    is overwritten in place when the flusher writes its pages back, with no fsync from anyone; its new
    times wait for the next transaction commit (every 30 s). The reaper trusts it, never reads the file, and deletes bytes the NAS never had.

    The cut: the loop image copied as the disk holds it at that instant, then mounted in its place,
    under a new boot id (``/proc/sys/kernel/random/boot_id``).
    """
    fs = case.split("-")[0]
    image = tmp_path / f"lab.{fs}.img"
    cut = tmp_path / "lab.cut.img"
    point = tmp_path / "lab"
    clock = Clock()
    with fs_disk(fs, point):
        lab = Lab.build(tmp_path)
        run = lab.make_run("Run_2026-01-01", files={k: v for k, v in FILES.items() if k != LIVE})
        (run / LIVE).touch()
        if fs == "btrfs":
            _run("chattr", "+C", str(run / LIVE))
        (run / LIVE).write_bytes(V)
        os.sync()
        time.sleep(2.5)
        async with running(cleanup_config(lab), clock) as client:
            await ready(client, clock, run)  # synced, audited, 25 h old: the next pass deletes
        before = os.stat(run / LIVE)
        time.sleep(0.05)
        fd = os.open(run / LIVE, os.O_WRONLY)
        try:
            os.pwrite(fd, b"LASTDATA", 0)  # the instrument saves in place...
            if fs == "xfs":
                os.fdatasync(fd)  # ...durably
            else:
                _write_back_data_only(fd)
        finally:
            os.close(fd)
        _run("cp", "--sparse=always", str(image), str(cut))  # the power cut: the disk as it is now
    try:
        _reboot(monkeypatch, tmp_path)
        _run("mount", "-o", "loop,nouuid" if fs == "xfs" else "loop", str(cut), str(point))  # the PC boots again
        try:
            after = os.stat(run / LIVE)
            on_disk = (run / LIVE).read_bytes()[:8]
            async with running(cleanup_config(lab), clock) as client:
                await client.cleanup_once()
                job = await client.job(run)
            local = (run / LIVE).read_bytes() if (run / LIVE).exists() else None
        finally:
            _run("umount", "-d", str(point))
    finally:
        cut.unlink(missing_ok=True)
    nas = (lab.nas_copy(run) / LIVE).read_bytes()
    assert on_disk == b"LASTDATA", "precondition: the save survived the cut"
    assert (after.st_mtime_ns, after.st_ctime_ns, after.st_ino, after.st_size) == (
        before.st_mtime_ns,
        before.st_ctime_ns,
        before.st_ino,
        before.st_size,
    ), "precondition: the cut took the save's new times with it"
    assert (local is not None and local[:8] == b"LASTDATA") or nas[:8] == b"LASTDATA", (
        f"bytes never verified were deleted after a power cut: local {'deleted' if local is None else local[:8]!r}, "
        f"NAS holds {nas[:8]!r}; job {_verdict(job)}"
    )
    # Damage to the engine (a bad sector looks alike): nothing sent, the way to keep the save named.
    assert (job.state, job.error_kind) == (S.FAILED, "local_damage"), _verdict(job)
    assert "power cut" in (job.last_error or ""), job.last_error
