"""The reaper's durable records: verified stats and the deletion plan, in the queue database.

Owns every SQL statement on the reaper's three tables (created by the
queue's migration 4, like every other table):

- ``verified_files``: the size, mtime, ctime and inode each verified file
  had when it was hashed (:class:`VerifiedStat`), and ``verified_boots``:
  the boot they were recorded in (queue migration 13, :func:`current_boot`);
- ``cleanup_progress``: one row per job whose deletion is planned (its
  manifest digest, counts, the folder it was planned in (:func:`folder_identity`,
  queue migration 12), the boot it was planned in (migration 13), and when its
  data were deleted);
- ``cleanup_plan``: one row per file that deletion may remove
  (:class:`PlannedFile`).

Writes run in the queue's ``BEGIN IMMEDIATE`` transaction (nested in the
caller's, when there is one, so a plan is dropped in the same transaction
as the job's transition). Reads take no write lock: a dry run or a status
read never waits for, nor holds up, a writer in another process.

Paths are stored as bytes (a name that is not valid UTF-8 survives the
round trip); times as ISO 8601 UTC text; a file's mtime and ctime in
nanoseconds as an INTEGER, or, outside SQLite's signed 64 bits (past
2262-04-11 or before 1677-09-21), as its decimal digits in a BLOB (see
:func:`_ns_key`).
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from exlab_wizard.fileio import METADATA_DIR
from exlab_wizard.sync.queue import JobQueue, SyncJobRow
from exlab_wizard.sync.states import IllegalTransition, SyncJobState

__all__ = [
    "ABORTED_EVENT",
    "DELETED_EVENT",
    "FINAL_PUSH_SKIPPED_EVENT",
    "LEGACY_NEWER",
    "NOTE_EVENT",
    "PLANNED_EVENT",
    "REFUSED_EVENT",
    "CleanupStore",
    "PlannedFile",
    "Progress",
    "VerifiedStat",
    "current_boot",
    "drop_plan",
    "ensure_cleanup_schema",
    "folder_identity",
    "local_data_deleted_at",
    "planned_paths",
    "planned_run_folder",
]

#: Event kinds the reaper writes (besides state transitions).
REFUSED_EVENT = "cleanup_refused"
PLANNED_EVENT = "cleanup_planned"
DELETED_EVENT = "cleanup_deleted"
ABORTED_EVENT = "cleanup_aborted"
NOTE_EVENT = "note"
#: the job finished without its final metadata push: another run's folder was at its path
FINAL_PUSH_SKIPPED_EVENT = "final_push_skipped"


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


#: the integers SQLite stores as INTEGER
_INT64 = range(-(2**63), 2**63)


def _ns_key(ns: int | None) -> int | bytes | None:
    """A time in nanoseconds as stored: exact, whatever its size.

    An INTEGER when it fits SQLite's signed 64 bits; else its decimal digits
    as a BLOB (an mtime past 2262-04-11: ``touch -d 2300-01-01``). Not TEXT:
    the columns are declared INTEGER, and their affinity turns an integer
    literal too large for 64 bits into a REAL, losing digits. A BLOB is
    stored as it is, so no migration is needed and older rows read as before.
    """
    return ns if ns is None or ns in _INT64 else b"%d" % ns


def _ns_value(stored: int | bytes | None) -> int | None:
    """A stored time in nanoseconds (:func:`_ns_key`) as the int it was."""
    return int(stored) if isinstance(stored, bytes) else stored


# --------------------------------------------------------------------------- the boot

#: Where Linux gives this boot's id: a new random UUID at every boot.
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def current_boot() -> str | None:
    """This boot's id (:data:`BOOT_ID_FILE`); None when it cannot be read (then no stat is of this boot).

    A power cut can keep a file's new bytes and lose its new times: XFS makes
    the data of a ``pwrite`` + ``fdatasync`` durable while the times wait in
    its in-memory log; btrfs writes a ``nodatacow`` file's pages in place
    while its times wait for the next transaction commit (30 s); ext4 within
    its journal commit (5 s). After the reboot the file holds other bytes
    under the very stat recorded. A stat recorded, or a plan written, in
    another boot therefore vouches for nothing: the file is read again.
    """
    try:
        with open(BOOT_ID_FILE, encoding="ascii") as handle:
            boot = handle.read().strip()
    except (OSError, ValueError):
        return None
    return boot or None


#: The queue migration that made ``verified_boots``, ``verified_files.writeback`` and
#: ``cleanup_progress.boot_id``. A database at an older step (a test pinning the migrations)
#: has none: its stats and plans are then of no boot known, as rows written before it are.
_BOOTS_SINCE = 13


def _boots_kept(conn: sqlite3.Connection) -> bool:
    return conn.execute("PRAGMA user_version").fetchone()[0] >= _BOOTS_SINCE


def _stored_boot(conn: sqlite3.Connection, query: str, job_id: str) -> str | None:
    """The boot id ``query`` reads for ``job_id``; None when none is stored (or the schema has none)."""
    if not _boots_kept(conn):
        return None
    row = conn.execute(query, (job_id,)).fetchone()
    return None if row is None else row[0]


# --------------------------------------------------------------------------- records

#: ``newer_sha256`` of an untrusted row recorded before queue migration 10 (set by migration 11;
#: never a SHA-256): whether the file held newer bytes than the verified ones then is not known.
LEGACY_NEWER = ""


@dataclass(frozen=True)
class VerifiedStat:
    """A file's metadata as recorded when its content was verified.

    ``trusted`` is False when the file may have been written while it was
    hashed (or was not a regular file then): the reaper re-hashes such a file
    before deleting it. ``size``/``mtime_ns``/``ctime_ns``/``ino`` are None
    when the file could not be stat-ed. ``newer_sha256``: read again when
    recorded, the file held other bytes than the verified ones, these: this
    stat is of an edit the hashing missed (a frame appended after the file
    was copied). None: the stat stands for the verified bytes.
    :data:`LEGACY_NEWER` (queue migration 11): an untrusted row an engine
    before migration 10 recorded without reading the file again; its stat
    may be of bytes written after the hashing (:attr:`legacy`).

    ``writeback``: the file was stamped within the kernel's writeback window
    before the hashing (or later): a store through a memory mapping into a
    page still dirty stamps no time, so its bytes may have changed since
    under this very stat (recorded untrusted). ``other_boot``: recorded in
    another boot than this one (or one not known), see :func:`current_boot`;
    such a stat vouches for nothing either. For both, other bytes under the
    very stat recorded (:meth:`same_stat`) are an edit whose times were never
    stamped or were lost, never damage.
    """

    path: str
    sha256: str
    size: int | None
    mtime_ns: int | None
    ctime_ns: int | None
    ino: int | None
    trusted: bool
    newer_sha256: str | None = None
    writeback: bool = False
    other_boot: bool = False

    @property
    def legacy(self) -> bool:
        """Untrusted and recorded before migration 10: the bytes under this stat were never read."""
        return not self.trusted and self.newer_sha256 == LEGACY_NEWER

    @property
    def unstamped(self) -> bool:
        """May the file have been written since with no time stamped, or with its new times lost?"""
        return self.writeback or self.other_boot

    def matches(self, st: os.stat_result) -> bool:
        """Same size, mtime, ctime and inode as ``st``, trusted, and recorded in this boot."""
        return self.trusted and not self.other_boot and self.same_stat(st)

    def same_stat(self, st: os.stat_result) -> bool:
        """Same size, mtime, ctime and inode as ``st``, trusted or not."""
        return (
            self.size == st.st_size
            and self.mtime_ns == st.st_mtime_ns
            and self.ctime_ns == st.st_ctime_ns
            and self.ino == st.st_ino
        )


@dataclass(frozen=True)
class PlannedFile:
    """One file the deletion may remove, with the stat it must still have.

    ``ctime_ns``: its ctime when it was checked (None: not known, a plan
    written before ctimes were kept, or a filesystem that keeps none). A
    file whose ctime moved since, or is not known, is re-hashed before it is
    unlinked (:func:`~.deletion.delete_batch`).
    """

    path: str
    size: int
    mtime_ns: int
    ino: int
    sha256: str
    ctime_ns: int | None = None


@dataclass(frozen=True)
class Progress:
    """A job's planned deletion: what was planned, and when its data were deleted (None: not yet).

    ``run_folder``: the :func:`folder_identity` of the run folder the plan was
    written for; None when not known (a plan written before queue migration 12,
    or a folder that could not be stat-ed then). ``boot_id``: the boot it was
    written in (:func:`current_boot`; None: not known, a plan written before
    queue migration 13).
    """

    job_id: str
    run_path: str
    manifest_digest: str
    planned_at: dt.datetime
    files: int
    bytes: int
    data_deleted_at: dt.datetime | None
    run_folder: str | None = None
    boot_id: str | None = None


def folder_identity(run: str | os.PathLike[str]) -> str | None:
    """Which folder is at ``run`` now: ``"<dev>:<ino> <dev>:<ino>"`` of it and of its ``.exlab-wizard/``.

    ``-`` for a ``.exlab-wizard/`` that is not there. None when the run folder
    cannot be stat-ed. Never through a symlink (``lstat``). A folder deleted and
    made again may get the same numbers (ext4 reuses a freed inode at once): a
    different identity proves another folder, an equal one proves nothing alone.
    """
    try:
        st = os.lstat(run)
    except OSError:
        return None
    try:
        meta = os.lstat(os.path.join(run, METADATA_DIR))
        inner = f"{meta.st_dev}:{meta.st_ino}"
    except OSError:
        inner = "-"
    return f"{st.st_dev}:{st.st_ino} {inner}"


#: ``(sha256, size, mtime_ns, ctime_ns, inode, trusted, newer_sha256[, writeback])`` of one file, as
#: :meth:`CleanupStore.record_verified` takes it (see :class:`VerifiedStat`; no ``writeback``: False).
StatRow = tuple[str, int, int, int, int, bool, str | None] | tuple[str, int, int, int, int, bool, str | None, bool]


# --------------------------------------------------------------------------- the store


class CleanupStore:
    """The reaper's tables in ``queue``'s database. Cheap to make; holds no state of its own."""

    def __init__(self, queue: JobQueue):
        self.queue = queue

    # ------------------------------------------------------------ reads (no write lock)

    def progress_rows(self) -> dict[str, Progress]:
        """Every planned deletion, by job id."""
        with self.queue.snapshot() as conn:
            rows = conn.execute("SELECT * FROM cleanup_progress").fetchall()
        return {
            row["job_id"]: Progress(
                job_id=row["job_id"],
                run_path=row["run_path"],
                manifest_digest=row["manifest_digest"],
                planned_at=_from_ts(row["planned_at"]),
                files=row["files"],
                bytes=row["bytes"],
                data_deleted_at=_from_ts(row["data_deleted_at"]),
                run_folder=row["run_folder"],
                boot_id=row["boot_id"] if "boot_id" in row.keys() else None,  # noqa: SIM118
            )
            for row in rows
        }

    def plan_files(self, job_id: str) -> list[PlannedFile]:
        """The job's planned files, in byte order of their paths; empty without a plan.

        A plan written in another boot (:func:`current_boot`) gives no ctime
        (None): each file is then read again right before its unlink, as on a
        disk that keeps no ctime (a power cut may have lost a save's new times).
        """
        boot = current_boot()
        with self.queue.snapshot() as conn:
            rows = conn.execute("SELECT * FROM cleanup_plan WHERE job_id = ?", (job_id,)).fetchall()
            planned = _stored_boot(conn, "SELECT boot_id FROM cleanup_progress WHERE job_id = ?", job_id)
        this_boot = boot is not None and planned == boot
        files = [
            PlannedFile(
                _path_text(r["path"]),
                r["size"],
                _ns_value(r["mtime_ns"]),
                int(r["ino"]),
                r["sha256"],
                _ns_value(r["ctime_ns"]) if this_boot else None,
            )
            for r in rows
        ]
        return sorted(files, key=lambda f: os.fsencode(f.path))

    def planned_paths(self, job_id: str) -> frozenset[str]:
        """The relative paths of the job's planned files; empty without a plan."""
        with self.queue.snapshot() as conn:
            rows = conn.execute("SELECT path FROM cleanup_plan WHERE job_id = ?", (job_id,)).fetchall()
        return frozenset(_path_text(row["path"]) for row in rows)

    def data_deleted_at(self, job_id: str) -> dt.datetime | None:
        """When the job's planned files were deleted; None when not yet, or without a plan."""
        with self.queue.snapshot() as conn:
            row = conn.execute("SELECT data_deleted_at FROM cleanup_progress WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else _from_ts(row["data_deleted_at"])

    def verified_stats(self, job_id: str) -> dict[str, VerifiedStat]:
        """The recorded stats of the job's verified files, by relative path (``other_boot``: see :func:`current_boot`)."""
        boot = current_boot()
        with self.queue.snapshot() as conn:
            rows = conn.execute("SELECT * FROM verified_files WHERE job_id = ?", (job_id,)).fetchall()
            recorded = _stored_boot(conn, "SELECT boot_id FROM verified_boots WHERE job_id = ?", job_id)
        other_boot = boot is None or recorded != boot
        out = {}
        for row in rows:
            rel = _path_text(row["path"])
            out[rel] = VerifiedStat(
                path=rel,
                sha256=row["sha256"],
                size=row["size"],
                mtime_ns=_ns_value(row["mtime_ns"]),
                ctime_ns=_ns_value(row["ctime_ns"]),
                ino=None if row["ino"] is None else int(row["ino"]),
                trusted=bool(row["trusted"]),
                newer_sha256=row["newer_sha256"],
                writeback="writeback" in row.keys() and bool(row["writeback"]),  # noqa: SIM118
                other_boot=other_boot,
            )
        return out

    # ------------------------------------------------------------ writes

    def record_verified(
        self,
        job_id: str,
        data: Mapping[str, str],
        stats: Mapping[str, StatRow] | Iterable[tuple[str, StatRow]],
        now: dt.datetime,
    ) -> int:
        """Store the stats of a verified manifest's files; returns the rows written.

        ``data``: the verified ``{path: sha256}`` (data files only); ``stats``:
        the files of it that could be stat-ed (a mapping, or ``(path, row)``
        pairs taken one at a time). A row whose SHA-256 is unchanged
        and trusted is kept as it is; rows of files no longer in ``data`` are
        dropped, and so is the row of a file verified with new content that
        could not be stat-ed now. Rows recorded in another boot
        (:func:`current_boot`) are all dropped first, none kept: the job's
        rows are then all of the boot stored with them.
        """
        stamp = _ts(now)
        written = 0
        boot = current_boot()
        with self.queue.transaction() as conn:
            boots = _boots_kept(conn)
            if (
                boot is None
                or _stored_boot(conn, "SELECT boot_id FROM verified_boots WHERE job_id = ?", job_id) != boot
            ):
                conn.execute("DELETE FROM verified_files WHERE job_id = ?", (job_id,))
                if boots:
                    conn.execute("DELETE FROM verified_boots WHERE job_id = ?", (job_id,))
            existing = {
                _path_text(row["path"]): row
                for row in conn.execute("SELECT * FROM verified_files WHERE job_id = ?", (job_id,)).fetchall()
            }
            for rel in existing:
                if rel not in data:
                    conn.execute("DELETE FROM verified_files WHERE job_id = ? AND path = ?", (job_id, _path_key(rel)))
            stated: set[str] = set()  # of the existing rows only

            def rows() -> Iterator[tuple[object, ...]]:
                nonlocal written
                for rel, (sha, size, mtime_ns, ctime_ns, ino, trusted, newer_sha256, *more) in (
                    stats.items() if isinstance(stats, Mapping) else stats
                ):
                    old = existing.get(rel)
                    if old is not None:
                        stated.add(rel)
                    if old is not None and old["sha256"] == sha and old["trusted"]:
                        continue
                    written += 1
                    row = (job_id, _path_key(rel), sha, size, _ns_key(mtime_ns), _ns_key(ctime_ns), str(ino))
                    yield (*row, int(trusted), newer_sha256, stamp, *((int(bool(more and more[0])),) if boots else ()))

            conn.executemany(  # one statement for every row: half the time of one execute a row
                "INSERT OR REPLACE INTO verified_files"
                " (job_id, path, sha256, size, mtime_ns, ctime_ns, ino, trusted, newer_sha256, recorded_at"
                + (
                    ", writeback) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    if boots
                    else ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                rows(),
            )
            if boot is not None and boots:
                conn.execute("INSERT OR REPLACE INTO verified_boots (job_id, boot_id) VALUES (?, ?)", (job_id, boot))
            for rel in data:
                if rel in existing and rel not in stated and existing[rel]["sha256"] != data[rel]:
                    # New content verified, file not stat-able now: the old stat must not vouch for it.
                    conn.execute("DELETE FROM verified_files WHERE job_id = ? AND path = ?", (job_id, _path_key(rel)))
        return written

    def write_plan(
        self,
        job: SyncJobRow,
        files: Sequence[PlannedFile],
        now: dt.datetime,
        detail: str,
        *,
        run_folder: str | None = None,
    ) -> Progress | None:
        """The plan, the progress row and the ``cleanup_planned`` event in one transaction.

        ``run_folder``: the :func:`folder_identity` of the run folder checked.
        None (nothing written) when the job is no longer CLEANUP_ELIGIBLE with
        the manifest digest it was checked with.
        """
        digest = job.manifest_digest or ""
        total = sum(f.size for f in files)
        boot = current_boot()
        with self.queue.transaction() as conn:
            row = conn.execute("SELECT state, manifest_digest FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row is None or row["state"] != SyncJobState.CLEANUP_ELIGIBLE.value or row["manifest_digest"] != digest:
                return None
            conn.execute("DELETE FROM cleanup_plan WHERE job_id = ?", (job.id,))
            conn.executemany(
                "INSERT INTO cleanup_plan (job_id, path, size, mtime_ns, ino, sha256, manifest_digest, ctime_ns)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        job.id,
                        _path_key(f.path),
                        f.size,
                        _ns_key(f.mtime_ns),
                        str(f.ino),
                        f.sha256,
                        digest,
                        _ns_key(f.ctime_ns),
                    )
                    for f in files
                ],
            )
            conn.execute(
                "INSERT OR REPLACE INTO cleanup_progress"
                " (job_id, run_path, manifest_digest, planned_at, files, bytes, data_deleted_at, run_folder)"
                " VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                (job.id, job.run_path, digest, _ts(now), len(files), total, run_folder),
            )
            if _boots_kept(conn):
                conn.execute("UPDATE cleanup_progress SET boot_id = ? WHERE job_id = ?", (boot, job.id))
            self.queue.record_event(job.id, PLANNED_EVENT, detail, now=now)
        return Progress(job.id, job.run_path, digest, now, len(files), total, None, run_folder, boot)

    def mark_data_deleted(self, job_id: str, at: dt.datetime, detail: str) -> None:
        """The planned files are gone: record when, with the ``cleanup_deleted`` event."""
        with self.queue.transaction() as conn:
            conn.execute("UPDATE cleanup_progress SET data_deleted_at = ? WHERE job_id = ?", (_ts(at), job_id))
            self.queue.record_event(job_id, DELETED_EVENT, detail, now=at)

    def drop_plan(self, job_id: str) -> None:
        """Forget the job's plan. Inside the caller's transaction, part of it."""
        with self.queue.transaction() as conn:
            conn.execute("DELETE FROM cleanup_plan WHERE job_id = ?", (job_id,))
            conn.execute("DELETE FROM cleanup_progress WHERE job_id = ?", (job_id,))

    def forget_verified(self, job_id: str) -> None:
        """Drop the job's verified stats (its local data are gone). Inside the caller's transaction, part of it."""
        with self.queue.transaction() as conn:
            conn.execute("DELETE FROM verified_files WHERE job_id = ?", (job_id,))
            if _boots_kept(conn):
                conn.execute("DELETE FROM verified_boots WHERE job_id = ?", (job_id,))


# --------------------------------------------------------------------------- entry points


def ensure_cleanup_schema(queue: JobQueue) -> None:
    """Make sure the reaper's tables exist. Idempotent; takes no write lock.

    The tables are the queue's migration 4, made when the database is
    opened: this only opens it (raising like :class:`JobQueue`).
    """
    with queue.snapshot():
        pass


def local_data_deleted_at(queue: JobQueue, job_id: str) -> dt.datetime | None:
    """When the reaper finished deleting the job's local data, or None (not deleted, or no plan).

    Set between the deletion of the data and CLEANED (with ``retain_cache:
    false`` the job may wait there for the final metadata push). Such a job
    has no local data to audit or send again.
    """
    return CleanupStore(queue).data_deleted_at(job_id)


def drop_plan(queue: JobQueue, job_id: str) -> None:
    """Forget the job's deletion plan (its files and progress). Inside the caller's transaction, part of it."""
    CleanupStore(queue).drop_plan(job_id)


def fail_part_deleted(
    queue: JobQueue,
    job_id: str,
    from_state: SyncJobState,
    *,
    now: dt.datetime,
    reason: str,
    kind: str,
    **fields: object,
) -> SyncJobRow | None:
    """A deletion stopped part way: FAILED with ``kind`` and the plan dropped, in one transaction.

    ``fields``: more columns to set with the transition. None (nothing done) when the
    job left ``from_state`` first: whoever moved it, its move stands. The reaper's own
    stops and the audit's (a NAS copy found bad during a deletion) both end here.
    """
    try:
        with queue.transaction():
            moved = queue.transition(
                job_id,
                from_state,
                SyncJobState.FAILED,
                now=now,
                detail=reason,
                error_kind=kind,
                last_error=reason,
                next_attempt_at=None,
                **fields,
            )
            drop_plan(queue, job_id)
    except IllegalTransition:
        return None
    return moved


def planned_run_folder(queue: JobQueue, job_id: str) -> str | None:
    """The :func:`folder_identity` of the run folder the job's cleanup was planned in; None when not known."""
    with queue.snapshot() as conn:
        row = conn.execute("SELECT run_folder FROM cleanup_progress WHERE job_id = ?", (job_id,)).fetchone()
    return None if row is None else row["run_folder"]


def cleanup_planned(queue: JobQueue, job_id: str) -> bool:
    """Has the reaper a deletion plan for the job (planned, under way or done)? One row read, not the plan."""
    with queue.snapshot() as conn:
        return conn.execute("SELECT 1 FROM cleanup_progress WHERE job_id = ?", (job_id,)).fetchone() is not None


def planned_paths(queue: JobQueue, job_id: str) -> frozenset[str]:
    """The data files the job's cleanup plan deletes (or deleted); empty without a plan.

    The plan outlives the manifest: with ``retain_cache: false`` a pass
    interrupted while removing ``.exlab-wizard/`` may leave the plan and no
    ``checksums.sha256``.
    """
    return CleanupStore(queue).planned_paths(job_id)
