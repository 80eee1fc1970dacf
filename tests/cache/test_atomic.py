"""atomic_write_bytes and FileLock: durable replace, no temp file left, locks that time out."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from exlab_wizard.cache import atomic
from exlab_wizard.cache.atomic import CacheError, CacheErrorKind, FileLock, LockTimeout, atomic_write_bytes
from tests.helpers import hold_lock_in_child, release_child


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

    monkeypatch.setattr(atomic.os, "replace", spy)
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
        monkeypatch.setattr(atomic.os, "fsync", boom)
    elif failing == "replace":
        monkeypatch.setattr(atomic.os, "replace", boom)
    else:
        monkeypatch.setattr(atomic.os, "write", lambda fd, data: 0)  # the disk takes nothing

    with pytest.raises(OSError) as caught:
        atomic_write_bytes(target, b"new content")
    if failing == "short_write":
        assert "short write" in str(caught.value)
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert _leftovers(tmp_path) == []


def test_partial_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(atomic.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    target = tmp_path / "f"
    payload = b"0123456789" * 50
    atomic_write_bytes(target, payload)
    assert target.read_bytes() == payload


def test_file_lock_creates_and_never_deletes_its_file(tmp_path: Path) -> None:
    lock_path = tmp_path / "creation.json.lock"
    with FileLock(lock_path, timeout=1.0):
        assert lock_path.exists()
    assert lock_path.exists()
    with FileLock(lock_path, timeout=1.0):  # re-acquirable after release
        pass


def test_file_lock_serialises_threads_and_times_out(tmp_path: Path) -> None:
    lock_path = tmp_path / "x.lock"
    holding = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with FileLock(lock_path, timeout=1.0):
            holding.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert holding.wait(5)
        started = time.monotonic()
        with pytest.raises(LockTimeout) as caught, FileLock(lock_path, timeout=0.2):
            pass
        assert 0.15 <= time.monotonic() - started < 2
        assert caught.value.kind is CacheErrorKind.LOCK_TIMEOUT
        assert str(lock_path) in str(caught.value)
    finally:
        release.set()
        thread.join()
    with FileLock(lock_path, timeout=0.5):
        pass


def test_file_lock_refuses_nesting_in_one_thread(tmp_path: Path) -> None:
    lock_path = tmp_path / "x.lock"
    with FileLock(lock_path, timeout=1.0), pytest.raises(RuntimeError, match="already locked by this thread"):
        FileLock(lock_path, timeout=0.1).acquire()
    with FileLock(lock_path, timeout=0.1):
        pass


def test_file_lock_on_a_missing_folder_is_an_io_error(tmp_path: Path) -> None:
    with pytest.raises(CacheError) as caught, FileLock(tmp_path / "absent" / "x.lock", timeout=0.1):
        pass
    assert caught.value.kind is CacheErrorKind.IO
    with FileLock(tmp_path / "absent.lock", timeout=0.1):  # the thread lock was released
        pass


def test_file_lock_times_out_against_another_process(tmp_path: Path) -> None:
    lock_path = tmp_path / "x.lock"
    child = hold_lock_in_child(lock_path)
    try:
        started = time.monotonic()
        with pytest.raises(LockTimeout, match="another process"), FileLock(lock_path, timeout=0.2):
            pass
        assert 0.15 <= time.monotonic() - started < 2
    finally:
        release_child(child)
    with FileLock(lock_path, timeout=2.0):
        pass
