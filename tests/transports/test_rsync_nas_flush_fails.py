"""rsync_ssh on a NAS volume whose writes fail under the filesystem while its page cache still holds them.

A thin-provisioned NAS volume (a Synology thin LUN, a VM disk on a pool,
here: a sparse btrfs image on a small tmpfs "pool", loop-mounted as the
rsync_ssh remote root) whose pool fills up: every write-back of new blocks
fails, ``syncfs`` reports it (EIO on btrfs, ENOSPC on XFS), but ``read``
still serves the bytes from the page cache; after the volume is mounted
again the files are gone (btrfs) or empty (XFS).

The remote hash programs fell back from a failing ``syncfs`` / ``sync -f .``
to a whole ``sync``, which reports nothing, and hashed the cached pages: the
job went VERIFIED for bytes that never reached the NAS's disks. Now a failing
flush is exit 6 and the job fails ``remote_write_refused``, for the python3
hasher and each sh one. The mount transport, for comparison, was sound: its own
``syncfs`` raises and its read-back reads storage. docs/transports.md, "Durable
on the NAS before it is verified". Needs root (tmpfs, loop devices) and mkfs.btrfs.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import rsync_ssh
from exlab_wizard.sync.transports._process import ToolResult
from exlab_wizard.sync.transports.classify import pull_error, push_error
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport
from tests.fixtures.sshd import RW_USER
from tests.helpers import Clock
from tests.lab import Site, act_once_in, running

S = SyncJobState
FILES = {
    "image_001.tif": os.urandom(300_000),
    "sub/stack.raw": os.urandom(2_000_000),
    "notes.txt": os.urandom(20_000),
}


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


class ThinVolume:
    """A sparse ``fs`` image on a 300 MiB tmpfs pool, loop-mounted at ``point``."""

    def __init__(self, fs: str, pool: Path, point: Path):
        self.fs, self.pool, self.point = fs, pool, point
        pool.mkdir()
        _sh("mount", "-t", "tmpfs", "-o", "size=300M", "tmpfs", str(pool))
        self.image = pool / "volume.img"
        with open(self.image, "wb") as fh:
            fh.truncate(1 << 30)
        _sh("mkfs.xfs", "-q", str(self.image)) if fs == "xfs" else _sh("mkfs.btrfs", "-q", str(self.image))
        self.device = _sh("losetup", "-f", "--show", str(self.image))
        self.mounted = False
        self.mount()

    def mount(self) -> None:
        _sh("mount", self.device, str(self.point))
        self.mounted = True

    def fill_pool(self) -> None:
        """The pool runs out: no new block of the image can be written any more."""
        avail = os.statvfs(self.pool).f_bavail * os.statvfs(self.pool).f_frsize
        filled = subprocess.run(["fallocate", "-l", str(avail), str(self.pool / "filler")], capture_output=True)
        if filled.returncode != 0:  # the volume wrote meanwhile: fill it up to the last page instead
            (self.pool / "filler").unlink(missing_ok=True)
            subprocess.run(["dd", "if=/dev/zero", f"of={self.pool / 'filler'}", "bs=1M"], capture_output=True)

    def grow_pool_and_remount(self) -> None:
        """The admin frees the pool and mounts the volume again (the NAS rebooted)."""
        (self.pool / "filler").unlink(missing_ok=True)
        self.unmount()
        self.mount()

    def unmount(self) -> None:
        if self.mounted:
            for _ in range(50):
                if subprocess.run(["umount", str(self.point)], capture_output=True).returncode == 0:
                    break
                subprocess.run(["sleep", "0.1"])
            else:
                subprocess.run(["umount", "-l", str(self.point)], capture_output=True)
            self.mounted = False

    def close(self) -> None:
        self.unmount()
        subprocess.run(["losetup", "-d", self.device], capture_output=True)
        subprocess.run(["umount", str(self.pool)], capture_output=True)


async def _fixed_tool(tool: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def hash_tool(self: RsyncSshTransport, run_path: object = None) -> str:
        return tool

    monkeypatch.setattr(RsyncSshTransport, "hash_tool", hash_tool)


async def _push_while_the_pool_fills(
    request, tmp_path: Path, remote_dir: Path, monkeypatch: pytest.MonkeyPatch, fs: str, before: str
) -> tuple[Any, dict[str, bytes | None]]:
    """FILES synced by the service onto a thin ``fs`` volume at ``remote_dir`` whose pool runs out
    right before the first call of ``RsyncSshTransport.<before>``; the job once it settled, and
    what the volume holds once mounted again."""
    vol = ThinVolume(fs, tmp_path / "pool", remote_dir)
    try:
        user = pwd.getpwnam(RW_USER)
        os.chown(remote_dir, user.pw_uid, user.pw_gid)
        os.chmod(remote_dir, 0o755)
        site = Site.on(request, tmp_path, "rsync_ssh")
        run = site.make_run(files=FILES)
        fired = act_once_in(monkeypatch, RsyncSshTransport, before, lambda *a, **k: True, vol.fill_pool)
        clock = Clock()
        async with running(site.config(sync={"backoff_s": [3600.0]}), clock) as client:
            await client.enqueue(run)
            for _ in range(60):
                job = await client.job(run)
                if job.state in (S.VERIFIED, S.FAILED) or (job.state == S.QUEUED and job.attempts):
                    break
                await asyncio.sleep(1)
        assert fired
        await asyncio.to_thread(vol.grow_pool_and_remount)
        nas = site.nas_copy(run)
        held = {rel: (nas / rel).read_bytes() if (nas / rel).is_file() else None for rel in FILES}
    finally:
        vol.close()
    return job, held


@pytest.mark.network
@pytest.mark.parametrize("tool", ["python3-openssl", "sha256sum", "openssl", "sha256sum-stdin"])
# XFS: the same loss measured outside the engine; in this flow its blocks were written before the pool filled
@pytest.mark.parametrize("fs", ["btrfs"])
async def test_rsync_ssh_never_verifies_bytes_the_thin_nas_volume_could_not_write(
    request, tmp_path: Path, remote_dir: Path, monkeypatch, fs: str, tool: str
) -> None:
    await _fixed_tool(tool, monkeypatch)
    job, held = await _push_while_the_pool_fills(request, tmp_path, remote_dir, monkeypatch, fs, "remote_manifest")
    lost = sorted(rel for rel, data in held.items() if data != FILES[rel])
    assert job.state != S.VERIFIED or not lost, (
        f"[{fs}, {tool}] the job is VERIFIED ({job.last_error or 'no error'}) but after the NAS volume is mounted "
        f"again {lost} are {[('missing' if held[r] is None else f'{len(held[r])} bytes') for r in lost]}: the hash "
        f"was of pages the volume never wrote (the failed flush fell back to a whole sync, which reports nothing)"
    )
    if lost:
        assert (job.state, job.error_kind) == (S.FAILED, "remote_write_refused"), (job.state, job.last_error)
        assert "sync not found or failed" in (job.last_error or ""), job.last_error


@pytest.mark.network
async def test_a_write_failing_while_the_push_flushes_the_nas_is_never_verified(
    request, tmp_path: Path, remote_dir: Path, monkeypatch
) -> None:
    """The pool runs out as the push starts, while the NAS is flushed every 50 ms beside it: the
    job is never VERIFIED (here btrfs turns read-only at the first failed flush, and the push is refused).

    Those flushes are plain ``sync`` calls (sync(2)), which report no write-back error and mark none
    as seen, so the verify pass's own ``syncfs`` still reports each one (a ``syncfs`` there would be
    told an error first, and a ``syncfs`` opened after it would find nothing to report: seen outside
    the engine on XFS with its log on another device, where only the data's write-back fails).
    test_remote_programs pins the plain ``sync``.
    """
    monkeypatch.setattr(rsync_ssh, "FLUSH_WHILE_SENDING_MIN_BYTES", 0)
    monkeypatch.setattr(rsync_ssh, "FLUSH_WHILE_SENDING_S", 0.05)
    await _fixed_tool("python3-openssl", monkeypatch)
    job, held = await _push_while_the_pool_fills(request, tmp_path, remote_dir, monkeypatch, "btrfs", "_send")
    lost = sorted(rel for rel, data in held.items() if data != FILES[rel])
    assert lost  # the pool was full before the first byte: none reached the volume's disks
    assert job.state != S.VERIFIED, f"VERIFIED, but {lost} never reached the NAS volume's disks"
    assert job.error_kind == "remote_write_refused", (job.state, job.last_error)


_TAIL = (
    "rsync error: some files/attrs were not transferred (see previous errors) (code 23) at main.c(1394) [sender=3.5.0]"
)


# Lines rsync printed in the flow above (btrfs answers the writes in flight with EIO, the later ones with
# EROFS): a push that met only EIO was "unknown" and retried, about 1 run in 40.
@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ('rsync: [receiver] open "/nas/Run/a.raw" failed: Input/output error (5)', "remote_write_refused"),
        (
            'rsync: [generator] recv_generator: failed to stat "/nas/Run/sub": Input/output error (5)',
            "remote_write_refused",
        ),
        ('rsync: [receiver] write failed on "/nas/Run/a.raw": Read-only file system (30)', "remote_write_refused"),
        # the sender is this PC: its EIO is a local read, never the NAS refusing
        ('rsync: [sender] read errors mapping "/data/Run/a.raw": Input/output error (5)', "unknown"),
        ('rsync: [sender] read errors mapping "/data/rsync: [receiver] x": Input/output error (5)', "unknown"),
    ],
)
def test_an_eio_on_the_nas_side_of_a_push_is_the_nas_refusing_the_write(line: str, kind: str) -> None:
    result = ToolResult(["rsync"], 23, b"", f"{line}\n{_TAIL}\n".encode(), 0.1)
    error = push_error("rsync", 23, result.stderr_text, "rsync push to /nas/Run")
    assert error.kind.value == kind, error.message
    assert error.message.startswith("rsync push to /nas/Run: ") and (line in error.message) == (kind != "unknown")


@pytest.mark.parametrize(
    "line",
    [
        'rsync: [receiver] write failed on "/tmp/exlab-verify-x/Run/a.raw": No space left on device (28)',
        'rsync: [receiver] mkstemp "/tmp/exlab-verify-x/Run/.a.raw.Xy1" failed: Permission denied (13)',
    ],
)
def test_a_write_refused_while_reading_from_the_nas_is_this_pcs_never_the_nas(line: str) -> None:
    """In a pull (reading back, fetch) the receiver is this PC: its full disk is no NAS refusing a write."""
    tail = "rsync error: error in file IO (code 11) at receiver.c(381) [receiver=3.5.0]"
    result = ToolResult(["rsync"], 11, b"", f"{line}\n{tail}\n".encode(), 0.1)
    error = pull_error("rsync", 11, result.stderr_text, "reading back /nas/Run")
    assert error.kind.value == "unknown", error.message
    assert "this PC could not write" in error.message and line in error.message
    assert push_error("rsync", 11, result.stderr_text, "rsync push to /nas/Run").kind.value == "remote_write_refused"


@pytest.mark.parametrize("fs", ["xfs", "btrfs"])
async def test_mount_never_verifies_bytes_the_thin_nas_volume_could_not_write(
    tmp_path: Path, monkeypatch, fs: str
) -> None:
    """Checked sound: the mount transport's own syncfs raises, and its read-back reads storage."""
    from exlab_wizard.sync.transports.mount import MountTransport
    from tests.lab import Lab

    (tmp_path / "nas").mkdir()
    vol = ThinVolume(fs, tmp_path / "pool", tmp_path / "nas")
    try:
        lab = Lab.build(tmp_path, equipment=("CONFOCAL_01",))
        small = {f"f{i}.bin": os.urandom(30_000) for i in range(20)}
        run = lab.make_run(files=small)
        fired = act_once_in(monkeypatch, MountTransport, "_syncfs_share", lambda *a, **k: True, vol.fill_pool)
        clock = Clock()
        cfg = lab.config(backoff_s=[3600.0])
        async with running(cfg, clock) as client:
            await client.enqueue(run)
            await client.wait_idle(timeout=120)
            job = await client.job(run)
        assert fired
        await asyncio.to_thread(vol.grow_pool_and_remount)
        nas = lab.nas_copy(run)
        held = {rel: (nas / rel).read_bytes() if (nas / rel).is_file() else None for rel in small}
    finally:
        vol.close()
    lost = sorted(rel for rel, data in held.items() if data != small[rel])
    assert job.state != S.VERIFIED or not lost, (fs, job.state, lost)
