"""File I/O every layer shares: the metadata folder's name, durable writes, SHA-256 reads.

The lowest layer of the engine (the standard library only): the cache, the
verifier, the transports and the reaper use these instead of their own copies.

- :data:`METADATA_DIR` and :func:`is_metadata_path` / :func:`is_data_path`:
  which relative paths of a run are its data. A path is metadata when it lies
  inside the top-level folder named exactly ``.exlab-wizard`` (byte for byte,
  case-sensitive); everything else, ``.Exlab-Wizard/`` or a *file* named
  ``.exlab-wizard`` included, is data.
- :func:`reaping_name` / :func:`is_reaping_name`: the private name the reaper
  gives a planned file right before its unlink (``.exlab-reaping-<20 hex>``);
  a file so named outside ``.exlab-wizard/``, at any depth, is never a run's
  data: every listing of a run's data leaves it out.
- :func:`rename_noreplace`: rename between open folders, never over an existing name.
- :func:`filesystem_type` / :func:`mounted_filesystem`: the mount holding a path, read from
  ``/proc/self/mountinfo`` (its type; what is mounted there: type, source, root).
- :func:`fsync_dir` / :func:`fsync_dir_fd`: make a creation, rename or unlink in a folder durable.
- :func:`atomic_write_bytes`: replace a file so that a reader, or a machine
  that loses power at any instant, sees the old content or the new one, never
  a mix (restic's recipe: temp file in the same folder, write, check the byte
  count, fsync, rename over the target, fsync the folder).
- :func:`read_bounded`: read a file someone else controls without letting
  it exhaust memory (at most one byte past a bound).
- :func:`open_regular`, :func:`hash_fd`, :func:`hash_file`,
  :func:`hash_from_storage`, :func:`prefetch_from_storage`: streaming SHA-256 of regular files, never
  following a symbolic link and never opening a FIFO for a blocking read;
  one read loop serves plain hashing, hashing while copying (``each``) and
  reading past the page cache (``drop_behind``).

Example::

    fd, info = open_regular(run / "a.raw")
    try:
        digest = hash_fd(fd, memoryview(bytearray(BLOCK_SIZE)))
    finally:
        os.close(fd)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "MOUNTINFO",
    "MountEntry",
    "mountinfo",
    "parse_mountinfo_lines",
    "remove_stale_temps",
    "filesystem_type",
    "real_path_by_links",
    "mounted_filesystem",
    "BLOCK_SIZE",
    "DROP_BEHIND",
    "METADATA_DIR",
    "REAPING_PREFIX",
    "advise_sequential",
    "atomic_write_bytes",
    "drop_page_cache",
    "drop_page_cache_fd",
    "filesystem_now_ns",
    "fsync_dir",
    "fsync_dir_fd",
    "hash_fd",
    "hash_file",
    "hash_from_storage",
    "is_data_path",
    "is_metadata_path",
    "is_reaping_name",
    "make_dirs_durable",
    "OpenFolders",
    "OpenFoldersByThread",
    "open_regular",
    "open_regular_beneath",
    "prefetch_from_storage",
    "read_bounded",
    "reaping_name",
    "rename_noreplace",
]

#: The run's metadata folder (``<run>/.exlab-wizard/``): creation.json, checksums.sha256, logs.
METADATA_DIR = ".exlab-wizard"
_METADATA_PREFIX = METADATA_DIR + "/"

#: Read size for hashing and copying: big enough for full-speed I/O, small
#: enough to keep memory constant (one buffer per thread).
BLOCK_SIZE = 1 << 20
#: While a file is read back past the page cache, the pages already hashed are dropped
#: every this many bytes: the read recycles a few MiB of memory instead of filling the
#: page cache with the whole file. (Filling it costs more than the read where memory
#: freed earlier was handed back to a hypervisor; on a 2-core VM, 1.46 s -> 0.98 s for
#: a 1 GiB push with its read-back.)
DROP_BEHIND = 8 << 20

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_OPEN_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC
#: O_NONBLOCK: a FIFO swapped in for a file never blocks the open.
_OPEN_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)
#: A folder opened to work in: never through a symlink.
_OPEN_FOLDER = _OPEN_DIR | getattr(os, "O_NOFOLLOW", 0)
#: Open folders an :class:`OpenFolders` keeps for the files that follow in them.
DIR_FDS = 16
#: errno values of an fsync that the file system does not support (some network shares).
_CANNOT_SYNC = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)


def is_metadata_path(rel: str) -> bool:
    """True for a relative path inside the run's ``.exlab-wizard/`` folder (exact name, exact case)."""
    return rel.startswith(_METADATA_PREFIX)


def is_data_path(rel: str) -> bool:
    """True for a relative path of a data file: anything outside ``.exlab-wizard/``."""
    return not rel.startswith(_METADATA_PREFIX)


#: The reaper's private names (:func:`reaping_name`) begin so.
REAPING_PREFIX = ".exlab-reaping-"
_REAPING_NAME = re.compile(re.escape(REAPING_PREFIX) + r"[0-9a-f]{20}")


def reaping_name(name: str, ino: int) -> str:
    """The private name a planned file (``name`` in its folder, inode ``ino``) is renamed to before its unlink.

    Deterministic (a resumed deletion finds what a killed one set aside) and
    35 characters whatever the length of ``name``.
    """
    key = os.fsencode(name) + b"\0" + str(ino).encode()
    return REAPING_PREFIX + hashlib.sha256(key).hexdigest()[:20]


def is_reaping_name(name: str) -> bool:
    """True for a file name made by :func:`reaping_name` (outside ``.exlab-wizard/``, never listed as data)."""
    # (a prefix test first: this runs for every file of every listing)
    return name.startswith(REAPING_PREFIX) and _REAPING_NAME.fullmatch(name) is not None


# --------------------------------------------------------------------------- durable writes


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a creation, rename or unlink in ``folder`` durable (fsync the folder).

    A file system that cannot fsync a folder (``EINVAL``, ``ENOTSUP``,
    ``EBADF``: certain network shares) is let be; any other error raises
    ``OSError``.
    """
    fd = os.open(folder, _OPEN_DIR)
    try:
        fsync_dir_fd(fd)
    finally:
        os.close(fd)


def fsync_dir_fd(fd: int) -> None:
    """:func:`fsync_dir` of a folder already open (``fd`` stays open)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _CANNOT_SYNC:
            raise


def make_dirs_durable(folder: str | os.PathLike[str]) -> None:
    """``mkdir -p folder``, each folder it creates made durable in its parent (fsync of the parent).

    A new folder's entry survives a power cut only once its parent is
    fsynced; the files written inside it later are fsynced with their own
    folder, not with this one. Nothing is synced when the folder exists.
    """
    path = os.path.abspath(folder)
    missing: list[str] = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for each in reversed(missing):
        try:
            os.mkdir(each)
        except FileExistsError:
            if not os.path.isdir(each):
                raise
            continue  # made meanwhile by another writer, who makes it durable
        fsync_dir(os.path.dirname(each))


#: renameat2's flag: fail with EEXIST rather than replace the target (Linux 3.15+).
_RENAME_NOREPLACE = 1
#: The kernel, the file system or the C library does not offer RENAME_NOREPLACE.
_NO_NOREPLACE = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP})


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """The C library's ``renameat2`` (glibc 2.28+, musl 1.2.3+), or None where there is none."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


def rename_noreplace(
    src: str, dst: str, *, dir_fd: int, dst_dir_fd: int | None = None, atomic_only: bool = False
) -> None:
    """Rename ``src`` in the folder ``dir_fd`` to ``dst`` in ``dst_dir_fd``, never replacing an existing ``dst``.

    ``dst_dir_fd`` None: ``dst`` is in the same folder as ``src``.

    ``renameat2(RENAME_NOREPLACE)``: atomic, ``FileExistsError`` when ``dst``
    exists. Where it is not offered (no ``renameat2`` in the C library; a
    kernel or file system that refuses the flag: ``EINVAL``, ``ENOSYS``,
    ``ENOTSUP``), ``dst`` is looked up and the rename made only when it is
    absent: a file made at ``dst`` between the look-up and the rename would
    be replaced, so that fallback is only for names no other program uses
    (the reaper's :func:`reaping_name`); ``atomic_only`` refuses it (``OSError``
    ``ENOTSUP``). Raises ``OSError`` as ``os.rename``.
    """
    to = dir_fd if dst_dir_fd is None else dst_dir_fd
    func = _renameat2()
    if func is not None:
        if func(dir_fd, os.fsencode(src), to, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _NO_NOREPLACE:
            raise OSError(err, os.strerror(err), src, None, dst)
    if atomic_only:
        raise OSError(errno.ENOTSUP, "no rename that refuses to replace a file here", src, None, dst)
    try:
        os.stat(dst, dir_fd=to, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=to)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), src, None, dst)


def filesystem_now_ns(folder: str | os.PathLike[str]) -> int | None:
    """The time now by the clock that stamps the files of ``folder``'s filesystem; None where unknown.

    Read as the ctime of an unnamed file made there (``O_TMPFILE``: it has no
    name, so nothing is left behind, even by a crash). That clock is not
    always this process's: a share stamps files by its server's clock, and
    this machine's clock may have been stepped since. None when the
    filesystem cannot make such a file (no ``O_TMPFILE``, read-only).
    """
    unnamed = getattr(os, "O_TMPFILE", 0)
    if not unnamed:
        return None
    try:
        fd = os.open(folder, unnamed | os.O_WRONLY, 0o600)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_ctime_ns
    finally:
        os.close(fd)


def _open_unique_temp(folder: Path, name: str, mode: int) -> tuple[int, Path]:
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not find a free temporary name", str(folder))


def remove_stale_temps(path: str | os.PathLike[str]) -> list[str]:
    """Remove the ``.<name>.<12 hex>.tmp`` files an earlier, killed :func:`atomic_write_bytes` of ``path`` left.

    Only for a caller that is the one writer of ``path`` right now (it holds
    the file's lock, or it is the only process that writes it): any such temp
    is then a leftover, never a write in progress. Returns the names removed.
    """
    path = Path(path)
    pattern = re.compile(r"\." + re.escape(path.name) + r"\.[0-9a-f]{12}\.tmp")
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if pattern.fullmatch(name):
            try:
                os.unlink(path.parent / name)
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, new_mode: int = 0o666) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    The bytes go to a uniquely named ``.<name>.<random>.tmp`` file in the same
    folder (created with ``O_EXCL``: never through a symbolic link); the byte
    count is checked, the file fsynced, renamed over ``path`` (``os.replace``)
    and the folder fsynced. An existing target keeps its permission bits; a
    new one gets ``new_mode`` minus the umask.

    Raises ``OSError`` (including a short write) and leaves ``path`` untouched;
    the temp file never survives a failure. The folder must exist.
    """
    atomic_write_chunks(path, [bytes(data) if not isinstance(data, bytes | bytearray) else data], new_mode=new_mode)


def atomic_write_chunks(
    path: str | os.PathLike[str], chunks: Iterable[bytes | bytearray], *, new_mode: int = 0o666
) -> None:
    """:func:`atomic_write_bytes` of the chunks one after the other, never all in memory at once.

    An error raised by the iterator leaves ``path`` untouched, as a failed write does.
    """
    path = Path(path)
    folder = path.parent
    try:
        mode = os.stat(path).st_mode & 0o7777
        keep_mode = True
    except FileNotFoundError:
        mode, keep_mode = new_mode, False
    fd, tmp = _open_unique_temp(folder, path.name, mode)
    try:
        try:
            if keep_mode:
                os.fchmod(fd, mode)  # the umask applied at creation; restore the target's bits
            expected = written = 0
            for data in chunks:
                expected += len(data)
                view = memoryview(data)
                done = 0
                while done < len(data):
                    n = os.write(fd, view[done:])
                    if n <= 0:
                        break
                    done += n
                written += done
                if done != len(data):
                    break
            size = os.fstat(fd).st_size
            if written != expected or size != expected:
                raise OSError(errno.EIO, f"short write: {size} of {expected} bytes reached the disk", str(tmp))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)


# --------------------------------------------------------------------------- reads


def read_bounded(fd: int, max_bytes: int, size_hint: int = 0) -> bytes:
    """What is left to read from ``fd``, but never more than ``max_bytes + 1`` bytes.

    A result longer than ``max_bytes`` means the file is larger than the
    bound (the caller refuses or skips it); nothing beyond that one byte is
    read. ``size_hint``: the size ``fstat`` gave; the first read asks for one
    byte more, so a file of that size is read in one call, and one that grew
    meanwhile is read on up to the bound. Raises ``OSError`` from the read.
    """
    chunks: list[bytes] = []
    total = 0
    want = min(size_hint, max_bytes) + 1
    while total <= max_bytes:
        chunk = os.read(fd, want)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total == size_hint and len(chunk) < want:
            break  # the whole file, as fstat sized it
        want = min(max_bytes + 1 - total, BLOCK_SIZE)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# --------------------------------------------------------------------------- SHA-256 reads


def open_regular(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """Open a regular file for reading without following a symlink; ``(fd, fstat)``.

    Raises ``OSError(ELOOP)`` for a symlink and ``OSError(EINVAL)`` for
    anything that is not a regular file (a FIFO never blocks the open).
    ``dir_fd``: ``path`` is relative to that open folder.
    """
    fd = os.open(path, _OPEN_READ, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def open_regular_beneath(base: str | os.PathLike[str], rel: str) -> tuple[int, os.stat_result]:
    """:func:`open_regular` of ``base/rel``, each folder of ``rel`` opened without following a symlink.

    A folder inside ``base`` swapped for a symlink since it was listed (the
    file's own or one above it) raises ``OSError`` (``ELOOP`` or ``ENOTDIR``)
    instead of reaching a file outside ``base``.
    """
    parts = rel.split("/")
    at = os.open(base, _OPEN_FOLDER)
    try:
        for part in parts[:-1]:
            inner = os.open(part, _OPEN_FOLDER, dir_fd=at)
            os.close(at)
            at = inner
        return open_regular(parts[-1], dir_fd=at)
    finally:
        os.close(at)


class OpenFolders:
    """Folders under ``base``, opened part by part without following a symlink, kept a while.

    Files are then opened, created and renamed relative to their open folder,
    so the kernel does not walk the whole path for each file, and a folder of
    ``base`` swapped for a symlink after it was listed (itself or one above
    it) is never entered. The last :data:`DIR_FDS` folders stay open (files
    come folder by folder). One owner (thread) at a time; :meth:`close` at the end.
    """

    def __init__(self, base: str):
        self.base = base
        self._open: dict[str, int] = {}

    def path(self, folder: str, name: str = "") -> str:
        """The absolute path of ``folder`` (relative, '' = ``base``), or of ``name`` in it."""
        path = f"{self.base}/{folder}" if folder else self.base
        return f"{path}/{name}" if name else path

    def fd(self, folder: str) -> int:
        """The open folder ``folder``; raises ``OSError`` as ``os.open`` does (``ELOOP``/``ENOTDIR`` for a symlink)."""
        fd = self._open.get(folder)
        if fd is None:
            if folder:
                parent, _, name = folder.rpartition("/")
                fd = os.open(name, _OPEN_FOLDER, dir_fd=self.fd(parent))
            else:
                fd = os.open(self.base, _OPEN_FOLDER)
            if len(self._open) >= DIR_FDS:
                os.close(self._open.pop(next(iter(self._open))))
            self._open[folder] = fd
        return fd

    def open_regular(self, rel: str) -> tuple[int, os.stat_result]:
        """:func:`open_regular` of the file ``rel`` (relative to ``base``) in its open folder."""
        folder, _, name = rel.rpartition("/")
        return open_regular(name, dir_fd=self.fd(folder))

    def close(self) -> None:
        for fd in self._open.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._open.clear()


class OpenFoldersByThread:
    """One :class:`OpenFolders` of ``base`` for each thread that asks (:meth:`mine`), all closed by :meth:`close`."""

    def __init__(self, base: str):
        self.base = base
        self._lock = threading.Lock()
        self._by_thread: dict[int, OpenFolders] = {}

    def mine(self) -> OpenFolders:
        key = threading.get_ident()
        with self._lock:
            folders = self._by_thread.get(key)
            if folders is None:
                folders = self._by_thread[key] = OpenFolders(self.base)
        return folders

    def close(self) -> None:
        with self._lock:
            for folders in self._by_thread.values():
                folders.close()
            self._by_thread.clear()


def advise_sequential(fd: int, size: int) -> None:
    """Tell the kernel a file of ``size`` bytes is read from start to end (best effort)."""
    if size > BLOCK_SIZE and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass


def hash_fd(
    fd: int,
    view: memoryview,
    progress: Callable[[int], None] | None = None,
    *,
    drop_behind: bool = False,
    limit: int | None = None,
    each: Callable[[memoryview], None] | None = None,
) -> str:
    """SHA-256 hex of everything left to read from ``fd``, read into ``view``.

    ``progress(n)`` is called after each block with its byte count.
    ``each(block)`` is given each block read (a slice of ``view``, valid
    until the next read) after it is hashed: a copy that hashes what it
    writes reads the file once. ``limit``: read at most this many bytes (a
    file appended to forever still ends); a file that ends sooner is no
    error, the caller compares the count it was given. ``drop_behind``:
    every ``DROP_BEHIND`` bytes, drop the (clean) pages already hashed from
    this machine's page cache; offsets are counted from 0, so pass it for a
    descriptor read from its start. Raises ``OSError`` from the read, and
    whatever ``each`` or ``progress`` raise.
    """
    digest = hashlib.sha256()
    readv = os.readv
    block_size = len(view)
    advise = drop_behind and hasattr(os, "posix_fadvise")
    total = dropped = 0
    while limit is None or total < limit:
        left = block_size if limit is None else limit - total
        count = readv(fd, [view if left >= block_size else view[:left]])
        if not count:
            break
        block = view[:count]
        digest.update(block)
        if each is not None:
            each(block)
        if progress is not None:
            progress(count)
        total += count
        if advise and total - dropped >= DROP_BEHIND:
            try:
                os.posix_fadvise(fd, dropped, total - dropped, os.POSIX_FADV_DONTNEED)
            except OSError:
                advise = False
            dropped = total
    return digest.hexdigest()


def hash_file(
    path: str | os.PathLike[str],
    *,
    block_size: int = BLOCK_SIZE,
    progress: Callable[[int], None] | None = None,
) -> str:
    """Lowercase SHA-256 hex of one regular file, streamed in ``block_size`` blocks.

    Never follows a symlink: a symlink raises ``OSError`` (``ELOOP``), as does
    anything that is not a regular file (``EINVAL``). Missing files raise
    ``FileNotFoundError``. ``progress(n)`` is called after each block.
    """
    view = memoryview(bytearray(block_size))
    fd, info = open_regular(path)
    try:
        advise_sequential(fd, info.st_size)
        return hash_fd(fd, view, progress)
    finally:
        os.close(fd)


def drop_page_cache_fd(fd: int, *, sync: bool = True) -> None:
    """Make the next read of ``fd`` come from the storage, not this machine's memory.

    fsync first (dirty pages cannot be dropped, only clean ones; a file
    system that cannot fsync is let be), then
    ``posix_fadvise(POSIX_FADV_DONTNEED)``, best effort. ``sync=False``
    when the file system was already synced as a whole.
    """
    if sync:
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EROFS, errno.ENOTSUP, errno.EBADF):
                raise
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def drop_page_cache(path: str | os.PathLike[str], *, sync: bool = True) -> None:
    """:func:`drop_page_cache_fd` for a path (a regular file; a symlink is never followed).

    Raises ``OSError`` for a missing file, a symlink or anything not a regular file.
    """
    fd, _info = open_regular(path)
    try:
        drop_page_cache_fd(fd, sync=sync)
    finally:
        os.close(fd)


def prefetch_from_storage(fd: int, *, sync: bool = True) -> None:
    """Drop ``fd``'s cached pages and start reading them again from the storage, without waiting.

    :func:`drop_page_cache_fd` (``sync`` as there), then
    ``POSIX_FADV_WILLNEED``: the read the kernel starts fills the cache from
    the storage, not from what this machine wrote. A reader that starts the
    next files' reads this way while it hashes the current one waits on one
    storage round trip at a time instead of one per file. Finish with
    :func:`hash_from_storage` ``(prefetched=True)``; best effort like
    :func:`drop_page_cache_fd`.
    """
    drop_page_cache_fd(fd, sync=sync)
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass


def hash_from_storage(
    fd: int,
    view: memoryview,
    *,
    sync: bool = True,
    prefetched: bool = False,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> str:
    """SHA-256 hex of ``fd`` as the storage holds it, not as this machine's memory does.

    :func:`drop_page_cache_fd` (``sync`` as there), then read to the end
    from offset 0 (a fresh descriptor), dropping the pages already hashed
    every ``DROP_BEHIND`` bytes (they are clean: nothing was written since
    the drop). ``prefetched``: :func:`prefetch_from_storage` already dropped
    the cache and started the read (dropping again would throw that read
    away). ``limit``: read at most this many bytes (the size ``fstat`` gave
    at open, for a caller that keeps it beside the hash). ``progress(n)``: after each block read.
    """
    if not prefetched:
        drop_page_cache_fd(fd, sync=sync)
    return hash_fd(fd, view, progress, drop_behind=True, limit=limit)


MOUNTINFO = "/proc/self/mountinfo"


class MountEntry(NamedTuple):
    """One line of ``mountinfo``: the mount's id, its mount point (unescaped), and its root, file system type
    and source as the kernel writes them (octal escapes kept: none holds a space)."""

    mount_id: int
    point: bytes
    root: bytes
    fstype: bytes
    source: bytes


def parse_mountinfo_lines(text: bytes) -> list[MountEntry]:
    """Every well-formed line of a ``mountinfo`` text, in order (a mount listed later is mounted on top)."""
    entries = []
    for line in text.splitlines():
        left, _sep, right = line.partition(b" - ")
        fields, after = left.split(b" "), right.split(b" ")
        if len(fields) < 5 or len(after) < 2 or not fields[4] or not fields[0].isdigit():
            continue
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8) & 0xFF]), fields[4])
        entries.append(MountEntry(int(fields[0]), point, fields[3], after[0], after[1]))
    return entries


def mountinfo(path: str = MOUNTINFO) -> list[MountEntry] | None:
    """This process's mount table (:func:`parse_mountinfo_lines`); None when it cannot be read (not Linux)."""
    try:
        with open(path, "rb") as handle:
            return parse_mountinfo_lines(handle.read())
    except OSError:
        return None


def _mount_of(path: str | os.PathLike[str]) -> tuple[str, str, str] | None:
    """``(filesystem type, source, root)`` of the mount holding ``path``, as /proc/self/mountinfo writes them.

    The mount is the one at the longest mount point above ``path``'s real
    path (the last listed of equal ones: the one mounted on top). ``source``
    and ``root`` (the folder of the source file system mounted there: ``/``,
    or a bind mount's or btrfs subvolume's folder) keep the kernel's octal
    escapes, so neither holds a space. None when the table cannot be read.
    Blocking I/O: the real path is looked up on the file systems it crosses.
    """
    entries = mountinfo()
    if entries is None:
        return None
    target = os.fsencode(real_path_by_links(path))
    best, found = b"", None
    for entry in entries:
        point = entry.point
        inside = target == point or target.startswith(point.rstrip(b"/") + b"/")
        if inside and len(point) >= len(best):
            best, found = point, (entry.fstype, entry.source, entry.root)
    if found is None:
        return None
    return tuple(os.fsdecode(f) for f in found)  # type: ignore[return-value]


def real_path_by_links(path: str | os.PathLike[str]) -> str:
    """``os.path.realpath(path)`` found with ``readlink`` alone, never a ``stat``.

    ``realpath`` lstats each component, and an lstat of a mount point asks the
    file system mounted there (a hung FUSE daemon, a silent hard-mounted share:
    blocked for ever); a readlink of a folder or a mount point is refused
    (EINVAL) without asking it. A component that is not there ends the walk
    (the rest is joined as written), as ``realpath`` does.
    """
    pending = os.path.abspath(os.fspath(path)).split(os.sep)[1:]
    resolved = os.sep
    hops = 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            resolved = os.path.dirname(resolved)
            continue
        here = os.path.join(resolved, name)
        try:
            link = os.readlink(here)
        except OSError:
            resolved = here  # not a link (EINVAL), or not there: taken as written
            continue
        hops += 1
        if hops > 40:  # a loop of links: as realpath, the path as far as it went
            return os.path.join(here, *pending)
        if os.path.isabs(link):
            resolved = os.sep
        pending[:0] = link.split(os.sep)
    return resolved


def filesystem_type(path: str | os.PathLike[str]) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mountinfo, the longest mount point
    above its real path), e.g. ``ext4``, ``fuseblk``, ``fuse.sshfs``; '' when the table cannot be read."""
    found = _mount_of(path)
    return "" if found is None else found[0]


def mounted_filesystem(path: str | os.PathLike[str]) -> str:
    """What is mounted where ``path`` is: ``<type> <source> <root>`` of the mount holding it; '' when unknown.

    Names the file system, not the mount point: another server (or disk)
    mounted at the same place reads differently, so does another folder of
    one file system bind-mounted there. A block device's source is the file
    system's id as the kernel gives it (``statvfs``'s ``f_fsid``: ext4 and
    btrfs derive it from the file system's UUID), so a disk the kernel
    renumbers (``/dev/sdb1`` one boot, ``/dev/sdc1`` the next) reads the same;
    where the id is 0 or unreadable, the device name (a renumbered disk then
    costs a re-verification: safe). Not udev's ``/dev/disk/by-uuid``: the
    service runs with ``PrivateDevices=yes`` and would name the file system
    otherwise than the CLI beside it. Network and FUSE sources are as mounted
    (``nas1:/export``, ``//nas1/lab``, ``lab@nas1:/srv``). Blocking I/O (see
    :func:`_mount_of`).
    """
    found = _mount_of(path)
    if found is None:
        return ""
    fstype, source, root = found
    if source.startswith("/dev/") and not fstype.startswith("fuse"):
        # Not through FUSE (fuseblk: exfat-fuse, ntfs-3g): its statfs asks the daemon, which may not answer,
        # and gives no id.
        source = _fsid(path) or source
    return f"{fstype} {source} {root}"


def _fsid(path: str | os.PathLike[str]) -> str | None:
    """``fsid=<hex>`` of the file system holding ``path`` (``statvfs`` of it or its nearest folder that
    exists); None when 0 or unreadable."""
    where = real_path_by_links(path)
    while True:
        try:
            fsid = os.statvfs(where).f_fsid
            break
        except FileNotFoundError:
            if os.path.dirname(where) == where:
                return None
            where = os.path.dirname(where)
        except OSError:
            return None
    return f"fsid={fsid:x}" if fsid else None
