"""exlab_wizard.fileio: the data-file rule, durable writes, one SHA-256 read loop."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exlab_wizard import fileio
from exlab_wizard.fileio import (
    BLOCK_SIZE,
    METADATA_DIR,
    atomic_write_bytes,
    fsync_dir,
    hash_fd,
    hash_file,
    is_data_path,
    is_metadata_path,
    open_regular,
)

# --------------------------------------------------------------------------- atomic write


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_creates_and_replaces_exactly(tmp_path: Path) -> None:
    target = tmp_path / "creation.json"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    payload = bytes(range(256)) * 1000
    atomic_write_bytes(target, payload)
    assert target.read_bytes() == payload
    atomic_write_bytes(target, b"")
    assert target.read_bytes() == b""
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["creation.json"]


def test_atomic_write_keeps_the_targets_permission_bits(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"new")
    assert target.stat().st_mode & 0o777 == 0o640


def test_temp_file_is_hidden_unique_and_in_the_same_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src, dst):  # type: ignore[no-untyped-def]
        seen.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", spy)
    target = tmp_path / "creation.json"
    atomic_write_bytes(target, b"a")
    atomic_write_bytes(target, b"b")
    (src1, dst1), (src2, _) = seen
    assert Path(src1).parent == tmp_path and dst1 == str(target)
    assert Path(src1).name.startswith(".creation.json.") and src1.endswith(".tmp")
    assert src1 != src2


@pytest.mark.parametrize("failing", ["fsync", "replace", "short_write"])
def test_failed_write_leaves_old_content_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    target = tmp_path / "creation.json"
    target.write_bytes(b"old content")

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(5, "forced failure")

    if failing == "fsync":
        monkeypatch.setattr(fileio.os, "fsync", boom)
    elif failing == "replace":
        monkeypatch.setattr(fileio.os, "replace", boom)
    else:
        monkeypatch.setattr(fileio.os, "write", lambda fd, data: 0)  # the disk takes nothing

    with pytest.raises(OSError) as caught:
        atomic_write_bytes(target, b"new content")
    if failing == "short_write":
        assert "short write" in str(caught.value)
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert _leftovers(tmp_path) == []


def test_partial_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(fileio.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    target = tmp_path / "f"
    payload = b"0123456789" * 50
    atomic_write_bytes(target, payload)
    assert target.read_bytes() == payload


def test_a_new_file_gets_new_mode_minus_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "m", b"x", new_mode=0o640)
        atomic_write_bytes(tmp_path / "d", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- fsync_dir


def test_fsync_dir_lets_a_share_that_cannot_sync_folders_be(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsync_dir(tmp_path)  # a real folder on a real file system

    def refuses(code: int):  # type: ignore[no-untyped-def]
        def fsync(fd: int) -> None:
            raise OSError(code, os.strerror(code))

        return fsync

    for code in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
        monkeypatch.setattr(fileio.os, "fsync", refuses(code))
        fsync_dir(tmp_path)
    monkeypatch.setattr(fileio.os, "fsync", refuses(errno.EIO))
    with pytest.raises(OSError) as caught:
        fsync_dir(tmp_path)
    assert caught.value.errno == errno.EIO


def test_fsync_dir_of_a_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "absent")


# --------------------------------------------------------------------------- the data-file rule


@pytest.mark.parametrize(
    ("rel", "metadata"),
    [
        (".exlab-wizard/creation.json", True),
        (".exlab-wizard/checksums.sha256", True),
        (".exlab-wizard/previous/20261205T073000Z/a.raw", True),
        (".exlab-wizard", False),  # a file of that name is not inside the folder
        (".Exlab-Wizard/creation.json", False),  # exact case: another folder, data
        (".EXLAB-WIZARD/x", False),
        (".exlab-wizard2/x", False),
        (".exlab-wizard.bak", False),
        ("sub/.exlab-wizard/creation.json", False),  # only the run's top level holds metadata
        ("a.raw", False),
        ("", False),
    ],
)
def test_the_data_file_rule(rel: str, metadata: bool) -> None:
    assert METADATA_DIR == ".exlab-wizard"
    assert is_metadata_path(rel) is metadata
    assert is_data_path(rel) is not metadata


def test_every_module_takes_metadata_dir_from_fileio() -> None:
    from exlab_wizard.cache import creation
    from exlab_wizard.sync import equipment_log, manifest_format, verifier
    from exlab_wizard.sync.transports import base
    from exlab_wizard.validator import engine

    for module in (creation, base, engine, verifier):
        assert module.METADATA_DIR is fileio.METADATA_DIR, module.__name__
    assert manifest_format.manifest_path(Path("/r")) == Path("/r", METADATA_DIR, "checksums.sha256")
    assert equipment_log.METADATA_DIR is fileio.METADATA_DIR


# --------------------------------------------------------------------------- SHA-256 reads


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_hash_fd_matches_hashlib_at_every_block_edge(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    counts: list[int] = []
    blocks: list[bytes] = []
    fd, _info = open_regular(path)
    try:
        digest = hash_fd(fd, memoryview(bytearray(4096)), counts.append, each=lambda b: blocks.append(bytes(b)))
    finally:
        os.close(fd)
    assert digest == _sha(data)
    assert b"".join(blocks) == data and sum(counts) == size
    assert all(len(b) <= 4096 for b in blocks)
    assert hash_file(path, block_size=4096) == _sha(data)


def test_hash_fd_stops_at_the_limit_and_reports_a_short_file(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    for limit in (0, 1, 4096, 5000, 10_000, 20_000):
        seen: list[int] = []
        fd, _info = open_regular(path)
        try:
            digest = hash_fd(fd, memoryview(bytearray(4096)), seen.append, limit=limit)
        finally:
            os.close(fd)
        assert digest == _sha(data[:limit]), limit
        assert sum(seen) == min(limit, len(data))


def test_hash_fd_with_drop_behind_hashes_the_same(tmp_path: Path) -> None:
    data = os.urandom(3 * fileio.DROP_BEHIND // 2)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd, _info = open_regular(path)
    try:
        assert fileio.hash_from_storage(fd, memoryview(bytearray(BLOCK_SIZE))) == _sha(data)
    finally:
        os.close(fd)


def test_an_error_in_each_stops_the_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10_000)
    calls = []

    def each(block: memoryview) -> None:
        calls.append(len(block))
        raise RuntimeError("the share refused")

    fd, _info = open_regular(path)
    try:
        with pytest.raises(RuntimeError, match="the share refused"):
            hash_fd(fd, memoryview(bytearray(4096)), each=each)
    finally:
        os.close(fd)
    assert calls == [4096]


def test_hashing_never_follows_a_symlink_nor_blocks_on_a_fifo(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"secret")
    (tmp_path / "link").symlink_to(real)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError) as caught:
        hash_file(tmp_path / "link")
    assert caught.value.errno == errno.ELOOP
    with pytest.raises(OSError) as caught:
        hash_file(tmp_path / "fifo")  # O_NONBLOCK: the open returns, fstat refuses it
    assert caught.value.errno == errno.EINVAL
    with pytest.raises(FileNotFoundError):
        hash_file(tmp_path / "absent")


def test_open_regular_relative_to_an_open_folder(tmp_path: Path) -> None:
    (tmp_path / "a.raw").write_bytes(b"abc")
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd, info = open_regular("a.raw", dir_fd=folder)
        os.close(fd)
    finally:
        os.close(folder)
    assert info.st_size == 3


POWER_CUT = textwrap.dedent(
    """
    import os, sys
    from exlab_wizard import fileio
    real_replace = os.replace
    def cut(src, dst):
        os._exit(9)  # the power goes out between the fsynced temp file and the rename
    os.replace = cut
    fileio.atomic_write_bytes(sys.argv[1], b"new content")
    """
)


def test_a_crash_before_the_rename_leaves_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "creation.json"
    target.write_bytes(b"old content")
    env = dict(os.environ, PYTHONPATH=str(Path(fileio.__file__).resolve().parents[1]))
    child = subprocess.run([sys.executable, "-c", POWER_CUT, str(target)], env=env, check=False, timeout=60)
    assert child.returncode == 9
    assert target.read_bytes() == b"old content"
    temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert [p.read_bytes() for p in temps] == [b"new content"]  # whole, beside it, never in its place


# --------------------------------------------------------------------------- bounded read


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 5000])
def test_read_bounded_reads_at_most_one_byte_past_the_bound(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    for hint in (0, size, max(0, size - 7), size + 7):
        fd, _info = open_regular(path)
        try:
            got = fileio.read_bounded(fd, 100, hint)
        finally:
            os.close(fd)
        assert got == data[:101], (size, hint)


def test_read_bounded_of_a_file_that_grew_since_its_fstat(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    fd, info = open_regular(path)
    try:
        with open(path, "ab") as more:
            more.write(b"y" * 50)
        assert fileio.read_bounded(fd, 40, info.st_size) == b"x" * 10 + b"y" * 31
    finally:
        os.close(fd)


def test_filesystem_now_is_the_files_clock_and_leaves_nothing_behind(tmp_path: Path) -> None:
    before = sorted(os.listdir(tmp_path))
    now = fileio.filesystem_now_ns(tmp_path)
    if getattr(os, "O_TMPFILE", 0):
        assert now is not None
        (tmp_path / "stamped").write_bytes(b"x")
        stamped = os.stat(tmp_path / "stamped").st_ctime_ns
        assert now <= stamped and stamped - now < 5_000_000_000  # the same clock, a moment apart
        os.unlink(tmp_path / "stamped")
    assert sorted(os.listdir(tmp_path)) == before
    assert fileio.filesystem_now_ns(tmp_path / "missing") is None


def test_a_renumbered_disk_is_the_same_mounted_filesystem(tmp_path: Path) -> None:
    """``/dev/loopN`` one boot, ``/dev/loopM`` the next: the file system's own id names it both times."""
    image, point = tmp_path / "disk.img", tmp_path / "usb"
    point.mkdir()
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    seen = []
    for _boot in range(2):
        # A device of its own each time (the one before is still attached): the kernel numbered it anew.
        device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True)
        devices = [device.stdout.strip()]
        if seen:
            devices.append(seen[-1][0])
        subprocess.run(["mount", devices[0], str(point)], check=True)
        try:
            seen.append((devices[0], fileio.mounted_filesystem(point / "not-there")))
        finally:
            subprocess.run(["umount", str(point)], check=True)
        if len(seen) == 2:
            for attached in {seen[0][0], seen[1][0]}:
                subprocess.run(["losetup", "-d", attached], check=True)
    (first_device, first), (second_device, second) = seen
    assert first_device != second_device
    assert first == second and first.startswith("ext4 fsid=") and first.endswith(" /")


def test_mounted_filesystem_tells_a_bind_mount_from_the_folder_under_it(tmp_path: Path) -> None:
    share, other = tmp_path / "share", tmp_path / "other"
    share.mkdir()
    other.mkdir()
    bare = fileio.mounted_filesystem(share)
    subprocess.run(["mount", "--bind", str(other), str(share)], check=True)
    try:
        bound = fileio.mounted_filesystem(share / "sub" / "not-there")
    finally:
        subprocess.run(["umount", str(share)], check=True)
    assert bare and bound != bare and bound.endswith(f" {other}")
    assert fileio.filesystem_type(share) == bare.split(" ")[0]
