"""A btrfs NAS whose checksums catch a damaged block: EIO on read while the share answers.

btrfs (Synology's filesystem) keeps a checksum of every data block: a
block that rotted, or that a failing disk or controller wrote wrongly, is
never handed out: read(2) fails with EIO while everything else on the
volume (the marker, the listing, every other file) reads fine. Built here
for real: a loop-mounted btrfs image as the NAS (mount transport, and the
loopback sshd's remote root for rsync_ssh), one on-disk byte of one file's
data block changed in the image, the kernel's caches dropped.

Such a file is unverifiable ("unreadable"), never "remote unreachable":

1. push: the bad copy is not re-sent (same size and mtime: skipped) and its
   verification fails as unreadable, not as a retry for ever as unreachable.
2. audit after the two passes: the audit that reads the EIO sends the job
   back, and the cleanup right after keeps the local copy, the only good one.
3. the push after that audit sends the file again, the bad NAS copy kept
   under previous/.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.mount import MountTransport
from tests.helpers import Clock
from tests.lab import Lab, MountLab, Site, act_once_in, cleanup_config, ready, retry_now, running

S = SyncJobState

#: files of 8 KiB and more: real data extents (not inlined in btrfs metadata, which is DUP and would be repaired)
BAD = "sub/stack.raw"
FILES = {
    "image_001.tif": os.urandom(65536),
    BAD: b"ROTTEN-BLOCK-PATTERN-" + os.urandom(3 * 65536 * 8 - 21),  # 1.5 MiB: copied (and read back) alone
    "notes.txt": os.urandom(8192),
}


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


class Btrfs:
    """A btrfs image loop-mounted at ``point``."""

    def __init__(self, image: Path, point: Path, size_mib: int = 320):
        self.image, self.point = image, point
        with open(image, "wb") as fh:
            fh.truncate(size_mib << 20)
        _sh("mkfs.btrfs", "-q", str(image))
        self.device = _sh("losetup", "-f", "--show", str(image))
        point.mkdir(parents=True, exist_ok=True)
        _sh("mount", self.device, str(point))

    def rot(self, data: bytes, at: int = 4000) -> None:
        """One byte of the on-disk block holding ``data``'s start changed under btrfs (bit rot)."""
        subprocess.run(["sync"], check=True)
        raw = self.image.read_bytes()
        where = raw.find(data[:4096])
        assert where >= 0, "the file's block is not on disk"
        assert raw.find(data[:4096], where + 1) < 0, "two copies of the block on disk"
        with open(self.image, "r+b") as fh:
            fh.seek(where + at)
            old = fh.read(1)
            fh.seek(where + at)
            fh.write(bytes([old[0] ^ 0xFF]))
            fh.flush()
            os.fsync(fh.fileno())
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    def close(self) -> None:
        for _ in range(50):
            if subprocess.run(["umount", str(self.point)], capture_output=True).returncode == 0:
                break
            subprocess.run(["sleep", "0.1"])
        else:
            subprocess.run(["umount", "-l", str(self.point)], capture_output=True)
        subprocess.run(["losetup", "-d", self.device], capture_output=True)
        self.image.unlink(missing_ok=True)


@contextlib.contextmanager
def btrfs_at(point: Path) -> Iterator[Btrfs]:
    fs = Btrfs(point.parent / f"{point.name}.btrfs.img", point)
    try:
        yield fs
    finally:
        fs.close()


def _eio(path: Path) -> bool:
    try:
        path.read_bytes()
    except OSError as exc:
        return exc.errno == 5
    return False


# --------------------------------------------------------------------------- 1. a block bad as it is read back


async def test_a_nas_file_unreadable_at_verify_is_not_retried_for_ever_as_unreachable(
    tmp_path: Path, monkeypatch
) -> None:
    (tmp_path / "nas").mkdir()
    with btrfs_at(tmp_path / "nas") as fs:
        lab = Lab.build(tmp_path)
        run = lab.make_run(files=FILES)
        nas_bad = lab.nas_copy(run) / BAD
        fired = act_once_in(
            monkeypatch,
            MountTransport,
            "_read_back",
            lambda _self, _job, name, *a, **k: name == BAD,
            lambda: fs.rot(FILES[BAD]),
        )
        clock = Clock()
        cfg = cleanup_config(lab)
        cfg = cfg.model_copy(update={"sync": cfg.sync.model_copy(update={"backoff_s": [3600.0]})})
        async with running(cfg, clock) as client:
            await client.enqueue(run)
            await client.wait_idle(timeout=60)
            assert fired
            assert _eio(nas_bad), "btrfs did not catch the changed block"
            for _ in range(2):  # the operator (or the backoff) tries again
                clock.advance(1)
                job = await retry_now(client, clock, run)
            job = await client.job(run)
        healed = not _eio(nas_bad) and nas_bad.read_bytes() == FILES[BAD]
    assert healed or (job.state != S.QUEUED and "unreachable" not in (job.last_error or "")), (
        f"the NAS copy of {BAD} stays unreadable (btrfs EIO), never re-sent, and the job retries for ever as "
        f"{job.state.value} {job.error_kind}: {job.last_error!r} (attempts {job.attempts})"
    )


# --------------------------------------------------------------------------- 2. the audit reads EIO, the reaper deletes


@pytest.mark.network
@pytest.mark.parametrize("kind", ["mount", "rsync_ssh"])
async def test_a_nas_file_unreadable_at_audit_keeps_the_local_copy(request, tmp_path: Path, kind: str) -> None:
    with contextlib.ExitStack() as stack:
        fs, site = _btrfs_site(stack, request, tmp_path, kind)
        run = site.make_run(files=FILES)
        cfg = site.config(
            cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
            sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        )
        clock = Clock()
        async with running(cfg, clock) as client:
            await ready(client, clock, run)  # synced, audited: two passes, 25 h old
            nas_bad = site.nas_copy(run) / BAD
            fs.rot(FILES[BAD])
            assert _eio(nas_bad), "btrfs did not catch the changed block"
            clock.advance(6)
            await client.audit_once()  # reads the NAS copy: EIO
            await client.cleanup_once()
            job = await client.job(run)
            notes = [e.detail for e in job.events if e.kind.startswith("audit")]
        local = (run / BAD).read_bytes() if (run / BAD).exists() else None
    assert local == FILES[BAD], (
        f"[{kind}] the audit could not read the NAS copy of {BAD} (btrfs EIO: the NAS says the block is bad), "
        f"noted {notes[-1:]!r}, and the cleanup then deleted the only good copy: job {job.state.value}"
    )


def _btrfs_site(stack: contextlib.ExitStack, request, tmp_path: Path, kind: str) -> tuple[Btrfs, Site]:
    """A site of ``kind`` whose NAS (the mount, or the sshd's remote root) is a btrfs image."""
    if kind == "mount":
        (tmp_path / "nas").mkdir()
        fs = stack.enter_context(btrfs_at(tmp_path / "nas"))
    else:
        remote = request.getfixturevalue("remote_dir")
        fs = stack.enter_context(btrfs_at(remote))
        os.chmod(remote, 0o755)
        from tests.fixtures.sshd import RW_USER

        os.chown(remote, *_ids(RW_USER))
    return fs, Site.on(request, tmp_path, kind)


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


# --------------------------------------------------------------------------- 3. the push after the audit


@pytest.mark.network
@pytest.mark.parametrize("kind", ["mount", "rsync_ssh"])
async def test_the_push_after_the_audit_sends_the_unreadable_file_again(request, tmp_path: Path, kind: str) -> None:
    with contextlib.ExitStack() as stack:
        fs, lab = _btrfs_site(stack, request, tmp_path, kind)
        run = lab.make_run(files=FILES)
        cfg = lab.config(
            cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
            sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        )
        clock = Clock()
        async with running(cfg, clock) as client:
            await ready(client, clock, run)
            nas = lab.nas_copy(run)
            fs.rot(FILES[BAD])
            assert _eio(nas / BAD), "btrfs did not catch the changed block"
            clock.advance(6)
            await client.audit_once()
            sent_back = await client.job(run)
            job = await retry_now(client, clock, run)
        kept = [p for p in (nas / ".exlab-wizard" / "previous").rglob("stack.raw")]
        healed = not _eio(nas / BAD) and (nas / BAD).read_bytes() == FILES[BAD]
        kept_unreadable = len(kept) == 1 and _eio(kept[0])
    assert sent_back.state == S.QUEUED and BAD in sent_back.rewrite_paths, (
        f"[{kind}] the audit did not send {BAD} back to be re-sent: {sent_back.state.value} {sent_back.rewrite_paths!r} "
        f"{sent_back.last_error!r}"
    )
    assert job.state == S.VERIFIED and healed, f"[{kind}] not re-sent: {job.state.value} {job.last_error!r}"
    assert kept_unreadable, f"[{kind}] the bad NAS copy is not kept under previous/: {kept!r}"


# --------------------------------------------------------------------------- the same error from a share gone, or a blip


def _failing_reads(monkeypatch, times: int, then=None) -> list[int]:
    """``hash_from_storage`` in the mount transport fails with EIO ``times`` times (``then`` run at the first)."""
    from exlab_wizard.sync.transports import mount as mount_module

    real = mount_module.hash_from_storage
    calls: list[int] = []

    def reading(fd, view, **kwargs):
        calls.append(fd)
        if len(calls) <= times:
            if then is not None and len(calls) == 1:
                then()
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, view, **kwargs)

    monkeypatch.setattr(mount_module, "hash_from_storage", reading)
    return calls


def test_eio_while_the_share_goes_away_stays_network(tmp_path: Path, monkeypatch) -> None:
    lab = MountLab(tmp_path)
    lab.write("a.bin", os.urandom(8192))
    lab.push()
    asyncio.run(lab.transport.remote_manifest(lab.run))  # the push's read-back records used up: the next one reads
    _failing_reads(monkeypatch, 1, then=lambda: (lab.nas / ".exlab-nas").unlink())
    with pytest.raises(TransportError) as caught:
        asyncio.run(lab.transport.remote_manifest(lab.run))
    assert caught.value.kind is TransportErrorKind.NETWORK, caught.value.message


def test_one_eio_on_a_share_that_answers_is_read_again(tmp_path: Path, monkeypatch) -> None:
    lab = MountLab(tmp_path)
    data = os.urandom(8192)
    lab.write("a.bin", data)
    lab.push()
    asyncio.run(lab.transport.remote_manifest(lab.run))
    calls = _failing_reads(monkeypatch, 1)
    found = asyncio.run(lab.transport.remote_manifest(lab.run))
    assert found.hashes["a.bin"] == hashlib.sha256(data).hexdigest() and not found.unverifiable
    assert len(calls) == 2
