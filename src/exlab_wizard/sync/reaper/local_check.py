"""The local check of a verified run: is every listed file still the verified bytes?

Owns interlock 6's facts: :func:`scan_run` compares the run folder with its
verified manifest and names the files added, changed, damaged or missing,
and, when the run is clean, the files a deletion would remove
(:class:`LocalScan`). A file is re-read only when its stat differs from the
one recorded when it was verified: :func:`record_verified_stat` records
those stats after every successful verification, :func:`load_verified_stats`
reads them back (both through :class:`~.store.CleanupStore`). For a run whose
queue lost them, :func:`check_against_copy` takes the verified NAS copies'
sizes and mtimes instead, and :func:`record_copy_stats` records those.

Never follows a symlink (see :mod:`.nofollow`) and never takes a file below
a mount point inside the run for the run's (see :mod:`.mounts`): the scan
refuses such a run, the verified stats of those files are not trusted.
A filesystem that keeps no change time (exFAT: exfat-fuse gives the mtime
for it) lets a rewrite in place that puts the old size and mtime back leave
every field of the stat as recorded: on such a disk (:func:`keeps_ctime`) no
stat is trusted, every file is read again by the scan and planned with no
ctime, so that the deletion reads it once more right before its unlink.
Nor is a stat that may not show a write: one stamped within the kernel's
writeback window before the hashing (:func:`writeback_window_ns`: a store
through a memory mapping stamps no time while its page stays dirty), or one
recorded in another boot (:func:`~.store.current_boot`: a power cut may keep a
save's bytes and lose its times). Other bytes under such a stat are an edit.

Reads only: nothing here deletes or writes a local file, but for the empty
file :func:`keeps_ctime` makes and removes in ``.exlab-wizard/`` on a
filesystem the mount table does not name.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from exlab_wizard.fileio import (
    BLOCK_SIZE,
    METADATA_DIR,
    filesystem_now_ns,
    filesystem_type,
    hash_fd,
    is_data_path,
    is_metadata_path,
    open_regular,
)
from exlab_wizard.sync.manifest_format import MANIFEST_NAME
from exlab_wizard.sync.policy import cleanup as policy
from exlab_wizard.sync.policy.cleanup import CleanupCode, LocalCheck
from exlab_wizard.sync.queue import TRANSITION_EVENT, JobQueue
from exlab_wizard.sync.reaper.mounts import describe, mounts_inside
from exlab_wizard.sync.reaper.nofollow import (
    RunFolderError,
    Tree,
    hash_at,
    open_dir_chain,
    open_run,
    split_path,
    steady,
    walk,
)
from exlab_wizard.sync.reaper.store import CleanupStore, PlannedFile, StatRow, VerifiedStat
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import RemoteFile

__all__ = [
    "RACE_SLACK_NS",
    "WRITEBACK_MARGIN_NS",
    "LocalScan",
    "PlannedFile",
    "VerifiedStat",
    "check_against_copy",
    "keeps_ctime",
    "load_verified_stats",
    "record_copy_stats",
    "record_verified_stat",
    "scan_run",
    "writeback_window_ns",
]

#: A file whose mtime is this close to (or after) the start of the hashing
#: may have been written while it was hashed: its recorded stat is not
#: trusted, and the reaper re-hashes it before deleting it. Covers filesystems
#: with coarse timestamps (FAT: 2 s).
RACE_SLACK_NS = 2_000_000_000

#: Where Linux keeps how long a page may stay dirty, and how often the flusher wakes (centiseconds).
_VM = "/proc/sys/vm"
#: Their defaults (30 s and 5 s), for a kernel that does not say.
_DIRTY_DEFAULTS_CS = {"dirty_expire_centisecs": 3000, "dirty_writeback_centisecs": 500}
#: Added to the kernel's window: a flusher busy with other pages comes late.
WRITEBACK_MARGIN_NS = 5_000_000_000


def writeback_window_ns() -> int | None:
    """How long before the hashing a write may have been stamped and still be followed by unstamped ones.

    A store through a shared memory mapping (``numpy.memmap``, a camera
    SDK's ring file) stamps mtime and ctime at its first write fault into a
    clean page only; later stores into that page stamp nothing until
    writeback has cleaned it: up to ``dirty_expire_centisecs`` +
    ``dirty_writeback_centisecs`` (35 s by default), plus
    :data:`WRITEBACK_MARGIN_NS`, and never less than :data:`RACE_SLACK_NS`.
    A file stamped later than that before the hashing began may hold other
    bytes than the hashed ones under its recorded stat. None: no bound (the
    periodic writeback is off, ``dirty_writeback_centisecs`` 0), no file is trusted.
    """
    total = 0
    for name, default in _DIRTY_DEFAULTS_CS.items():
        try:
            with open(f"{_VM}/{name}", encoding="ascii") as handle:
                value = int(handle.read().strip())
        except (OSError, ValueError):
            value = default
        if name == "dirty_writeback_centisecs" and value <= 0:
            return None
        total += max(0, value) * 10_000_000
    return max(RACE_SLACK_NS, total + WRITEBACK_MARGIN_NS)


#: Filesystems whose ctime is the kernel's change time, set by every write, rename and utime.
_CTIME_KEPT = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "zfs", "f2fs", "jfs", "reiserfs", "nilfs2", "bcachefs"}
)
#: FAT's kin keep no change time on disk: their kernel drivers give the mtime for it once an inode
#: has left memory.
_NO_CTIME = frozenset({"vfat", "msdos", "umsdos", "fat", "exfat"})
#: The mtime :func:`keeps_ctime` sets on its probe: 2001-09-09, within FAT's range, never "now".
_PROBE_NS = 1_000_000_000_000_000_000


def keeps_ctime(run_path: Path | str) -> bool:
    """Does the run's filesystem keep a real change time (ctime)? False when that cannot be told.

    Without one (exfat-fuse reports ctime = mtime), a file rewritten in place
    with its size and mtime put back (``exiftool -P``, ``touch -r``) keeps
    every field of its stat: only its bytes tell. By the mount table's type
    where it says (ext4, xfs, ...: kept; vfat, exfat: not); else (``fuseblk``
    is exfat-fuse and ntfs-3g alike) probed: an empty file made in the run's
    ``.exlab-wizard/`` (the engine's own folder, on the run's filesystem) is
    given an old mtime; a real ctime then reads "now", a missing one that
    mtime. The file is removed at once (a crash in between leaves an empty
    ``.ctime-probe.<hex>.tmp`` there). A folder that cannot be written, or
    is not there, answers False: the files are read again, never trusted
    unread. Blocking I/O.
    """
    run = Path(run_path)
    if not os.path.lexists(run):
        return False
    kind = filesystem_type(run)
    if kind in _CTIME_KEPT:
        return True
    if kind in _NO_CTIME:
        return False
    try:
        root = open_run(run)
    except RunFolderError:
        return False
    try:
        meta = open_dir_chain(root, [METADATA_DIR])
    except OSError:
        return False
    finally:
        os.close(root)
    name = f".ctime-probe.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags, 0o600, dir_fd=meta)
        try:
            os.utime(fd, ns=(_PROBE_NS, _PROBE_NS))
            st = os.fstat(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=meta)
    except OSError:
        return False
    finally:
        os.close(meta)
    return st.st_ctime_ns > st.st_mtime_ns + RACE_SLACK_NS


@dataclass(frozen=True)
class LocalScan:
    """The local check's answer: what it found, and the files a deletion would remove.

    ``files`` is complete only when ``check.clean``. ``rehashed`` names the
    files whose stat differed from the recorded one and were read again.
    """

    check: LocalCheck
    files: tuple[PlannedFile, ...] = ()
    rehashed: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


# --------------------------------------------------------------------------- verified stats


def _data_paths(hashes: Mapping[str, str]) -> Mapping[str, str]:
    """The data entries, digests in lower case: ``hashes`` itself when it is that already (no copy at 200,000 files)."""
    if all(type(k) is str and type(v) is str and _lower(v) and is_data_path(k) for k, v in hashes.items()):
        return hashes
    return {str(k): str(v) if _lower(str(v)) else str(v).lower() for k, v in hashes.items() if is_data_path(str(k))}


def _lower(digest: str) -> bool:
    return digest.islower() or digest.isdigit()


def _ns(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)


def _hashing_started(queue: JobQueue, job_id: str) -> dt.datetime | None:
    """When the job last entered RUNNING: no local hashing of this copy began earlier."""
    for event in reversed(queue.events(job_id)):
        if event.kind == TRANSITION_EVENT and event.to_state == SyncJobState.RUNNING.value:
            return event.at
    return None


def record_verified_stat(
    queue: JobQueue,
    job_id: str,
    run_path: Path | str,
    hashes: Mapping[str, str],
    now: dt.datetime,
    *,
    hashed_since: dt.datetime | None = None,
    hashing_for_s: float | None = None,
    run_folder: tuple[int, int] | None = None,
) -> int:
    """Record the size, mtime, ctime and inode of each verified file. Call after every successful verification.

    ``hashes`` is the verified local manifest (``{relative path: sha256}``;
    ``.exlab-wizard/`` entries are ignored). ``hashed_since`` is when the
    local hashing began; by default the time the job last entered RUNNING
    (the earliest the hashing can have begun). ``hashing_for_s``: how long
    ago the hashing began by a clock that is never stepped and counts a
    suspend (``context.elapsed_s``: ``time.monotonic()`` stops while the
    PC sleeps, and would date the start too late); the bound is then never
    later than ``now`` minus that, so a wall clock stepped back since the
    job entered RUNNING (NTP correcting a clock that ran ahead) cannot date
    a later edit before the hashing. A file modified within
    :data:`RACE_SLACK_NS` of that time, or later, may not hold the hashed
    bytes: its stat is recorded as not trusted, and the reaper re-hashes it
    before it deletes anything. So is one whose mtime or ctime is within the
    kernel's writeback window before that time (:func:`writeback_window_ns`,
    ~40 s): a store through a memory mapping may change it later with no
    time stamped; its row is marked ``writeback``, and other bytes under its
    very stat are then an edit, not damage (:func:`_damage`). So is a file below a folder (the run's
    included) whose ctime is that late: renamed or moved into place since,
    it may hold another run's files of the same names. ``run_folder``: the
    run folder's (device, inode) when the hashing began; another folder at
    the run's path now (one above it renamed) makes every file untrusted.
    So does a mount point inside the run (a folder bind-mounted over a
    subfolder shows another folder's files under the run's names, with no
    ctime moved): every file at or below one, or below a folder on another
    device than the run folder, is recorded as not trusted (the reaper refuses the run while
    the mount is there, and re-hashes those files once it is gone). The files of a btrfs
    subvolume inside the run (another device, no mount: the run's) are not trusted either:
    the scan re-hashes them every time, then plans them like any other.
    On a filesystem that keeps no change time (:func:`keeps_ctime`: exFAT)
    no row is trusted. A file stamped since the hashing began is read
    again, and so is one stamped by a write (ctime = mtime, or no ctime
    kept) within :data:`RACE_SLACK_NS` before it (exFAT rounds an mtime
    down to the second): when it holds
    other bytes now, its row records their SHA-256 (``newer_sha256``, see
    :class:`VerifiedStat`), and the reaper takes those bytes for an edit,
    never for damage.

    A row whose recorded SHA-256 is unchanged and trusted is kept as it is:
    the first stat recorded for that content stands, so a call made without
    re-reading the local files (an audit pass) never passes a local edit
    off as verified. Rows for files no longer in ``hashes`` are dropped.
    Files missing locally are not recorded (the reaper then re-hashes).

    Returns the number of rows written. Raises like the queue (``JobNotFound``
    is not checked: the foreign key refuses an unknown job).
    """
    run = Path(run_path)
    data = _data_paths(hashes)
    since = hashed_since if hashed_since is not None else _hashing_started(queue, job_id)
    if hashing_for_s is not None:
        began = now - dt.timedelta(seconds=max(0.0, hashing_for_s))
        since = began if since is None else min(since, began)
    since_ns = None if since is None else _ns(since) - RACE_SLACK_NS
    if since_ns is not None:
        # The files are stamped by their filesystem's clock. Where this client's clock runs ahead
        # of it (a share's server behind, this clock stepped back since), the hashing began
        # earlier in file time than the client says: move the bound back by that much, never on.
        file_now = filesystem_now_ns(run)
        if file_now is not None:
            since_ns -= max(0, _ns(now) - file_now)
    # A file stamped after this may have been written through a mapping since, with no time stamped.
    # None: no bound known (the periodic writeback is off), every file may have been.
    window = writeback_window_ns()
    settled_ns = None if since_ns is None or window is None else since_ns + RACE_SLACK_NS - window

    # Without a ctime, a rewrite that put the size and mtime back is seen by no stat: none is trusted.
    ctime_kept = keeps_ctime(run)

    base = os.fspath(run) + "/"
    #: folder (relative, "" = the run) -> it and every folder above it, up to the run's, unchanged
    #: since the hashing began. A folder renamed or moved into place since (another run's folder
    #: swapped in under this name, a subfolder replaced) has a new ctime: the files below it are
    #: not the ones hashed, whatever their own times say.
    folders: dict[str, bool] = {}
    #: Mount points inside the run (read once): the files at or below one are another folder's.
    mounted = frozenset(mounts_inside(run))
    try:
        run_dev: int | None = os.lstat(run).st_dev
    except OSError:
        run_dev = None

    def folder_kept(folder: str) -> bool:
        known = folders.get(folder)
        if known is None:
            above = True if not folder else folder_kept(folder.rpartition("/")[0])
            try:
                st = os.lstat(base + folder if folder else run)
                known = (
                    above
                    and stat.S_ISDIR(st.st_mode)
                    and since_ns is not None
                    and st.st_ctime_ns < since_ns
                    and st.st_dev == run_dev
                    and folder not in mounted
                )
                if not folder and run_folder is not None:
                    known = known and (st.st_dev, st.st_ino) == run_folder
            except OSError:
                known = False
            folders[folder] = known
        return known

    def stats() -> Iterator[tuple[str, StatRow]]:
        # One file's row at a time, straight into the store: 200,000 rows held at once cost ~60 MB.
        # Paths joined as strings: a Path a file cost a third of the call at 20,000 files.
        for rel, sha in data.items():
            try:
                st = os.lstat(base + rel)
            except OSError:
                continue
            regular = stat.S_ISREG(st.st_mode)
            writeback = (
                ctime_kept
                and since_ns is not None
                and (settled_ns is None or max(st.st_mtime_ns, st.st_ctime_ns) >= settled_ns)
            )
            trusted = (
                regular
                and ctime_kept
                and not writeback
                and since_ns is not None
                and st.st_mtime_ns < since_ns
                and st.st_ctime_ns < since_ns
                and rel not in mounted
                and folder_kept(rel.rpartition("/")[0])
            )
            # Bytes a write stamped after the hashing began (no slack: an mtime put back to before it
            # is not that) may not be the bytes it read: read them again. So may bytes stamped up to
            # the slack before it where times are rounded down (exFAT: whole seconds; FAT: 2 s): a
            # frame appended in the second the hashing began. Stamped by a write: its ctime is its
            # mtime (a tool putting an mtime back leaves a later ctime), or no ctime is kept (exFAT).
            stamped = since_ns is None or st.st_mtime_ns >= since_ns + RACE_SLACK_NS
            if not stamped and st.st_mtime_ns >= since_ns:
                stamped = not ctime_kept or st.st_ctime_ns == st.st_mtime_ns
            newer = _other_bytes(base + rel, sha, st) if regular and stamped else None
            yield rel, (sha, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, trusted, newer, writeback)

    return CleanupStore(queue).record_verified(job_id, data, stats(), now)


def _other_bytes(path: str, sha: str, st: os.stat_result) -> str | None:
    """The SHA-256 of the bytes the file at ``path`` holds now, when they are not ``sha`` and were read
    under the very stat ``st`` its row records; else None.

    A write landing between that stat and the end of the read (a byte
    flipped with the old mtime put back, an edit) moves the file's ctime:
    the bytes read are not the ones the row's stat vouches for, and taken
    for the newer bytes of an edit they would pass damage off as one (sent
    over the verified NAS copy). With no newer bytes recorded the reaper
    judges them by their own mtime: an edit moves it on, damage does not. A
    file that cannot be read as a regular file is left to the reaper's own
    check.
    """
    try:
        fd, before = open_regular(path)
    except OSError:
        return None
    try:
        digest = hash_fd(fd, memoryview(bytearray(BLOCK_SIZE)))
        after = os.fstat(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if before.st_ino != st.st_ino or not (steady(st, before) and steady(before, after)):
        return None
    return None if digest == sha else digest


def load_verified_stats(queue: JobQueue, job_id: str) -> dict[str, VerifiedStat]:
    """The recorded stats of a job's verified files, by relative path. Takes no write lock."""
    return CleanupStore(queue).verified_stats(job_id)


# --------------------------------------------------------------------------- the scan


#: Reads of a file that each saw a write before it counts as being written (an edit under way).
STEADY_READS = 3


def _steady_read(folder: int, name: str) -> tuple[str, os.stat_result, os.stat_result]:
    """:func:`hash_at`, read again while a write lands during the read: up to :data:`STEADY_READS` reads.

    One write landing during one read (bit rot, a tool rewriting a byte and
    putting the old mtime back) leaves a ctime that moved: the read that
    follows sees the bytes it left, and the caller judges them by their
    mtime (damage when it was not moved on). Taken for "being written
    right now" from that one read, the damage would be an edit, and sent
    over the verified NAS copy. A file every read sees written to is a
    write under way (the last read's stats say so to the caller).
    """
    for _ in range(STEADY_READS - 1):
        digest, before, after = hash_at(folder, name)
        if steady(before, after):
            return digest, before, after
    return hash_at(folder, name)


def _bad_manifest_path(rel: str) -> bool:
    if not rel or rel.startswith("/") or "\x00" in rel:
        return True
    parts = rel.split("/")
    return any(part in ("", ".", "..") for part in parts) or is_metadata_path(rel)


def _replaced_ancestor(rel: str, tree: Tree) -> bool:
    parts = rel.split("/")
    for i in range(1, len(parts)):
        prefix = "/".join(parts[:i])
        if prefix in tree.others or prefix in tree.files:
            return True
    return False


def _written_behind(st: os.stat_result, size: int | None, times: tuple[int | None, ...]) -> bool:
    """Did a write stamped by a clock now behind the record's give the file a new size? Then it is an edit.

    The file's change time (``st_ctime``), set by the kernel at every write,
    rename or ``utime`` and never by a tool, is earlier than a time
    recorded for the file (``times``: its recorded mtime and ctime, or its
    NAS copy's mtime): nothing since the record can have been stamped so
    unless the clock that stamps the file runs behind the one that stamped
    the record (the files written while the PC's clock ran ahead, then NTP;
    a CMOS reset to 2000; a lab setting the clock back). Any mtime compared
    with the recorded one then says nothing of edit or damage. What tells a
    write from a tool putting an old mtime back is the file's own pair: a
    write stamps mtime and ctime alike (a save through a temp file and a
    rename within :data:`RACE_SLACK_NS`), a put-back mtime lies behind the
    ctime of its ``utime``. And the size must differ from the recorded one:
    damage keeps the size (DESIGN section 6); a file of another size, stamped
    by a write, is an edit, sent again (the push keeps the replaced NAS copy
    under ``previous/``), never "restored" away.
    """
    known = [t for t in times if t is not None]
    return (
        size is not None
        and st.st_size != size
        and bool(known)
        and st.st_ctime_ns < max(known)
        and abs(st.st_ctime_ns - st.st_mtime_ns) <= RACE_SLACK_NS
    )


def _damage(st: os.stat_result, record: VerifiedStat | None, verified_ns: int | None, digest: str) -> bool:
    """Is a file (stat-ed ``st``) whose bytes (``digest``) differ from the manifest damaged (True) or edited (False)?

    By its mtime. An edit moves the mtime on, past the one recorded after the
    verification; damage keeps it, or puts an older one back. Trusted or not, a record was
    stat-ed after the hashing, and may have caught a rewrite half way (a tool
    rewriting bytes and then putting the old mtime back): so an older mtime
    coming back is damage too. Except a write stamped by a clock behind the
    record's that gave the file another size (:func:`_written_behind`): an
    edit, whatever its mtime. Except the very bytes a record found newer
    (``newer_sha256``): read again when recorded, the file held bytes written
    after the hashing read it (a frame appended to a file already copied);
    those bytes under that mtime are the edit the hashing missed, sent again,
    never "restored" away. Other bytes under that mtime are damage. An
    untrusted row an engine before queue migration 10 recorded
    (:attr:`~.store.VerifiedStat.legacy`) never read the file again: any
    bytes under its mtime may be that edit, so they are one (sent again; the
    push keeps the replaced NAS copy), only an older mtime is damage. A row
    whose stat may not show a write (:attr:`~.store.VerifiedStat.unstamped`:
    written within the writeback window before the hashing, or recorded in
    another boot) is read before any deletion, never trusted; other bytes
    under its very stat are damage all the same: an unstamped save (a store
    through a mapping, a power cut losing a save's times) and a bad sector
    look alike, and damage is never sent over the verified NAS copy. The
    operator tells them apart (:func:`~exlab_wizard.sync.recovery.damage_ways_out`
    names both). File times are
    compared with file times (the "trusted" flag compares them with the
    client's clock, which may be off). Without a record, only an mtime after
    the verification is an edit.
    """
    mtime_ns = st.st_mtime_ns
    if record is not None and record.mtime_ns is not None:
        if _written_behind(st, record.size, (record.mtime_ns, record.ctime_ns)):
            return False
        if record.legacy:
            return mtime_ns < record.mtime_ns
        if record.newer_sha256 is not None and mtime_ns == record.mtime_ns and digest == record.newer_sha256:
            return False
        return mtime_ns <= record.mtime_ns
    return verified_ns is None or mtime_ns <= verified_ns


def _verified_bound(root: int, verified_at: dt.datetime | None) -> int | None:
    """The file time after which a new content counts as an edit when no stat was recorded.

    ``verified_at`` is the client's clock; the files are stamped by their
    filesystem's, which may run ahead (a share's server). The manifest
    written at the verification carries that clock's time of it: the later
    of the two is the bound (later only makes more changes damage: nothing
    deleted, nothing sent).
    """
    if verified_at is None:
        return None
    bound = _ns(verified_at)
    try:
        meta = open_dir_chain(root, [METADATA_DIR])
    except OSError:
        return bound
    try:
        written = os.stat(MANIFEST_NAME, dir_fd=meta, follow_symlinks=False)
    except OSError:
        return bound
    finally:
        os.close(meta)
    return max(bound, written.st_mtime_ns) if stat.S_ISREG(written.st_mode) else bound


def scan_run(
    run_path: Path | str,
    manifest: Mapping[str, str],
    verified: Mapping[str, VerifiedStat],
    *,
    verified_at: dt.datetime | None = None,
) -> LocalScan:
    """Compare the local run with its verified manifest (interlock 6). Blocking I/O.

    Never follows a symlink: the run folder is opened with ``O_NOFOLLOW``
    (a run folder replaced by a symlink is refused) and so is every folder
    and file below it. ``.exlab-wizard/`` is not compared.

    Per listed file, against its recorded :class:`VerifiedStat`:

    - same size, mtime, ctime and inode (and trusted), on a filesystem that
      keeps a ctime (:func:`keeps_ctime`): unchanged, not read;
    - otherwise re-hashed: the same content -> unchanged (touched, copied
      back, or recorded while possibly being written); different content
      with an mtime later than the recorded one -> ``changed`` (an edit);
      different content with the recorded mtime or an older one ->
      ``damaged`` (bytes changed behind the filesystem's back, maybe with
      the old mtime put back after a record that caught the rewrite half
      way), unless a write stamped by a clock behind the record's gave it
      another size (``changed``: :func:`_written_behind`). With no recorded
      stat at all, a new content is ``changed`` when
      the file's mtime is after ``verified_at``, else ``damaged`` (see
      :func:`_damage`);
    - a read that saw a write (its size, mtime or ctime moved) is made again
      (:func:`_steady_read`): a file every read saw written to is
      ``changed`` (an edit under way) when its mtime moved on, else judged
      by its bytes as above; so is one replaced since the listing (another
      inode). One that cannot be read for ``EIO`` (a bad sector) is
      ``damaged``;
    - no longer a regular file (a symlink, a folder), or a parent folder
      replaced by a symlink -> ``changed``; gone -> ``missing``.

    A regular file the manifest does not list is ``added``; symlinks and
    special files the manifest does not list are ignored (they are never
    synced, and never deleted). A folder that cannot be read is a refusal
    (its files cannot be checked), and so is a mount point inside the run
    (``run holds a mount point: <paths>``, :data:`CleanupCode.RUN_HOLDS_MOUNT`):
    the files below it are another folder's, whatever their stats say. A btrfs
    subvolume inside the run is no mount point (:func:`~.nofollow.is_subvolume`):
    compared like any folder (its files' stats recorded untrusted: re-hashed).
    On a filesystem that keeps no ctime, every file is planned with none
    (``ctime_ns`` None): the deletion reads it again before its unlink.
    """
    run = Path(run_path)
    for rel in manifest:
        if _bad_manifest_path(rel):
            return LocalScan(
                LocalCheck(
                    refusal=f"manifest lists a path outside the run data: {rel!r}",
                    refusal_code=CleanupCode.MANIFEST_UNREADABLE,
                )
            )
    try:
        root = open_run(run)
    except RunFolderError as exc:
        return LocalScan(LocalCheck(refusal=exc.reason, refusal_code=exc.code))
    try:
        tree = Tree()
        walk(root, "", tree)
        mounted = sorted(set(tree.mounts).union(mounts_inside(run)), key=os.fsencode)
        if mounted:
            return LocalScan(LocalCheck(refusal=describe(mounted), refusal_code=CleanupCode.RUN_HOLDS_MOUNT))
        if tree.unreadable:
            return LocalScan(
                LocalCheck(
                    refusal=f"cannot read folder: {policy.name_paths(tree.unreadable)}",
                    refusal_code=CleanupCode.LOCAL_UNREADABLE,
                )
            )
        # No ctime kept: no stat vouches for the bytes, and the plan's files are read again at their unlink.
        ctime_kept = keeps_ctime(run)
        added = sorted((p for p in tree.files if p not in manifest), key=os.fsencode)
        changed: list[str] = []
        damaged: list[str] = []
        missing: list[str] = []
        rehashed: list[str] = []
        planned: list[PlannedFile] = []
        verified_ns = _verified_bound(root, verified_at)
        for rel in sorted(manifest, key=os.fsencode):
            want = manifest[rel].lower()
            st = tree.files.get(rel)
            if st is None:
                if rel in tree.others or rel in tree.dirs or _replaced_ancestor(rel, tree):
                    changed.append(rel)
                else:
                    missing.append(rel)
                continue
            record = verified.get(rel)
            if record is not None and record.sha256 != want:
                record = None  # recorded for another content: vouches for nothing
            if ctime_kept and record is not None and record.matches(st):
                planned.append(PlannedFile(rel, st.st_size, st.st_mtime_ns, st.st_ino, want, st.st_ctime_ns))
                continue
            rehashed.append(rel)
            parents, name = split_path(rel)
            try:
                folder = open_dir_chain(root, parents)
            except FileNotFoundError:
                missing.append(rel)
                continue
            except OSError:
                changed.append(rel)
                continue
            try:
                digest, before, after = _steady_read(folder, name)
            except FileNotFoundError:
                missing.append(rel)
                continue
            except OSError as exc:
                # A bad sector is no edit: never sent (nor its NAS copy moved aside for it). Anything
                # else: it became a symlink or a folder under us, or cannot be opened (sent as it is).
                (damaged if exc.errno == errno.EIO else changed).append(rel)
                continue
            finally:
                os.close(folder)
            # Every read saw a write: an edit under way when the mtime moved on; else judged by its
            # bytes like any other file (metadata churning under a rotted file). So is a file replaced
            # since the listing (another inode): a save through a rename moves the mtime on.
            if not steady(before, after) and not _damage(after, record, verified_ns, digest):
                changed.append(rel)
                continue
            if digest == want:
                ctime = after.st_ctime_ns if ctime_kept else None
                planned.append(PlannedFile(rel, after.st_size, after.st_mtime_ns, after.st_ino, want, ctime))
            else:
                (damaged if _damage(after, record, verified_ns, digest) else changed).append(rel)
        check = LocalCheck(added=tuple(added), changed=tuple(changed), damaged=tuple(damaged), missing=tuple(missing))
        return LocalScan(check, tuple(planned) if check.clean else (), tuple(rehashed))
    finally:
        os.close(root)


# --------------------------------------------------------------------------- no recorded stat: the NAS copy's


def _below_any(rel: str, mounted: tuple[str, ...]) -> bool:
    """Is ``rel`` one of the ``mounted`` paths, or below one?"""
    return any(rel == m or rel.startswith(m + "/") for m in mounted)


#: How much later than its NAS copy's mtime a local file's may be and still be the copy's time: FAT
#: keeps 2 s, exFAT 10 ms, many backends 1 ms, and each truncates (or rounds) the time it was sent.
COPY_TIME_SLACK_NS = 2_000_000_000


def check_against_copy(
    run_path: Path | str, manifest: Mapping[str, str], copies: Mapping[str, RemoteFile]
) -> tuple[tuple[str, ...], dict[str, StatRow]]:
    """The local check of a run whose verified stats the queue does not hold, against its NAS copy. Blocking I/O.

    ``manifest``: the run's own ``checksums.sha256`` (data files), which its
    NAS folder holds too (the run's own verified copy); ``copies``: that
    folder's files with their size and mtime (``Transport.remote_stats``).
    Every transport gives a file it sends the local mtime, so a verified
    copy's size and mtime are the ones its local file had when those bytes
    were sent: they stand in for the stats recorded at verification (lost with
    the queue), under :func:`_damage`'s rule. A NAS keeps mtimes to its own
    precision (2 s on FAT, 10 ms on exFAT, 1 ms on many backends; whole
    seconds as rsync and sftp list them): a local mtime up to
    :data:`COPY_TIME_SLACK_NS` past its copy's is the copy's time.

    Returns ``(damaged, rows)``. ``damaged``: the files whose bytes differ
    from the manifest while their mtime is not later than their copy's (size
    the same or not; but a write stamped by a clock behind the copy's mtime
    that gave the file another size is an edit, :func:`_written_behind`).
    Only those files are read: a later mtime is an edit,
    sent as such (the push keeps the replaced NAS copy). ``rows``: for each
    file the NAS holds, the stat its copy vouches for (the copy's size, the
    local mtime when it is the copy's, else the copy's), not trusted (the
    reaper and ``restore`` re-hash before they rely on it), in the form
    :meth:`~.store.CleanupStore.record_verified` takes. Files the run or the
    NAS does not hold, that are no regular files here, or that are at or
    below a mount point inside the run (another folder's), are left out.
    Never follows a symlink; reads only.
    """
    try:
        root = open_run(Path(run_path))
    except RunFolderError:
        return (), {}
    try:
        tree = Tree()
        walk(root, "", tree)
        mounted = tuple(mounts_inside(run_path))
        damaged: list[str] = []
        rows: dict[str, StatRow] = {}
        for rel in sorted(manifest, key=os.fsencode):
            st, copy = tree.files.get(rel), copies.get(rel)
            if st is None or copy is None or _bad_manifest_path(rel) or _below_any(rel, mounted):
                continue
            want = manifest[rel].lower()
            # The copy's time, to any precision a NAS keeps (exFAT 10 ms, a backend's 1 ms, FAT's 2 s):
            # only a local mtime past it by more than the coarsest is an edit, never hashed.
            same = st.st_mtime_ns <= copy.mtime_ns + COPY_TIME_SLACK_NS
            mtime_ns = st.st_mtime_ns if same and st.st_mtime_ns >= copy.mtime_ns - 1_000 else copy.mtime_ns
            rows[rel] = (want, copy.size, mtime_ns, st.st_ctime_ns, st.st_ino, False, None)
            if not same:
                continue  # edited since its copy was sent
            parents, name = split_path(rel)
            try:
                folder = open_dir_chain(root, parents)
            except OSError:
                continue  # gone or replaced meanwhile: nothing here to send as damage
            try:
                digest, before, after = _steady_read(folder, name)
            except OSError:
                continue
            finally:
                os.close(folder)
            # Written to while read, each time, with the mtime moved on: an edit under way, never damage.
            if (
                digest != want
                and after.st_mtime_ns <= mtime_ns
                and not _written_behind(after, copy.size, (copy.mtime_ns,))
            ):
                damaged.append(rel)
        return tuple(damaged), rows
    finally:
        os.close(root)


def record_copy_stats(
    queue: JobQueue, job_id: str, manifest: Mapping[str, str], rows: Mapping[str, StatRow], now: dt.datetime
) -> int:
    """Record :func:`check_against_copy`'s ``rows`` as the job's verified stats (``manifest``: its data files).

    For a job that takes the run's verified copy on the NAS for its own (its
    queue lost): :func:`scan_run`, and so ``retry``, ``enqueue`` and
    ``restore``, then tell damage from an edit as for a run verified by this
    queue. A verification of the job records its own stats over them.
    """
    return CleanupStore(queue).record_verified(job_id, _data_paths(manifest), rows, now)
