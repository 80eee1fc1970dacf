"""The mount transport on tmp_path: copy, resume, guard, conflicts, failures, bandwidth."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import fcntl
import hashlib
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from exlab_wizard.sync.transports import mount as mount_module
from exlab_wizard.sync.transports.base import RemoteManifest, TransportError, TransportErrorKind
from exlab_wizard.sync.transports.mount import LARGE_FILE, MountTransport, is_temp_name, same_mtime
from exlab_wizard.sync.verifier import Verifier, compare, hash_tree
from tests.helpers import require_tool
from tests.lab import MountLab as Lab

MIB = 1 << 20
MONDAY_10AM = dt.datetime(2024, 1, 8, 10, 0).astimezone()
SATURDAY_10AM = dt.datetime(2024, 1, 13, 10, 0).astimezone()

HOSTILE_NAMES = [
    "with space.txt",
    'quote\'s "double".txt',
    "$(touch pwned).txt",
    "-leading-dash.txt",
    "new\nline.txt",
    "back\\slash.txt",
    "ünïcødé_日本語.txt",
    "semi;colon&amp|pipe*.txt",
]


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


def _build_full_run(lab: Lab) -> None:
    lab.write("a.txt", b"alpha\n", mtime_ns=1_600_000_000_123_456_789)
    lab.write("empty.bin", b"")
    lab.write("sub/deeper/c.dat", bytes(range(256)) * 100)
    lab.write("sub/deeper/empty_too", b"")
    lab.write("big.raw", os.urandom(3 * MIB + 12345), mtime_ns=1_700_000_000_000_000_001)
    lab.write(".exlab-wizard/creation.json", b'{"schema_version": "1.0", "sync_status": "pending"}')
    for index, name in enumerate(HOSTILE_NAMES):
        lab.write(name, f"root {index}".encode())
        lab.write(f"hostile dir/{name}", f"nested {index}".encode())
    (lab.run / "empty_dir").mkdir()
    (lab.run / "sub" / "empty nested" / "deeper").mkdir(parents=True)
    os.chmod(lab.run / "a.txt", 0o640)


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under root: files by content and mtime, folders as markers."""
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = Path(folder) / name
            out[str(path.relative_to(root))] = ("dir",)
        for name in files:
            path = Path(folder) / name
            info = path.lstat()
            out[str(path.relative_to(root))] = ("file", path.read_bytes(), info.st_mtime_ns, info.st_mode & 0o777)
    return out


def _temps(root: Path) -> list[str]:
    return [name for _folder, _dirs, files in os.walk(root) for name in files if is_temp_name(name)]


# --------------------------------------------------------------------------- end to end


def test_end_to_end_copy_is_byte_identical_with_mtimes(lab: Lab) -> None:
    _build_full_run(lab)
    progress: list[int] = []
    result = lab.push(progress=progress.append)

    assert result.ok
    assert _tree(lab.remote) == _tree(lab.run)  # bytes, mtimes, modes, empty folders
    assert (lab.remote / "empty_dir").is_dir() and (lab.remote / "sub/empty nested/deeper").is_dir()
    expected = hash_tree(lab.run, include_metadata=True)
    assert result.local_hashes == expected
    assert result.files_sent == len(expected)
    assert result.bytes_sent == sum(progress) == sum(p.stat().st_size for p in lab.run.rglob("*") if p.is_file())
    assert _temps(lab.nas) == []
    assert not (lab.tmp / "pwned").exists() and not Path("pwned").exists()

    manifest = asyncio.run(lab.transport.remote_manifest(lab.run))
    assert manifest.hashes == expected and manifest.unverifiable == {}
    assert compare(result.local_hashes, manifest).ok

    log = lab.log_text()
    assert "push_start" in log and "push_end" in log
    assert f"files={len(expected)} bytes={result.bytes_sent}" in log


def test_nas_copy_passes_sha256sum_check(lab: Lab) -> None:
    sha256sum = require_tool("sha256sum")
    _build_full_run(lab)
    hashes = lab.push().local_hashes
    Verifier().write_manifest(lab.run, hashes)
    # The manifest goes with the metadata push after the verification, never with the data.
    assert lab.push().files_sent == 0
    assert not (lab.remote / ".exlab-wizard" / "checksums.sha256").exists()
    asyncio.run(lab.transport.push_metadata(lab.run))
    check = subprocess.run([sha256sum, "-c", ".exlab-wizard/checksums.sha256"], cwd=lab.remote, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_resume_sends_nothing_and_rewrite_resends(lab: Lab) -> None:
    _build_full_run(lab)
    first = lab.push()
    second = lab.push()
    assert (second.files_sent, second.bytes_sent) == (0, 0)
    assert second.local_hashes == first.local_hashes  # skipped files are still hashed
    third = lab.push(rewrite=frozenset({"a.txt", "sub/deeper/c.dat"}))
    assert third.files_sent == 2
    assert third.bytes_sent == len(b"alpha\n") + 25600

    lab.write("a.txt", b"ALPHA\n", mtime_ns=1_600_000_001_000_000_000)  # edited: same size, new mtime
    fourth = lab.push()
    assert fourth.files_sent == 1 and (lab.remote / "a.txt").read_bytes() == b"ALPHA\n"


def test_remote_damage_with_equal_size_and_mtime_is_resent_through_rewrite(lab: Lab) -> None:
    _build_full_run(lab)
    first = lab.push()
    target = lab.remote / "sub/deeper/c.dat"
    info = target.stat()
    target.write_bytes(b"\0" * info.st_size)  # damaged on the NAS, size and mtime kept
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    verdict = compare(first.local_hashes, asyncio.run(lab.transport.remote_manifest(lab.run)))
    assert verdict.different == ("sub/deeper/c.dat",)
    assert lab.push().files_sent == 0  # resume trusts size and mtime ...
    lab.push(rewrite=frozenset(verdict.different))  # ... rewrite does not
    assert compare(first.local_hashes, asyncio.run(lab.transport.remote_manifest(lab.run))).ok


@pytest.mark.parametrize(
    ("local_ns", "remote_ns", "equal"),
    [
        (1_700_000_000_123_456_789, 1_700_000_000_123_456_789, True),
        (1_700_000_000_123_456_789, 1_700_000_000_123_456_700, True),  # 100 ns (SMB)
        (1_700_000_000_123_456_789, 1_700_000_000_123_456_000, True),  # us
        (1_700_000_000_123_456_789, 1_700_000_000_123_450_000, False),
        (1_700_000_000_923_456_789, 1_700_000_000_000_000_000, True),  # whole seconds
        (1_700_000_001_923_456_789, 1_700_000_000_000_000_000, True),  # FAT 2 s
        (1_700_000_002_000_000_001, 1_700_000_000_000_000_000, False),
        (1_700_000_000_500_000_000, 1_700_000_000_400_000_000, False),
    ],
)
def test_mtime_equality_rule(local_ns: int, remote_ns: int, equal: bool) -> None:
    assert same_mtime(local_ns, remote_ns) is equal


def test_per_file_fsync_path_when_syncfs_is_not_trusted(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mount_module, "_SYNCFS", None)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(mount_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    _build_full_run(lab)
    result = lab.push()
    assert _tree(lab.remote) == _tree(lab.run)
    assert len(synced) >= result.files_sent
    assert compare(result.local_hashes, asyncio.run(lab.transport.remote_manifest(lab.run))).ok


class _WriteSpy:
    """Records, per temp file, how many bytes went out with O_DIRECT set and how many without."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, refuse_open: bool = False, refuse_write: bool = False):
        self.opened_direct: list[str] = []
        self.direct = 0
        self.buffered = 0
        real_open, real_write, real_close = os.open, os.write, os.close
        direct_flag = getattr(os, "O_DIRECT", 0)
        temp_fds: set[int] = set()

        def spy_open(path, flags, mode=0o777, *args, **kwargs):
            is_temp = is_temp_name(os.path.basename(os.fspath(path)))
            if is_temp and flags & direct_flag:
                self.opened_direct.append(os.fspath(path))
                if refuse_open:
                    raise OSError(errno.EINVAL, "direct I/O not supported here")
            fd = real_open(path, flags, mode, *args, **kwargs)
            if is_temp:
                temp_fds.add(fd)
            return fd

        def spy_write(fd, data):
            if fd in temp_fds:
                if fcntl.fcntl(fd, fcntl.F_GETFL) & direct_flag:
                    if refuse_write:
                        raise OSError(errno.EINVAL, "direct I/O alignment refused")
                    count = real_write(fd, data)
                    self.direct += count
                    return count
                count = real_write(fd, data)
                self.buffered += count
                return count
            return real_write(fd, data)

        def spy_close(fd):
            temp_fds.discard(fd)  # its number is free for the next file opened
            return real_close(fd)

        monkeypatch.setattr(mount_module.os, "open", spy_open)
        monkeypatch.setattr(mount_module.os, "write", spy_write)
        monkeypatch.setattr(mount_module.os, "close", spy_close)


def _local_disk(monkeypatch: pytest.MonkeyPatch, lab: Lab) -> None:
    """Treat the test's filesystem as a local disk that gets direct writes, whatever it is."""
    fstype = mount_module.filesystem_type(str(lab.nas))
    monkeypatch.setattr(mount_module, "_DIRECT_WRITE_FS", frozenset({fstype}))


BIG = 3 * MIB + 12345  # whole 4 KiB blocks and a tail


def _takes_direct_io(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        return False
    os.close(fd)
    os.unlink(folder / "probe")
    return True


def test_large_files_bypass_the_page_cache_with_direct_writes(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hasattr(os, "O_DIRECT"), "the engine runs on Linux, which has O_DIRECT"
    _local_disk(monkeypatch, lab)
    lab.write("big.raw", os.urandom(BIG))
    lab.write("exact.raw", os.urandom(2 * MIB))
    lab.write("small.txt", b"below the 1 MiB line: an ordinary write\n")
    spy = _WriteSpy(monkeypatch)
    result = lab.push()
    assert _tree(lab.remote) == _tree(lab.run)
    assert compare(result.local_hashes, asyncio.run(lab.transport.remote_manifest(lab.run))).ok
    assert sorted(os.path.basename(p).split(".exlab-tmp-")[0] for p in spy.opened_direct) == [".big.raw", ".exact.raw"]
    # every whole 4 KiB block of the large files went direct (on a filesystem that
    # refuses O_DIRECT at open, the fallback wrote them all the ordinary way)
    assert spy.direct == ((BIG - BIG % 4096) + 2 * MIB if _takes_direct_io(lab.nas) else 0)
    assert spy.direct + spy.buffered == result.bytes_sent


def test_network_shares_keep_buffered_writes(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mount_module, "filesystem_type", lambda path: "nfs4")
    lab.write("big.raw", os.urandom(BIG))
    spy = _WriteSpy(monkeypatch)
    lab.push()
    assert spy.opened_direct == [] and spy.direct == 0
    assert _tree(lab.remote) == _tree(lab.run)


@pytest.mark.parametrize("refusal", ["open", "write"])
def test_a_share_refusing_direct_io_gets_ordinary_writes(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    _local_disk(monkeypatch, lab)
    lab.write("big.raw", os.urandom(BIG))
    spy = _WriteSpy(monkeypatch, refuse_open=refusal == "open", refuse_write=refusal == "write")
    result = lab.push()
    assert len(spy.opened_direct) == 1 and spy.direct == 0 and spy.buffered == BIG
    assert _tree(lab.remote) == _tree(lab.run) and _temps(lab.nas) == []
    assert compare(result.local_hashes, asyncio.run(lab.transport.remote_manifest(lab.run))).ok


# --------------------------------------------------------------------------- guard and conflicts


def test_missing_marker_is_network_and_writes_nothing(lab: Lab) -> None:
    _build_full_run(lab)
    (lab.nas / ".exlab-nas").unlink()
    before = _tree(lab.nas)
    with pytest.raises(TransportError) as caught:
        lab.push()
    assert caught.value.kind is TransportErrorKind.NETWORK
    assert "not mounted" in caught.value.message and ".exlab-nas" in caught.value.message
    with pytest.raises(TransportError) as caught:
        asyncio.run(lab.transport.remote_manifest(lab.run))
    assert caught.value.kind is TransportErrorKind.NETWORK
    assert asyncio.run(lab.transport.reachable(lab.run)) is False
    assert _tree(lab.nas) == before == {}


def test_mount_path_missing_is_unreachable(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    (lab.nas / ".exlab-nas").unlink()
    lab.nas.rmdir()
    assert asyncio.run(lab.transport.reachable(lab.run)) is False
    lab.write("a", b"x")
    with pytest.raises(TransportError) as caught:
        lab.push()
    assert caught.value.kind is TransportErrorKind.NETWORK
    assert not lab.nas.exists()


def test_reachable_with_marker(lab: Lab) -> None:
    assert asyncio.run(lab.transport.reachable(lab.run)) is True


@pytest.mark.parametrize(
    "foreign",
    ["someone_elses.txt", "sub/deeper/other.dat", "a.txt/", "sub/deeper/c.dat/"],
    ids=["file-at-root", "nested-file", "folder-where-run-has-a-file", "nested-folder-for-file"],
)
def test_conflict_refuses_and_writes_nothing(lab: Lab, foreign: str) -> None:
    _build_full_run(lab)
    target = lab.remote / foreign.rstrip("/")
    if foreign.endswith("/"):
        target.mkdir(parents=True)
        (target / "inside").write_bytes(b"theirs")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"theirs")
    before = _tree(lab.nas)
    with pytest.raises(TransportError) as caught:
        lab.push()
    assert caught.value.kind is TransportErrorKind.REMOTE_CONFLICT
    assert _tree(lab.nas) == before


def test_symlink_on_the_remote_where_the_run_has_a_folder_is_a_conflict(lab: Lab, tmp_path: Path) -> None:
    _build_full_run(lab)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lab.remote.mkdir(parents=True)
    (lab.remote / "sub").symlink_to(elsewhere)
    with pytest.raises(TransportError) as caught:
        lab.push()
    assert caught.value.kind is TransportErrorKind.REMOTE_CONFLICT
    assert list(elsewhere.iterdir()) == []


def test_remote_metadata_files_we_no_longer_have_are_not_a_conflict(lab: Lab) -> None:
    _build_full_run(lab)
    lab.remote.joinpath(".exlab-wizard").mkdir(parents=True)
    lab.remote.joinpath(".exlab-wizard", "old-sync.log").write_bytes(b"ours, rotated away locally")
    assert lab.push().ok
    assert (lab.remote / ".exlab-wizard" / "old-sync.log").exists()


def test_stale_temp_files_are_removed(lab: Lab) -> None:
    _build_full_run(lab)
    lab.push()
    stale = [
        lab.remote / ".a.txt.exlab-tmp-0123456789ab",
        lab.remote / "sub" / "deeper" / ".c.dat.exlab-tmp-abcdef012345",
        lab.remote / ".new\nline.txt.exlab-tmp-00ff00ff00ff",
    ]
    for path in stale:
        path.write_bytes(b"partial")
    result = lab.push()
    assert result.files_sent == 0
    assert not any(path.exists() for path in stale)
    assert _tree(lab.remote) == _tree(lab.run)


def test_a_local_file_named_like_a_temp_file_is_data(lab: Lab) -> None:
    lab.write(".x.exlab-tmp-0123456789ab", b"real data")
    lab.push()
    assert lab.push().files_sent == 0
    assert (lab.remote / ".x.exlab-tmp-0123456789ab").read_bytes() == b"real data"


# --------------------------------------------------------------------------- symlinks and local failures


def test_symlinks_are_not_copied_and_targets_untouched(lab: Lab, tmp_path: Path) -> None:
    _build_full_run(lab)
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"outside the run")
    os.utime(secret, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    before = secret.stat()
    (lab.run / "link_to_file").symlink_to(secret)
    (lab.run / "link_to_dir").symlink_to(secret.parent)
    (lab.run / "sub" / "dangling").symlink_to(tmp_path / "nowhere")
    result = lab.push()
    for name in ("link_to_file", "link_to_dir", "sub/dangling"):
        assert not os.path.lexists(lab.remote / name)
        assert name not in result.local_hashes
    after = secret.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert secret.read_bytes() == b"outside the run"
    assert not (lab.nas / "secret.txt").exists()


@pytest.mark.parametrize("swapped", ["well", "plate"], ids=["the files' folder", "a folder above it"])
@pytest.mark.parametrize("size", [16, LARGE_FILE], ids=["small files", "large files"])
def test_a_run_folder_swapped_for_a_symlink_after_listing_is_not_followed(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swapped: str, size: int
) -> None:
    # Small files (the batched path) and large ones: every folder is opened without following a
    # symlink, the files' own and every one above it, so bytes from outside the run never reach
    # the share under the run's names.
    for index in range(3):
        lab.write(f"plate/well/frame_{index}.bin", (b"run data %d" % index).ljust(size, b"."))
    outside = tmp_path / "outside"
    (outside / "well").mkdir(parents=True)
    for index in range(3):
        data = (b"not the run's %d" % index).ljust(size, b".")
        (outside / f"frame_{index}.bin").write_bytes(data)
        (outside / "well" / f"frame_{index}.bin").write_bytes(data)
    real_make_dirs = MountTransport._make_dirs
    target = lab.run / ("plate/well" if swapped == "well" else "plate")

    def swap_after_listing(self, job, run, local_dirs):
        real_make_dirs(self, job, run, local_dirs)
        target.rename(tmp_path / "moved")
        target.symlink_to(outside)

    monkeypatch.setattr(MountTransport, "_make_dirs", swap_after_listing)
    with pytest.raises(TransportError):
        lab.push()
    copied = [p.read_bytes() for p in lab.remote.rglob("*") if p.is_file()] if lab.remote.exists() else []
    assert not [data for data in copied if data.startswith(b"not the run")]
    assert _temps(lab.nas) == []


def test_small_files_keep_their_permission_bits(lab: Lab) -> None:
    # A temp file is created with its final mode when the umask keeps it, else fchmod gives it.
    modes = {"a.bin": 0o644, "b.bin": 0o600, "c.bin": 0o755, "d.bin": 0o444, "e.bin": 0o664, "f.bin": 0o2755}
    for name, mode in modes.items():
        os.chmod(lab.write(f"m/{name}", name.encode()), mode)
    old = os.umask(0o022)
    try:
        lab.push()
    finally:
        os.umask(old)
    for name, mode in modes.items():
        assert stat.S_IMODE(os.lstat(lab.remote / "m" / name).st_mode) == mode, name


def test_local_file_deleted_mid_push_is_local_file_vanished(lab: Lab) -> None:
    files = [lab.write(f"d{index:02}/f.bin", os.urandom(70_000)) for index in range(40)]

    def delete_the_rest(_count: int) -> None:
        for path in files:
            path.unlink(missing_ok=True)

    with pytest.raises(TransportError) as caught:
        lab.push(progress=delete_the_rest)
    assert caught.value.kind is TransportErrorKind.LOCAL_FILE_VANISHED
    assert "f.bin" in caught.value.message
    assert _temps(lab.nas) == []
    assert "push_failed" in lab.log_text()


def test_an_unreadable_subfolder_is_named_in_the_error(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    lab.write("a.bin", b"a")
    lab.write("plates/A1/frame.bin", b"f")
    real = os.scandir

    def refused(path):  # as for a folder without read permission (root's tests cannot drop it)
        if os.fspath(path).endswith("plates/A1"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", refused)
    with pytest.raises(TransportError) as caught:
        lab.push()
    assert caught.value.message.startswith("cannot read plates/A1 in "), caught.value.message
    assert "Permission denied" in caught.value.message


def test_file_changing_while_copied_is_copied_again(lab: Lab) -> None:
    path = lab.write("growing.raw", os.urandom(3 * MIB))
    appended: list[bool] = []

    def append_once(_count: int) -> None:
        if not appended:
            appended.append(True)
            with open(path, "ab") as handle:
                handle.write(b"late data")

    result = lab.push(progress=append_once)
    final = path.read_bytes()
    assert (lab.remote / "growing.raw").read_bytes() == final
    assert result.local_hashes["growing.raw"] == hashlib.sha256(final).hexdigest()
    assert _temps(lab.nas) == []


def test_file_that_keeps_changing_fails_for_a_later_retry(lab: Lab) -> None:
    path = lab.write("live.raw", os.urandom(2 * MIB))

    def append_always(_count: int) -> None:
        with open(path, "ab") as handle:
            handle.write(b"more")

    with pytest.raises(TransportError) as caught:
        lab.push(progress=append_always)
    assert caught.value.kind is TransportErrorKind.UNKNOWN
    assert "kept changing" in caught.value.message
    assert _temps(lab.nas) == []


# --------------------------------------------------------------------------- remote failures


def _chattr(flag: str, path: Path) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def test_read_only_target_is_remote_write_refused(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    _build_full_run(lab)
    lab.remote.mkdir(parents=True)
    immutable = _chattr("+i", lab.remote)
    if not immutable:  # no chattr here: force the error the real share would give
        real_open = os.open

        def refusing_open(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and str(lab.remote) in os.fspath(path):
                raise OSError(errno.EROFS, "Read-only file system", path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(mount_module.os, "open", refusing_open)
    try:
        with pytest.raises(TransportError) as caught:
            lab.push()
        assert caught.value.kind is TransportErrorKind.REMOTE_WRITE_REFUSED
        assert list(lab.remote.iterdir()) == []
    finally:
        if immutable:
            _chattr("-i", lab.remote)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENOSPC, TransportErrorKind.REMOTE_WRITE_REFUSED),
        (errno.EDQUOT, TransportErrorKind.REMOTE_WRITE_REFUSED),
        (errno.EROFS, TransportErrorKind.REMOTE_WRITE_REFUSED),
        (errno.EACCES, TransportErrorKind.REMOTE_WRITE_REFUSED),
        (errno.EPERM, TransportErrorKind.REMOTE_WRITE_REFUSED),
        (errno.ENOTCONN, TransportErrorKind.NETWORK),
        (errno.EIO, TransportErrorKind.NETWORK),
        (errno.ESTALE, TransportErrorKind.NETWORK),
        (errno.EHOSTDOWN, TransportErrorKind.NETWORK),
        (errno.ENOENT, TransportErrorKind.NETWORK),
        (errno.EBUSY, TransportErrorKind.UNKNOWN),
    ],
)
def test_remote_error_mapping(lab: Lab, code: int, kind: TransportErrorKind) -> None:
    error = lab.transport._remote_error(OSError(code, os.strerror(code)), "/nas/x")
    assert error.kind is kind


def test_enospc_during_write_is_refused_and_leaves_no_temp(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    lab.write("big.raw", os.urandom(2 * MIB))
    real_write = os.write

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mount_module.os, "write", full_disk)
    with pytest.raises(TransportError) as caught:
        lab.push()
    monkeypatch.setattr(mount_module.os, "write", real_write)
    assert caught.value.kind is TransportErrorKind.REMOTE_WRITE_REFUSED
    assert _temps(lab.nas) == []


def test_share_unmounted_mid_push_is_network(lab: Lab) -> None:
    for index in range(30):
        lab.write(f"d{index:02}/f.bin", os.urandom(50_000))
    unmounted: list[bool] = []

    def unmount(_count: int) -> None:
        if not unmounted:
            unmounted.append(True)
            (lab.nas / ".exlab-nas").unlink()
            for folder in lab.remote.iterdir():
                if folder.name >= "d20" and folder.is_dir():
                    for child in folder.iterdir():
                        child.unlink()
                    folder.rmdir()

    with pytest.raises(TransportError) as caught:
        lab.push(progress=unmount)
    assert caught.value.kind is TransportErrorKind.NETWORK


# --------------------------------------------------------------------------- remote manifest


@pytest.mark.parametrize("read_back", [True, False], ids=["read-back-by-push", "read-by-manifest"])
def test_remote_manifest_reads_each_file_from_storage(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, read_back: bool
) -> None:
    _build_full_run(lab)
    if not read_back:
        monkeypatch.setattr(mount_module, "READ_BACK_TTL_S", -1.0)  # as for an audit: all read anew
        lab.push()
    reads = _count_manifest_reads(monkeypatch)
    if read_back:  # the push reads each file back from the share right after it is durable
        lab.push()
    manifest = asyncio.run(lab.transport.remote_manifest(lab.run))
    # every file of the copy was hashed past the page cache (verifier.hash_from_storage), once
    assert len(set(reads)) == len(reads) == len(manifest.hashes) == len(hash_tree(lab.run, include_metadata=True))
    assert set(reads) == {os.lstat(p).st_ino for p in lab.remote.rglob("*") if p.is_file()}


def _count_manifest_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Files hashed past the page cache: by ``hash_from_storage``, or by the small-file batch's read-back."""
    reads: list[int] = []
    real_hash = mount_module.hash_from_storage
    real_prefetched = mount_module._hash_prefetched

    def hashed(fd, view, **kwargs):
        reads.append(os.fstat(fd).st_ino)
        return real_hash(fd, view, **kwargs)

    def prefetched(fd, info):
        reads.append(os.fstat(fd).st_ino)
        return real_prefetched(fd, info)

    monkeypatch.setattr(mount_module, "hash_from_storage", hashed)
    monkeypatch.setattr(mount_module, "_hash_prefetched", prefetched)
    return reads


def test_read_back_serves_the_next_manifest_once(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    _build_full_run(lab)
    result = lab.push()
    reads = _count_manifest_reads(monkeypatch)
    first = asyncio.run(lab.transport.remote_manifest(lab.run))
    assert reads == []  # every file was read back from the share by the push
    assert compare(result.local_hashes, first).ok
    second = asyncio.run(lab.transport.remote_manifest(lab.run))  # an audit: reads everything again
    assert second == first
    assert len(reads) == len(first.hashes)


def test_read_back_is_not_trusted_for_a_file_changed_since(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    lab.write("big.raw", os.urandom(2 * MIB))
    lab.write("small.txt", b"hello")
    result = lab.push()
    for rel in ("big.raw", "small.txt"):  # flip one byte, same size, mtime put back
        target = lab.remote / rel
        info = target.stat()
        with open(target, "r+b") as handle:
            first = handle.read(1)
            handle.seek(0)
            handle.write(bytes([first[0] ^ 1]))
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    reads = _count_manifest_reads(monkeypatch)
    outcome = compare(result.local_hashes, asyncio.run(lab.transport.remote_manifest(lab.run)))
    assert outcome.different == ("big.raw", "small.txt")
    assert len(reads) == 2


def test_the_manifest_after_a_push_holds_the_push_own_strings(lab: Lab) -> None:
    """Issue 13 (memory): the manifest taken from the read-back makes no new path or digest string per file."""
    for index in range(50):
        lab.write(f"d{index % 3}/f{index}.bin", index.to_bytes(2, "little") * 300)
    result = lab.push()
    manifest = asyncio.run(lab.transport.remote_manifest(lab.run))
    assert manifest.hashes == result.local_hashes
    keys = {id(rel) for rel in result.local_hashes}
    assert all(id(rel) in keys for rel in manifest.hashes)
    assert all(manifest.hashes[rel] is result.local_hashes[rel] for rel in manifest.hashes)


def test_a_file_read_back_unlike_its_copy_is_read_again(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-back whose digest differs from the copy's vouches for nothing: the manifest reads its folder again."""
    lab.write("x/a.bin", b"a" * 1000)
    lab.write("x/c.bin", b"c" * 1000)
    lab.write("y/b.bin", b"b" * 1000)

    def misreading(real):  # the push's read-back of x/a.bin gives a wrong digest (hex or raw)
        def fake(fd, *args, **kwargs):
            digest = real(fd, *args, **kwargs)
            if os.pread(fd, 1, 0) != b"a":
                return digest
            return bytes(len(digest)) if isinstance(digest, bytes) else "0" * len(digest)

        return fake

    for name in ("hash_from_storage", "_hash_prefetched"):  # whichever hashes the read-back
        if hasattr(mount_module, name):
            monkeypatch.setattr(mount_module, name, misreading(getattr(mount_module, name)))
    result = lab.push()
    monkeypatch.undo()
    reads = _count_manifest_reads(monkeypatch)
    manifest = asyncio.run(lab.transport.remote_manifest(lab.run))
    assert sorted(reads) == sorted((lab.remote / rel).stat().st_ino for rel in ("x/a.bin", "x/c.bin"))
    assert compare(result.local_hashes, manifest).ok


def test_a_folder_with_a_file_changed_since_its_read_back_is_read_again(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder's sum of tags no longer matches: every file of it (and only it) is read from storage."""
    for index in range(5):
        lab.write(f"x/f{index}.bin", bytes([index]) * 500)
        lab.write(f"y/f{index}.bin", bytes([index + 9]) * 500)
    result = lab.push()
    os.utime(lab.remote / "x" / "f3.bin", ns=(1, os.stat(lab.remote / "x" / "f3.bin").st_mtime_ns))  # a new ctime
    reads = _count_manifest_reads(monkeypatch)
    manifest = asyncio.run(lab.transport.remote_manifest(lab.run))
    assert sorted(reads) == sorted(p.stat().st_ino for p in (lab.remote / "x").iterdir())
    assert compare(result.local_hashes, manifest).ok
    assert dict(manifest.hashes) == result.local_hashes


def test_a_file_read_back_then_removed_from_the_share_is_not_in_the_manifest(lab: Lab) -> None:
    lab.write("a.bin", b"a" * 1000)
    lab.write("sub/b.bin", b"b" * 1000)
    result = lab.push()
    (lab.remote / "sub" / "b.bin").unlink()
    manifest = asyncio.run(lab.transport.remote_manifest(lab.run))
    assert "sub/b.bin" not in manifest.hashes
    assert compare(result.local_hashes, manifest).missing == ("sub/b.bin",)


def test_read_back_expires(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    lab.write("a.bin", b"a" * 1000)
    lab.push()
    monkeypatch.setattr(mount_module, "READ_BACK_TTL_S", -1.0)
    reads = _count_manifest_reads(monkeypatch)
    asyncio.run(lab.transport.remote_manifest(lab.run))
    assert len(reads) == 1


def test_remote_manifest_of_a_run_never_sent_is_empty(lab: Lab) -> None:
    lab.write("a", b"x")
    assert asyncio.run(lab.transport.remote_manifest(lab.run)) == RemoteManifest(hashes={})


# --------------------------------------------------------------------------- bandwidth


WEEKDAY_WINDOW = {
    "upload_mbps": 0.5,
    "schedule": [{"days": ["mon", "tue", "wed", "thu", "fri"], "from": "08:00", "to": "18:00"}],
}


def test_window_closing_mid_transfer_lifts_the_limit(tmp_path: Path) -> None:
    lab = Lab(tmp_path, bandwidth=WEEKDAY_WINDOW, now=lambda: SATURDAY_10AM)
    lab.write("data.raw", os.urandom(4 * MIB))
    start = time.monotonic()
    result = lab.push(bwlimit_kibps=61)  # 0.5 Mbps in force at the start: 67 s for 4 MiB
    elapsed = time.monotonic() - start
    assert result.bytes_sent == 4 * MIB
    assert 0.4 <= elapsed < 3.0  # the limit held until the first re-read, then was lifted


def test_window_opening_mid_transfer_imposes_the_limit(tmp_path: Path) -> None:
    window = dict(WEEKDAY_WINDOW, upload_mbps=8)  # 976 KiB/s
    calls: list[dt.datetime] = []

    def now() -> dt.datetime:
        calls.append(MONDAY_10AM)
        return MONDAY_10AM

    lab = Lab(tmp_path, bandwidth=window, now=now)
    lab.write("data.raw", os.urandom(3 * MIB))
    blocks: list[int] = []

    def slow_network(count: int) -> None:
        blocks.append(count)
        if len(blocks) <= 2:
            time.sleep(0.3)  # the first two blocks take 0.3 s each: past the 0.5 s re-read

    start = time.monotonic()
    lab.push(bwlimit_kibps=None, progress=slow_network)  # unlimited when the push started
    elapsed = time.monotonic() - start
    assert calls, "the schedule was never re-read"
    # 0.6 s unlimited, then the last MiB at 976 KiB/s (~1.05 s); without the limit ~0.6 s
    assert elapsed >= 1.35


def test_cancelled_push_stops_and_cleans_up(lab: Lab) -> None:
    lab.write("data.raw", os.urandom(4 * MIB))

    async def cancel_soon() -> None:
        task = asyncio.create_task(lab.transport.push(lab.run, bwlimit_kibps=8))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    deadline = time.monotonic() + 3
    while _temps(lab.nas) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _temps(lab.nas) == []
    assert not (lab.remote / "data.raw").exists()


def test_a_push_cancelled_during_a_copys_fsync_renames_nothing(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled while a file's copy was made durable (a stalled share): the thread renames nothing after.

    Its coroutine returns at once and the service may hand its lease over while the thread still
    runs: a rename then would land beside another process's push (found by review).
    """
    lab.write("data.raw", os.urandom(2 * MIB))
    real = MountTransport._copy_once
    pushes: list = []

    def copy_then_cancelled(self, job, *args, **kwargs):
        copied = real(self, job, *args, **kwargs)
        pushes.append(job)
        job.abort.set()  # the cancel lands while the fsync ran
        return copied

    monkeypatch.setattr(MountTransport, "_copy_once", copy_then_cancelled)
    with pytest.raises(TransportError, match="cancelled"):
        lab.push()
    assert pushes
    assert not (lab.remote / "data.raw").exists()
    assert _temps(lab.nas) == []


def test_module_exports() -> None:
    assert set(mount_module.__all__) == {"MountTransport", "is_temp_name", "same_mtime"}
    assert MountTransport.capabilities.hashes_while_sending


def test_a_cancelled_remote_manifest_stops_reading_the_share(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(60):
        lab.write(f"f{i:02d}.bin", os.urandom(4096))
    lab.push()
    monkeypatch.setattr(mount_module, "READ_BACK_TTL_S", -1.0)  # every file read anew, as in an audit
    real = mount_module.hash_from_storage
    reads: list[int] = []

    def slow(fd, view, **kwargs):
        reads.append(fd)
        time.sleep(0.02)
        return real(fd, view, **kwargs)

    monkeypatch.setattr(mount_module, "hash_from_storage", slow)

    async def cancel_early() -> None:
        task = asyncio.ensure_future(lab.transport.remote_manifest(lab.run))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_early())  # asyncio.run waits for the worker thread to return
    stopped_at = len(reads)
    time.sleep(0.2)
    assert len(reads) == stopped_at < 60  # no file read after the cancellation settled


def test_read_backs_nobody_takes_are_dropped_after_their_time_to_live(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push whose read-back no verification takes (the metadata push after VERIFIED) must not stay in memory."""
    lab.write("a.raw", os.urandom(2000))
    lab.push()
    assert len(lab.transport._read_backs) == 1
    clock = [time.monotonic() + mount_module.READ_BACK_TTL_S + 1]
    monkeypatch.setattr(mount_module.time, "monotonic", lambda: clock[0])
    other = lab.run.with_name("Run_2024-01-09")
    (other / "b.raw").parent.mkdir(parents=True)
    (other / "b.raw").write_bytes(b"b")
    asyncio.run(lab.transport.push(other, bwlimit_kibps=None))
    assert list(lab.transport._read_backs) == [lab.transport.remote_run_path(other)]


def test_a_metadata_only_push_keeps_no_read_back(lab: Lab) -> None:
    """The metadata push follows VERIFIED and no verification takes its read-back: keep none (soak memory)."""
    lab.write("a.raw", os.urandom(2000))
    lab.push()
    asyncio.run(lab.transport.remote_manifest(lab.run))  # the verification takes the push's read-back
    assert lab.transport._read_backs == {}
    (lab.run / ".exlab-wizard").mkdir(exist_ok=True)
    (lab.run / ".exlab-wizard" / "creation.json").write_text('{"sync_status": "verified"}')
    result = asyncio.run(lab.transport.push_metadata(lab.run))
    assert result.ok and result.files_sent >= 1
    assert lab.transport._read_backs == {}


@pytest.mark.parametrize(
    "name", ["a" + "é" * 110, "é" * 127, "日本語" * 30, "x" * 255], ids=["odd", "even", "cjk", "ascii"]
)
def test_a_temp_name_never_cuts_a_character_in_half(name: str) -> None:
    """A long non-ASCII name the share accepts: its temp name is whole UTF-8 too (exFAT and SMB refuse half a character)."""
    from exlab_wizard.sync.transports.mount import _temp_name

    temp = os.fsencode(_temp_name(name))
    assert len(temp) <= 255
    assert temp.decode("utf-8").startswith("." + name[:10])
    assert is_temp_name(os.fsdecode(temp))


def test_a_temp_name_of_a_name_that_is_not_utf8_keeps_its_bytes() -> None:
    from exlab_wizard.sync.transports.mount import _temp_name

    name = os.fsdecode(b"frame\xff" * 60)
    temp = os.fsencode(_temp_name(name))
    assert temp.startswith(b".frame\xff") and len(temp) <= 255
