"""The ``mount`` transport: copy a run to a mounted share (SMB, NFS or a local disk).

No external tool. Guarantees, on top of the :class:`Transport` contract:

* **Mount guard.** Nothing is listed, written, hashed or deleted unless
  ``<mount_path>/<mount_marker>`` exists. An unmounted share leaves a bare
  local folder at the mount point; writing into it would "verify" a copy on
  the same disk. A missing marker raises ``TransportError(NETWORK)``
  ("remote unreachable: ... is not mounted").
* **No foreign data overwritten.** Before writing anything the remote run
  folder is listed; a regular file there that the local run does not have
  (outside ``.exlab-wizard/``, and other than a leftover temp file of ours),
  or an entry whose type differs from the local one (a folder where the run
  has a file, a symlink where the run has a file or folder), raises
  ``REMOTE_CONFLICT`` with nothing written. Remote ``.exlab-wizard/`` files
  the local run no longer has are our own metadata: left alone, no conflict.
* **Atomic, durable files.** Each file is written to
  ``.<name>.exlab-tmp-<hex>`` in its target folder while the source is
  hashed in the same read pass, gets the source's mtime (ns) and permission
  bits, is made durable, then renamed over the final name. Directories
  touched are fsynced once at the end. Files of 1 MiB and more go to a
  local-disk share (ext2/3/4, xfs) with ``O_DIRECT``, bypassing this
  machine's page cache (the unaligned tail, and any share refusing direct
  I/O, fall back to ordinary writes); elsewhere, write-back of every
  ``WRITE_BEHIND`` bytes written is started at once, so the fsync waits for
  little. Durability: files of 1 MiB and more,
  and every file on a share whose ``syncfs`` is not known to reach stable
  storage (SMB/CIFS, FUSE, unknown), are fsynced one by one in the copy
  threads; small files on a local disk or NFS are made durable together with
  one ``syncfs`` per batch before their renames (a per-file fsync costs a
  journal commit each: 20,000 of them take seconds). Those small files are
  copied in batches by one thread, relative to their open folders, while a
  helper thread runs the ``syncfs`` of the previous batch; that thread then
  renames the previous batch and reads it back (the next files' reads started
  ahead); large files go side by side on ``threads`` threads. Everything is durable before ``push`` returns. Leftover temp files of a crashed push are removed
  by the next one.
* **Resume.** A remote file is taken as already sent when it is a regular
  file with the local size and an equal mtime, unless its path is in
  ``rewrite``. mtimes are equal when within 1 us (shares keeping ns, 100 ns
  or us), or, when the remote mtime is a whole second, within 2 s (shares
  keeping seconds, FAT's 2 s). A wrongly skipped file cannot pass: the
  remote manifest is compared with the local hashes afterwards, and a
  mismatch re-sends it through ``rewrite``. Skipped files are still hashed
  locally so ``local_hashes`` covers the whole run.
* **A source changing while copied** (size or mtime differ after the copy,
  or fewer bytes than its size could be read; at most the size seen at open
  is read, so a file appended to forever still ends) is copied again, up to 3 attempts in all;
  then ``TransportError(UNKNOWN)`` (retried later with backoff: the run is
  evidently still being written). A source file that disappears (or is
  unlinked while copied) raises ``LOCAL_FILE_VANISHED``.
* **Errors**: on the share, ENOSPC/EDQUOT/EFBIG/EROFS/EACCES/EPERM and names
  the share refuses (EINVAL/EILSEQ/ENAMETOOLONG; ENOENT creating or renaming
  to a name holding ``"*:<>?\\|``, a control character or a trailing dot or
  space, in a folder that is there, the share mounted: exFAT's and SMB's
  answer to ``a:b.tif``) are
  ``REMOTE_WRITE_REFUSED``; ENOENT (share or folder gone), ENOTCONN, EIO,
  ESTALE, EHOSTDOWN and other connection errors are ``NETWORK``; anything
  else ``UNKNOWN`` (the tables are :mod:`exlab_wizard.sync.failures`'s).
* **Bandwidth**: a :class:`~exlab_wizard.sync.throttle.TokenBucket` shared
  by the copy threads, starting at ``bwlimit_kibps`` and re-reading the
  equipment's schedule at ``now()`` every half second.
* **Remote manifest** reads past this machine's page cache: every file's
  cached pages are dropped (fsync + ``POSIX_FADV_DONTNEED``) before it is
  hashed, so the check reads what the share stores (and the pages it reads
  are dropped again as it goes: see ``verifier.hash_from_storage``). To overlap that read
  with the copy, the push reads each file back the same way as soon as it
  is durable and renamed (while the other threads go on copying); when the
  bytes read back have the digest computed while copying, it adds a 64-bit
  tag of that digest and the file's inode, size, mtime and ctime to its
  folder's count and sum (a few numbers a folder, nothing kept a file). The
  first remote manifest after that push, if within ``READ_BACK_TTL_S``,
  lists the share and gives a folder's files the local digests when the
  folder's count and sum of tags (from each file's lstat now, any write or
  utime changing the ctime) agree and every local file of it is there; it
  reads every file of any other folder from storage (a file read back
  differently included), and the files the local run does not have. Later
  manifests (the audits) read every file again.

Symlinks in the run are never followed nor copied. Progress callbacks get
byte deltas from the copy threads, one call at a time (for small files, one
call per MiB or so, not per file); a callback with ``set_total`` is told the
bytes to send once the run is listed (``reports_total``).

One module, though long: it is one transport, and its parts (the copy
threads, the batched durability, the read-back, the remote manifest that
takes the read-back's hashes) share the push's state and its error mapping.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import hashlib
import itertools
import mmap
import os
import re
import secrets
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple, TypeVar

from exlab_wizard.config.models import EquipmentConfig, MountTransportConfig
from exlab_wizard.fileio import (
    BLOCK_SIZE,
    METADATA_DIR,
    OpenFolders,
    OpenFoldersByThread,
    drop_page_cache_fd,
    filesystem_type,
    fsync_dir,
    fsync_dir_fd,
    hash_fd,
    hash_from_storage,
    is_data_path,
    is_reaping_name,
    open_regular,
    open_regular_beneath,
    rename_noreplace,
)
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.failures import (
    GONE_ERRNOS,
    UNREADABLE_ERRNOS,
    FailureKind,
    local_errno_kind,
    remote_errno_kind,
)
from exlab_wizard.sync.policy.bandwidth import limit_kibps
from exlab_wizard.sync.spill import SpillMap, items_by_bytes
from exlab_wizard.sync.throttle import TokenBucket
from exlab_wizard.sync.transports.base import (
    PREVIOUS_DIR,
    Clock,
    NasNotAnswering,
    PreviousStampTaken,
    ProgressCallback,
    RemoteFile,
    RemoteManifest,
    Transport,
    TransportCapabilities,
    TransportError,
    TransportErrorKind,
    TransportResult,
    check_previous_stamp,
    check_relpath,
    clamped_times,
    local_now,
    previous_path,
    previous_stamps,
    remote_relpath,
    report_total,
)
from exlab_wizard.sync.transports.conflict import (
    CLAIMS_DIR,
    DIR,
    FILE,
    NAS_MANIFEST,
    OTHER,
    claim_body,
    claim_markers,
    claim_path,
    conflict_error,
    fold_twins,
    foreign_copy_error,
    local_manifest_digest,
    ownership_error,
    sort_remote,
    twins_refused,
)
from exlab_wizard.sync.transports.share_lanes import lane as share_lane
from exlab_wizard.sync.verifier import run_parallel, scan_run, serial_progress, side_by_side

__all__ = ["MountTransport", "is_temp_name", "same_mtime"]

#: Files at least this big are fsynced on their own, overlapping the write-back
#: with the copy of the next file.
LARGE_FILE = 1 << 20
T = TypeVar("T")

#: A batch of small files shares one syncfs before its renames.
BATCH_FILES = 2048
BATCH_BYTES = 64 << 20
#: Files made durable on their own go to the copy threads in rounds of at most this many
#: bytes (or 4,096 files); a round ends when its last file is read back.
ROUND_BYTES = 512 << 20
ROUND_FILES = 4096
#: The read-back of a batch keeps this many files' reads from storage in flight (one thread
#: reads back: 8 took 3.3 s for 20,000 x 4 KiB, 32 2.6 s, 128 2.2 s; at most a batch's bytes).
READ_AHEAD = 128
#: Progress is reported at most once per this many bytes per copy thread (plus a
#: last call for the rest), not once per small file.
PROGRESS_STEP = 1 << 20
#: How long the share may give no answer (no block written or read, no file done, no entry listed)
#: before the work on it is given up: ``NETWORK``, "<mount_path> has not answered for N s". Read at
#: each check (tests lower it). The work's thread, blocked in the share, is left to return on its own
#: (aborted); nothing more is started on the equipment's share until it does.
STALL_TIMEOUT_S = 120.0
#: equipment id and mount path -> (what was started, when (monotonic), set once it returned): work
#: given up while still blocked in the share. Module-wide: a transport built anew (a config change)
#: still sees it.
_STUCK: dict[tuple[str, str], tuple[str, float, threading.Event]] = {}
_STUCK_LOCK = threading.Lock()
COPY_ATTEMPTS = 3
#: While a large file is copied, write-back of each such stretch already
#: written is started at once (so the fsync at the end waits for little).
WRITE_BEHIND = 8 << 20
#: Hashes read back from the share during a push serve the remote manifest
#: that follows within this many seconds, once; later manifests (audits)
#: read everything again.
READ_BACK_TTL_S = 120.0

_TEMP_MARK = ".exlab-tmp-"
_TEMP_RE = re.compile(r"^\..+\.exlab-tmp-[0-9a-f]{6,32}$", re.DOTALL)
_NAME_KEEP = 200  # bytes of the original name kept in a temp name (NAME_MAX is 255)

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
#: Large files are written with O_DIRECT on these (local disk) filesystems: the
#: bytes go from our buffer to the disk without passing through, and filling,
#: this machine's page cache. An acquisition PC keeps its memory for the
#: instrument, and there is no write-back of a GiB of dirty pages for the fsync
#: to wait on (1 GiB run on a 2-core VM: 1.32 s -> 0.95 s, enqueue to VERIFIED).
#: Network shares keep buffered writes: their direct writes are round trips.
_DIRECT_WRITE_FS = frozenset({"ext2", "ext3", "ext4", "xfs"})
#: O_DIRECT writes are whole multiples of this, from a buffer aligned to it.
_DIRECT_ALIGN = 4096
_DIRECTORY = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
_FADVISE = getattr(os, "posix_fadvise", None)
#: The mount marker is opened (followed, as ``exists`` would), never read.
_MARKER = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
#: An open that fails with one of these: the file is not (or no longer) a regular file there.
_NOT_THERE = GONE_ERRNOS | {errno.ENXIO}
#: A read of a file that opened fine failing with one of these, while the share still answers:
#: the NAS cannot return the file (btrfs, ZFS or XFS caught a bad block or checksum), not a share gone.
_BAD_BLOCK = frozenset({errno.EIO, errno.EBADMSG, getattr(errno, "EUCLEAN", errno.EIO)})

#: Filesystems whose syncfs(2) makes every written file durable (for NFS the
#: write-back commits to the server). Anything else gets per-file fsync.
_SYNCFS_DURABLE = frozenset(
    {
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "f2fs",
        "jfs",
        "zfs",
        "bcachefs",
        "tmpfs",
        "ramfs",
        "nfs",
        "nfs4",
        "overlay",
    }
)
#: Filesystems that keep the times set on an open file (``futimens`` before close). Elsewhere the
#: push looks at a file's mtime once it is renamed and sets it again by name when it moved:
#: smbnetfs (libsmbclient) sets times by name on a handle of its own, and Samba then stamps the
#: write time when the writing handle closes, so every file would look changed to the next push.
_KEEPS_TIMES = _SYNCFS_DURABLE | {"vfat", "msdos", "exfat", "ntfs", "ntfs3", "fuseblk", "fuse.sshfs"}


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    except OSError:
        return None


_SYNCFS = _load_syncfs()

#: statx(2): AT_FDCWD (a path from the working folder), AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH (the open file
#: itself), AT_STATX_FORCE_SYNC (ask the server, not the attribute cache), and the fields wanted (type, mode,
#: size, mtime).
_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EMPTY_PATH = 0x1000
_AT_STATX_FORCE_SYNC = 0x2000
_STATX_WANTED = 0x1 | 0x2 | 0x40 | 0x200  # STATX_TYPE | STATX_MODE | STATX_MTIME | STATX_SIZE


def _load_statx() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "statx", None)
    except OSError:
        return None


_STATX = _load_statx()


def _synced_stat(dir_fd: int, path: str = "", flags: int = 0) -> tuple[int, int, int]:
    """``(mode, size, mtime ns)`` of ``path`` in the folder open as ``dir_fd`` (``_AT_FDCWD``: the working
    folder), or of the open file ``dir_fd`` itself when ``path`` is empty, as its filesystem's server has it now.

    ``statx`` with ``AT_STATX_FORCE_SYNC`` (and ``flags``: ``_AT_SYMLINK_NOFOLLOW``):
    FUSE, NFS and SMB ask the server instead of answering from the kernel's
    attribute cache (an ``fstat`` right after the open may still be the
    cached attributes of a second ago). By a path it is no last look on its
    own: sshfs answers that from its own cache (up to 20 s) unless an open of
    the name just failed (which drops the name from it) or succeeded (which
    asks the server). Where ``statx`` is missing or does not fill these
    fields, ``os.stat``/``fstat``.
    """
    if not path:
        flags |= _AT_EMPTY_PATH
    if _STATX is not None:
        buf = ctypes.create_string_buffer(256)  # struct statx
        if _STATX(dir_fd, os.fsencode(path), flags | _AT_STATX_FORCE_SYNC, _STATX_WANTED, buf) == 0:
            raw, order = buf.raw, sys.byteorder
            if int.from_bytes(raw[0:4], order) & _STATX_WANTED == _STATX_WANTED:
                mode, size = int.from_bytes(raw[28:30], order), int.from_bytes(raw[40:48], order)
                seconds = int.from_bytes(raw[112:120], order, signed=True)  # stx_mtime.tv_sec, then tv_nsec
                return mode, size, seconds * 1_000_000_000 + int.from_bytes(raw[120:124], order)
        elif ctypes.get_errno() not in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path or None)
    if path:
        at = None if dir_fd == _AT_FDCWD else dir_fd
        info = os.stat(path, dir_fd=at, follow_symlinks=not flags & _AT_SYMLINK_NOFOLLOW)
    else:
        info = os.fstat(dir_fd)
    return info.st_mode, info.st_size, info.st_mtime_ns


#: Characters some share (exFAT, FAT, SMB to NTFS) cannot store in a name: control characters and these.
_REFUSED_CHARS = frozenset('"*:<>?\\|' + "".join(map(chr, range(32))))


def _name_some_share_refuses(name: str) -> bool:
    """Does ``name`` hold a character some share cannot store, or end in a dot or a space?"""
    return name.endswith((".", " ")) or not _REFUSED_CHARS.isdisjoint(name)


def is_temp_name(name: str) -> bool:
    """Is ``name`` (a file name, not a path) one of this transport's temp files?"""
    return bool(_TEMP_RE.match(name))


def _own_temp(rel: str, kind: str) -> str | None:
    return rel if kind == FILE and is_temp_name(rel.rpartition("/")[2]) else None


def same_mtime(local_ns: int, remote_ns: int) -> bool:
    """The resume rule: mtimes equal to the precision the share evidently keeps.

    A local time outside the share's range is equal to the end the share
    clamps it to (:func:`~exlab_wizard.sync.transports.base.clamped_times`):
    sent again, the file would be clamped again, for ever.
    """
    return any(_same_to_precision(sent, remote_ns) for sent in (local_ns, *clamped_times(local_ns)))


def _same_to_precision(local_ns: int, remote_ns: int) -> bool:
    diff = abs(local_ns - remote_ns)
    if diff <= 1_000:
        return True
    return remote_ns % 1_000_000_000 == 0 and diff < 2_000_000_000


#: Temp names end in this process's random salt and a counter: unique without asking
#: the kernel for random bytes once per file (O_EXCL refuses a clash all the same).
_TEMP_SALT = secrets.token_hex(4)
_TEMP_COUNTER = itertools.count()


def _temp_name(name: str) -> str:
    whole = os.fsencode(name)
    raw = whole[:_NAME_KEEP]
    try:
        whole.decode("utf-8")
    except UnicodeDecodeError:
        pass  # not UTF-8 at all: the share took the name's own bytes, it takes their prefix
    else:
        raw = raw.decode("utf-8", "ignore").encode()  # never half a character: exFAT and SMB refuse one
    suffix = f"{_TEMP_SALT}{next(_TEMP_COUNTER) & 0xFFFFFFFF:08x}"
    return os.fsdecode(b"." + raw + _TEMP_MARK.encode() + suffix.encode())


def _buffered(fd: int) -> None:
    """Turn ``O_DIRECT`` off on ``fd``."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


def _syncfs(path: str) -> None:
    fd = os.open(path, _DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:  # type: ignore[misc]
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)


class _Cancelled(Exception):
    """The push was cancelled (task cancelled, or another copy thread failed)."""


class _Source(NamedTuple):
    """One file of the push: a small tuple (200,000 of them may be built), the rest derived."""

    rel: str
    size: int
    send: bool

    @property
    def folder(self) -> str:
        """Relative folder of the file ('' = run root)."""
        return self.rel.rpartition("/")[0]

    @property
    def name(self) -> str:
        return self.rel.rpartition("/")[2]


@dataclass
class _Push:
    """State of one push, shared by its copy threads."""

    run: Path
    remote: str
    bucket: TokenBucket
    progress: ProgressCallback | None
    abort: threading.Event
    per_file_sync: bool
    total_sink: ProgressCallback | None = None  # the caller's own callback, told the total (report_total)
    direct_io: bool = False
    hashes: SpillMap[str] = field(default_factory=SpillMap)
    #: folder -> [files, sum of their :func:`_read_back_tag`] of the files read back from the
    #: share with the digest of ``hashes`` (a few numbers a folder, none a file)
    read_back: dict[str, list[int]] = field(default_factory=dict)
    temps: set[str] = field(default_factory=set)
    touched: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    files_sent: int = 0
    bytes_sent: int = 0
    #: this process's umask (None: unknown, every temp file gets its mode with fchmod)
    umask: int | None = None
    #: the manifests the run may have left on the NAS (conflict.foreign_copy_error); None: no check
    own: Collection[str] | None = None
    #: a run verified before: every data file the push replaces is first moved under previous/<stamp>/
    keep_stamp: str | None = None
    #: no push of the job wrote to the NAS yet: a data file of the run's names there is another's
    fresh: bool = False
    #: called once the conflict checks passed, before the first write (Transport.push)
    claim: Callable[[], None] | None = None
    #: the job's id, named in .exlab-wizard/claims/ before the first write (None: no claim written)
    owner: str | None = None
    #: files sent that the push's listing showed on the NAS: renamed over their NAS copy on purpose
    #: (kept under previous/ first when verified); every other file is renamed only to a free name
    replacing: set[str] = field(default_factory=set)
    #: the share refuses ``RENAME_NOREPLACE``: a free name is looked up, then renamed to, under ``placing``
    noreplace_refused: bool = False
    placing: threading.Lock = field(default_factory=threading.Lock)
    #: the share may not keep the times set on an open file (:data:`_KEEPS_TIMES`)
    check_times: bool = False
    fstype: str = ""


#: read-back tags and their sums are 64-bit
_TAG_MASK = (1 << 64) - 1


def _stat_key(info: os.stat_result) -> bytes:
    """A file's (inode, size, mtime ns, ctime ns), exactly: the ns times may not fit 64 bits (past 2262)."""
    return b"%d:%d:%d:%d" % (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _read_back_tag(info: os.stat_result, digest: str) -> int:
    """A file's read-back tag: 64 bits of a keyed hash of its stat key and its SHA-256 (hex).

    ``hash()`` of bytes is SipHash, keyed at random per process. The push
    adds up, folder by folder, the tags of the files whose bytes read back
    from storage had the digest computed from the local file; the remote
    manifest adds up the tags of the folder's files as listed then with the
    local digests, and takes those digests for the whole folder only when
    both the count and the sum agree (see :meth:`MountTransport._list_remote`).
    """
    return _tag(_stat_key(info), digest)


def _tag(stat_key: bytes, digest: str) -> int:
    """:func:`_read_back_tag` of a file whose :func:`_stat_key` is ``stat_key``."""
    return hash(stat_key + bytes.fromhex(digest)) & _TAG_MASK


def _add_tag(sums: dict[str, list[int]], rel: str, tag: int) -> None:
    """Count ``rel``'s tag into its folder's ``[files, sum of tags]``."""
    folder = rel.rpartition("/")[0]
    acc = sums.get(folder)
    if acc is None:
        sums[folder] = [1, tag]
    else:
        acc[0] += 1
        acc[1] = (acc[1] + tag) & _TAG_MASK


class MountTransport(Transport):
    """Copies runs to ``<mount_path>/<run path relative to local_root/id>`` on a mounted share.

    ``log``: equipment log for push and manifest events. ``now``: the aware
    local time, read to follow the bandwidth schedule. ``threads``: copy and
    hash threads for files fsynced one by one and for the remote manifest
    (default 6: much of the time is spent waiting on fsync and on reads from
    the share, so more threads than cores keep both busy); small files in
    batches go on one thread of their own.
    """

    capabilities = TransportCapabilities(hashes_while_sending=True, metadata_push=True, reports_total=True)

    def __init__(
        self,
        equipment: EquipmentConfig,
        *,
        log: EquipmentLog | None = None,
        now: Clock = local_now,
        threads: int | None = None,
    ):
        super().__init__(equipment)
        if not isinstance(equipment.transport, MountTransportConfig):
            raise ValueError(f"equipment {equipment.id}: transport type is {equipment.transport.type!r}, not 'mount'")
        self.config: MountTransportConfig = equipment.transport
        self.mount_path = os.fspath(self.config.mount_path)
        self.marker = os.path.join(self.mount_path, self.config.mount_marker)
        self.log = log
        self.now = now
        self.threads = threads or 6
        #: remote run folder -> (monotonic time the push ended, its read-back records, its local hashes)
        self._read_backs: dict[str, tuple[float, dict[str, list[int]], dict[str, str]]] = {}
        self._read_backs_lock = threading.Lock()
        #: filesystem types seen refusing ``RENAME_NOREPLACE`` (FUSE 2: smbnetfs, exfat-fuse)
        self._noreplace_refused: set[str] = set()
        #: monotonic time the share last answered (a block, a file, an entry): the stall watchdog reads it
        self._answered_at = 0.0

    # ------------------------------------------------------------------ stall watchdog

    def _answered(self, _count: int = 0) -> None:
        """The share answered (a block written or read, a file done, an entry listed): progress."""
        self._answered_at = time.monotonic()

    async def _watched(
        self, what: str, abort: threading.Event | None, fn: Callable[..., T], *args, wait: bool = True, **kwargs
    ) -> T:
        """``fn(*args, **kwargs)`` on a thread of the share's lane, given up after :data:`STALL_TIMEOUT_S` without
        progress.

        Given up: ``abort`` set, :class:`NasNotAnswering` raised, the thread
        (blocked in the share) left to end on its own, its late result thrown
        away. Until it ends nothing more is started on this equipment's share,
        never two pushes into one folder: a call waits for it (a job's step,
        whose failure costs an attempt), given up in turn after as long; with
        ``wait=False`` (:meth:`reachable`, the probe) it raises at once.
        A daemon thread of the share's lane (:mod:`.share_lanes`), not the
        loop's executor: one blocked for ever holds no pool slot and no exit,
        and ``serve`` names it when it stops without it.
        """
        key = (self.equipment.id, self.mount_path)
        with _STUCK_LOCK:
            stuck = _STUCK.get(key)
        if stuck is not None:
            # Work given up earlier is still blocked in the share: wait for it as for any answer.
            what_before, since, gone = stuck
            waited = time.monotonic()
            while not gone.is_set():
                if not wait or time.monotonic() - waited >= STALL_TIMEOUT_S:
                    raise NasNotAnswering(
                        f"{self.mount_path} has not answered for {time.monotonic() - since:.0f} s: the {what_before} "
                        f"started then has not returned; nothing more is started on it until it does"
                    )
                await asyncio.sleep(min(0.2, STALL_TIMEOUT_S / 4))
            with _STUCK_LOCK:
                if _STUCK.get(key) is stuck:
                    del _STUCK[key]
        returned = threading.Event()

        def body() -> T:
            try:
                return fn(*args, **kwargs)
            finally:
                returned.set()

        started = time.monotonic()
        # On the share's own lane (daemon threads, apart from the loop's pool; :func:`share_lanes.stuck`
        # names a call still blocked in it when serve stops without it). Cancelling stops the wait only.
        future = asyncio.ensure_future(share_lane(self.mount_path, "io" if wait else "probe").run(what, body))

        def give_up() -> None:
            if abort is not None:
                abort.set()  # the work stops at its next block once the share answers, and removes its temps
            future.cancel()  # its late result thrown away; the lane's thread ends when the share answers
            with _STUCK_LOCK:
                if not returned.is_set():
                    _STUCK[key] = (what, started, returned)

        try:
            while True:
                limit = STALL_TIMEOUT_S
                await asyncio.wait({future}, timeout=min(1.0, limit / 4))
                if future.done():
                    return future.result()
                if time.monotonic() - max(started, self._answered_at) >= limit:
                    break
        except asyncio.CancelledError:
            give_up()
            raise
        give_up()
        raise NasNotAnswering(f"{self.mount_path} has not answered for {limit:g} s")

    # ------------------------------------------------------------------ guard

    def _mounted(self) -> bool:
        """``mount_path`` is a folder and its marker opens: an open goes to the server (a stat may be
        answered from sshfs's or NFS's attribute cache).

        A marker the service may not open (an admin's 0600 file, NFS
        root_squash) is there: only a name that is there is refused for its
        permissions, and the server's stat right after says it still is.
        """
        try:
            if not os.path.isdir(self.mount_path):
                return False
            try:
                os.close(os.open(self.marker, _MARKER))
            except PermissionError:
                _synced_stat(_AT_FDCWD, self.marker)
            return True
        except OSError:
            return False

    def _require_mounted(self) -> None:
        if not self._mounted():
            raise TransportError(
                TransportErrorKind.NETWORK,
                f"remote unreachable: {self.mount_path} is not mounted (no {self.config.mount_marker})",
            )

    async def reachable(self, run_path: Path) -> bool:
        """True when ``mount_path`` is a folder holding the mount marker. Never raises."""
        try:
            return await self._watched("reachability check", None, self._mounted, wait=False)
        except NasNotAnswering:
            return False

    def _remote_error(self, exc: OSError, where: str) -> TransportError:
        code = exc.errno
        reason = f"{where}: {exc.strerror or exc}"
        if code == errno.ENOENT and not self._mounted():
            return TransportError(
                TransportErrorKind.NETWORK,
                f"remote unreachable: {self.mount_path} was unmounted (no {self.config.mount_marker}); {reason}",
            )
        kind = remote_errno_kind(code)
        if kind is FailureKind.REMOTE_WRITE_REFUSED:
            return TransportError(kind, f"remote refused the write: {reason}")
        if kind is FailureKind.NETWORK:
            return TransportError(kind, f"remote unreachable: {reason}")
        return TransportError(TransportErrorKind.UNKNOWN, f"remote error: {reason}")

    def _create_error(
        self, exc: OSError, path: str, *, dir_fd: int | None = None, source: str | None = None
    ) -> TransportError:
        """An error making ``path`` (a file, a folder, or a rename's target) on the share.

        ENOENT is how exFAT and SMB refuse a name they cannot store (``a:b.tif``,
        ``q"x``): when the name holds a character some share refuses, the share
        is mounted, the folder made in is there (the one open as ``dir_fd``)
        and a rename's ``source`` still in it, that is the name refused, not a
        share gone (which reads as unreachable, below). Only such a name: sshfs
        and SMB answer "is the folder there" from a cache, so a plain name in a
        folder removed on the server would read as refused, for good.
        """
        if (
            exc.errno == errno.ENOENT
            and _name_some_share_refuses(os.path.basename(path))
            and self._folder_holds(os.path.dirname(path), dir_fd, source)
            and self._mounted()
        ):
            return TransportError(
                TransportErrorKind.REMOTE_WRITE_REFUSED,
                f"remote refused the write: {path}: a name the share cannot store ({exc.strerror or exc})",
            )
        return self._remote_error(exc, path)

    @staticmethod
    def _folder_holds(folder: str, dir_fd: int | None, source: str | None) -> bool:
        """Is ``folder`` a folder on the share (the same as the one open as ``dir_fd``) holding ``source``?"""
        try:
            there = os.stat(folder)
            if not stat.S_ISDIR(there.st_mode) or (
                dir_fd is not None and not os.path.samestat(os.fstat(dir_fd), there)
            ):
                return False
            if source is not None:
                os.stat(source, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    @staticmethod
    def _local_error(exc: OSError, rel: str, run: Path) -> TransportError:
        if local_errno_kind(exc.errno) is FailureKind.LOCAL_FILE_VANISHED:
            return TransportError(TransportErrorKind.LOCAL_FILE_VANISHED, f"{rel}: vanished from {run} during the push")
        return TransportError(TransportErrorKind.UNKNOWN, f"cannot read {rel} in {run}: {exc.strerror or exc}")

    def _logged(self, level: str, run: Path, event: str, **fields: object) -> None:
        if self.log is not None:
            try:
                self.log.write(level, run, event, **fields)
            except OSError:
                pass  # a full or read-only log disk must not fail a transfer

    # ------------------------------------------------------------------ push

    async def push(
        self,
        run_path: Path,
        *,
        bwlimit_kibps: int | None,
        rewrite: frozenset[str] = frozenset(),
        progress: ProgressCallback | None = None,
        cleaned: frozenset[str] = frozenset(),
        own_manifests: Collection[str] | None = (),
        previous_stamp: str | None = None,
        fresh: bool = False,
        claim: Callable[[], None] | None = None,
        owner: str | None = None,
    ) -> TransportResult:
        """Copy the whole run (data and ``.exlab-wizard/``); see the module notes.

        Returns ``TransportResult(ok=True, files_sent, bytes_sent,
        local_hashes)`` where ``local_hashes`` covers every regular file of the
        run, sent or skipped. Raises :class:`TransportError` on any failure.
        """
        abort = threading.Event()
        try:
            return await self._watched(
                "push",
                abort,
                self._push,
                Path(run_path),
                bwlimit_kibps,
                frozenset(rewrite),
                progress,
                abort,
                frozenset(cleaned),
                own=own_manifests,
                keep_stamp=previous_stamp,
                fresh=fresh,
                claim=claim,
                owner=owner,
            )
        except asyncio.CancelledError:
            abort.set()  # the copy threads stop at their next block and remove their temp files
            raise

    async def push_metadata(self, run_path: Path, *, bwlimit_kibps: int | None = None) -> TransportResult:
        """Copy only ``<run>/.exlab-wizard/`` to the share, file by file as push() does.

        Only the remote ``.exlab-wizard/`` is listed and written; every file
        is sent (temp name, durable, renamed); the data files are not looked
        at. Same marker guard and errors as push(); ``local_hashes`` covers
        the ``.exlab-wizard/`` files.
        """
        abort = threading.Event()
        try:
            return await self._watched(
                "metadata push",
                abort,
                self._push,
                Path(run_path),
                bwlimit_kibps,
                frozenset(),
                None,
                abort,
                frozenset(),
                True,
            )
        except asyncio.CancelledError:
            abort.set()
            raise

    def _push(
        self,
        run: Path,
        bwlimit_kibps: int | None,
        rewrite: frozenset[str],
        progress: ProgressCallback | None,
        abort: threading.Event,
        cleaned: frozenset[str] = frozenset(),
        metadata_only: bool = False,
        *,
        own: Collection[str] | None = None,
        keep_stamp: str | None = None,
        fresh: bool = False,
        claim: Callable[[], None] | None = None,
        owner: str | None = None,
    ) -> TransportResult:
        started = time.monotonic()
        self._require_mounted()
        remote = self.remote_run_path(run)
        self._take_read_back(remote)  # what an earlier push read back is stale now

        started_limit = [bwlimit_kibps]

        def current_limit() -> int | None:
            if started_limit:
                return started_limit.pop()  # the limit in force when the push started
            return limit_kibps(self.config.bandwidth, self.now())

        def nap(seconds: float) -> None:
            if abort.wait(seconds):
                raise _Cancelled()

        job = _Push(
            run=run,
            remote=remote,
            bucket=TokenBucket(current_limit, sleep=nap),
            progress=serial_progress(progress),
            abort=abort,
            per_file_sync=True,
            total_sink=progress,
            own=None if metadata_only else own,
            keep_stamp=None if metadata_only else keep_stamp,
            fresh=fresh and not metadata_only,
            claim=None if metadata_only else claim,
            owner=None if metadata_only else owner,
        )
        try:
            self._push_steps(job, bwlimit_kibps, rewrite, cleaned, metadata_only)
            if abort.is_set():
                # The copy loops stop quietly between files once aborted: what ran was not the whole push.
                raise _Cancelled()
        except _Cancelled:
            error = TransportError(TransportErrorKind.UNKNOWN, "push cancelled")
            self._logged(
                "WARNING",
                run,
                "push_cancelled",
                transport="mount",
                files=job.files_sent,
                bytes=job.bytes_sent,
                **({"scope": METADATA_DIR} if metadata_only else {}),
            )
            raise error from None
        except TransportError as error:
            self._logged("ERROR", run, "push_failed", kind=error.kind.value, error=error.message)
            raise
        except OSError as exc:  # anything not classified where it happened
            error = TransportError(TransportErrorKind.UNKNOWN, f"push failed: {exc}")
            self._logged("ERROR", run, "push_failed", kind=error.kind.value, error=error.message)
            raise error from exc
        finally:
            for temp in list(job.temps):
                try:
                    os.unlink(temp)
                except OSError:
                    pass  # removed by the next push as a stale temp file
        self._logged(
            "INFO",
            run,
            "push_end",
            transport="mount",
            files=job.files_sent,
            bytes=job.bytes_sent,
            hashed=len(job.hashes),
            seconds=f"{time.monotonic() - started:.3f}",
            **({"scope": METADATA_DIR} if metadata_only else {}),
        )
        # A metadata-only push follows VERIFIED: no verification comes after it (an audit reads
        # every file again), so its read-back would only sit in memory until its time to live.
        # Unsorted (the manifest is sorted when written): a sorted copy of 200,000 entries costs ~25 MB.
        hashes = job.hashes
        if job.read_back and not metadata_only:
            now = time.monotonic()
            with self._read_backs_lock:
                # Read-backs nobody asked for within their time to live (the metadata push after
                # VERIFIED has no verification after it) are dropped here, so the map stays small.
                for stale in [k for k, (ended, *_) in self._read_backs.items() if now - ended > READ_BACK_TTL_S]:
                    del self._read_backs[stale]
                # With the local hashes (alive anyway until the verification): the remote manifest
                # takes their digest strings where equal instead of making 200,000 new ones.
                self._read_backs[remote] = (now, job.read_back, hashes)
        return TransportResult(
            ok=True,
            files_sent=job.files_sent,
            bytes_sent=job.bytes_sent,
            local_hashes=hashes,
            message=f"sent {job.files_sent} files ({job.bytes_sent} bytes) to {remote}; "
            f"{len(hashes) - job.files_sent} already there",
        )

    def _push_steps(
        self,
        job: _Push,
        bwlimit_kibps: int | None,
        rewrite: frozenset[str],
        cleaned: frozenset[str] = frozenset(),
        metadata_only: bool = False,
    ) -> None:
        run = job.run
        if not run.is_dir():
            raise TransportError(TransportErrorKind.LOCAL_FILE_VANISHED, f"run folder {run} does not exist")
        # The whole run, or (metadata_only) its .exlab-wizard/ folder alone, keyed like the run.
        top, prefix = (run / METADATA_DIR, METADATA_DIR + "/") if metadata_only else (run, "")
        if metadata_only and (os.path.islink(top) or not os.path.isdir(top)):
            raise TransportError(TransportErrorKind.LOCAL_FILE_VANISHED, f"{top} is not a folder")
        dirs: list[str] = [METADATA_DIR] if metadata_only else []
        # (size, mtime ns) only: whole stat results, or absolute paths, would cost hundreds of
        # bytes a file (the path is made from the run folder when the file is opened). On disk
        # past spill.SPILL_AT files: the push's memory does not grow with the run.
        local_files: SpillMap[tuple[int, int]] = SpillMap()

        def listed() -> Iterator[str]:
            """Each folder and file as listed (a folder's entries together), kept in ``dirs`` and ``local_files``."""
            for entry in scan_run(top, include_metadata=True, with_stat=True, metadata_root=metadata_only):
                rel = prefix + entry.rel
                if entry.is_dir:
                    dirs.append(rel)
                elif metadata_only or entry.rel != NAS_MANIFEST:
                    # The verified manifest goes to the NAS only with the metadata push after its
                    # VERIFIED is recorded: a NAS manifest is then always one the queue knows
                    # (conflict.foreign_copy_error), never one written locally by a step that failed.
                    local_files[rel] = (entry.stat.st_size, entry.stat.st_mtime_ns)
                else:
                    continue
                yield rel

        try:
            names = listed()
            # Name twins looked for as the run is listed, folders and files alike, one folder's
            # names at a time: a spilled listing is not in folder order when read back.
            twins = fold_twins(names)
            for _rest in names:  # the whole listing, whatever was found
                pass
        except OSError as exc:
            # The folder the listing could not read (a subfolder without permission), named in the run.
            where = os.path.relpath(exc.filename, run) if isinstance(exc.filename, str) else prefix or "."
            raise self._local_error(exc, where, run) from exc
        local_dirs = sorted(dirs, key=lambda rel: rel.count("/"))
        if twins is not None and self._share_folds(job.remote):
            raise twins_refused(twins, where="share")
        remote_stats, stale, claimed_here = self._inspect_remote(
            job.remote,
            local_files,
            set(local_dirs),
            cleaned,
            only=METADATA_DIR if metadata_only else "",
            owner=None if job.own is None else (run, job.own),
            fresh=job.fresh,
            job_id=job.owner,
            keep_stamp=job.keep_stamp,
        )
        if job.claim is not None:
            job.claim()  # durably, before anything is written or moved in the NAS folder

        def sources() -> Iterator[_Source]:
            """Every file of the push, by the bytes of its path: what it is and whether it is sent."""
            for rel, (size, mtime_ns) in items_by_bytes(local_files):
                theirs = remote_stats.get(rel)  # (size, mtime ns)
                send = (
                    metadata_only
                    or rel in rewrite
                    or theirs is None
                    or theirs[0] != size
                    or not same_mtime(mtime_ns, theirs[1])
                )
                yield _Source(rel, size, send)

        replaced: list[str] = []  # data files on the NAS this push writes over
        sent = sent_bytes = skipped = small = 0
        for src in sources():
            if not src.send:
                skipped += 1
                continue
            sent += 1
            sent_bytes += src.size
            small += src.size < LARGE_FILE
            if src.rel in remote_stats:
                job.replacing.add(src.rel)
                if job.keep_stamp is not None and is_data_path(src.rel):
                    replaced.append(src.rel)
        if replaced:
            self._keep_replaced(job, replaced)  # in byte order, as listed
        self._logged(
            "INFO",
            run,
            "push_start",
            transport="mount",
            remote=job.remote,
            files=sent,
            bytes=sent_bytes,
            skipped=skipped,
            bwlimit_kibps="none" if bwlimit_kibps is None else bwlimit_kibps,
            **({"scope": METADATA_DIR} if metadata_only else {}),
        )
        report_total(job.total_sink, sent_bytes)
        self._remove_stale(job, stale)
        chain = self._make_dirs(job, run, local_dirs)
        if job.owner is not None and not claimed_here:
            self._write_claim(job)  # durably, before any file of the run is written
        fstype = job.fstype = filesystem_type(job.remote)
        job.per_file_sync = _SYNCFS is None or fstype not in _SYNCFS_DURABLE
        job.direct_io = bool(_O_DIRECT) and fstype in _DIRECT_WRITE_FS
        job.noreplace_refused = fstype in self._noreplace_refused
        job.check_times = fstype not in _KEEPS_TIMES
        job.umask = _current_umask()
        # Small files on a share whose syncfs is durable go in batches (one syncfs each), folder by
        # folder (one thread, each folder opened once); every other file is made durable on its own
        # (fsync) by the copy threads, round-robin over folders. Both taken from the listing as
        # they are sent, never a list of the whole run.
        batching = small > 0 and not job.per_file_sync
        work = []
        if not batching or len(local_files) > small:
            alone = (s for s in sources() if not (batching and s.send and s.size < LARGE_FILE))
            work.append(lambda: self._send_alone(job, _interleave(alone)))
        if batching:
            work.append(lambda: self._send_small(job, (s for s in sources() if s.send and s.size < LARGE_FILE)))
        # Side by side: large files mostly wait on the disk, small ones on the CPU.
        side_by_side(work, job.abort)
        if not job.abort.is_set() and len(job.hashes) != len(local_files):
            # Every file listed is sent or found there, and hashed either way: a file a send path
            # left out would be missing from the NAS and from the local manifest alike, and the
            # verification, comparing the two, could not see it.
            raise TransportError(
                TransportErrorKind.UNKNOWN,
                f"push incomplete: {len(job.hashes)} of the {len(local_files)} files listed were sent or found",
            )
        local_files.close()
        if job.touched:
            self._set_dir_times(job, run, local_dirs)
        # Every folder of the run and of the chain above it, not only those this push touched: a
        # push cut off before this step left its folders and renames unsynced, and the next one,
        # skipping the files already there, touches none of them (a clean folder's fsync is cheap).
        folders = job.touched.union(chain)
        run_parallel(sorted(folders), lambda folder, _view: self._sync_dir(folder), self.threads, job.abort)
        self._require_mounted()

    def _share_folds(self, remote: str) -> bool:
        """Does the share take names that differ in letter case for one? Asked of a folder on it.

        The deepest existing folder of ``remote`` below the share root whose
        name has a cased letter is looked up under its name with the case
        swapped: the same folder found means the share folds. The same folder
        is one inode, or, on a share that numbers a file per name looked up
        (FUSE without ``use_ino``, exfat-fuse; cifs with ``noserverino``), two
        names found that the parent folder does not list as two entries. No
        such folder yet (a first push of a new project): False, and the
        audit's read-back by name finds the two files one later.
        """
        root = os.path.realpath(self.mount_path)
        folder = os.path.realpath(remote)
        while folder.startswith(root + os.sep):
            name = os.path.basename(folder)
            if name.swapcase() != name:
                parent = os.path.dirname(folder)
                try:
                    here = os.stat(folder)
                    there = os.stat(os.path.join(parent, name.swapcase()))
                except OSError:
                    pass  # not there yet (or no such twin): go up
                else:
                    if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
                        return True
                    # Two inode numbers: two folders only if the share lists both names.
                    return not self._lists_both(parent, name, name.swapcase())
                if os.path.isdir(folder):
                    return False  # there, and its swapped name is not: the share tells case apart
            folder = os.path.dirname(folder)
        return False

    def _lists_both(self, parent: str, name: str, twin: str) -> bool:
        """Does ``parent`` on the share hold entries under both names (one share that tells case apart)?"""
        wanted = {name, twin}
        try:
            with os.scandir(parent) as entries:
                for entry in entries:
                    wanted.discard(entry.name)
                    if not wanted:
                        return True
        except OSError as exc:
            raise self._remote_error(exc, parent) from exc
        return False

    def _inspect_remote(
        self,
        remote: str,
        local_files: Mapping[str, tuple[int, int]],
        local_dirs: set[str],
        cleaned: frozenset[str] = frozenset(),
        *,
        only: str = "",
        owner: tuple[Path, Collection[str]] | None = None,
        fresh: bool = False,
        job_id: str | None = None,
        keep_stamp: str | None = None,
    ) -> tuple[Mapping[str, tuple[int, int]], list[str], bool]:
        """(size, mtime ns) of remote files the run also has, stale temp files, and does ``job_id`` claim the folder.

        Refuses conflicts.

        ``only``: list just this subfolder of the remote run folder (relative path).
        ``owner``: the local run and the manifests it may have left on the NAS: a verified
        manifest there must be one of them
        (:func:`~exlab_wizard.sync.transports.conflict.foreign_copy_error`).
        ``fresh``, ``job_id``: without such a manifest, the folder must not be another job's
        (:func:`~exlab_wizard.sync.transports.conflict.ownership_error`).
        ``keep_stamp``: the push's new ``previous/<stamp>/``, which the folder must not hold yet
        (:class:`~exlab_wizard.sync.transports.base.PreviousStampTaken`).
        """
        top = os.path.join(remote, only) if only else remote
        try:
            root = os.lstat(top)
        except FileNotFoundError:
            return {}, [], False
        except OSError as exc:
            raise self._remote_error(exc, top) from exc
        if not stat.S_ISDIR(root.st_mode):
            raise TransportError(
                TransportErrorKind.REMOTE_CONFLICT,
                f"remote {'folder' if only else 'run folder'} {top} exists and is not a folder",
            )
        # A resumed push finds the whole run there: both on disk past spill.SPILL_AT entries.
        stats: SpillMap[tuple[int, int]] = SpillMap()
        listing: SpillMap[str] = SpillMap()
        try:
            for rel, entry in _scan_share(top, only + "/" if only else ""):
                if entry.is_dir(follow_symlinks=False):
                    listing[rel] = DIR
                elif entry.is_file(follow_symlinks=False):
                    listing[rel] = FILE
                    if rel in local_files:
                        info = entry.stat(follow_symlinks=False)
                        stats[rel] = (info.st_size, info.st_mtime_ns)
                else:
                    listing[rel] = OTHER
        except OSError as exc:
            raise self._remote_error(exc, remote) from exc
        extras = sort_remote(local_files, local_dirs, listing, cleaned, leftover=_own_temp, fresh=fresh)
        if extras.foreign:
            raise conflict_error(remote, extras.foreign)
        if owner is not None and listing.get(NAS_MANIFEST) == FILE:
            error = foreign_copy_error(
                remote, theirs=self._remote_digest(remote), own=owner[1], local=local_manifest_digest(owner[0])
            )
        else:
            error = ownership_error(
                remote,
                claimed=extras.claimed,
                markers=claim_markers(rel for rel, kind in listing.items() if kind == FILE),
                owner=job_id,
                fresh=fresh,
            )
        if error is not None:
            raise error
        if keep_stamp is not None and keep_stamp in previous_stamps(listing):
            raise PreviousStampTaken(keep_stamp, remote)
        claimed_here = job_id is not None and listing.get(claim_path(job_id)) == FILE
        return stats, [os.path.join(remote, rel) for rel in extras.leftovers], claimed_here

    def _keep_replaced(self, job: _Push, replaced: list[str]) -> None:
        """Move the NAS files this push replaces under ``previous/<stamp>/`` before anything is written.

        The push decides what it sends from its own listing, not from a check
        made earlier: whatever changed locally since (an edit, damage, another
        folder renamed into place), the verified NAS copy it replaces is kept.
        A file already kept under the stamp was kept by an earlier attempt of
        this round (one stamp from one verification to the next): what is in
        its place now is that attempt's own write, never verified.
        """
        assert job.keep_stamp is not None
        self._keep_previous(job.run, replaced, job.keep_stamp)

    def _remote_digest(self, remote: str) -> str:
        """SHA-256 of the remote run folder's verified manifest (read past no symlink)."""
        try:
            fd, _info = open_regular_beneath(remote, NAS_MANIFEST)
        except OSError as exc:
            raise self._remote_error(exc, os.path.join(remote, NAS_MANIFEST)) from exc
        try:
            return hash_fd(fd, memoryview(bytearray(BLOCK_SIZE)))
        except OSError as exc:
            raise self._remote_error(exc, os.path.join(remote, NAS_MANIFEST)) from exc
        finally:
            os.close(fd)

    def _remove_stale(self, job: _Push, stale: list[str]) -> None:
        for path in stale:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._remote_error(exc, path) from exc
            job.touched.add(os.path.dirname(path))

    def _write_claim(self, job: _Push) -> None:
        """``.exlab-wizard/claims/<job id>`` in the remote run folder, durable (file and folders) before it returns."""
        assert job.owner is not None
        folder = os.path.join(job.remote, CLAIMS_DIR)
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, job.owner)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, claim_body(self.equipment.id, job.run))
                os.fsync(fd)
            finally:
                os.close(fd)
            for at in (folder, os.path.dirname(folder), job.remote):
                fsync_dir(at)
        except OSError as exc:
            raise self._remote_error(exc, folder) from exc

    def _make_dirs(self, job: _Push, run: Path, local_dirs: list[str]) -> list[str]:
        """Create the remote run folder, its parents and every folder of the run (empty ones too); all of them.

        The list starts with ``mount_path``, whose entry for the first folder a fsync of it makes durable.
        """
        wanted = [self.mount_path]
        for part in remote_relpath(self.equipment, run).parts:
            wanted.append(os.path.join(wanted[-1], part))
        wanted.extend(os.path.join(job.remote, rel) for rel in local_dirs)
        for path in wanted[1:]:
            try:
                os.mkdir(path)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise TransportError(
                        TransportErrorKind.REMOTE_CONFLICT, f"{path} exists on the share and is not a folder"
                    ) from None
                continue
            except OSError as exc:
                raise self._create_error(exc, path) from exc
            job.touched.add(os.path.dirname(path))
            job.touched.add(path)
        return wanted

    def _transfer(self, job: _Push, folders: OpenFoldersByThread, src: _Source, view: memoryview) -> None:
        """Hash a skipped file, or copy one, make it durable on its own, rename it and read it back.

        The file is created, renamed and read back in its folder opened part by part without
        following a symlink (this thread's ``folders``): a folder of the NAS run swapped for a
        link (to another run's verified folder, say) after the listing is never written through.
        """
        if not src.send:
            job.hashes[src.rel] = self._hash_local(job, src, view)
            return
        shares = folders.mine()
        folder, final = shares.path(src.folder), shares.path(src.folder, src.name)
        try:
            at = shares.fd(src.folder)
        except OSError as exc:
            raise self._remote_error(exc, folder) from exc
        for _attempt in range(COPY_ATTEMPTS):
            copied = self._copy_once(job, src, view, folder, durable=True, dir_fd=at)
            if copied is not None:
                break
        else:
            raise _kept_changing(src)
        temp, digest, source = copied
        if job.abort.is_set():
            # Cancelled during the copy (its fsync may take long on a stalled share): no rename after
            # the push was given up, when its lease may already be another process's.
            self._unlink_temp(job, temp, dir_fd=at)
            raise _Cancelled()
        job.hashes[src.rel] = digest
        self._rename(job, temp, final, dir_fd=at, replace=src.rel in job.replacing)
        if job.check_times:
            self._keep_times(final, source, dir_fd=at)
        self._read_back(job, src.rel, final, view, dir_fd=at)

    def _send_alone(self, job: _Push, alone: Iterable[_Source]) -> None:
        """Files fsynced one by one (large ones, or every file on a share whose syncfs is not trusted)."""
        for part in _batches(alone, ROUND_FILES, ROUND_BYTES):
            shares = OpenFoldersByThread(job.remote)  # each copy thread keeps its folders open for the round
            try:
                run_parallel(part, partial(self._transfer, job, shares), self.threads, job.abort)
            finally:
                shares.close()

    # ------------------------------------------------------------------ small files, in batches

    def _send_small(self, job: _Push, small: Iterable[_Source]) -> None:
        """Copy small files in batches on this one thread; one syncfs per batch on a thread of its own.

        Batch k+1 is copied while the ``syncfs`` that makes batch k durable
        runs; then batch k is renamed and read back from storage with
        :data:`READ_AHEAD` reads in flight. One thread does all the copying
        and reading: a 4 KiB file is a dozen short system calls, and threads
        doing them side by side spend more time handing the interpreter lock
        to each other than they gain (two copy threads and a committer were
        slower than this one thread on two cores). Files are opened, created
        and renamed relative to their open folder (:class:`OpenFolders`).
        ``small`` is taken from as its files are sent. Any failure stops the
        push; the first error is raised.
        """
        sources, shares = OpenFolders(os.fspath(job.run)), OpenFolders(job.remote)
        view = memoryview(mmap.mmap(-1, BLOCK_SIZE))
        syncing: _Background | None = None
        copied: list[tuple[str, str, str, str]] = []
        try:
            for batch in _batches(small, BATCH_FILES, BATCH_BYTES):
                ready = self._copy_batch(job, batch, view, sources, shares)
                del batch
                if syncing is not None:
                    syncing.wait()
                    self._commit_batch(job, copied, shares)
                copied, syncing = ready, _Background(lambda: self._syncfs_share(job))
            if syncing is not None:
                syncing.wait()
                self._commit_batch(job, copied, shares)
        except BaseException:
            job.abort.set()
            if syncing is not None:
                syncing.join()
            raise
        finally:
            sources.close()
            shares.close()

    def _syncfs_share(self, job: _Push) -> None:
        try:
            _syncfs(job.remote)
        except OSError as exc:
            raise self._remote_error(exc, job.remote) from exc

    def _copy_batch(
        self, job: _Push, batch: list[_Source], view: memoryview, sources: OpenFolders, shares: OpenFolders
    ) -> list[tuple[str, str, str, str]]:
        """Copy a batch of small files to temp names (not yet durable): ``(folder, temp, name, rel)`` each."""
        progress, abort, hashes = job.progress, job.abort, job.hashes
        copied: list[tuple[str, str, str, str]] = []
        unreported = sent = 0
        try:
            for src in batch:
                if abort.is_set():
                    raise _Cancelled()
                rel = src.rel
                folder, _sep, name = rel.rpartition("/")
                for _attempt in range(COPY_ATTEMPTS):
                    done = self._copy_small(job, src, view, folder, name, sources, shares)
                    if done is not None:
                        break
                else:
                    raise _kept_changing(src)
                temp, digest, count = done
                hashes[rel] = digest
                self._answered()
                copied.append((folder, temp, name, rel))
                sent += count
                unreported += count
                if progress is not None and unreported >= PROGRESS_STEP:
                    progress(unreported)
                    unreported = 0
        finally:
            with job.lock:
                job.bytes_sent += sent
        if progress is not None and unreported:
            progress(unreported)
        return copied

    def _copy_small(
        self,
        job: _Push,
        src: _Source,
        view: memoryview,
        folder: str,
        name: str,
        sources: OpenFolders,
        shares: OpenFolders,
    ) -> tuple[str, str, int] | None:
        """One small file to a temp name, hashed from the same read; (temp name, sha256, bytes) or None if it changed.

        The file is read whole (at most the size seen at open); one that grew
        past the buffer since it was listed goes the general way.
        """
        try:
            fd_in = os.open(name, _READ, dir_fd=sources.fd(folder))
        except OSError as exc:
            raise self._local_error(exc, src.rel, job.run) from exc
        try:
            try:
                before = os.fstat(fd_in)
                if not stat.S_ISREG(before.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file", src.rel)
            except OSError as exc:
                raise self._local_error(exc, src.rel, job.run) from exc
            size = before.st_size
            if size > len(view):
                os.close(fd_in)
                fd_in = -1
                copied = self._copy_once(job, src, view, shares.path(folder), durable=False, dir_fd=shares.fd(folder))
                return None if copied is None else (os.path.basename(copied[0]), copied[1], size)
            try:
                data = os.read(fd_in, size) if size else b""
                while len(data) < size:
                    more = os.read(fd_in, size - len(data))
                    if not more:
                        break  # shrank while read: the size check sees it
                    data += more
            except OSError as exc:
                raise self._local_error(exc, src.rel, job.run) from exc
            digest = hashlib.sha256(data).hexdigest()
            job.bucket.consume(len(data))
            temp = _temp_name(name)
            mode = stat.S_IMODE(before.st_mode)
            # Created with its final permission bits when the umask keeps them: one fchmod less.
            chmod = job.umask is None or mode & ~0o777 or mode & job.umask
            at: int | None = None
            try:
                at = shares.fd(folder)
                fd_out = os.open(temp, _CREATE, 0o600 if chmod else mode, dir_fd=at)
            except OSError as exc:
                raise self._create_error(exc, shares.path(folder, name), dir_fd=at) from exc
            temp_path = shares.path(folder, temp)
            job.temps.add(temp_path)
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd_out, data[done:] if done else data)
            except OSError as exc:
                _close_quietly(fd_out)
                raise self._remote_error(exc, temp_path) from exc
            changed = self._seal(
                job, src, fd_in, fd_out, before, len(data), temp_path, durable=False, chmod=bool(chmod)
            )
        finally:
            if fd_in >= 0:
                os.close(fd_in)
        if changed:
            self._unlink_temp(job, temp_path, dir_fd=shares.fd(folder))
            return None
        return temp, digest, len(data)

    def _seal(
        self,
        job: _Push,
        src: _Source,
        fd_in: int,
        fd_out: int,
        before: os.stat_result,
        count: int,
        temp: str,
        *,
        durable: bool,
        chmod: bool = True,
    ) -> bool:
        """End a copy: did the source change meanwhile? If not, the temp file gets its mode and mtime.

        Closes ``fd_out`` in every case (a late write error at close is the
        share's). Raises ``LOCAL_FILE_VANISHED`` for a source unlinked while
        copied. True when the source changed (the temp file is to be removed).
        """
        try:
            after = os.fstat(fd_in)
            if after.st_nlink == 0:
                raise TransportError(
                    TransportErrorKind.LOCAL_FILE_VANISHED, f"{src.rel}: deleted from {job.run} while being copied"
                )
            size = before.st_size
            changed = count != size or after.st_size != size or after.st_mtime_ns != before.st_mtime_ns
            if not changed:
                self._finish_file(fd_out, before, durable, temp, chmod)
        except BaseException:
            _close_quietly(fd_out)  # the error in flight is the one to report
            raise
        try:
            os.close(fd_out)
        except OSError as exc:  # NFS and SMB report late write errors at close
            raise self._remote_error(exc, temp) from exc
        return changed

    def _commit_batch(self, job: _Push, batch: list[tuple[str, str, str, str]], shares: OpenFolders) -> None:
        """Rename a batch of temp files made durable by one syncfs, and read each back from storage.

        Each file is renamed and its read from storage started (cached pages
        dropped, then ``POSIX_FADV_WILLNEED``) :data:`READ_AHEAD` files
        before it is hashed, so the reads overlap instead of waiting one by
        one. Best effort like :meth:`_read_back`: a file that cannot be read
        back is read by the remote manifest.
        """
        abort, temps = job.abort, job.temps
        items = iter(batch)
        ahead: deque[tuple[str, int, os.stat_result]] = deque()
        read_back: dict[str, list[int]] = {}
        hashes = job.hashes
        folders: set[str] = set()
        renamed = 0
        try:
            while True:
                while len(ahead) < READ_AHEAD:
                    item = next(items, None)
                    if item is None:
                        break
                    if abort.is_set():
                        raise _Cancelled()
                    folder, temp, name, rel = item
                    try:
                        at = shares.fd(folder)
                    except OSError as exc:
                        raise self._remote_error(exc, shares.path(folder, name)) from exc
                    try:
                        self._place(
                            job, temp, name, dir_fd=at, replace=rel in job.replacing, path=shares.path(folder, name)
                        )
                    except OSError as exc:
                        raise self._create_error(exc, shares.path(folder, name), dir_fd=at, source=temp) from exc
                    temps.discard(shares.path(folder, temp))
                    folders.add(folder)
                    renamed += 1
                    try:
                        fd = os.open(name, _READ, dir_fd=at)
                    except OSError:
                        continue
                    try:
                        info = os.fstat(fd)
                        if _FADVISE is None or not stat.S_ISREG(info.st_mode):
                            raise OSError(errno.EINVAL, "cannot read past the page cache")
                        # durable already (syncfs): its pages are clean and can be dropped
                        _FADVISE(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        _FADVISE(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                    except OSError:
                        os.close(fd)
                        continue
                    ahead.append((rel, fd, info))
                if not ahead:
                    break
                rel, fd, info = ahead.popleft()
                try:
                    digest = _hash_prefetched(fd, info)
                except OSError:
                    continue
                finally:
                    os.close(fd)
                # The stat before the read: any later write or utime changes the ctime, and the
                # remote manifest then reads the file again (as it does one read back different).
                if hashes.get(rel) == digest:
                    _add_tag(read_back, rel, _read_back_tag(info, digest))
        finally:
            for _rel, fd, _info in ahead:
                os.close(fd)
            job.touched.update(shares.path(folder) for folder in folders)
            with job.lock:
                job.files_sent += renamed
                self._answered()
                for folder, (files, total) in read_back.items():
                    acc = job.read_back.setdefault(folder, [0, 0])
                    acc[0] += files
                    acc[1] = (acc[1] + total) & _TAG_MASK

    def _hash_local(self, job: _Push, src: _Source, view: memoryview) -> str:
        try:
            fd, _info = open_regular_beneath(job.run, src.rel)
        except OSError as exc:
            raise self._local_error(exc, src.rel, job.run) from exc
        try:
            return hash_fd(fd, view)
        except OSError as exc:
            raise self._local_error(exc, src.rel, job.run) from exc
        finally:
            os.close(fd)

    def _copy_once(
        self, job: _Push, src: _Source, view: memoryview, folder: str, *, durable: bool, dir_fd: int
    ) -> tuple[str, str, os.stat_result] | None:
        """Copy to a temp file, fsynced when ``durable``; (temp, sha256, the source's stat) or None when the
        source changed meanwhile.

        The temp file is made in ``dir_fd``, the open ``folder``; ``temp`` is its path, for messages
        and the push's list of temp files.
        """
        try:
            fd_in, before = open_regular_beneath(job.run, src.rel)
        except OSError as exc:
            raise self._local_error(exc, src.rel, job.run) from exc
        name = _temp_name(src.name)
        temp = os.path.join(folder, name)
        try:
            direct = _O_DIRECT if job.direct_io and before.st_size >= LARGE_FILE else 0
            try:
                try:
                    fd_out = os.open(name, _CREATE | direct, 0o600, dir_fd=dir_fd)
                except OSError as exc:
                    if not direct or exc.errno != errno.EINVAL:
                        raise
                    direct = 0  # the share does not do direct I/O
                    fd_out = os.open(name, _CREATE, 0o600, dir_fd=dir_fd)
            except OSError as exc:
                raise self._create_error(exc, os.path.join(folder, src.name), dir_fd=dir_fd) from exc
            job.temps.add(temp)
            try:
                digest, count = self._stream(job, src, fd_in, fd_out, view, temp, before.st_size, bool(direct))
            except BaseException:
                _close_quietly(fd_out)  # the error in flight is the one to report
                raise
            changed = self._seal(job, src, fd_in, fd_out, before, count, temp, durable=durable)
        finally:
            os.close(fd_in)
        if changed:
            self._unlink_temp(job, temp, dir_fd=dir_fd)
            return None
        return temp, digest, before

    def _stream(
        self,
        job: _Push,
        src: _Source,
        fd_in: int,
        fd_out: int,
        view: memoryview,
        temp: str,
        size: int,
        direct: bool = False,
    ) -> tuple[str, int]:
        """Copy at most ``size`` bytes (the size at open): a file appended to forever still ends.

        ``direct``: ``fd_out`` was opened with ``O_DIRECT`` (``view``, from
        ``run_parallel``, is page-aligned); whole 4 KiB multiples go straight to
        the share, and the first write that is not one (the tail, a short read)
        or that the share refuses (``EINVAL``) turns direct I/O off for the rest
        of the file.
        """
        write = os.write
        consume, progress, abort = job.bucket.consume, job.progress, job.abort
        total = started = 0
        write_behind = WRITE_BEHIND if size >= LARGE_FILE and not direct and hasattr(os, "posix_fadvise") else 0

        def copy(block: memoryview) -> None:
            nonlocal total, started, write_behind, direct
            if abort.is_set():
                raise _Cancelled()
            if write_behind and total - started >= write_behind:
                # DONTNEED on dirty pages starts their write-back without waiting for it
                # (a hint: durability still comes from the fsync before the rename).
                try:
                    os.posix_fadvise(fd_out, started, total - started, os.POSIX_FADV_DONTNEED)
                except OSError:
                    write_behind = 0
                started = total
            count = len(block)
            consume(count)
            done = 0
            try:
                if direct:
                    aligned = count - count % _DIRECT_ALIGN
                    try:
                        while done < aligned:
                            done += write(fd_out, block[done:aligned])
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                    if done < count:
                        _buffered(fd_out)
                        direct = False
                while done < count:
                    done += write(fd_out, block[done:])
            except OSError as exc:
                raise self._remote_error(exc, temp) from exc
            total += count
            self._answered()
            with job.lock:
                job.bytes_sent += count

        if abort.is_set():
            raise _Cancelled()
        try:
            # A short read (the file shrank while copied) ends the loop: the caller sees the short count.
            digest = hash_fd(fd_in, view, progress, limit=size, each=copy)
        except OSError as exc:  # copy() turns its own errors into TransportError: this is the read
            raise self._local_error(exc, src.rel, job.run) from exc
        return digest, total

    def _finish_file(self, fd_out: int, source: os.stat_result, durable: bool, temp: str, chmod: bool = True) -> None:
        if chmod:
            try:
                os.fchmod(fd_out, stat.S_IMODE(source.st_mode))
            except OSError:
                pass  # shares without POSIX permissions: the bytes and mtime are what matter
        try:
            os.utime(fd_out, ns=(source.st_atime_ns, source.st_mtime_ns))
            if durable:
                os.fsync(fd_out)
        except OSError as exc:
            raise self._remote_error(exc, temp) from exc

    def _unlink_temp(self, job: _Push, temp: str, *, dir_fd: int) -> None:
        try:
            os.unlink(os.path.basename(temp), dir_fd=dir_fd)
        except OSError:
            pass
        job.temps.discard(temp)

    def _rename(self, job: _Push, temp: str, final: str, *, dir_fd: int, replace: bool = False) -> None:
        """``temp`` to ``final``, both in the open folder ``dir_fd`` (their paths name them in messages).

        ``replace``: over the NAS file the listing showed there; otherwise only to a free name (:meth:`_place`).
        """
        try:
            self._place(
                job, os.path.basename(temp), os.path.basename(final), dir_fd=dir_fd, replace=replace, path=final
            )
        except OSError as exc:
            raise self._create_error(exc, final, dir_fd=dir_fd, source=os.path.basename(temp)) from exc
        job.temps.discard(temp)
        job.touched.add(os.path.dirname(final))
        with job.lock:
            job.files_sent += 1
            self._answered()

    def _place(self, job: _Push, temp: str, name: str, *, dir_fd: int, replace: bool, path: str) -> None:
        """Rename the temp file ``temp`` to ``name`` in the open folder ``dir_fd`` (``path``: for messages).

        A file the listing did not show (``replace`` False) never lands on an
        existing NAS file: the share may take its name for another's (letter
        case, a Unicode form, a name it mangles, or cuts: smbnetfs stores
        ``x?`` as ``x``). ``RENAME_NOREPLACE`` refuses atomically; where the
        share refuses the flag (FUSE 2: smbnetfs, exfat-fuse; remembered per
        filesystem type), the name is looked up and renamed to only when
        nothing answers to it, the two steps under one lock so the push's own
        threads cannot both take a name. Raises ``REMOTE_WRITE_REFUSED`` when
        the name is taken, ``OSError`` as ``os.rename``.
        """
        if replace:
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        if not job.noreplace_refused:
            try:
                rename_noreplace(temp, name, dir_fd=dir_fd, atomic_only=True)
                return
            except FileExistsError:
                raise self._name_taken(path) from None
            except OSError as exc:
                if exc.errno != errno.ENOTSUP:
                    raise
            job.noreplace_refused = True
            self._noreplace_refused.add(job.fstype)
        with job.placing:
            try:
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                return
        raise self._name_taken(path)

    @staticmethod
    def _name_taken(path: str) -> TransportError:
        return TransportError(
            TransportErrorKind.REMOTE_WRITE_REFUSED,
            f"remote refused the write: the share already holds a file under the name {path!r}, one the push's"
            " listing did not show (the share takes the name for another's: letter case, Unicode form, or a"
            " name it cuts or mangles); nothing was overwritten",
        )

    def _keep_times(self, final: str, source: os.stat_result, *, dir_fd: int) -> None:
        """Set the renamed ``final``'s times again, by name, when the share moved them (:data:`_KEEPS_TIMES`).

        Best effort: a file whose mtime is off is only sent again by the next push.
        """
        name = os.path.basename(final)
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and not same_mtime(source.st_mtime_ns, info.st_mtime_ns):
                os.utime(name, dir_fd=dir_fd, ns=(source.st_atime_ns, source.st_mtime_ns), follow_symlinks=False)
        except OSError:
            pass

    def _read_back(self, job: _Push, rel: str, final: str, view: memoryview, *, dir_fd: int) -> None:
        """Hash a durable file as the share stores it (cached pages dropped), for the coming manifest.

        ``final`` is read in the open folder ``dir_fd``. Best effort: any error leaves the file to
        be read by the remote manifest.
        """
        try:
            fd, info = open_regular(os.path.basename(final), dir_fd=dir_fd)
        except OSError:
            return
        try:
            # durable already (fsync or syncfs): its pages are clean
            digest = hash_from_storage(fd, view, sync=False, progress=self._answered)
            after = os.fstat(fd)
        except OSError:
            return
        finally:
            os.close(fd)
        if _stat_key(info) == _stat_key(after) and job.hashes.get(rel) == digest:
            tag = _read_back_tag(info, digest)
            with job.lock:
                _add_tag(job.read_back, rel, tag)

    def _set_dir_times(self, job: _Push, run: Path, local_dirs: list[str]) -> None:
        # Deepest first: setting a folder's time must come after every change inside it.
        for rel in [*reversed(local_dirs), ""]:
            try:
                info = os.lstat(run / rel if rel else run)
                os.utime(os.path.join(job.remote, rel) if rel else job.remote, ns=(info.st_atime_ns, info.st_mtime_ns))
            except OSError:
                pass  # folder times are a courtesy, not part of the verified copy

    def _sync_dir(self, folder: str) -> None:
        try:
            fsync_dir(folder)
        except OSError as exc:
            raise self._remote_error(exc, folder) from exc

    # ------------------------------------------------------------------ remote manifest

    async def remote_manifest(self, run_path: Path) -> RemoteManifest:
        """Hash every regular file in the remote run folder, read from the share itself.

        Marker guard as for ``push``; a missing remote run folder gives an
        empty manifest. A file the share refuses to let us read is
        ``unverifiable``; one removed while we hash is left out.
        """
        abort = threading.Event()
        try:
            return await self._watched("remote manifest", abort, self._remote_manifest, Path(run_path), abort)
        except asyncio.CancelledError:
            abort.set()  # the hashing threads stop at their next file
            raise

    def _take_read_back(self, remote: str) -> tuple[dict[str, list[int]], dict[str, str]]:
        """The read-back records and local hashes of the last push to ``remote``, once, when fresh; else empty."""
        with self._read_backs_lock:
            ended, read_back, local = self._read_backs.pop(remote, (0.0, {}, {}))
        return (read_back, local) if time.monotonic() - ended <= READ_BACK_TTL_S else ({}, {})

    def _remote_manifest(self, run: Path, abort: threading.Event | None = None) -> RemoteManifest:
        self._require_mounted()
        remote = self.remote_run_path(run)
        read_back, local = self._take_read_back(remote)
        try:
            listed, folders = self._list_remote(remote, read_back, local, self._answered)
            del read_back
        except FileNotFoundError:
            self._require_mounted()
            return RemoteManifest(hashes={})
        except OSError as exc:
            raise self._remote_error(exc, remote) from exc
        hashes: dict[str, str] = {}
        # One syncfs cleans every page of a filesystem whose syncfs is durable; elsewhere each
        # file is fsynced before its pages are dropped.
        synced = False
        if listed and _SYNCFS is not None and filesystem_type(self.mount_path) in _SYNCFS_DURABLE:
            try:
                _syncfs(remote)
                synced = True
            except OSError:
                synced = False
        unverifiable: dict[str, str] = {}
        # Each file opened in its folder, opened part by part: a kept copy's path may be past PATH_MAX.
        shares = OpenFoldersByThread(remote)

        def work(rel: str, view: memoryview) -> None:
            path = f"{remote}/{rel}"  # for messages only
            for again in (False, True):
                try:
                    fd, _info = shares.mine().open_regular(rel)
                except OSError as exc:
                    if exc.errno in GONE_ERRNOS:
                        return  # removed or replaced since the listing: not on the share any more
                    if exc.errno in UNREADABLE_ERRNOS:
                        unverifiable[rel] = f"unreadable: {exc.strerror}"
                        return
                    raise self._remote_error(exc, path) from exc
                try:
                    hashes[rel] = hash_from_storage(fd, view, sync=not synced, progress=self._answered)
                    return
                except OSError as exc:
                    if exc.errno in UNREADABLE_ERRNOS:
                        unverifiable[rel] = f"unreadable: {exc.strerror}"
                        return
                    if exc.errno not in _BAD_BLOCK or not self._mounted():
                        raise self._remote_error(exc, path) from exc
                    if again:
                        # Opened, read twice, the share mounted and answering each time: the NAS
                        # holds the file but cannot return it. Unverifiable, never "unreachable".
                        unverifiable[rel] = f"unreadable: {exc.strerror}"
                        return
                    # An sshfs or SMB blip mid-read: read it once more, from a fresh open.
                finally:
                    os.close(fd)

        try:
            run_parallel(listed, work, self.threads, abort)
        finally:
            shares.close()
        if abort is not None and abort.is_set():
            raise TransportError(TransportErrorKind.UNKNOWN, "remote manifest cancelled")
        self._require_mounted()
        # Unsorted: a sorted copy of 200,000 entries costs ~25 MB, and compare() needs no order.
        manifest: Mapping[str, str] = _ReadBackManifest(local, folders, hashes) if folders else hashes
        self._logged(
            "INFO", run, "remote_manifest", transport="mount", files=len(manifest), unverifiable=len(unverifiable)
        )
        return RemoteManifest(hashes=manifest, unverifiable=unverifiable)

    @staticmethod
    def _list_remote(
        remote: str,
        read_back: dict[str, list[int]],
        local: dict[str, str],
        answered: Callable[[], None] = lambda: None,
    ) -> tuple[list[str], dict[str, int]]:
        """List the remote run folder: the files to read from storage, and the folders confirmed by the read-back.

        A folder is confirmed when every local file of it is there, read back
        by the push with its local digest, and unchanged since: the count of
        its listed files that the local manifest has, and the sum of their
        tags (:func:`_read_back_tag`, from their lstat now and the local
        digest), equal the push's record, and that count is the number of
        local files in the folder. Its files then take the local digests (no
        record a file kept, no string made); every file of any other folder,
        and every file the local manifest does not have, is read. A file
        changed since its read-back (a new ctime) changes the sum, with odds
        of 2**-64 of not doing so. Returns the files to read (relative
        paths), and the confirmed folders with their file counts. Nothing
        followed (:func:`_scan_share`). ``answered()``: after each entry (the stall watchdog's progress).
        """
        if not read_back:
            found: list[str] = []
            for rel, entry in _scan_share(remote):
                answered()
                if entry.is_file(follow_symlinks=False) and not (is_data_path(rel) and is_reaping_name(entry.name)):
                    found.append(rel)
            return found, {}
        wanted: dict[str, int] = {}  # folder -> local files in it
        for rel in local:
            folder = rel.rpartition("/")[0]
            wanted[folder] = wanted.get(folder, 0) + 1
        listed: list[str] = []
        confirmed: dict[str, int] = {}
        files: list[tuple[str, bytes]] = []  # the folder being listed: its files and their _stat_key
        folder: str | None = None

        def close_folder() -> None:
            held: list[str] = []  # its files that the local manifest has
            total = 0
            files.sort()  # looked up in path order: a spilled local manifest reads ahead
            for rel, key in files:
                mine = local.get(rel)
                if mine is None:
                    listed.append(rel)
                else:
                    total = (total + _tag(key, mine)) & _TAG_MASK
                    held.append(rel)
            files.clear()
            if held and read_back.get(folder) == [len(held), total] and wanted.get(folder) == len(held):
                confirmed[folder] = len(held)
            else:
                listed.extend(held)

        for rel, entry in _scan_share(remote):  # folders one at a time
            answered()
            here = rel.rpartition("/")[0]
            if here != folder:
                close_folder()
                folder = here
            try:
                if entry.is_file(follow_symlinks=False):
                    files.append((rel, _stat_key(entry.stat(follow_symlinks=False))))  # as listed now
            except FileNotFoundError:
                continue  # vanished while listed: not on the share any more
        close_folder()
        return listed, confirmed

    # ------------------------------------------------------------------ fetch, keep previous

    async def fetch(self, run_path: Path, paths: Collection[str], into: Path) -> dict[str, Path]:
        """Copy the named files from the share into ``into``, read past this machine's page cache.

        Marker guard as for ``push``. A file reached through a symlink on the
        share (the file or a folder above it) is not fetched.
        """
        return await self._watched("fetch", None, self._fetch, Path(run_path), sorted(set(paths)), Path(into))

    def _fetch(self, run: Path, paths: list[str], into: Path) -> dict[str, Path]:
        self._require_mounted()
        remote = self.remote_run_path(run)
        fetched: dict[str, Path] = {}
        buffer = bytearray(1 << 20)
        shares = OpenFolders(remote)  # every folder opened below the run folder, never through a symlink
        try:
            for rel in map(check_relpath, paths):
                folder, _, name = rel.rpartition("/")
                source = shares.path(folder, name)
                try:
                    fd, _info = open_regular(name, dir_fd=shares.fd(folder))
                except OSError as exc:
                    if exc.errno in GONE_ERRNOS:  # missing, or a symlink (the file or a folder above it)
                        continue
                    raise self._remote_error(exc, source) from exc
                target = into / rel
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "xb") as out:  # errors writing our scratch copy are local: raised as they are
                        self._read_from_share(fd, source, buffer, out.write)
                finally:
                    os.close(fd)
                fetched[rel] = target
        finally:
            shares.close()
        self._require_mounted()
        return fetched

    def _read_from_share(self, fd: int, source: str, buffer: bytearray, write: Callable[[memoryview], object]) -> None:
        """Every byte of ``fd`` as the share stores it (cached pages dropped first), given to ``write``."""
        view = memoryview(buffer)
        try:
            drop_page_cache_fd(fd)  # the bytes the share stores, not the ones this machine remembers
        except OSError as exc:
            raise self._remote_error(exc, source) from exc
        while True:
            try:
                count = os.readv(fd, [buffer])
            except OSError as exc:
                raise self._remote_error(exc, source) from exc
            if not count:
                return
            write(view[:count])

    async def keep_previous(
        self, run_path: Path, paths: Collection[str], stamp: str, *, new: bool = False
    ) -> list[str]:
        """Rename the named files into ``.exlab-wizard/previous/<stamp>/`` on the share; folders fsynced."""
        return await self._watched(
            "keep previous", None, self._keep_previous, Path(run_path), sorted(set(paths)), stamp, new=new
        )

    def _keep_previous(self, run: Path, paths: list[str], stamp: str, *, new: bool = False) -> list[str]:
        """Each rename made below the remote run folder, opened once: folder by folder, never through a symlink.

        Paths relative to open folders, never absolute ones: a file whose NAS
        path is close to PATH_MAX is kept too (its kept path is ~40 bytes longer).
        """
        self._require_mounted()
        remote = self.remote_run_path(run)
        kept: list[str] = []
        touched: set[str] = set()  # folders (relative to the run folder) whose entries changed
        shares = OpenFolders(remote)
        try:
            if new and paths:
                # The round's first keep under the stamp: a folder there is an earlier round's.
                try:
                    there = self._lstat_below(shares, PREVIOUS_DIR, check_previous_stamp(stamp))
                except OSError as exc:
                    raise self._remote_error(exc, shares.path(PREVIOUS_DIR, stamp)) from exc
                if there is not None:
                    raise PreviousStampTaken(stamp, remote)
            for rel in paths:
                kept_folder, _, kept_name = previous_path(stamp, rel).rpartition("/")
                folder, _, name = rel.rpartition("/")
                source = shares.path(folder, name)
                try:
                    there = self._lstat_below(shares, kept_folder, kept_name)
                    if there is not None:
                        if stat.S_ISREG(there.st_mode):
                            kept.append(rel)  # moved by an earlier call: never overwritten
                        continue
                    mine = self._lstat_below(shares, folder, name)
                    if mine is None or not stat.S_ISREG(mine.st_mode):
                        continue
                except OSError as exc:
                    raise self._remote_error(exc, source) from exc
                at = self._make_folders_below(shares, kept_folder, touched)
                try:
                    rename_noreplace(name, kept_name, dir_fd=shares.fd(folder), dst_dir_fd=at)
                except FileExistsError:
                    continue  # made meanwhile: never overwritten; the source stays where it is
                except OSError as exc:
                    if exc.errno in GONE_ERRNOS:
                        continue  # gone (or swapped for a symlink) since it was looked at
                    raise self._remote_error(exc, shares.path(kept_folder, kept_name)) from exc
                finally:
                    os.close(at)
                touched.add(folder)
                while True:  # every folder made or changed, up to the run folder
                    touched.add(kept_folder)
                    if not kept_folder:
                        break
                    kept_folder = kept_folder.rpartition("/")[0]
                kept.append(rel)
            for each in sorted(touched, key=len, reverse=True):  # inner folders first
                try:
                    fsync_dir_fd(shares.fd(each))
                except OSError as exc:
                    raise self._remote_error(exc, shares.path(each)) from exc
        finally:
            shares.close()
        self._require_mounted()
        if kept:
            self._logged(
                "INFO",
                run,
                "previous_kept",
                transport="mount",
                files=len(kept),
                folder=f"{METADATA_DIR}/previous/{stamp}",
            )
        return sorted(kept, key=os.fsencode)

    @staticmethod
    def _lstat_below(shares: OpenFolders, folder: str, name: str) -> os.stat_result | None:
        """``lstat`` of ``name`` in ``folder`` below the run folder; None when missing.

        None too when a folder on the way is not a real folder (a symlink is never followed).
        """
        try:
            return os.stat(name, dir_fd=shares.fd(folder), follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise

    def _make_folders_below(self, shares: OpenFolders, folder: str, touched: set[str]) -> int:
        """``folder`` below the run folder, each missing part made in its open parent; a new descriptor of it.

        The caller closes the descriptor (``shares`` may close its own at any
        later open). A part that exists and is not a real folder (a file, a
        symlink: never followed) raises ``REMOTE_CONFLICT``. Each folder that
        gained an entry is added to ``touched``.
        """
        parent = ""
        try:
            for part in folder.split("/"):
                try:
                    os.mkdir(part, dir_fd=shares.fd(parent))
                    touched.add(parent)
                except FileExistsError:
                    pass
                parent = f"{parent}/{part}" if parent else part
            return os.dup(shares.fd(folder))
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise TransportError(
                    TransportErrorKind.REMOTE_CONFLICT,
                    f"{shares.path(parent)} on the share is not a folder; the verified copy cannot be kept there",
                ) from None
            raise self._remote_error(exc, shares.path(parent)) from exc

    # ------------------------------------------------------------------ remote listing

    async def remote_listing(self, run_path: Path) -> dict[str, int]:
        """Every regular file under the remote run folder -> its size, from ``lstat`` on the share.

        Marker guard before and after the walk (a share unmounted meanwhile is
        ``NETWORK``, never a short listing). A missing remote run folder, or one
        that is not a folder, lists nothing; a subfolder removed while listed
        lists nothing either. Nothing is followed, read or written.
        """
        listed = await self._watched("remote listing", None, self._remote_listing, Path(run_path))
        return {rel: info.size for rel, info in listed.items()}

    async def remote_stats(self, run_path: Path) -> dict[str, RemoteFile]:
        """As :meth:`remote_listing`, each file with its mtime as the share keeps it."""
        return await self._watched("remote listing", None, self._remote_listing, Path(run_path))

    def _remote_listing(self, run: Path) -> dict[str, RemoteFile]:
        """The listing, each file opened and its size and mtime asked of the server (:func:`_opened_stat`).

        A folder's entries may come from the client's cache, but each file is
        opened: an open goes to the server on sshfs (whose ``lstat`` answers
        from its cache for up to 20 s) and makes NFS and SMB revalidate. A file
        whose open finds it gone (or not a regular file) is left out; one the
        service may not open is listed as the server's stat has it; any other
        failure raises (a file that cannot be opened is never one not there).
        """
        self._require_mounted()
        remote = self.remote_run_path(run)
        files: dict[str, RemoteFile] = {}
        try:
            if not stat.S_ISDIR(os.lstat(remote).st_mode):
                self._require_mounted()
                return files
        except FileNotFoundError:
            self._require_mounted()
            return files
        except OSError as exc:
            raise self._remote_error(exc, remote) from exc
        folders = OpenFolders(remote)
        try:
            for rel, entry in _scan_share(remote, folders=folders):
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    info = _opened_stat(entry.name, folders.fd(rel.rpartition("/")[0]))
                except FileNotFoundError:
                    continue  # removed while listed: not on the share any more
                except OSError as exc:
                    raise self._listing_error(exc, f"{remote}/{rel}") from exc
                self._answered()
                if info is not None:
                    files[rel] = info
        except FileNotFoundError:
            pass  # the run folder removed while listed, or the share unmounted (checked below)
        except OSError as exc:
            raise self._remote_error(exc, remote) from exc
        finally:
            folders.close()
        self._require_mounted()
        return files

    def _listing_error(self, exc: OSError, where: str) -> TransportError:
        """A file listed that cannot be opened: unreachable (``NETWORK``) or ``UNKNOWN``, never a refused write."""
        error = self._remote_error(exc, where)
        if error.kind is TransportErrorKind.NETWORK:
            return error
        return TransportError(
            TransportErrorKind.UNKNOWN,
            f"a file on the share cannot be opened to list it: {where}: {exc.strerror or exc}",
        )


def _opened_stat(name: str, dir_fd: int) -> RemoteFile | None:
    """Size and mtime of the regular file ``name`` in the open folder ``dir_fd``, opened now (never followed,
    never read) and asked of the server (:func:`_synced_stat`); None when it is not there as a regular file
    (gone, a symlink, a socket, a folder). Raises ``OSError`` for any other failure.

    A file the service may not open (a colleague's, umask 077) is there (only a name that is there is
    refused for its permissions): its stat by name, asked right after the refused open, is the server's
    (sshfs drops a name whose open failed from its cache; NFS and SMB revalidate)."""
    try:
        try:
            fd = os.open(name, _READ, dir_fd=dir_fd)
        except PermissionError:
            mode, size, mtime_ns = _synced_stat(dir_fd, name, _AT_SYMLINK_NOFOLLOW)
        else:
            try:
                mode, size, mtime_ns = _synced_stat(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        if exc.errno in _NOT_THERE:
            return None
        raise
    return RemoteFile(size, mtime_ns) if stat.S_ISREG(mode) else None


def _scan_share(
    top: str, prefix: str = "", *, folders: OpenFolders | None = None
) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """``(prefix + relative path, entry)`` of everything below the share folder ``top``, folders one at a time.

    Each folder is opened relative to its open parent without following a
    symlink, never by its absolute path: below a run folder a path may be
    longer than PATH_MAX (a file kept under ``.exlab-wizard/previous/<stamp>/``
    is ~40 bytes deeper than it was). A folder removed, or swapped for a
    symlink, while listed is left out. An entry's ``stat()`` holds until the
    next entry is taken. Raises ``OSError`` as ``os.open`` when ``top`` is
    missing or not a real folder, as ``os.scandir`` otherwise. Unordered.
    ``folders``: the caller's :class:`OpenFolders` of ``top`` (not closed here),
    whose ``fd(folder)`` is the folder of the entry just taken.
    """
    own = folders is None
    folders = OpenFolders(top) if folders is None else folders
    try:
        folders.fd("")
        stack = [""]
        while stack:
            folder = stack.pop()
            try:
                fd = folders.fd(folder)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue
                raise
            with os.scandir(fd) as entries:  # no other folder is opened while these are listed
                for entry in entries:
                    rel = f"{folder}/{entry.name}" if folder else entry.name
                    yield prefix + rel, entry
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(rel)
    finally:
        if own:
            folders.close()


class _ReadBackManifest(Mapping[str, str]):
    """The remote manifest after a push: the local digests of the folders the read-back confirmed, and the files read.

    A view, not a copy: at 200,000 files a dict of its own would cost about
    130 bytes a file. ``folders``: the confirmed folders with their file
    counts (every local file of each is on the share); ``read``: the files
    hashed from storage now (never in a confirmed folder).
    """

    __slots__ = ("_folders", "_local", "_read", "_size")

    def __init__(self, local: Mapping[str, str], folders: dict[str, int], read: dict[str, str]):
        self._local, self._folders, self._read = local, folders, read
        self._size = len(read) + sum(folders.values())

    def _confirmed(self, rel: str) -> bool:
        return rel.rpartition("/")[0] in self._folders and rel in self._local

    def __getitem__(self, rel: str) -> str:
        digest = self._read.get(rel)
        if digest is None and isinstance(rel, str) and rel.rpartition("/")[0] in self._folders:
            digest = self._local.get(rel)  # one lookup (a spilled map's is read from disk)
        if digest is None:
            raise KeyError(rel)
        return digest

    def __contains__(self, rel: object) -> bool:
        return rel in self._read or (isinstance(rel, str) and self._confirmed(rel))

    def __iter__(self) -> Iterator[str]:
        folders = self._folders
        yield from (rel for rel in self._local if rel.rpartition("/")[0] in folders)
        yield from self._read

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"_ReadBackManifest({dict(self)!r})"


def _kept_changing(src: _Source) -> TransportError:
    return TransportError(
        TransportErrorKind.UNKNOWN,
        f"{src.rel} kept changing while being copied ({COPY_ATTEMPTS} attempts); is the run still being written?",
    )


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # the error in flight is the one to report


def _current_umask() -> int | None:
    """This process's umask, read without changing it (``/proc/self/status``), or None."""
    try:
        with open("/proc/self/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _hash_prefetched(fd: int, info: os.stat_result) -> str:
    """SHA-256 hex of the ``info.st_size`` bytes of a small file whose read from storage was started.

    The batch read-back's: the file's cached pages were dropped and its read
    started (``POSIX_FADV_DONTNEED``, then ``POSIX_FADV_WILLNEED``); read
    in one call when it fits a block (a file that grew after it was listed is
    read a block at a time), as :func:`hash_from_storage` would with ``prefetched``.
    """
    digest = hashlib.sha256()
    left = info.st_size
    while left > 0:
        data = os.read(fd, min(left, BLOCK_SIZE))
        if not data:
            break
        digest.update(data)
        left -= len(data)
    return digest.hexdigest()


class _Background:
    """One call on a thread of its own; ``wait`` waits for it and raises its error."""

    def __init__(self, call: Callable[[], None]):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), name="exlab-syncfs", daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException as exc:
            self._error = exc

    def join(self) -> None:
        self._thread.join()

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _interleave(sources: Iterable[_Source], chunk: int = 32_768) -> Iterator[_Source]:
    """Round-robin over folders, so parallel threads mostly work in different folders.

    ``sources`` in byte order (a folder's files together); taken ``chunk`` files at a time, so a
    run of any size holds one chunk's records, not the whole run's.
    """
    taken = iter(sources)
    while part := list(itertools.islice(taken, chunk)):
        by_folder: dict[str, list[_Source]] = {}
        for src in part:
            by_folder.setdefault(src.folder, []).append(src)
        del part
        queues = [iter(group) for group in by_folder.values()]
        while queues:
            alive = []
            for queue in queues:
                item = next(queue, None)
                if item is not None:
                    yield item
                    alive.append(queue)
            queues = alive


def _batches(sources: Iterable[_Source], max_files: int, max_bytes: int):
    """Split the work into batches of at most ``max_files`` files or about ``max_bytes`` bytes to send."""
    batch: list[_Source] = []
    size = 0
    for src in sources:
        batch.append(src)
        if src.send:
            size += src.size
        if len(batch) >= max_files or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
