"""FileLock: a lock file never deleted, locks that time out, within a process and across processes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from exlab_wizard.cache.atomic import CacheError, CacheErrorKind, FileLock, LockTimeout
from tests.helpers import hold_lock_in_child, release_child


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


def test_the_per_path_lock_registry_forgets_paths_nobody_holds(tmp_path: Path) -> None:
    """A service that writes a creation.json per run for months must not keep one lock entry per run forever."""
    from exlab_wizard.cache import atomic

    paths = [tmp_path / f"run{i}.lock" for i in range(50)]
    for path in paths:
        with FileLock(path, timeout=1.0):
            assert str(path.absolute()) in atomic._REGISTRY
    with pytest.raises(RuntimeError), FileLock(paths[0], timeout=1.0), FileLock(paths[0], timeout=0.05):
        pass  # nested in one thread: refused
    timed_out: list[BaseException] = []
    with FileLock(paths[1], timeout=1.0):

        def other() -> None:
            try:
                with FileLock(paths[1], timeout=0.05):
                    pass
            except LockTimeout as exc:
                timed_out.append(exc)

        waiter = threading.Thread(target=other)
        waiter.start()
        waiter.join()
    assert timed_out
    assert not any(str(p.absolute()) in atomic._REGISTRY for p in paths)
