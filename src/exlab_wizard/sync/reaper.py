"""The cleanup reaper: frees the local disk of verified runs, and never loses data.

The reaper carries out the decisions of :mod:`exlab_wizard.sync.policy.cleanup`.
On each pass (:meth:`Reaper.run_pass`):

1. A deletion planned earlier and interrupted (crash, kill, power cut) is
   resumed first, after the interlocks are checked again.
2. A VERIFIED job meeting interlocks 1, 2 and 3 moves to CLEANUP_ELIGIBLE
   (with cleanup disabled it stays VERIFIED).
3. For each CLEANUP_ELIGIBLE job all six interlocks are checked, the costly
   ones last (remote probe, overrides, the local check, then one listing of
   the remote run folder, which must hold every planned file with its size:
   a NAS copy that lost a file or holds one of another size sends the job
   back to QUEUED to send those files again, nothing deleted). A refusal is
   recorded as a ``cleanup_refused`` event, once per reason (not on every
   pass). A local change sends the job back to QUEUED (through the gate, then
   re-synced); local damage or a vanished file sends it to FAILED, nothing
   deleted.
4. Deletion is planned durably, then carried out idempotently:

   a. One transaction writes the plan (every file to delete with the size,
      mtime and inode seen by the check, and its SHA-256) with the manifest
      digest, and the event ``cleanup_planned``.
   b. Each planned file is ``lstat``-ed right before it is unlinked, through
      directory descriptors opened with ``O_NOFOLLOW`` from the run folder
      down: it must still be a regular file with the planned size, mtime and
      inode, else the deletion stops (nothing more is deleted). A file
      already gone is fine (an interrupted pass deleted it). Parent folders
      are fsync-ed.
   c. Folders left empty by the deletion are removed (never a symlink, never
      outside the run, never ``.exlab-wizard/`` while ``retain_cache``).
   d. The equipment log gets ``cleanup_deleted files=N bytes=B
      verify_passes=K pass_times=... manifest_digest=...``; creation.json
      gets ``local_cleaned``. With ``retain_cache: false`` the
      ``.exlab-wizard/`` files and the run folder go only after
      ``push_metadata(job)`` proved the final push (:class:`FinalPush`);
      until then the job waits, the reason recorded once.
   e. One transaction moves the job to CLEANED and drops the plan.

A crash at any point leaves the plan in the queue database; the next pass
resumes at (b), after the interlocks and a new listing of the remote run
folder: files already gone are fine, anything not matching the plan is not
deleted. Only files listed in the verified manifest and matching it
are ever planned, so every local file either still exists or has a verified
copy on the NAS.

The local check needs the size and mtime each file had when it was hashed:
the client calls :func:`record_verified_stat` after every successful
verification, which stores them in the ``verified_files`` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import inspect
import logging
import os
import stat
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.manifest_format import ManifestFormatError, manifest_digest, read_manifest
from exlab_wizard.sync.policy import cleanup as policy
from exlab_wizard.sync.policy.cleanup import CleanupDecision, CleanupFacts, LocalCheck
from exlab_wizard.sync.queue import TRANSITION_EVENT, JobQueue, SyncJobRow
from exlab_wizard.sync.states import IllegalTransition, SyncJobState
from exlab_wizard.sync.transports.base import METADATA_DIR, TransportError, TransportErrorKind

__all__ = [
    "CLEANUP_SCHEMA",
    "FinalPush",
    "LocalScan",
    "PlannedFile",
    "Reaper",
    "ReaperOutcome",
    "VerifiedStat",
    "ensure_cleanup_schema",
    "load_verified_stats",
    "local_data_deleted_at",
    "planned_paths",
    "record_verified_stat",
    "scan_run",
]

logger = logging.getLogger(__name__)

S = SyncJobState

#: Event kinds the reaper writes (besides state transitions).
REFUSED_EVENT = "cleanup_refused"
PLANNED_EVENT = "cleanup_planned"
DELETED_EVENT = "cleanup_deleted"
ABORTED_EVENT = "cleanup_aborted"
NOTE_EVENT = "note"

#: A file whose mtime is this close to (or after) the start of the hashing
#: may have been written while it was hashed: its recorded stat is not
#: trusted, and the reaper re-hashes it before deleting. Covers filesystems
#: with coarse timestamps (FAT: 2 s).
RACE_SLACK_NS = 2_000_000_000

_HASH_CHUNK = 1024 * 1024
_DELETE_BATCH = 256

#: The reaper's tables, created in the queue database on first use.
CLEANUP_SCHEMA = """
CREATE TABLE IF NOT EXISTS verified_files (
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    path        BLOB NOT NULL,
    sha256      TEXT NOT NULL,
    size        INTEGER,
    mtime_ns    INTEGER,
    ctime_ns    INTEGER,
    ino         TEXT,
    trusted     INTEGER NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (job_id, path)
);
CREATE TABLE IF NOT EXISTS cleanup_progress (
    job_id          TEXT PRIMARY KEY REFERENCES jobs (id),
    run_path        TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    planned_at      TEXT NOT NULL,
    files           INTEGER NOT NULL,
    bytes           INTEGER NOT NULL,
    data_deleted_at TEXT
);
CREATE TABLE IF NOT EXISTS cleanup_plan (
    job_id          TEXT NOT NULL REFERENCES jobs (id),
    path            BLOB NOT NULL,
    size            INTEGER NOT NULL,
    mtime_ns        INTEGER NOT NULL,
    ino             TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    PRIMARY KEY (job_id, path)
);
"""


# --------------------------------------------------------------------------- small helpers


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ts(moment: dt.datetime) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment!r}: pass a timezone-aware time")
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _from_ts(text: str | None) -> dt.datetime | None:
    return None if text is None else dt.datetime.fromisoformat(text)


def _path_key(path: str) -> bytes:
    # Stored as bytes: a name that is not valid UTF-8 survives the round trip.
    return os.fsencode(path)


def _path_text(blob: bytes | str) -> str:
    return os.fsdecode(blob)


#: Queues whose database already has the reaper's tables (one check per queue object:
#: a database file removed and created again gets a new JobQueue, so a reused inode
#: number cannot make us skip the tables).
_SCHEMA_READY: weakref.WeakSet[JobQueue] = weakref.WeakSet()


def ensure_cleanup_schema(queue: JobQueue) -> None:
    """Create the reaper's tables in the queue database if they are missing. Idempotent."""
    if queue in _SCHEMA_READY:
        return
    with queue.transaction() as conn:
        for statement in CLEANUP_SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
    _SCHEMA_READY.add(queue)


def _utc_text(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- verified stats


@dataclass(frozen=True)
class VerifiedStat:
    """A file's metadata as recorded when its content was verified.

    ``trusted`` is False when the file may have been written while it was
    hashed (or was not a regular file then): the reaper re-hashes such a file
    before deleting it. ``size``/``mtime_ns``/``ctime_ns``/``ino`` are None
    when the file could not be stat-ed.
    """

    path: str
    sha256: str
    size: int | None
    mtime_ns: int | None
    ctime_ns: int | None
    ino: int | None
    trusted: bool

    def matches(self, st: os.stat_result) -> bool:
        """Same size, mtime, ctime and inode as ``st``, and trusted."""
        return (
            self.trusted
            and self.size == st.st_size
            and self.mtime_ns == st.st_mtime_ns
            and self.ctime_ns == st.st_ctime_ns
            and self.ino == st.st_ino
        )


def _data_paths(hashes: Mapping[str, str]) -> dict[str, str]:
    prefix = METADATA_DIR + "/"
    return {str(k): str(v).lower() for k, v in hashes.items() if k != METADATA_DIR and not str(k).startswith(prefix)}


def _hashing_started(queue: JobQueue, job_id: str) -> dt.datetime | None:
    """When the job last entered RUNNING: no local hashing of this copy began earlier."""
    for event in reversed(queue.events(job_id)):
        if event.kind == TRANSITION_EVENT and event.to_state == S.RUNNING.value:
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
) -> int:
    """Record the size, mtime, ctime and inode of each verified file. Call after every successful verification.

    ``hashes`` is the verified local manifest (``{relative path: sha256}``;
    ``.exlab-wizard/`` entries are ignored). ``hashed_since`` is when the
    local hashing began; by default the time the job last entered RUNNING
    (the earliest the hashing can have begun). A file modified within
    :data:`RACE_SLACK_NS` of that time, or later, may not hold the hashed
    bytes: its stat is recorded as not trusted, and the reaper re-hashes it
    before it deletes anything.

    A row whose recorded SHA-256 is unchanged and trusted is kept as it is:
    the first stat recorded for that content stands, so a call made without
    re-reading the local files (an audit pass) never passes a local edit
    off as verified. Rows for files no longer in ``hashes`` are dropped.
    Files missing locally are not recorded (the reaper then re-hashes).

    Returns the number of rows written. Raises like the queue (``JobNotFound``
    is not checked: the foreign key refuses an unknown job).
    """
    ensure_cleanup_schema(queue)
    run = Path(run_path)
    data = _data_paths(hashes)
    since = hashed_since if hashed_since is not None else _hashing_started(queue, job_id)
    since_ns = None if since is None else int(since.timestamp() * 1_000_000_000) - RACE_SLACK_NS
    stamp = _ts(now)
    stats: dict[str, tuple[Any, ...]] = {}
    for rel, sha in data.items():
        try:
            st = os.lstat(run / rel)
        except OSError:
            continue
        regular = stat.S_ISREG(st.st_mode)
        trusted = regular and since_ns is not None and st.st_mtime_ns < since_ns and st.st_ctime_ns < since_ns
        stats[rel] = (sha, st.st_size, st.st_mtime_ns, st.st_ctime_ns, str(st.st_ino), 1 if trusted else 0)
    written = 0
    with queue.transaction() as conn:
        existing = {
            _path_text(row["path"]): row
            for row in conn.execute("SELECT * FROM verified_files WHERE job_id = ?", (job_id,)).fetchall()
        }
        for rel, row in existing.items():
            if rel not in data:
                conn.execute("DELETE FROM verified_files WHERE job_id = ? AND path = ?", (job_id, _path_key(rel)))
        for rel, (sha, size, mtime_ns, ctime_ns, ino, trusted) in stats.items():
            old = existing.get(rel)
            if old is not None and old["sha256"] == sha and old["trusted"]:
                continue
            conn.execute(
                "INSERT OR REPLACE INTO verified_files"
                " (job_id, path, sha256, size, mtime_ns, ctime_ns, ino, trusted, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, _path_key(rel), sha, size, mtime_ns, ctime_ns, ino, trusted, stamp),
            )
            written += 1
        for rel in data:
            if rel not in stats and rel in existing and existing[rel]["sha256"] != data[rel]:
                # New content verified, file not stat-able now: the old stat must not vouch for it.
                conn.execute("DELETE FROM verified_files WHERE job_id = ? AND path = ?", (job_id, _path_key(rel)))
    return written


def load_verified_stats(queue: JobQueue, job_id: str) -> dict[str, VerifiedStat]:
    """The recorded stats of a job's verified files, by relative path."""
    ensure_cleanup_schema(queue)
    with queue.transaction() as conn:
        rows = conn.execute("SELECT * FROM verified_files WHERE job_id = ?", (job_id,)).fetchall()
    out = {}
    for row in rows:
        rel = _path_text(row["path"])
        out[rel] = VerifiedStat(
            path=rel,
            sha256=row["sha256"],
            size=row["size"],
            mtime_ns=row["mtime_ns"],
            ctime_ns=row["ctime_ns"],
            ino=None if row["ino"] is None else int(row["ino"]),
            trusted=bool(row["trusted"]),
        )
    return out


def local_data_deleted_at(queue: JobQueue, job_id: str) -> dt.datetime | None:
    """When the reaper finished deleting the job's local data, or None (not deleted, or no plan).

    Set between the deletion of the data and CLEANED (with ``retain_cache:
    false`` the job may wait there for the final metadata push). Such a job
    has no local data to audit or send again.
    """
    ensure_cleanup_schema(queue)
    with queue.transaction() as conn:
        row = conn.execute("SELECT data_deleted_at FROM cleanup_progress WHERE job_id = ?", (job_id,)).fetchone()
    return None if row is None else _from_ts(row["data_deleted_at"])


def planned_paths(queue: JobQueue, job_id: str) -> frozenset[str]:
    """The data files the job's cleanup plan deletes (or deleted); empty without a plan.

    The plan outlives the manifest: with ``retain_cache: false`` a pass
    interrupted while removing ``.exlab-wizard/`` may leave the plan and no
    ``checksums.sha256``.
    """
    ensure_cleanup_schema(queue)
    with queue.transaction() as conn:
        rows = conn.execute("SELECT path FROM cleanup_plan WHERE job_id = ?", (job_id,)).fetchall()
    return frozenset(_path_text(row["path"]) for row in rows)


# --------------------------------------------------------------------------- no-follow file access

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | _CLOEXEC
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC


class _RunFolderError(Exception):
    """The run folder cannot be opened as a real folder; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _open_run(run_path: Path) -> int:
    """The run folder as a directory descriptor; never through a symlink at its last component."""
    try:
        return os.open(run_path, _DIR_FLAGS)
    except FileNotFoundError:
        raise _RunFolderError("run folder missing") from None
    except OSError as exc:
        if os.path.islink(run_path):
            raise _RunFolderError("run folder is a symlink") from None
        if exc.errno in (getattr(os, "ELOOP", -1), getattr(os, "ENOTDIR", -1)):
            raise _RunFolderError("run folder is not a folder") from None
        raise _RunFolderError(f"cannot open run folder: {exc.strerror or exc}") from None


def _open_dir_chain(root_fd: int, parts: Sequence[str]) -> int:
    """Descend from ``root_fd`` through ``parts`` with ``O_NOFOLLOW`` at each step.

    Returns a new descriptor (the caller closes it). Raises ``OSError``:
    ``ENOENT`` when a folder is gone, ``ELOOP``/``ENOTDIR`` when one was
    replaced by a symlink or a file.
    """
    fd = os.dup(root_fd)
    try:
        for part in parts:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _split(rel: str) -> tuple[list[str], str]:
    parts = rel.split("/")
    return parts[:-1], parts[-1]


def _hash_at(dir_fd: int, name: str) -> tuple[str, os.stat_result, os.stat_result]:
    """SHA-256 of a regular file opened without following symlinks, with its stat before and after."""
    fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise IsADirectoryError(name)
        digest = hashlib.sha256()
        while True:
            chunk = os.read(fd, _HASH_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    return digest.hexdigest(), before, after


# --------------------------------------------------------------------------- the local check


@dataclass(frozen=True)
class PlannedFile:
    """One file the deletion may remove, with the stat it must still have."""

    path: str
    size: int
    mtime_ns: int
    ino: int
    sha256: str


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


@dataclass
class _Tree:
    files: dict[str, os.stat_result] = dataclasses.field(default_factory=dict)
    others: dict[str, str] = dataclasses.field(default_factory=dict)  # symlinks, sockets, ...
    dirs: set[str] = dataclasses.field(default_factory=set)
    unreadable: list[str] = dataclasses.field(default_factory=list)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "folder"
    return "special file"


def _walk(dir_fd: int, rel: str, tree: _Tree, *, skip_metadata: bool = True) -> None:
    """Every entry under ``dir_fd`` (lstat), never following a symlink; ``.exlab-wizard/`` skipped at the top."""
    subdirs = []
    try:
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                name = entry.name
                if skip_metadata and not rel and name == METADATA_DIR:
                    continue
                path = f"{rel}/{name}" if rel else name
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    tree.files[path] = st
                elif stat.S_ISDIR(st.st_mode):
                    tree.dirs.add(path)
                    subdirs.append((name, path))
                else:
                    tree.others[path] = _kind(st.st_mode)
    except OSError as exc:
        tree.unreadable.append(f"{rel or '.'} ({exc.strerror or exc})")
        return
    for name, path in subdirs:
        try:
            sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            tree.dirs.discard(path)
            continue
        except OSError as exc:
            if exc.errno in (getattr(os, "ELOOP", -1), getattr(os, "ENOTDIR", -1)):
                tree.dirs.discard(path)
                tree.others[path] = "symlink"
                continue
            tree.unreadable.append(f"{path} ({exc.strerror or exc})")
            continue
        try:
            _walk(sub, path, tree, skip_metadata=skip_metadata)
        finally:
            os.close(sub)


def _bad_manifest_path(rel: str) -> bool:
    if not rel or rel.startswith("/") or "\x00" in rel:
        return True
    parts = rel.split("/")
    return any(part in ("", ".", "..") for part in parts) or parts[0] == METADATA_DIR


def _replaced_ancestor(rel: str, tree: _Tree) -> bool:
    parts = rel.split("/")
    for i in range(1, len(parts)):
        prefix = "/".join(parts[:i])
        if prefix in tree.others or prefix in tree.files:
            return True
    return False


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

    - same size, mtime, ctime and inode (and trusted): unchanged, not read;
    - otherwise re-hashed: the same content -> unchanged (touched, copied
      back, or recorded while possibly being written); different content
      with a new mtime -> ``changed`` (an edit); different content with the
      recorded mtime -> ``damaged`` (bytes changed behind the filesystem's
      back). With no recorded stat at all, a new content is ``changed`` when
      the file's mtime is after ``verified_at``, else ``damaged``;
    - no longer a regular file (a symlink, a folder), or a parent folder
      replaced by a symlink -> ``changed``; gone -> ``missing``.

    A regular file the manifest does not list is ``added``; symlinks and
    special files the manifest does not list are ignored (they are never
    synced, and never deleted). A folder that cannot be read is a refusal
    (its files cannot be checked).
    """
    run = Path(run_path)
    for rel in manifest:
        if _bad_manifest_path(rel):
            return LocalScan(LocalCheck(refusal=f"manifest lists a path outside the run data: {rel!r}"))
    try:
        root = _open_run(run)
    except _RunFolderError as exc:
        return LocalScan(LocalCheck(refusal=exc.reason))
    try:
        tree = _Tree()
        _walk(root, "", tree)
        if tree.unreadable:
            return LocalScan(LocalCheck(refusal=f"cannot read folder: {policy.name_paths(tree.unreadable)}"))
        added = sorted((p for p in tree.files if p not in manifest), key=os.fsencode)
        changed: list[str] = []
        damaged: list[str] = []
        missing: list[str] = []
        rehashed: list[str] = []
        planned: list[PlannedFile] = []
        verified_ns = None if verified_at is None else int(verified_at.timestamp() * 1_000_000_000)
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
            if record is not None and record.matches(st):
                planned.append(PlannedFile(rel, st.st_size, st.st_mtime_ns, st.st_ino, want))
                continue
            rehashed.append(rel)
            parents, name = _split(rel)
            try:
                folder = _open_dir_chain(root, parents)
            except FileNotFoundError:
                missing.append(rel)
                continue
            except OSError:
                changed.append(rel)
                continue
            try:
                digest, before, after = _hash_at(folder, name)
            except FileNotFoundError:
                missing.append(rel)
                continue
            except OSError:
                changed.append(rel)  # became a symlink or a folder under us
                continue
            finally:
                os.close(folder)
            if (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
                after.st_size, after.st_mtime_ns, after.st_ctime_ns
            ) or before.st_ino != st.st_ino:
                changed.append(rel)  # being written right now
                continue
            if digest == want:
                planned.append(PlannedFile(rel, after.st_size, after.st_mtime_ns, after.st_ino, want))
            elif record is not None:
                (damaged if after.st_mtime_ns == record.mtime_ns else changed).append(rel)
            elif verified_ns is not None and after.st_mtime_ns > verified_ns:
                changed.append(rel)
            else:
                damaged.append(rel)
        check = LocalCheck(
            added=tuple(added), changed=tuple(changed), damaged=tuple(damaged), missing=tuple(missing)
        )
        return LocalScan(check, tuple(planned) if check.clean else (), tuple(rehashed))
    finally:
        os.close(root)


# --------------------------------------------------------------------------- deletion primitives


@dataclass
class _DeleteResult:
    deleted: int = 0
    gone: int = 0
    bytes_deleted: int = 0
    stop: str | None = None        # a reason: nothing more was deleted
    stop_fatal: bool = False       # the plan can never complete (FAILED) vs. try again later
    stop_path: str | None = None


def _delete_batch(run_path: Path, batch: Sequence[PlannedFile]) -> _DeleteResult:
    """Unlink the planned files of ``batch`` that still match the plan. Blocking I/O.

    Stops at the first file that does not match (nothing more deleted).
    Folders are fsync-ed after their files are unlinked.
    """
    result = _DeleteResult()
    try:
        root = _open_run(run_path)
    except _RunFolderError as exc:
        result.stop = exc.reason
        return result
    try:
        groups: dict[tuple[str, ...], list[PlannedFile]] = {}
        for item in batch:
            parents, _ = _split(item.path)
            groups.setdefault(tuple(parents), []).append(item)
        for parents, items in groups.items():
            try:
                folder = _open_dir_chain(root, parents)
            except FileNotFoundError:
                result.gone += len(items)  # the whole folder is gone: so are its files
                continue
            except OSError as exc:
                result.stop = f"folder replaced since the plan: {'/'.join(parents)} ({exc.strerror or exc})"
                result.stop_fatal, result.stop_path = True, items[0].path
                return result
            try:
                unlinked = False
                for item in items:
                    _, name = _split(item.path)
                    try:
                        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
                    except FileNotFoundError:
                        result.gone += 1
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        result.stop = f"not a regular file any more: {item.path} ({_kind(st.st_mode)})"
                    elif (st.st_size, st.st_mtime_ns, st.st_ino) != (item.size, item.mtime_ns, item.ino):
                        result.stop = f"local file changed since the plan: {item.path}"
                    if result.stop is not None:
                        result.stop_fatal, result.stop_path = True, item.path
                        break
                    try:
                        os.unlink(name, dir_fd=folder)
                    except FileNotFoundError:
                        result.gone += 1
                        continue
                    except OSError as exc:
                        result.stop = f"cannot delete {item.path}: {exc.strerror or exc}"
                        result.stop_path = item.path
                        break
                    unlinked = True
                    result.deleted += 1
                    result.bytes_deleted += item.size
                if unlinked:
                    os.fsync(folder)
            finally:
                os.close(folder)
            if result.stop is not None:
                return result
    finally:
        os.close(root)
    return result


def _remove_left_empty(run_path: Path, paths: Iterable[str]) -> list[str]:
    """Remove the folders that held the given files and are now empty, deepest first. Blocking I/O.

    Never the run folder itself, never a symlink (``rmdir`` does not follow
    one), never a folder outside the run (descent uses ``O_NOFOLLOW``).
    Returns the folders removed.
    """
    candidates: set[tuple[str, ...]] = set()
    for rel in paths:
        parents, _ = _split(rel)
        for i in range(1, len(parents) + 1):
            candidates.add(tuple(parents[:i]))
    removed: list[str] = []
    try:
        root = _open_run(run_path)
    except _RunFolderError:
        return removed
    try:
        for folder in sorted(candidates, key=lambda p: (-len(p), p)):
            try:
                parent = _open_dir_chain(root, folder[:-1])
            except OSError:
                continue
            try:
                os.rmdir(folder[-1], dir_fd=parent)
            except OSError:
                pass  # not empty, already gone, or not a folder: leave it
            else:
                removed.append("/".join(folder))
                os.fsync(parent)
            finally:
                os.close(parent)
    finally:
        os.close(root)
    return removed


def _metadata_snapshot(run_path: Path) -> tuple[list[tuple[str, int, int, int]], list[str]]:
    """Regular files under ``.exlab-wizard/`` (path, size, mtime_ns, inode), and its folders (deepest first)."""
    files: list[tuple[str, int, int, int]] = []
    folders: list[str] = []
    root = _open_run(run_path)
    try:
        try:
            meta = os.open(METADATA_DIR, _DIR_FLAGS, dir_fd=root)
        except FileNotFoundError:
            return files, folders
        tree = _Tree()
        try:
            _walk(meta, "", tree, skip_metadata=False)
        finally:
            os.close(meta)
    finally:
        os.close(root)
    if tree.unreadable:
        raise OSError(f"cannot read {METADATA_DIR}/{tree.unreadable[0]}")
    for rel, st in tree.files.items():
        files.append((f"{METADATA_DIR}/{rel}", st.st_size, st.st_mtime_ns, st.st_ino))
    folders = [f"{METADATA_DIR}/{d}" for d in sorted(tree.dirs, key=lambda p: (-p.count("/"), p))]
    folders.append(METADATA_DIR)
    return files, folders


def _remove_metadata(run_path: Path, files: Sequence[tuple[str, int, int, int]], folders: Sequence[str]) -> str | None:
    """Delete the snapshotted ``.exlab-wizard/`` files that did not change, then its empty folders.

    Returns a reason when something changed after the snapshot (nothing of
    it deleted then), else None.
    """
    planned = [PlannedFile(rel, size, mtime_ns, ino, "") for rel, size, mtime_ns, ino in files]
    result = _delete_batch(run_path, planned)
    if result.stop is not None:
        return result.stop
    try:
        root = _open_run(run_path)
    except _RunFolderError as exc:
        return exc.reason
    try:
        for rel in folders:
            parents, name = _split(rel)
            try:
                parent = _open_dir_chain(root, parents)
            except OSError:
                continue
            try:
                os.rmdir(name, dir_fd=parent)
                os.fsync(parent)
            except OSError:
                pass
            finally:
                os.close(parent)
    finally:
        os.close(root)
    return None


def _remove_run_folder(run_path: Path) -> str | None:
    """``rmdir`` the run folder if it is empty (a symlink is never removed this way). None when removed."""
    if os.path.islink(run_path):
        return "run folder is a symlink"
    try:
        os.rmdir(run_path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"run folder kept: {exc.strerror or exc}"
    with contextlib.suppress(OSError):
        parent = os.open(run_path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
        try:
            os.fsync(parent)
        finally:
            os.close(parent)
    return None


# --------------------------------------------------------------------------- the reaper


@dataclass(frozen=True)
class ReaperOutcome:
    """What a pass did (or, for a dry run, would do) with one job.

    ``action``: ``promoted`` (VERIFIED -> CLEANUP_ELIGIBLE), ``deleted``
    (CLEANED), ``waiting`` (a refusal; ``reason`` says which), ``requeued``,
    ``failed``, ``aborted`` (a deletion stopped part way), ``busy`` (another
    reaper holds the lock), ``error``; for a dry run ``would_delete``,
    ``would_requeue``, ``would_fail``, ``in_progress``. ``files``/``bytes``:
    deleted, or that would be freed. ``paths``: the local paths the outcome
    is about.
    """

    job_id: str
    run_path: str
    action: str
    reason: str
    files: int = 0
    bytes: int = 0
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Progress:
    job_id: str
    run_path: str
    manifest_digest: str
    planned_at: dt.datetime
    files: int
    bytes: int
    data_deleted_at: dt.datetime | None


class _ProcessLock:
    """A non-blocking exclusive lock file: one reaper pass at a time per queue database."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: the asyncio lock and the runner lease suffice
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


@dataclass(frozen=True)
class FinalPush:
    """What the final metadata push (``retain_cache: false``) proved.

    ``verified``: the NAS holds the run's ``.exlab-wizard/``, so the local
    one may go. ``reason``: how that was proved, or what is missing; it is
    recorded with the job (the wait's reason, or the cleaned event).
    """

    verified: bool
    reason: str = ""


RemoteStat = Callable[[SyncJobRow], "bool | Awaitable[bool]"]
RemoteListing = Callable[[SyncJobRow], Awaitable[Mapping[str, int]]]
PushMetadata = Callable[[SyncJobRow], "Awaitable[bool | FinalPush]"]


class Reaper:
    """Carries out cleanup for the jobs of one queue database.

    ``queue``: the :class:`JobQueue`. ``config``: the ``Config`` (its
    ``nas_cleanup`` is read on every pass). ``writer``: a ``CreationWriter``
    (reads overrides, records ``local_cleaned``). ``remote_stat(job)``: is
    the job's remote run root reachable now (bool or awaitable; raising
    counts as unreachable). ``remote_listing(job)``: every regular file of
    the job's remote run folder -> its size, one fresh listing (the
    transport's ``remote_listing``); taken right before a plan is written and
    before a resumed plan deletes more, it must show every planned file with
    its size. Raising (``TransportError(NETWORK)`` for an unreachable remote)
    makes the job wait; without it nothing is ever deleted. ``log_for(equipment_id)``: the job's
    :class:`EquipmentLog` (raising refuses the deletion: nothing is deleted
    unlogged). ``push_metadata(job)``: the final push of ``.exlab-wizard/``,
    a :class:`FinalPush` (or True only when verified on the NAS); needed
    only with ``retain_cache: false``. ``now()``: the clock (timezone-aware).

    One pass at a time per database: passes in one process are serialised,
    and a lock file ``<queue db>.reaper.lock`` keeps a second process (the
    CLI beside ``serve``) out while a pass runs.
    """

    def __init__(
        self,
        queue: JobQueue,
        config: Any,
        *,
        writer: Any,
        remote_stat: RemoteStat,
        log_for: Callable[[str], EquipmentLog],
        push_metadata: PushMetadata | None = None,
        now: Callable[[], dt.datetime] = _utcnow,
        remote_listing: RemoteListing | None = None,
    ):
        self.queue = queue
        self.config = config
        self.writer = writer
        self.remote_stat = remote_stat
        self.remote_listing = remote_listing
        self.log_for = log_for
        self.push_metadata = push_metadata
        self.now = now
        self._lock = asyncio.Lock()
        self._file_lock = _ProcessLock(Path(str(queue.db_path) + ".reaper.lock"))

    # ------------------------------------------------------------ public

    async def run_pass(self) -> list[ReaperOutcome]:
        """One pass: resume interrupted deletions, promote, then check and clean eligible jobs.

        Returns one outcome per job looked at. Never raises for one job's
        trouble: an unexpected error becomes an ``error`` outcome and a
        refusal event, and the job is tried again next pass.
        """
        async with self._lock:
            if not self._file_lock.acquire():
                return [ReaperOutcome("", "", "busy", "another cleanup pass is running on this queue")]
            try:
                ensure_cleanup_schema(self.queue)
                return await self._pass()
            finally:
                self._file_lock.release()

    async def plan(self, dry_run: bool = True) -> list[ReaperOutcome]:
        """What a pass would do, changing nothing (``exlab-sync cleanup --dry-run``).

        For each VERIFIED or CLEANUP_ELIGIBLE job: ``would_delete`` with the
        files and bytes it would free, or why it waits (``waiting``), or
        ``would_requeue`` / ``would_fail`` with the local paths, or
        ``in_progress`` for a deletion already planned. The remote is
        probed and the local run checked (read only); no event is recorded.
        With ``dry_run=False`` this is :meth:`run_pass`.
        """
        if not dry_run:
            return await self.run_pass()
        ensure_cleanup_schema(self.queue)
        outcomes: list[ReaperOutcome] = []
        progress = self._progress_rows()
        for state in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
            for job in self.queue.list_jobs(state=state):
                try:
                    outcomes.append(await self._dry_run_job(job, progress.get(job.id)))
                except Exception as exc:  # a dry run reports, it never stops
                    outcomes.append(ReaperOutcome(job.id, job.run_path, "error", f"{type(exc).__name__}: {exc}"))
        return outcomes

    # ------------------------------------------------------------ the pass

    async def _pass(self) -> list[ReaperOutcome]:
        outcomes: list[ReaperOutcome] = []
        progress = self._progress_rows()
        for row in sorted(progress.values(), key=lambda p: p.planned_at):
            outcomes.append(await self._guarded(row.job_id, row.run_path, self._resume(row)))
        for job in self.queue.list_jobs(state=S.VERIFIED):
            outcomes.append(await self._guarded(job.id, job.run_path, self._promote(job)))
        for job in self.queue.list_jobs(state=S.CLEANUP_ELIGIBLE):
            if job.id in progress:
                continue
            outcomes.append(await self._guarded(job.id, job.run_path, self._consider(job)))
        return [o for o in outcomes if o is not None]

    async def _guarded(self, job_id: str, run_path: str, work: Awaitable[ReaperOutcome | None]) -> ReaperOutcome | None:
        try:
            return await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("cleanup of job %s failed", job_id)
            reason = f"cleanup error: {type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                self._refuse_event(job_id, reason)
            return ReaperOutcome(job_id, run_path, "error", reason)

    async def _promote(self, job: SyncJobRow) -> ReaperOutcome | None:
        ok, reason = policy.eligible_to_promote(job, self.config, self.now())
        if not ok:
            self._refuse_event(job.id, reason)
            return ReaperOutcome(job.id, job.run_path, "waiting", reason)
        try:
            self.queue.transition(job.id, S.VERIFIED, S.CLEANUP_ELIGIBLE, now=self.now(), detail=reason)
        except IllegalTransition:
            return None  # moved on meanwhile (an audit failed): nothing to do
        return ReaperOutcome(job.id, job.run_path, "promoted", reason)

    # ------------------------------------------------------------ facts

    async def _reachable(self, job: SyncJobRow) -> bool:
        try:
            answer = self.remote_stat(job)
            if inspect.isawaitable(answer):
                answer = await answer
            return bool(answer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.info("remote probe for job %s failed: %s", job.id, exc)
            return False

    async def _remote_check(self, job: SyncJobRow, expected: Mapping[str, int]) -> policy.RemoteCheck:
        """One listing of the remote run folder, compared with the sizes it must hold (interlock 4)."""
        if self.remote_listing is None:
            return policy.RemoteCheck(
                refusal="remote run folder cannot be listed: nothing is deleted without a listing"
            )
        try:
            listing = await self.remote_listing(job)
            if not isinstance(listing, Mapping):
                raise TypeError(f"remote listing returned {type(listing).__name__}, not a mapping")
        except asyncio.CancelledError:
            raise
        except TransportError as exc:
            logger.info("remote listing for job %s failed: %s", job.id, exc)
            if exc.kind == TransportErrorKind.NETWORK:
                return policy.RemoteCheck(refusal=f"remote unreachable: {exc.message}")
            return policy.RemoteCheck(refusal=f"remote listing failed: {exc.kind.value}: {exc.message}")
        except Exception as exc:
            logger.info("remote listing for job %s failed: %s", job.id, exc)
            return policy.RemoteCheck(refusal=f"remote listing failed: {type(exc).__name__}: {exc}")
        return policy.check_remote(expected, listing)

    def _overrides(self, job: SyncJobRow, now: dt.datetime) -> tuple[tuple[str, ...], str | None]:
        """(ids no longer active, error reading them)."""
        ids = tuple(job.overrides_relied_on)
        if not ids:
            return (), None
        from exlab_wizard.validator.overrides import revoked_or_expired

        try:
            creation = self.writer.read(Path(job.run_path))
        except Exception as exc:
            return (), f"creation.json unreadable: {exc}"
        entries = list(creation.validation_overrides) if creation is not None else []
        return tuple(revoked_or_expired(ids, entries, now)), None

    def _scan(self, job: SyncJobRow) -> LocalScan:
        run = Path(job.run_path)
        if os.path.islink(run):
            return LocalScan(LocalCheck(refusal="run folder is a symlink"))
        try:
            manifest = read_manifest(run)
        except ManifestFormatError as exc:
            return LocalScan(LocalCheck(refusal=f"manifest unreadable: {exc}"))
        except OSError as exc:
            if not run.exists():
                return LocalScan(LocalCheck(refusal="run folder missing"))
            return LocalScan(LocalCheck(refusal=f"manifest unreadable: {exc.strerror or exc}"))
        if manifest is None:
            if not run.exists():
                return LocalScan(LocalCheck(refusal="run folder missing"))
            return LocalScan(LocalCheck(refusal="no recorded manifest"))
        if not job.manifest_digest:
            return LocalScan(LocalCheck(refusal="no verified manifest digest on the job"))
        if manifest_digest(manifest) != job.manifest_digest:
            return LocalScan(LocalCheck(refusal="manifest changed since verification"))
        if not manifest:
            return LocalScan(LocalCheck(refusal="manifest lists no files"))
        verified = load_verified_stats(self.queue, job.id)
        return scan_run(run, manifest, verified, verified_at=job.verified_at)

    def _base_facts(self, job: SyncJobRow, now: dt.datetime) -> CleanupFacts:
        cleanup = self.config.nas_cleanup
        return CleanupFacts(
            enabled=cleanup.enabled,
            verify_passes=job.verify_passes,
            min_verify_passes=cleanup.min_verify_passes,
            verified_at=job.verified_at,
            min_age_hours=cleanup.min_age_hours,
            now=now,
            metadata_push_pending=job.metadata_push_pending,
        )

    async def _decide(
        self, job: SyncJobRow, *, local: bool, planned: Sequence[PlannedFile] | None = None
    ) -> tuple[CleanupDecision, LocalScan | None]:
        """Gather facts as far as they matter and decide.

        ``local=False`` treats interlock 6 as holding; the remote listing is
        then compared with ``planned`` (a resumed plan), or treated as holding
        when ``planned`` is None (the data are deleted already).
        """
        now = self.now()
        facts = self._base_facts(job, now)
        scan: LocalScan | None = None
        while True:
            decision = policy.decide(facts)
            if decision.action != "check":
                return decision, scan
            if decision.needs == "remote_reachable":
                facts = dataclasses.replace(facts, remote_reachable=await self._reachable(job))
            elif decision.needs == "overrides":
                gone, error = await asyncio.to_thread(self._overrides, job, now)
                facts = dataclasses.replace(facts, overrides_no_longer_active=gone, override_check_error=error)
            elif decision.needs == "remote_listing":
                files = scan.files if scan is not None else planned
                if files is None:
                    facts = dataclasses.replace(facts, remote=policy.RemoteCheck())
                else:
                    expected = {f.path: f.size for f in files}
                    facts = dataclasses.replace(facts, remote=await self._remote_check(job, expected))
            elif local:
                scan = await asyncio.to_thread(self._scan, job)
                facts = dataclasses.replace(facts, local=scan.check)
            else:
                facts = dataclasses.replace(facts, local=LocalCheck())

    # ------------------------------------------------------------ events

    def _refuse_event(self, job_id: str, reason: str) -> bool:
        """Record a refusal unless the last one since the job's last transition says the same."""
        key = policy.refusal_key(reason)
        for event in reversed(self.queue.events(job_id, limit=100)):
            if event.kind == TRANSITION_EVENT:
                break
            if event.kind == REFUSED_EVENT:
                if policy.refusal_key(event.detail) == key:
                    return False
                break
        self.queue.record_event(job_id, REFUSED_EVENT, reason, now=self.now())
        return True

    def _log(self, job: SyncJobRow) -> EquipmentLog:
        return self.log_for(job.equipment_id)

    # ------------------------------------------------------------ one eligible job

    async def _consider(self, job: SyncJobRow) -> ReaperOutcome:
        try:
            log = self._log(job)
        except Exception as exc:
            reason = f"equipment log unavailable: {exc}"
            self._refuse_event(job.id, reason)
            return ReaperOutcome(job.id, job.run_path, "waiting", reason)
        decision, scan = await self._decide(job, local=True)
        if decision.action == "wait":
            if self._refuse_event(job.id, decision.reason) and decision.interlock >= 4:
                log.info(job.run_path, "cleanup_refused", job=job.id, reason=decision.reason)
            return ReaperOutcome(job.id, job.run_path, "waiting", decision.reason)
        if decision.action == "requeue":
            if decision.interlock == 4:
                return self._requeue_incomplete(job, decision, log)
            return self._requeue(job, decision, log)
        if decision.action == "fail":
            return self._fail(job, decision, log)
        assert decision.action == "delete" and scan is not None
        progress = self._write_plan(job, scan, log)
        if progress is None:
            return ReaperOutcome(job.id, job.run_path, "waiting", "job changed while it was checked")
        return await self._execute(job, progress, log, resumed=False)

    def _requeue(self, job: SyncJobRow, decision: CleanupDecision, log: EquipmentLog) -> ReaperOutcome:
        detail = f"{decision.reason}; nothing deleted, back through the gate for a new transfer"
        try:
            self.queue.transition(
                job.id, S.CLEANUP_ELIGIBLE, S.QUEUED, now=self.now(), detail=detail,
                error_kind=decision.error_kind, last_error=decision.reason, attempts=0, mismatch_count=0,
                next_attempt_at=None, verify_passes=0, verified_at=None, pass_times=(),
            )
        except IllegalTransition:
            return ReaperOutcome(job.id, job.run_path, "waiting", "job changed while it was checked")
        log.warning(job.run_path, "cleanup_requeued", job=job.id, reason=decision.reason, paths=len(decision.paths))
        return ReaperOutcome(job.id, job.run_path, "requeued", decision.reason, paths=decision.paths)

    def _requeue_incomplete(self, job: SyncJobRow, decision: CleanupDecision, log: EquipmentLog) -> ReaperOutcome:
        """The NAS copy lost files (or holds them with another size): send them again, delete nothing.

        The local check ran first and found the verified bytes, so they may be
        sent. Counted as the first mismatch of the retry policy (as an audit
        mismatch is): a second one after the re-transfer is FAILED.
        """
        detail = f"{decision.reason}; nothing deleted, these files are sent to the NAS again"
        try:
            self.queue.transition(
                job.id, S.CLEANUP_ELIGIBLE, S.QUEUED, now=self.now(), detail=detail,
                error_kind=decision.error_kind, last_error=decision.reason, attempts=0, mismatch_count=1,
                next_attempt_at=None, rewrite_paths=decision.paths, verify_passes=0, verified_at=None, pass_times=(),
            )
        except IllegalTransition:
            return ReaperOutcome(job.id, job.run_path, "waiting", "job changed while it was checked")
        log.warning(job.run_path, "cleanup_requeued", job=job.id, reason=decision.reason, paths=len(decision.paths))
        return ReaperOutcome(job.id, job.run_path, "requeued", decision.reason, paths=decision.paths)

    def _fail(self, job: SyncJobRow, decision: CleanupDecision, log: EquipmentLog) -> ReaperOutcome:
        reason = f"{decision.reason}; nothing deleted, the NAS copy is left as verified"
        if decision.error_kind == "local_damage":
            from exlab_wizard.sync.recovery import damage_ways_out  # recovery builds on this module

            reason += ". " + damage_ways_out(job.id, job.run_path)
        try:
            self.queue.transition(
                job.id, S.CLEANUP_ELIGIBLE, S.FAILED, now=self.now(), detail=reason,
                error_kind=decision.error_kind, last_error=reason, next_attempt_at=None,
            )
        except IllegalTransition:
            return ReaperOutcome(job.id, job.run_path, "waiting", "job changed while it was checked")
        log.error(job.run_path, "cleanup_failed", job=job.id, kind=decision.error_kind, reason=decision.reason,
                  paths=len(decision.paths))
        return ReaperOutcome(job.id, job.run_path, "failed", reason, paths=decision.paths)

    # ------------------------------------------------------------ the durable plan

    def _progress_rows(self) -> dict[str, _Progress]:
        with self.queue.transaction() as conn:
            rows = conn.execute("SELECT * FROM cleanup_progress").fetchall()
        return {
            row["job_id"]: _Progress(
                job_id=row["job_id"], run_path=row["run_path"], manifest_digest=row["manifest_digest"],
                planned_at=_from_ts(row["planned_at"]), files=row["files"], bytes=row["bytes"],
                data_deleted_at=_from_ts(row["data_deleted_at"]),
            )
            for row in rows
        }

    def _plan_files(self, job_id: str) -> list[PlannedFile]:
        with self.queue.transaction() as conn:
            rows = conn.execute("SELECT * FROM cleanup_plan WHERE job_id = ?", (job_id,)).fetchall()
        files = [
            PlannedFile(_path_text(r["path"]), r["size"], r["mtime_ns"], int(r["ino"]), r["sha256"]) for r in rows
        ]
        return sorted(files, key=lambda f: os.fsencode(f.path))

    def _write_plan(self, job: SyncJobRow, scan: LocalScan, log: EquipmentLog) -> _Progress | None:
        """(a) The plan, the progress row and the ``cleanup_planned`` event in one transaction."""
        now = self.now()
        digest = job.manifest_digest or ""
        retain = self.config.nas_cleanup.retain_cache
        detail = (
            f"cleanup planned: {len(scan.files)} files, {scan.bytes} bytes, manifest {digest}, "
            f"verify passes {job.verify_passes}, retain_cache {'true' if retain else 'false'}"
        )
        with self.queue.transaction() as conn:
            row = conn.execute("SELECT state, manifest_digest FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row is None or row["state"] != S.CLEANUP_ELIGIBLE.value or row["manifest_digest"] != digest:
                return None
            conn.execute("DELETE FROM cleanup_plan WHERE job_id = ?", (job.id,))
            conn.executemany(
                "INSERT INTO cleanup_plan (job_id, path, size, mtime_ns, ino, sha256, manifest_digest)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(job.id, _path_key(f.path), f.size, f.mtime_ns, str(f.ino), f.sha256, digest) for f in scan.files],
            )
            conn.execute(
                "INSERT OR REPLACE INTO cleanup_progress"
                " (job_id, run_path, manifest_digest, planned_at, files, bytes, data_deleted_at)"
                " VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (job.id, job.run_path, digest, _ts(now), len(scan.files), scan.bytes),
            )
            self.queue.record_event(job.id, PLANNED_EVENT, detail, now=now)
        log.info(
            job.run_path, "cleanup_planned", job=job.id, files=len(scan.files), bytes=scan.bytes,
            verify_passes=job.verify_passes, manifest_digest=digest,
            rehashed=len(scan.rehashed),
        )
        return _Progress(job.id, job.run_path, digest, now, len(scan.files), scan.bytes, None)

    def _drop_plan(self, conn: Any, job_id: str) -> None:
        conn.execute("DELETE FROM cleanup_plan WHERE job_id = ?", (job_id,))
        conn.execute("DELETE FROM cleanup_progress WHERE job_id = ?", (job_id,))

    async def _resume(self, progress: _Progress) -> ReaperOutcome:
        """A plan found at the start of a pass: carry it on, or drop it if its job moved on."""
        job = self.queue.get(progress.job_id)
        if job is None or job.state != S.CLEANUP_ELIGIBLE or job.manifest_digest != progress.manifest_digest:
            return self._abandon(progress, job, "job left cleanup_eligible" if job else "job missing")
        try:
            log = self._log(job)
        except Exception as exc:
            reason = f"equipment log unavailable: {exc}"
            self._refuse_event(job.id, reason)
            return ReaperOutcome(job.id, job.run_path, "waiting", reason)
        # Interlocks 1-5 again, with a new listing of the remote run folder against the plan
        # while local data remain; 6 is the per-file check of the plan itself.
        planned = self._plan_files(job.id) if progress.data_deleted_at is None else None
        decision, _ = await self._decide(job, local=False, planned=planned)
        if decision.action == "requeue" and decision.interlock == 4:
            return await self._resume_incomplete(job, progress, log, decision)
        if decision.action != "delete":
            reason = f"deletion paused: {decision.reason}"
            self._refuse_event(job.id, reason)
            return ReaperOutcome(job.id, job.run_path, "waiting", reason)
        return await self._execute(job, progress, log, resumed=True)

    async def _resume_incomplete(
        self, job: SyncJobRow, progress: _Progress, log: EquipmentLog, decision: CleanupDecision
    ) -> ReaperOutcome:
        """A resumed plan whose NAS copy lost planned files: delete nothing more.

        Nothing deleted yet: the job is decided afresh, as one never planned
        (the local copy is checked, then the NAS listed again), and the plan
        dropped once it leaves CLEANUP_ELIGIBLE. Some files deleted already: a
        re-transfer cannot send them, so FAILED for a person to look at.
        """
        run = Path(job.run_path)
        if os.path.islink(run) or not os.path.isdir(run):
            # Its disk is away: a missing run is not a deleted one; decide when it is back.
            reason = f"deletion paused: run folder {'is a symlink' if os.path.islink(run) else 'missing'}"
            self._refuse_event(job.id, reason)
            return ReaperOutcome(job.id, job.run_path, "waiting", reason)
        present = await asyncio.to_thread(self._count_present, progress)
        if present < progress.files:
            return self._stop_incomplete(job, progress, log, decision, progress.files - present)
        fresh, _scan = await self._decide(job, local=True)
        if fresh.action == "delete":
            return await self._execute(job, progress, log, resumed=True)  # the NAS copy is whole again
        if fresh.action in ("wait", "check"):
            reason = f"deletion paused: {fresh.reason}"
            self._refuse_event(job.id, reason)
            return ReaperOutcome(job.id, job.run_path, "waiting", reason)
        if fresh.action == "requeue":
            outcome = (self._requeue_incomplete if fresh.interlock == 4 else self._requeue)(job, fresh, log)
        else:
            outcome = self._fail(job, fresh, log)
        current = self.queue.get(job.id)
        if current is None or current.state != S.CLEANUP_ELIGIBLE:
            with self.queue.transaction() as conn:
                self._drop_plan(conn, job.id)
        return outcome

    def _stop_incomplete(
        self, job: SyncJobRow, progress: _Progress, log: EquipmentLog, decision: CleanupDecision, done: int
    ) -> ReaperOutcome:
        """Part of the plan deleted, and the NAS copy lost planned files since: FAILED, plan dropped."""
        reason = (
            f"cleanup stopped: {decision.reason}; {done} of {progress.files} planned files were already "
            f"deleted (the NAS held them when the deletion was planned), nothing else"
        )
        with contextlib.suppress(IllegalTransition), self.queue.transaction() as conn:
            self.queue.transition(
                job.id, S.CLEANUP_ELIGIBLE, S.FAILED, now=self.now(), detail=reason,
                error_kind="remote_changed_during_cleanup", last_error=reason, next_attempt_at=None,
            )
            self._drop_plan(conn, job.id)
        log.error(job.run_path, "cleanup_stopped", job=job.id, reason=decision.reason, files_deleted=done,
                  files_planned=progress.files, manifest_digest=progress.manifest_digest)
        return ReaperOutcome(job.id, job.run_path, "aborted", reason, paths=decision.paths)

    def _abandon(self, progress: _Progress, job: SyncJobRow | None, why: str) -> ReaperOutcome:
        """Drop a plan whose job is no longer CLEANUP_ELIGIBLE with the planned manifest: delete nothing more."""
        present = self._count_present(progress)
        detail = (
            f"cleanup plan dropped ({why}): {progress.files - present} of {progress.files} planned files "
            f"were already deleted; nothing more will be"
        )
        with self.queue.transaction() as conn:
            self._drop_plan(conn, progress.job_id)
            if job is not None:
                self.queue.record_event(job.id, ABORTED_EVENT, detail, now=self.now())
        if job is not None:
            with contextlib.suppress(Exception):
                self._log(job).warning(job.run_path, "cleanup_aborted", job=job.id, reason=why,
                                       files_deleted=progress.files - present, files_planned=progress.files)
        return ReaperOutcome(progress.job_id, progress.run_path, "aborted", detail)

    def _count_present(self, progress: _Progress) -> int:
        run = Path(progress.run_path)
        return sum(1 for f in self._plan_files(progress.job_id) if os.path.lexists(run / f.path))

    async def _execute(self, job: SyncJobRow, progress: _Progress, log: EquipmentLog, *, resumed: bool) -> ReaperOutcome:
        """(b)-(e): delete the planned files, tidy, log, record, then CLEANED."""
        run = Path(job.run_path)
        retain = self.config.nas_cleanup.retain_cache
        files = self._plan_files(job.id)
        if progress.data_deleted_at is None:
            if resumed:
                log.info(job.run_path, "cleanup_resumed", job=job.id, files=progress.files,
                         manifest_digest=progress.manifest_digest)
            deleted = gone = 0
            for start in range(0, len(files), _DELETE_BATCH):
                current = self.queue.get(job.id)
                if (current is None or current.state != S.CLEANUP_ELIGIBLE
                        or current.manifest_digest != progress.manifest_digest):
                    return self._abandon(progress, current, "job left cleanup_eligible during the deletion")
                batch = files[start:start + _DELETE_BATCH]
                result = await asyncio.to_thread(_delete_batch, run, batch)
                deleted += result.deleted
                gone += result.gone
                if result.stop is not None:
                    return self._stopped(job, progress, log, result, deleted)
            if not resumed and gone:
                # Files vanished between the check and the unlink; their verified copies are on the NAS.
                log.warning(job.run_path, "cleanup_files_already_gone", job=job.id, files=gone)
            removed = await asyncio.to_thread(_remove_left_empty, run, [f.path for f in files])
            fields: dict[str, object] = {
                "job": job.id, "files": progress.files, "bytes": progress.bytes,
                "verify_passes": job.verify_passes,
                "pass_times": ",".join(_utc_text(t) for t in job.pass_times) or "-",
                "manifest_digest": progress.manifest_digest,
                "folders_removed": len(removed),
            }
            if resumed:
                fields["resumed"] = True
            log.info(job.run_path, "cleanup_deleted", **fields)
            data_deleted_at = self.now()
            with self.queue.transaction() as conn:
                conn.execute(
                    "UPDATE cleanup_progress SET data_deleted_at = ? WHERE job_id = ?", (_ts(data_deleted_at), job.id)
                )
                self.queue.record_event(
                    job.id, DELETED_EVENT,
                    f"local data deleted: {progress.files} files, {progress.bytes} bytes, "
                    f"manifest {progress.manifest_digest}, verify passes {job.verify_passes}",
                    now=data_deleted_at,
                )
            progress = dataclasses.replace(progress, data_deleted_at=data_deleted_at)
        await asyncio.to_thread(self._record_cleaned, job, progress, log)
        folder_note = ""
        if not retain:
            waiting, folder_note = await self._remove_cache(job, log)
            if waiting is not None:
                if self._refuse_event(job.id, waiting):
                    log.warning(job.run_path, "cleanup_waiting", job=job.id, reason=waiting)
                return ReaperOutcome(job.id, job.run_path, "waiting", waiting, files=progress.files, bytes=progress.bytes)
        detail = (
            f"cleaned: {progress.files} files, {progress.bytes} bytes freed, "
            f"manifest {progress.manifest_digest}{folder_note}"
        )
        try:
            with self.queue.transaction() as conn:
                self.queue.transition(job.id, S.CLEANUP_ELIGIBLE, S.CLEANED, now=self.now(), detail=detail)
                self._drop_plan(conn, job.id)
                conn.execute("DELETE FROM verified_files WHERE job_id = ?", (job.id,))
        except IllegalTransition:
            current = self.queue.get(job.id)
            return self._abandon(progress, current, "job left cleanup_eligible before it was marked cleaned")
        return ReaperOutcome(job.id, job.run_path, "deleted", detail, files=progress.files, bytes=progress.bytes)

    def _stopped(self, job: SyncJobRow, progress: _Progress, log: EquipmentLog, result: _DeleteResult,
                 deleted_now: int) -> ReaperOutcome:
        """A planned file no longer matches, or cannot be deleted: stop and record."""
        present = self._count_present(progress)
        done = progress.files - present
        if not result.stop_fatal:
            # The run folder is away or a file cannot be unlinked: keep the plan, try again next pass.
            reason = f"deletion paused: {result.stop}"
            if self._refuse_event(job.id, reason):
                log.warning(job.run_path, "cleanup_paused", job=job.id, reason=result.stop,
                            files_deleted=done, files_planned=progress.files)
            return ReaperOutcome(job.id, job.run_path, "waiting", reason, files=deleted_now)
        reason = (
            f"cleanup stopped: {result.stop}; {done} of {progress.files} planned files were deleted "
            f"(their verified copies are on the NAS), nothing else"
        )
        with contextlib.suppress(IllegalTransition), self.queue.transaction() as conn:
            self.queue.transition(
                job.id, S.CLEANUP_ELIGIBLE, S.FAILED, now=self.now(), detail=reason,
                error_kind="local_changed_during_cleanup", last_error=reason, next_attempt_at=None,
            )
            self._drop_plan(conn, job.id)
        log.error(job.run_path, "cleanup_stopped", job=job.id, reason=result.stop, files_deleted=done,
                  files_planned=progress.files, manifest_digest=progress.manifest_digest)
        return ReaperOutcome(job.id, job.run_path, "aborted", reason, files=deleted_now,
                             paths=(result.stop_path,) if result.stop_path else ())

    def _record_cleaned(self, job: SyncJobRow, progress: _Progress, log: EquipmentLog) -> None:
        run = Path(job.run_path)
        if os.path.islink(run) or not os.path.isdir(run / METADATA_DIR) or os.path.islink(run / METADATA_DIR):
            return
        value = {
            "at": _utc_text(progress.data_deleted_at or self.now()),
            "files": progress.files,
            "bytes": progress.bytes,
            "manifest_digest": progress.manifest_digest,
        }
        try:
            self.writer.record(run, "local_cleaned", value)
        except Exception as exc:
            # The equipment log and the queue already hold the record; the deletion stands.
            log.warning(job.run_path, "cleanup_record_failed", job=job.id, error=str(exc))
            self.queue.record_event(job.id, NOTE_EVENT, f"creation.json not updated: {exc}", now=self.now())

    async def _remove_cache(self, job: SyncJobRow, log: EquipmentLog) -> tuple[str | None, str]:
        """``retain_cache: false``: push the metadata, then remove it and the run folder.

        Returns (a reason when waiting, a note on what was removed).
        """
        run = Path(job.run_path)
        if os.path.islink(run):
            return "waiting: run folder is a symlink", ""
        if not os.path.isdir(run):
            if not os.path.isdir(run.parent):
                return "waiting: run folder missing", ""  # its disk is away, not removed by us
            return None, "; run folder removed"  # by an earlier, interrupted pass
        try:
            files, folders = await asyncio.to_thread(_metadata_snapshot, run)
        except (OSError, _RunFolderError) as exc:
            return f"waiting: cannot read {METADATA_DIR}/: {exc}", ""
        if files:
            if self.push_metadata is None:
                return "waiting: no final metadata push available (retain_cache is false)", ""
            try:
                pushed = await self.push_metadata(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.info("final metadata push for job %s failed: %s", job.id, exc)
                pushed = FinalPush(False, f"final metadata push failed: {type(exc).__name__}: {exc}")
            if not isinstance(pushed, FinalPush):
                pushed = FinalPush(bool(pushed), "final metadata push verified" if pushed else "")
            if not pushed.verified:
                return f"waiting: {pushed.reason or 'final metadata push not verified'}", ""
            proof = pushed.reason
        else:
            proof = f"no {METADATA_DIR}/ files left to push"
        stop = await asyncio.to_thread(_remove_metadata, run, files, folders)
        if stop is not None:
            return f"waiting: {METADATA_DIR}/ changed during the final push: {stop}", ""
        kept = await asyncio.to_thread(_remove_run_folder, run)
        if kept is None:
            log.info(job.run_path, "cleanup_run_folder_removed", job=job.id, metadata_files=len(files), proof=proof)
            return None, f"; .exlab-wizard/ and run folder removed ({proof})"
        log.warning(job.run_path, "cleanup_run_folder_kept", job=job.id, reason=kept, proof=proof)
        return None, f"; .exlab-wizard/ removed ({proof}), {kept}"

    # ------------------------------------------------------------ dry run

    async def _dry_run_job(self, job: SyncJobRow, progress: _Progress | None) -> ReaperOutcome:
        if progress is not None:
            return ReaperOutcome(
                job.id, job.run_path, "in_progress",
                f"deletion in progress: {progress.files} files, {progress.bytes} bytes planned",
                files=progress.files, bytes=progress.bytes,
            )
        if job.state == S.VERIFIED:
            # What stands between the job and cleanup besides interlock 1 (decided below): a dry run
            # with cleanup off is how a lab sees what enabling it would do.
            opted_in = self.config.nas_cleanup.model_copy(update={"enabled": True})
            ok, reason = policy.eligible_to_promote(job, opted_in, self.now())
            if not ok:
                return ReaperOutcome(job.id, job.run_path, "waiting", reason)
        decision, scan = await self._decide(job, local=True)
        if decision.action == "wait":
            return ReaperOutcome(job.id, job.run_path, "waiting", decision.reason)
        if decision.action == "requeue":
            return ReaperOutcome(job.id, job.run_path, "would_requeue", decision.reason, paths=decision.paths)
        if decision.action == "fail":
            return ReaperOutcome(job.id, job.run_path, "would_fail", decision.reason, paths=decision.paths)
        assert scan is not None
        return ReaperOutcome(
            job.id, job.run_path, "would_delete",
            f"would free {len(scan.files)} files, {scan.bytes} bytes",
            files=len(scan.files), bytes=scan.bytes,
        )
