"""The mount transport's read-back comes from the storage, never from the page cache of the bytes just written.

Counted, not assumed: ``read_bytes`` in ``/proc/self/io`` is what this
process (every thread of it) made the block layer read. Files written a
moment ago are all in this machine's page cache; a read-back served from
there reads nothing from storage, so the count stays near zero.

The lab lives on a filesystem backed by a block device: the test's own
folder when it is one (ext4 on the CI machine), otherwise a loop-mounted
ext4 made for the test (CI runs as root).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.sync.transports import mount as mount_module
from exlab_wizard.sync.verifier import compare
from tests.lab import MountLab

KIB = 1 << 10
BLOCK_BACKED = {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs"}


def _read_bytes() -> int:
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise AssertionError("/proc/self/io has no read_bytes line")


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Path]:
    """A folder on a block-backed filesystem."""
    if mount_module.filesystem_type(str(tmp_path)) in BLOCK_BACKED:
        yield tmp_path
        return
    assert os.geteuid() == 0, f"{tmp_path} is not on a block device and a loop mount needs root"
    image, point = tmp_path / "fs.img", tmp_path / "mnt"
    subprocess.run(["truncate", "-s", "64M", image], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
    point.mkdir()
    subprocess.run(["mount", "-o", "loop", image, point], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", point], check=False)


def _small_run(lab: MountLab) -> int:
    total = 0
    for index in range(48):  # small files: the batched path (one syncfs, read-back with read-ahead)
        data = os.urandom(96 * KIB)
        lab.write(f"well_{index % 4}/frame_{index:03d}.bin", data)
        total += len(data)
    return total


def test_the_push_reads_every_small_file_back_from_storage(storage: Path) -> None:
    assert shutil.which("mkfs.ext4") or mount_module.filesystem_type(str(storage)) in BLOCK_BACKED
    lab = MountLab(storage)
    data = _small_run(lab)
    before = _read_bytes()
    result = lab.push()
    read = _read_bytes() - before
    assert result.files_sent == 48
    # The copy read its sources from the page cache (just written); the read-back
    # of the 48 files it wrote went to the storage, each of their bytes.
    assert read >= data, f"read back {read} bytes from storage for {data} bytes written"
    # and the manifest that follows takes those hashes: it reads nothing more
    again = _read_bytes()
    manifest = asyncio.run(lab.transport.remote_manifest(lab.run))
    assert compare(result.local_hashes, manifest).ok
    assert _read_bytes() - again < data // 4


def test_an_audit_reads_every_file_from_storage(storage: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = MountLab(storage)
    data = _small_run(lab)
    result = lab.push()
    monkeypatch.setattr(mount_module, "READ_BACK_TTL_S", -1.0)  # an audit: nothing taken from the push
    for path in lab.remote.rglob("*.bin"):
        path.read_bytes()  # in this machine's page cache now, whatever the push did
    before = _read_bytes()
    manifest = asyncio.run(lab.transport.remote_manifest(lab.run))
    read = _read_bytes() - before
    assert compare(result.local_hashes, manifest).ok
    assert read >= data, f"the audit read {read} bytes from storage for {data} bytes on the share"
