"""Durable file primitives of the cache: a safe bounded read and an inter-process lock file.

:func:`atomic_write_bytes` and :func:`fsync_dir` live in
:mod:`exlab_wizard.fileio` (re-exported here for the cache's callers).

:func:`read_regular_file` reads a small file that someone else controls (a
run's creation.json) without the traps of a plain read: it never follows a
symbolic link, never opens a FIFO, socket or device, and never reads more
than a bound, so a broken or hostile file cannot hang or exhaust the engine.

:class:`FileLock` serialises writers of one file across processes (an
exclusive ``flock`` on a sidecar lock file) and across threads of one process
(a per-path ``threading.Lock``), with a timeout.

The error tree of the cache lives here so both modules can raise it:
:class:`CacheError` with a :class:`CacheErrorKind`, and :class:`LockTimeout`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import time
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from exlab_wizard.fileio import atomic_write_bytes, fsync_dir, read_bounded  # the first two re-exported

__all__ = [
    "CacheError",
    "CacheErrorKind",
    "FileLock",
    "LockTimeout",
    "atomic_write_bytes",
    "fsync_dir",
    "read_regular_file",
]


class CacheErrorKind(StrEnum):
    """Why a cache file could not be read or written."""

    MALFORMED = "malformed"  # not JSON, not an object, wrong field types
    UNSUPPORTED_SCHEMA = "unsupported_schema"  # schema_version missing, unparsable or major != 1
    LOCK_TIMEOUT = "lock_timeout"  # another writer held the lock too long
    IO = "io"  # the file system refused
    NOT_REGULAR = "not_regular_file"  # a symbolic link, folder, FIFO, socket or device
    TOO_LARGE = "too_large"  # larger than the reader's bound


class CacheError(Exception):
    """A cache file that cannot be used; ``kind`` says why, the message names the file."""

    def __init__(self, kind: CacheErrorKind | str, message: str, path: Path | str | None = None):
        self.kind = CacheErrorKind(kind)
        self.message = message
        self.path = Path(path) if path is not None else None
        super().__init__(message)


class LockTimeout(CacheError):
    """The lock was not obtained within the timeout (``kind`` is ``lock_timeout``)."""

    def __init__(self, message: str, path: Path | str | None = None):
        super().__init__(CacheErrorKind.LOCK_TIMEOUT, message, path)


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _not_regular(path: Path, mode: int) -> CacheError:
    return CacheError(
        CacheErrorKind.NOT_REGULAR, f"{path} is {_file_kind(mode)}, not a regular file; it is not read", path
    )


def _too_large(path: Path, max_bytes: int) -> CacheError:
    return CacheError(CacheErrorKind.TOO_LARGE, f"{path} is larger than {max_bytes} bytes; it is not read", path)


def read_regular_file(path: Path, max_bytes: int) -> bytes | None:
    """The bytes of the regular file ``path``, or ``None`` when it does not exist.

    Safe against a file that someone else controls: a symbolic link is never
    followed (``lstat`` first, then ``O_NOFOLLOW``), a FIFO, socket, device
    or folder is never opened for reading (``lstat``; ``O_NONBLOCK`` so that
    a FIFO swapped in after the ``lstat`` cannot block the ``open``; ``fstat``
    of the opened file must show a regular file again), and at most
    ``max_bytes`` are read (a file that is, or grows, larger is refused).

    Raises :class:`CacheError`: ``not_regular_file`` (symbolic link, folder,
    FIFO, socket, device), ``too_large`` (more than ``max_bytes``), ``io``
    (the file system refused: permission, I/O error). The message names the
    file. Takes no lock.
    """
    path = Path(path)
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CacheError(CacheErrorKind.IO, f"{path}: cannot read: {exc.strerror or exc}", path) from exc
    if not stat.S_ISREG(before.st_mode):
        raise _not_regular(path, before.st_mode)
    if before.st_size > max_bytes:
        raise _too_large(path, max_bytes)
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None  # removed since the lstat: as if it never was
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a symbolic link since the lstat
            raise _not_regular(path, stat.S_IFLNK) from exc
        raise CacheError(CacheErrorKind.IO, f"{path}: cannot read: {exc.strerror or exc}", path) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, info.st_mode)
        data = read_bounded(fd, max_bytes, info.st_size)
    except OSError as exc:
        raise CacheError(CacheErrorKind.IO, f"{path}: cannot read: {exc.strerror or exc}", path) from exc
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise _too_large(path, max_bytes)
    return data


class _PathLock:
    __slots__ = ("lock", "owner", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.users = 0  # holders and waiters; the entry is dropped at 0, so the registry stays small


_REGISTRY_GUARD = threading.Lock()
_REGISTRY: dict[str, _PathLock] = {}


def _reset_after_fork() -> None:
    # A forked child must not inherit locks held by threads that do not exist in it.
    global _REGISTRY_GUARD, _REGISTRY
    _REGISTRY_GUARD = threading.Lock()
    _REGISTRY = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _path_lock(key: str) -> _PathLock:
    with _REGISTRY_GUARD:
        entry = _REGISTRY.get(key)
        if entry is None:
            entry = _REGISTRY[key] = _PathLock()
        entry.users += 1
        return entry


def _unuse(key: str, entry: _PathLock) -> None:
    """One holder or waiter less; a path nobody holds or waits for leaves the registry."""
    with _REGISTRY_GUARD:
        entry.users -= 1
        if entry.users <= 0 and _REGISTRY.get(key) is entry:
            del _REGISTRY[key]


def _open_lock_file(path: Path) -> int:
    """Open (create) a lock file: never through a symbolic link, never blocking on a FIFO; a regular file only."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


class FileLock:
    """An exclusive lock on ``path``, shared by threads and processes.

    ``with FileLock(folder / "creation.json.lock", timeout=10.0): ...``

    The lock file is created when missing (its folder must exist) and is never
    deleted: deleting it would let two writers lock two different inodes.
    Inside one process a per-path ``threading.Lock`` is taken first, then an
    exclusive ``fcntl.flock`` (polled until the deadline). Raises
    :class:`LockTimeout` after ``timeout`` seconds, :class:`CacheError`
    (``io``) when the lock file cannot be opened, and ``RuntimeError`` when the
    same thread asks again for a lock it already holds (the lock is not
    re-entrant; waiting would only end in a timeout). Not re-usable while held.
    """

    def __init__(self, path: Path, timeout: float):
        self.path = Path(path)
        self.timeout = float(timeout)
        self._key = os.path.abspath(self.path)
        self._fd: int | None = None
        self._entry: _PathLock | None = None

    def acquire(self) -> None:
        """Take the lock or raise; see the class docstring."""
        deadline = time.monotonic() + max(self.timeout, 0.0)
        entry = _path_lock(self._key)
        me = threading.get_ident()
        if entry.owner == me:
            _unuse(self._key, entry)
            raise RuntimeError(f"{self.path} is already locked by this thread (nested write?)")
        if not entry.lock.acquire(timeout=max(self.timeout, 0.0)):
            _unuse(self._key, entry)
            raise LockTimeout(
                f"{self.path}: another writer in this process held the lock for more than {self.timeout:g} s",
                self.path,
            )
        entry.owner = me
        try:
            fd = _open_lock_file(self.path)
        except OSError as exc:
            entry.owner = None
            entry.lock.release()
            _unuse(self._key, entry)
            why = "it is a symbolic link" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
            raise CacheError(CacheErrorKind.IO, f"{self.path}: cannot open the lock file: {why}", self.path) from exc
        try:
            delay = 0.002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise LockTimeout(
                            f"{self.path}: another process held the lock for more than {self.timeout:g} s",
                            self.path,
                        ) from None
                    time.sleep(min(delay, remaining))
                    delay = min(delay * 2, 0.05)
        except BaseException:
            os.close(fd)
            entry.owner = None
            entry.lock.release()
            _unuse(self._key, entry)
            raise
        self._fd, self._entry = fd, entry

    def release(self) -> None:
        """Release the lock (closing the descriptor drops the ``flock``)."""
        fd, entry = self._fd, self._entry
        self._fd = self._entry = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        if entry is not None:
            entry.owner = None
            entry.lock.release()
            _unuse(self._key, entry)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
