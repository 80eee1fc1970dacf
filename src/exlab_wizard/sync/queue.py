"""The durable job queue: one SQLite file, one job per run for life, and an event trail.

The queue is the engine's record of work. Jobs are never deleted: they move
between :class:`SyncJobState` values through :meth:`JobQueue.transition`,
which checks the transition table, runs in ``BEGIN IMMEDIATE`` with
``UPDATE ... WHERE id = ? AND state = ?`` (a stale caller fails loudly) and
writes the matching ``transition`` event in the same transaction. A crash at
any point leaves either the old state and no event, or the new state and its
event, never one without the other.

Storage decisions:

- Times are timezone-aware UTC ``datetime`` objects in code and are stored as
  ISO 8601 UTC text of fixed width, ``YYYY-MM-DDTHH:MM:SS.ffffff+00:00``, so
  text comparison in SQL orders them correctly. Naive datetimes are refused
  (``ValueError``).
- ``overrides_relied_on``, ``rewrite_paths`` and ``pass_times`` are JSON
  arrays of strings (``pass_times`` of the ISO text above).
- ``run_path`` is stored absolute and lexically normalised
  (``os.path.normpath``); lookups by run path normalise the same way.
- The file is opened in WAL mode with ``synchronous=FULL``, a 10 s
  ``busy_timeout`` and ``foreign_keys=ON``. The schema version lives in
  ``PRAGMA user_version``; :data:`MIGRATIONS` lists the steps, entry *i*
  taking the file from version *i* to *i + 1*. Adding a table is appending
  one SQL script (or a callable taking the connection) to that list.

Concurrency: one :class:`JobQueue` is safe to share between threads (one
connection behind a re-entrant lock); several processes may open the same
file at once (SQLite's locking with ``busy_timeout``). Only one process runs
workers for a file; :class:`RunnerLease` decides which.

This module is longer than most on purpose: the schema and its migrations,
the row type and every statement that writes a job row belong together, so
that a column is added, read and written in one file. Read-only aggregates
for the service live in :mod:`exlab_wizard.sync.queue_stats`.

Example::

    queue = JobQueue(state_dir / "queue.db")
    job, created = queue.get_or_create(run, "CONFOCAL_01", remote, now=now)
    job = queue.transition(job.id, SyncJobState.QUEUED, SyncJobState.RUNNING,
                           now=now, detail="transfer started")
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import sqlite3
import stat
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exlab_wizard.sync.queue_damage import QueueDamaged, check_tables, classified, known
from exlab_wizard.sync.state_dir import (
    LockHolder,
    PrivateLock,
    create_private,
    is_mine,
    lock_holder,
    make_state_dir,
)
from exlab_wizard.sync.states import DeletionPlanned, IllegalTransition, SyncJobState, check_transition

__all__ = [
    "BUSY_TIMEOUT_S",
    "CACHE_KIB",
    "JOB_FIELDS",
    "MIGRATIONS",
    "NAS_CLAIMED_EVENT",
    "TRANSITION_EVENT",
    "WAL_LIMIT_BYTES",
    "JobNotFound",
    "JobQueue",
    "Migration",
    "QueueDamaged",
    "QueueSchemaError",
    "RunnerLease",
    "SyncEvent",
    "SyncJobRow",
    "attempt_due",
    "lease_path_for",
]

logger = logging.getLogger(__name__)

#: How long a writer waits for another connection's write lock.
BUSY_TIMEOUT_S = 10.0
#: SQLite page cache per connection, KiB (``PRAGMA cache_size``). SQLite's default (2,000 KiB)
#: fills as the queue file grows, in every long-lived connection of a service; the pages
#: come back from the OS page cache in microseconds, so a small cache costs little.
CACHE_KIB = 256
#: Bytes the WAL file is cut back to once a checkpoint has emptied it (``PRAGMA journal_size_limit``).
#: Without a limit SQLite keeps the file at the largest it ever grew (a burst of 100,000 enqueues),
#: for the life of the service.
WAL_LIMIT_BYTES = 16 << 20
#: Jobs read per query by :meth:`JobQueue.iter_jobs`: a pass over every verified job holds one page.
JOB_PAGE = 200

#: Event kind of every state change (other kinds record decisions).
TRANSITION_EVENT = "transition"
#: A push of the job got past its conflict checks and is about to write into the NAS folder:
#: from then on, files of the run's names there may be the job's own (conflict.unclaimed_files_error).
NAS_CLAIMED_EVENT = "nas_claimed"

#: One schema step: an SQL script, or a function given the connection inside
#: the migration transaction.
Migration = str | Callable[[sqlite3.Connection], None]

#: Schema steps; entry i takes ``user_version`` from i to i + 1. Append only.
MIGRATIONS: list[Migration] = [
    # 1: jobs and their events
    """
    CREATE TABLE jobs (
        id                  TEXT PRIMARY KEY,
        run_path            TEXT NOT NULL UNIQUE,
        equipment_id        TEXT NOT NULL,
        remote_path         TEXT NOT NULL,
        state               TEXT NOT NULL,
        attempts            INTEGER NOT NULL DEFAULT 0,
        next_attempt_at     TEXT,
        error_kind          TEXT,
        last_error          TEXT,
        verify_passes       INTEGER NOT NULL DEFAULT 0,
        verified_at         TEXT,
        created_at          TEXT NOT NULL,
        updated_at          TEXT NOT NULL,
        mismatch_count      INTEGER NOT NULL DEFAULT 0,
        overrides_relied_on TEXT NOT NULL DEFAULT '[]',
        manifest_digest     TEXT,
        last_verify_at      TEXT,
        pass_times          TEXT NOT NULL DEFAULT '[]',
        rewrite_paths       TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX jobs_by_due ON jobs (state, next_attempt_at, created_at);
    CREATE INDEX jobs_by_equipment ON jobs (equipment_id, created_at);
    CREATE TABLE events (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id     TEXT NOT NULL REFERENCES jobs (id),
        at         TEXT NOT NULL,
        kind       TEXT NOT NULL,
        from_state TEXT,
        to_state   TEXT,
        detail     TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_by_job ON events (job_id, id);
    """,
    # 2: the push of the refreshed .exlab-wizard/ after a verification, recorded until it succeeded.
    # Jobs verified before this version may have lost that push (closed before it ended): send it again.
    """
    ALTER TABLE jobs ADD COLUMN metadata_push_due_at TEXT;
    ALTER TABLE jobs ADD COLUMN metadata_push_failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN metadata_push_error TEXT;
    CREATE INDEX jobs_by_metadata_push ON jobs (metadata_push_due_at) WHERE metadata_push_due_at IS NOT NULL;
    UPDATE jobs SET metadata_push_due_at = updated_at WHERE state IN ('verified', 'cleanup_eligible');
    """,
    # 3: local damage accepted as the new truth (retry --accept-local), and where the NAS keeps
    # the verified files it replaces
    """
    ALTER TABLE jobs ADD COLUMN accept_local_paths TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN previous_stamp TEXT;
    ALTER TABLE jobs ADD COLUMN previous_kept_at TEXT;
    """,
    # 4: the cleanup reaper's tables: each verified file's stat, and the durable deletion plan.
    # IF NOT EXISTS: earlier versions made these tables on first use, outside this list.
    """
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
    """,
    # 5: what the completion watcher learned about runs (exlab_wizard.service.watch_store): runs
    # handed to the queue are not looked into again; gate-blocked runs wait for a change
    """
    CREATE TABLE watched_runs (
        run_path      TEXT PRIMARY KEY,
        equipment_id  TEXT NOT NULL,
        status        TEXT NOT NULL,
        job_id        TEXT,
        fingerprint   TEXT,
        findings      TEXT NOT NULL DEFAULT '[]',
        first_seen_at TEXT NOT NULL,
        updated_at    TEXT NOT NULL
    );
    CREATE INDEX watched_runs_by_equipment ON watched_runs (equipment_id, status);
    """,
    # 6: the service's questions stay cheap with 100,000 jobs: jobs by equipment and state (a
    # covering GROUP BY) and the oldest queued job (one seek), the latest verification per
    # equipment (one seek), and pages by state (an index whose rows follow creation order).
    """
    CREATE INDEX jobs_by_equipment_state ON jobs (equipment_id, state, created_at);
    CREATE INDEX jobs_by_equipment_verified ON jobs (equipment_id, verified_at);
    CREATE INDEX jobs_by_state ON jobs (state);
    """,
    # 7: what an event is, as a stable code (a cleanup refusal's CleanupCode, a gate hold's sorted
    # blocking rules): a repeated refusal or hold is recognised by it, never by its text.
    # Older events have none (NULL): the next refusal or hold after the upgrade is recorded once more.
    """
    ALTER TABLE events ADD COLUMN code TEXT;
    """,
    # 8: a planned file's ctime (a change that keeps size, mtime and inode still moves it; older
    # plans have none, NULL: each such file is re-hashed before it is unlinked), and where the
    # NAS copy was verified (exlab_wizard.sync.transports.base.run_location; NULL for jobs
    # verified before: the reaper then compares remote_path alone).
    """
    ALTER TABLE cleanup_plan ADD COLUMN ctime_ns INTEGER;
    ALTER TABLE jobs ADD COLUMN verified_location TEXT;
    """,
    # 9: a job whose push may have written into its NAS folder says so (NAS_CLAIMED_EVENT). Before
    # this version nothing did: every job an attempt of which ran is taken to have written.
    """
    INSERT INTO events (job_id, at, kind, detail)
    SELECT job_id, MIN(at), 'nas_claimed', 'an attempt ran before this version: it may have written to the NAS'
    FROM events WHERE kind = 'transition' AND to_state = 'running' GROUP BY job_id;
    """,
    # 10: a verified file's recorded stat that stands for bytes written after the hashing read it
    # (read again when recorded: another content, its SHA-256 here). That content under that very
    # mtime is then an edit, not damage; NULL: the stat stands for the verified bytes.
    """
    ALTER TABLE verified_files ADD COLUMN newer_sha256 TEXT;
    """,
    # 11: untrusted rows recorded before 10, by engines that never read a file stamped after the
    # hashing again: the stat may be of bytes written since (a frame appended to a file already
    # copied), and 10 left NULL, "the verified bytes". '' (never a SHA-256): nothing known of the
    # bytes under that stat; new bytes under it are an edit, never damage. A database at 10 may
    # hold such rows still (upgraded, not verified again), which look like 10's own untrusted
    # NULL rows: every untrusted NULL row is marked. Rows written from here on keep NULL's meaning.
    """
    UPDATE verified_files SET newer_sha256 = '' WHERE trusted = 0 AND newer_sha256 IS NULL;
    """,
    # 12: which folder a cleanup was planned in (exlab_wizard.sync.reaper.store.folder_identity: the
    # device and inode of the run folder and of its .exlab-wizard/). After the data are deleted, a
    # folder at the run's path that is not that one is another run's: the final metadata push sends
    # nothing from it and deletes nothing in it. NULL for plans written before: not known, the
    # reaper then judges by what the folder holds.
    """
    ALTER TABLE cleanup_progress ADD COLUMN run_folder TEXT;
    """,
    # 13: the boot (/proc/sys/kernel/random/boot_id) a job's verified stats were recorded in, and a
    # plan written in: a power cut may keep a save's bytes and lose its new times, so a stat from
    # another boot vouches for nothing (NULL, rows and plans written before: another boot). And a
    # verified file written within the kernel's writeback window before the hashing (writeback = 1):
    # a store through a memory mapping may have changed its bytes since with no time stamped.
    """
    CREATE TABLE verified_boots (
        job_id  TEXT PRIMARY KEY REFERENCES jobs (id),
        boot_id TEXT NOT NULL
    );
    ALTER TABLE verified_files ADD COLUMN writeback INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE cleanup_progress ADD COLUMN boot_id TEXT;
    """,
]


class JobNotFound(LookupError):
    """No job has this id."""


class QueueSchemaError(RuntimeError):
    """The database cannot be used: written by a newer version, or not in WAL mode."""


# --------------------------------------------------------------------------- times


def _ts(value: dt.datetime) -> str:
    """A timezone-aware datetime as fixed-width ISO 8601 UTC text."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: the queue needs timezone-aware UTC times")
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _storable(value: Any) -> Any:
    """A text SQLite can store (valid UTF-8); other values unchanged.

    A file name holding a byte that is not UTF-8 reaches a reason as a lone
    surrogate (``surrogateescape``): it is stored as ``\\xNN`` instead of
    making the whole transition fail.
    """
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _dt(text: str | None) -> dt.datetime | None:
    return None if text is None else dt.datetime.fromisoformat(text)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else _ts(value)


def _beyond(now: dt.datetime, max_wait: dt.timedelta | None) -> str:
    """The stamp after which a recorded due time counts as due now (see :func:`attempt_due`).

    With no ``max_wait`` nothing is beyond it (the year 9999 is later than every stamp).
    """
    return "9999" if max_wait is None else _ts(now + max_wait)


def attempt_due(at: dt.datetime | None, now: dt.datetime, max_wait: dt.timedelta | None = None) -> bool:
    """Is a QUEUED job whose ``next_attempt_at`` is ``at`` due at ``now``?

    Due when ``at`` is unset or not after ``now``, and also when it lies
    further ahead than ``max_wait`` (the longest wait the engine ever sets: a
    backoff or a scan interval). Such a time was set by a clock that ran ahead
    and has since been set back; waiting it out would hold the job for the
    whole error of that clock.
    """
    return at is None or at <= now or (max_wait is not None and at > now + max_wait)


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class SyncEvent:
    """One line of a job's audit trail.

    ``kind`` is ``"transition"`` for a state change (``from_state`` is None
    only for the creation event) and something else for a decision that
    changed no state (``gate_hold``, ``cleanup_refused``, ``verify_pass``,
    ``note``); those carry no from/to state. ``code``: what the event is, for
    programs (a refusal's ``CleanupCode`` value, a gate hold's sorted blocking
    rules, comma-separated), or None; ``detail`` is for people.
    """

    id: int
    job_id: str
    at: dt.datetime
    kind: str
    from_state: str | None
    to_state: str | None
    detail: str
    code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly values (the time as ISO text)."""
        return {
            "id": self.id,
            "job_id": self.job_id,
            "at": _iso(self.at),
            "kind": self.kind,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "detail": self.detail,
            "code": self.code,
        }


@dataclass(frozen=True)
class SyncJobRow:
    """A snapshot of one job as stored.

    ``attempts``: failed transfer attempts since the last success or re-arm.
    ``mismatch_count``: hash mismatches since the last good verification.
    ``verified_at``: first verification of the current NAS copy.
    ``pass_times``: the times of the verify passes of the current NAS copy,
    at most 16 (the earliest and the latest; ``verify_passes`` counts them all).
    ``rewrite_paths``: files to send again whatever their size and mtime.
    ``metadata_push_due_at``: set while the push of the refreshed
    ``.exlab-wizard/`` after a verification has not succeeded yet (when it is
    due next); ``metadata_push_failures`` and ``metadata_push_error``: its
    failed attempts and the last reason.
    ``accept_local_paths``: files whose local bytes differ from the verified
    manifest (local damage) that ``retry --accept-local`` allows to be sent
    once, as the new truth. ``previous_stamp``: the UTC timestamp folder
    under ``<remote run>/.exlab-wizard/previous/`` where the NAS keeps the
    verified files they replace; ``previous_kept_at``: when that move was
    done (None: not yet).
    ``events`` is filled only by :meth:`JobQueue.job_with_events`.
    """

    id: str
    run_path: str
    equipment_id: str
    remote_path: str
    state: SyncJobState
    attempts: int
    next_attempt_at: dt.datetime | None
    error_kind: str | None
    last_error: str | None
    verify_passes: int
    verified_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    mismatch_count: int
    overrides_relied_on: tuple[str, ...]
    manifest_digest: str | None
    last_verify_at: dt.datetime | None
    pass_times: tuple[dt.datetime, ...]
    rewrite_paths: tuple[str, ...]
    metadata_push_due_at: dt.datetime | None = None
    metadata_push_failures: int = 0
    metadata_push_error: str | None = None
    accept_local_paths: tuple[str, ...] = ()
    previous_stamp: str | None = None
    previous_kept_at: dt.datetime | None = None
    #: where the NAS copy was verified (:func:`~exlab_wizard.sync.transports.base.run_location`); None before
    verified_location: str | None = None
    events: tuple[SyncEvent, ...] = ()

    @property
    def metadata_push_pending(self) -> bool:
        """True while the NAS copy has not received the ``.exlab-wizard/`` of the current verification."""
        return self.metadata_push_due_at is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly values: ISO text times, the state's value, lists for tuples."""
        return {
            "id": self.id,
            "run_path": self.run_path,
            "equipment_id": self.equipment_id,
            "remote_path": self.remote_path,
            "state": self.state.value,
            "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at),
            "error_kind": self.error_kind,
            "last_error": self.last_error,
            "verify_passes": self.verify_passes,
            "verified_at": _iso(self.verified_at),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "mismatch_count": self.mismatch_count,
            "overrides_relied_on": list(self.overrides_relied_on),
            "manifest_digest": self.manifest_digest,
            "last_verify_at": _iso(self.last_verify_at),
            "pass_times": [_iso(t) for t in self.pass_times],
            "rewrite_paths": list(self.rewrite_paths),
            "metadata_push_due_at": _iso(self.metadata_push_due_at),
            "metadata_push_failures": self.metadata_push_failures,
            "metadata_push_error": self.metadata_push_error,
            "accept_local_paths": list(self.accept_local_paths),
            "previous_stamp": self.previous_stamp,
            "previous_kept_at": _iso(self.previous_kept_at),
            "events": [e.to_dict() for e in self.events],
        }


def _job(row: sqlite3.Row) -> SyncJobRow:
    return SyncJobRow(
        id=row["id"],
        run_path=row["run_path"],
        equipment_id=row["equipment_id"],
        remote_path=row["remote_path"],
        state=SyncJobState(row["state"]),
        attempts=row["attempts"],
        next_attempt_at=_dt(row["next_attempt_at"]),
        error_kind=row["error_kind"],
        last_error=row["last_error"],
        verify_passes=row["verify_passes"],
        verified_at=_dt(row["verified_at"]),
        created_at=_dt(row["created_at"]),
        updated_at=_dt(row["updated_at"]),
        mismatch_count=row["mismatch_count"],
        overrides_relied_on=tuple(json.loads(row["overrides_relied_on"])),
        manifest_digest=row["manifest_digest"],
        last_verify_at=_dt(row["last_verify_at"]),
        pass_times=tuple(_dt(t) for t in json.loads(row["pass_times"])),
        rewrite_paths=tuple(json.loads(row["rewrite_paths"])),
        metadata_push_due_at=_dt(row["metadata_push_due_at"]),
        metadata_push_failures=row["metadata_push_failures"],
        metadata_push_error=row["metadata_push_error"],
        accept_local_paths=tuple(json.loads(row["accept_local_paths"])),
        previous_stamp=row["previous_stamp"],
        previous_kept_at=_dt(row["previous_kept_at"]),
        # A database opened at an older schema step (a test pinning the migrations) has no such column.
        verified_location=row["verified_location"] if "verified_location" in row.keys() else None,  # noqa: SIM118
    )


def _event(row: sqlite3.Row) -> SyncEvent:
    return SyncEvent(
        id=row["id"],
        job_id=row["job_id"],
        at=_dt(row["at"]),
        kind=row["kind"],
        from_state=row["from_state"],
        to_state=row["to_state"],
        detail=row["detail"],
        code=row["code"] if "code" in row.keys() else None,  # noqa: SIM118 (`in` on a Row looks at its values)
    )


# --------------------------------------------------------------------------- fields

_INT, _TIME, _TEXT, _TEXTS, _TIMES = "int", "time", "text", "texts", "times"

#: The job fields ``transition`` and ``update`` may set, and how each is stored.
JOB_FIELDS: dict[str, str] = {
    "attempts": _INT,
    "next_attempt_at": _TIME,
    "error_kind": _TEXT,
    "last_error": _TEXT,
    "verify_passes": _INT,
    "verified_at": _TIME,
    "mismatch_count": _INT,
    "overrides_relied_on": _TEXTS,
    "manifest_digest": _TEXT,
    "last_verify_at": _TIME,
    "pass_times": _TIMES,
    "rewrite_paths": _TEXTS,
    "metadata_push_due_at": _TIME,
    "metadata_push_failures": _INT,
    "metadata_push_error": _TEXT,
    "accept_local_paths": _TEXTS,
    "previous_stamp": _TEXT,
    "previous_kept_at": _TIME,
    "verified_location": _TEXT,
}


def _sequence(name: str, value: Any) -> list[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence, not {type(value).__name__}")
    return list(value)


def _encode(name: str, value: Any) -> Any:
    """The stored form of one job field; None clears a nullable field."""
    kind = JOB_FIELDS.get(name)
    if kind is None:
        raise TypeError(f"unknown job field {name!r}")
    if kind == _INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")
        return value
    if kind == _TIME:
        return None if value is None else _ts(value)
    if kind == _TEXT:
        if value is None:
            return None
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str or None, not {type(value).__name__}")
        return str(value)
    items = _sequence(name, value)
    if kind == _TIMES:
        return json.dumps([_ts(item) for item in items])
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} items must be str, not {type(item).__name__}")
    return json.dumps([str(item) for item in items])


def _encode_all(fields: dict[str, Any]) -> dict[str, Any]:
    return {name: _encode(name, value) for name, value in fields.items()}


def _norm_run(run_path: str | os.PathLike[str]) -> str:
    text = os.fspath(run_path)
    if not os.path.isabs(text):
        raise ValueError(f"run path must be absolute: {text!r}")
    return os.path.normpath(text)


def _statements(script: str) -> Iterator[str]:
    """Split an SQL script into complete statements (semicolons in strings are kept)."""
    pieces = script.split(";")
    buffer = ""
    for index, piece in enumerate(pieces):
        buffer += piece if index == len(pieces) - 1 else piece + ";"
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip():
        raise ValueError(f"incomplete SQL statement in migration: {buffer.strip()[:80]!r}")


_QUEUED = SyncJobState.QUEUED.value


# --------------------------------------------------------------------------- queue


def _keep_private(db_path: Path) -> None:
    """Create the queue database 0600; take other users' bits off one of ours (and its -wal, -shm).

    SQLite creates ``-wal`` and ``-shm`` with the database's mode, so a 0600
    database keeps the three private. A file other users can open lets them
    take SQLite's locks (a read lock on ``-shm`` holds every writer); group
    bits an admin gave stay. Best effort: the queue opens either way.
    """
    with contextlib.suppress(OSError):
        if create_private(db_path):
            return
    for path in (db_path, db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-shm")):
        with contextlib.suppress(OSError):
            info = os.stat(path, follow_symlinks=False)
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISREG(info.st_mode) and is_mine(info) and mode & 0o007:
                os.chmod(path, mode & ~0o007)
                logger.warning("%s was open to other users (mode %04o): set to %04o", path, mode, mode & ~0o007)


#: The jobs whose pending metadata push is sent (:meth:`JobQueue.next_metadata_push`): VERIFIED,
#: CLEANUP_ELIGIBLE, and FAILED ``local_damage`` (its NAS copy is the verified one).
_OWES_PUSH = "(state IN (?, ?) OR (state = ? AND error_kind = ?))"
_OWES_PUSH_PARAMS = (
    SyncJobState.VERIFIED.value,
    SyncJobState.CLEANUP_ELIGIBLE.value,
    SyncJobState.FAILED.value,
    "local_damage",
)


class JobQueue:
    """The SQLite job store at ``db_path`` (created, with its folder, if missing).

    All methods are synchronous and short. Every write runs in one
    ``BEGIN IMMEDIATE`` transaction; every method that takes ``now`` needs a
    timezone-aware datetime. Jobs are never deleted.

    Raises :class:`QueueSchemaError` when the file was written by a newer
    schema or cannot use WAL. Every method raises :class:`QueueDamaged` once
    SQLite has said the file is damaged (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``)
    to any connection of this process: from then on this queue reads and
    writes nothing (:attr:`damage`).
    """

    def __init__(self, db_path: Path | str):
        self.db_path = Path(db_path)
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        self._depth = 0
        self._closed = False
        # Connections inherited through fork are kept referenced, never used or closed.
        self._inherited: list[sqlite3.Connection] = []
        make_state_dir(self.db_path.parent)
        _keep_private(self.db_path)
        with self._locked():
            pass

    # ---------------------------------------------------------------- plumbing

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise QueueSchemaError(f"{self.db_path}: cannot use WAL journaling (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        target = len(MIGRATIONS)
        if conn.execute("PRAGMA user_version").fetchone()[0] == target:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > target:
                raise QueueSchemaError(
                    f"{self.db_path}: schema version {version} is newer than this program's {target}"
                )
            for step in MIGRATIONS[version:target]:
                if callable(step):
                    step(conn)
                else:
                    for statement in _statements(step):
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        if self._pid != os.getpid():
            # Inherited through fork: the parent's lock and connection are not ours.
            if self._conn is not None:
                self._inherited.append(self._conn)
            self._lock, self._conn, self._depth, self._pid = threading.RLock(), None, 0, os.getpid()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"job queue {self.db_path} is closed")
            damage = known(self.db_path)
            if damage is not None:  # no poll can mend it: raised untried, a write never risks more
                raise damage
            with classified(self.db_path):
                if self._conn is None:
                    self._conn = self._open()
                yield self._conn

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A consistent read across several statements."""
        with self._locked() as conn:
            if self._depth:
                yield conn
                return
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def snapshot(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A consistent read across several statements, without the write lock.

        A deferred ``BEGIN``: in WAL mode it neither waits for nor blocks a
        writer in another connection. Inside :meth:`transaction` it joins
        that transaction. Yields the connection (rows read by column name).
        """
        return self._snapshot()

    @property
    def damage(self) -> QueueDamaged | None:
        """The damage SQLite reported on this file to this process, or None."""
        return known(self.db_path)

    def check(self) -> None:
        """Check the per-run tables' pages (``PRAGMA quick_check``); :class:`QueueDamaged` when damaged.

        Reads the jobs and the cleanup plan tables with their indexes (not
        the per-file and per-event ones): tens of milliseconds for 100,000
        jobs in the page cache. What a start runs before it trusts the queue.
        """
        with self._locked() as conn:
            check_tables(conn, self.db_path)

    def close(self) -> None:
        """Close the connection; later calls raise ``RuntimeError``. Idempotent."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
            self._closed = True

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; ``ROLLBACK`` if the block raises.

        Yields the connection (rows read by column name). Holds this queue's
        lock for the whole block, so other threads wait. Nested use (also by
        the queue's own methods called inside the block) becomes a savepoint:
        an inner failure that is caught undoes only the inner part, and
        nothing is committed before the outermost block ends.

        Example::

            with queue.transaction() as conn:
                conn.execute("INSERT INTO my_table ...")
                queue.transition(job_id, S.CLEANUP_ELIGIBLE, S.CLEANED, now=now)
        """
        with self._locked() as conn:
            savepoint = f"exlab_sp{self._depth}" if self._depth else None
            conn.execute(f"SAVEPOINT {savepoint}" if savepoint else "BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield conn
            except BaseException:
                self._depth -= 1
                self._rollback(conn, savepoint)
                raise
            self._depth -= 1
            try:
                conn.execute(f"RELEASE {savepoint}" if savepoint else "COMMIT")
            except BaseException:
                self._rollback(conn, savepoint)
                raise

    @staticmethod
    def _rollback(conn: sqlite3.Connection, savepoint: str | None) -> None:
        # SQLite may already have rolled back on its own (disk full, I/O error).
        if not conn.in_transaction:
            return
        with contextlib.suppress(sqlite3.Error):
            if savepoint:
                conn.execute(f"ROLLBACK TO {savepoint}")
                conn.execute(f"RELEASE {savepoint}")
            else:
                conn.execute("ROLLBACK")

    @staticmethod
    def _insert_event(
        conn: sqlite3.Connection,
        job_id: str,
        at: str,
        kind: str,
        from_state: str | None,
        to_state: str | None,
        detail: str,
        code: str | None = None,
    ) -> None:
        if code is None:  # the column named only when used (a test may build an older schema)
            conn.execute(
                "INSERT INTO events (job_id, at, kind, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, at, kind, from_state, to_state, _storable(str(detail))),
            )
            return
        conn.execute(
            "INSERT INTO events (job_id, at, kind, from_state, to_state, detail, code) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job_id, at, kind, from_state, to_state, _storable(str(detail)), str(code)),
        )

    @staticmethod
    def _fetch(conn: sqlite3.Connection, job_id: str) -> SyncJobRow:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return _job(row)

    @staticmethod
    def _guarded_update(
        conn: sqlite3.Connection,
        job_id: str,
        expected: SyncJobState,
        sets: dict[str, Any],
        unchanged: dict[str, Any] | None = None,
        unless_planned: bool = False,
    ) -> None:
        columns = ", ".join(f"{name} = ?" for name in sets)
        same = unchanged or {}
        guards = "".join(f" AND {name} IS ?" for name in same)
        params: tuple[Any, ...] = (
            *(_storable(value) for value in sets.values()),
            job_id,
            expected.value,
            *same.values(),
        )
        if unless_planned:
            guards += " AND NOT EXISTS (SELECT 1 FROM cleanup_progress WHERE job_id = ?)"
            params = (*params, job_id)
        cursor = conn.execute(f"UPDATE jobs SET {columns} WHERE id = ? AND state = ?{guards}", params)
        if cursor.rowcount == 1:
            return
        current = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if current is None:
            raise JobNotFound(job_id)
        if current["state"] == expected.value and unless_planned:
            planned = conn.execute("SELECT 1 FROM cleanup_progress WHERE job_id = ?", (job_id,)).fetchone()
            if planned is not None:
                raise DeletionPlanned(f"job {job_id}: the reaper has a deletion plan for it; left {expected.value}")
        if current["state"] == expected.value:
            raise IllegalTransition(f"stale: job {job_id} changed its {', '.join(same)} meanwhile")
        raise IllegalTransition(f"stale: job {job_id} is in state {current['state']}, not {expected.value}")

    # ---------------------------------------------------------------- writes

    def get_or_create(
        self, run_path: str, equipment_id: str, remote_path: str, *, now: dt.datetime
    ) -> tuple[SyncJobRow, bool]:
        """The run's job, creating it in QUEUED if the run has none.

        Returns ``(job, created)``. A run has one job for life: an existing
        job is returned as it is, whatever its state (its equipment and
        remote path are not changed). Creation writes a ``transition`` event
        (None -> queued, detail ``enqueued``). Raises ``ValueError`` for a
        relative run path.
        """
        run = _norm_run(run_path)
        stamp = _ts(now)
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE run_path = ?", (run,)).fetchone()
            if row is not None:
                return _job(row), False
            job_id = uuid.uuid4().hex
            conn.execute(
                "INSERT INTO jobs (id, run_path, equipment_id, remote_path, state, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, run, str(equipment_id), str(remote_path), _QUEUED, stamp, stamp),
            )
            self._insert_event(conn, job_id, stamp, TRANSITION_EVENT, None, _QUEUED, "enqueued")
            return self._fetch(conn, job_id), True

    def transition(
        self,
        job_id: str,
        from_state: SyncJobState | str,
        to_state: SyncJobState | str,
        *,
        now: dt.datetime,
        detail: str = "",
        unless_planned: bool = False,
        **fields: Any,
    ) -> SyncJobRow:
        """Move a job from ``from_state`` to ``to_state`` and return the new row.

        ``fields`` may set any of :data:`JOB_FIELDS` (None clears a nullable
        one; omitted fields keep their value); ``updated_at`` is always set
        to ``now``. The ``transition`` event is written in the same
        transaction. ``unless_planned``: not while the reaper has a deletion
        plan for the job (a ``cleanup_progress`` row), checked in the same
        UPDATE: a plan written by another process between a caller's look and
        its move wins (:class:`~exlab_wizard.sync.states.DeletionPlanned`).

        Raises :class:`IllegalTransition` when the table forbids the move or
        the job is no longer in ``from_state`` (stale), :class:`JobNotFound`
        for an unknown id, ``TypeError`` for an unknown or mistyped field.
        Nothing is written when it raises.
        """
        src, dst = SyncJobState(from_state), SyncJobState(to_state)
        check_transition(src, dst)
        sets = _encode_all(fields)
        stamp = _ts(now)
        with self.transaction() as conn:
            self._guarded_update(
                conn, job_id, src, {**sets, "state": dst.value, "updated_at": stamp}, unless_planned=unless_planned
            )
            self._insert_event(conn, job_id, stamp, TRANSITION_EVENT, src.value, dst.value, detail)
            return self._fetch(conn, job_id)

    def update(
        self,
        job_id: str,
        expected_state: SyncJobState | str,
        *,
        now: dt.datetime,
        event_kind: str | None = None,
        detail: str = "",
        unchanged: dict[str, Any] | None = None,
        **fields: Any,
    ) -> SyncJobRow:
        """Change job fields without a state change, guarded by ``expected_state``.

        Sets ``updated_at``; when ``event_kind`` is given, records that event
        (no from/to state) in the same transaction. ``unchanged``: fields
        (of :data:`JOB_FIELDS`) that must still hold these values, checked in
        the same statement (an audit pass counts only for the verification it
        read). Raises like :meth:`transition`; ``ValueError`` for
        ``event_kind="transition"`` (state changes go through :meth:`transition`).
        """
        expected = SyncJobState(expected_state)
        if event_kind == TRANSITION_EVENT:
            raise ValueError("a transition event needs a state change: use transition()")
        sets = _encode_all(fields)
        same = _encode_all(dict(unchanged or {}))
        stamp = _ts(now)
        with self.transaction() as conn:
            self._guarded_update(conn, job_id, expected, {**sets, "updated_at": stamp}, same)
            if event_kind is not None:
                self._insert_event(conn, job_id, stamp, str(event_kind), None, None, detail)
            return self._fetch(conn, job_id)

    def record_event(
        self, job_id: str, kind: str, detail: str, *, now: dt.datetime, code: str | None = None
    ) -> SyncEvent:
        """Record a decision that changes nothing on the job (e.g. a refused cleanup).

        ``code`` says what the decision is, for programs (see :class:`SyncEvent`).
        Returns the event. Raises :class:`JobNotFound` for an unknown id and
        ``ValueError`` for kind ``"transition"``.
        """
        if kind == TRANSITION_EVENT:
            raise ValueError("a transition event needs a state change: use transition()")
        stamp = _ts(now)
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise JobNotFound(job_id)
            self._insert_event(conn, job_id, stamp, str(kind), None, None, detail, code)
            row = conn.execute("SELECT * FROM events WHERE id = last_insert_rowid()").fetchone()
            return _event(row)

    def recover(self, *, now: dt.datetime, max_wait: dt.timedelta | None = None) -> list[SyncJobRow]:
        """Crash recovery, for the lease holder only, in one transaction.

        Every RUNNING job goes back to QUEUED, due ``now``, attempts
        unchanged, with the event ``recovered after restart``. Every pending
        metadata push is due ``now`` (an interrupted one is sent again at
        once), and so is every QUEUED job whose ``next_attempt_at`` lies
        further ahead than ``max_wait`` (set by a clock since set back, see
        :func:`attempt_due`). Returns the AWAITING_VERIFY jobs (oldest first)
        for the caller to verify again.
        """
        with self.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET metadata_push_due_at = ? WHERE metadata_push_due_at > ?", (_ts(now), _ts(now))
            )
            conn.execute(
                "UPDATE jobs SET next_attempt_at = ? WHERE state = ? AND next_attempt_at > ?",
                (_ts(now), _QUEUED, _beyond(now, max_wait)),
            )
            running = conn.execute(
                "SELECT id FROM jobs WHERE state = ? ORDER BY created_at, rowid",
                (SyncJobState.RUNNING.value,),
            ).fetchall()
            for row in running:
                self.transition(
                    row["id"],
                    SyncJobState.RUNNING,
                    SyncJobState.QUEUED,
                    now=now,
                    detail="recovered after restart",
                    next_attempt_at=now,
                )
            waiting = conn.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY created_at, rowid",
                (SyncJobState.AWAITING_VERIFY.value,),
            ).fetchall()
            return [_job(row) for row in waiting]

    # ---------------------------------------------------------------- reads

    def get(self, job_id: str) -> SyncJobRow | None:
        """The job with this id, or None."""
        with self._locked() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def by_run(self, run_path: str) -> SyncJobRow | None:
        """The run's job, or None. Raises ``ValueError`` for a relative path."""
        run = _norm_run(run_path)
        with self._locked() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE run_path = ?", (run,)).fetchone()
        return None if row is None else _job(row)

    def list_jobs(self, state: SyncJobState | str | None = None, equipment_id: str | None = None) -> list[SyncJobRow]:
        """Jobs, oldest first, optionally only those in ``state`` and/or of ``equipment_id``."""
        clauses, params = [], []
        if state is not None:
            clauses.append("state = ?")
            params.append(SyncJobState(state).value)
        if equipment_id is not None:
            clauses.append("equipment_id = ?")
            params.append(equipment_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._locked() as conn:
            rows = conn.execute(f"SELECT * FROM jobs{where} ORDER BY created_at, rowid", params).fetchall()
        return [_job(row) for row in rows]

    def iter_jobs(self, state: SyncJobState | str) -> Iterator[SyncJobRow]:
        """The jobs in ``state``, in insertion order, read :data:`JOB_PAGE` at a time.

        For passes over every verified job (audit, cleanup): memory stays one
        page whatever the size of the queue, and the lock is not held between
        pages. A job that leaves ``state`` before its page is read is not
        yielded; one that enters it may be.
        """
        value, after = SyncJobState(state).value, 0
        while True:
            with self._locked() as conn:
                rows = conn.execute(
                    "SELECT rowid AS rowid_, * FROM jobs WHERE state = ? AND rowid > ? ORDER BY rowid LIMIT ?",
                    (value, after, JOB_PAGE),
                ).fetchall()
            if not rows:
                return
            after = rows[-1]["rowid_"]
            jobs = [_job(row) for row in rows]
            del rows
            yield from jobs
            if len(jobs) < JOB_PAGE:
                return

    def counts(self) -> dict[SyncJobState, int]:
        """How many jobs are in each state (every state present, zero if none)."""
        with self._locked() as conn:
            rows = conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        found = {row["state"]: row["n"] for row in rows}
        return {state: found.get(state.value, 0) for state in SyncJobState}

    @staticmethod
    def _events(conn: sqlite3.Connection, job_id: str, limit: int | None) -> list[SyncEvent]:
        if limit is None:
            rows = conn.execute("SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,)).fetchall()
        else:
            if limit < 0:
                raise ValueError(f"limit must not be negative, got {limit}")
            rows = conn.execute(
                "SELECT * FROM (SELECT * FROM events WHERE job_id = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
                (job_id, limit),
            ).fetchall()
        return [_event(row) for row in rows]

    def events(self, job_id: str, limit: int | None = None) -> list[SyncEvent]:
        """The job's events, oldest first; with ``limit``, only the last ``limit``."""
        with self._locked() as conn:
            return self._events(conn, job_id, limit)

    def job_with_events(self, run_path_or_id: str, limit: int = 50) -> SyncJobRow | None:
        """The job (by id, or by absolute run path) with its last ``limit`` events, oldest first."""
        key = os.fspath(run_path_or_id)
        with self._snapshot() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (key,)).fetchone()
            if row is None and os.path.isabs(key):
                row = conn.execute("SELECT * FROM jobs WHERE run_path = ?", (_norm_run(key),)).fetchone()
            if row is None:
                return None
            events = self._events(conn, row["id"], limit)
        return dataclasses.replace(_job(row), events=tuple(events))

    def next_due(
        self, now: dt.datetime, *, busy_equipment: Collection[str] = (), max_wait: dt.timedelta | None = None
    ) -> SyncJobRow | None:
        """The QUEUED job to run next, or None.

        Among QUEUED jobs that are due (``next_attempt_at`` null or <= ``now``,
        or further ahead than ``max_wait``: see :func:`attempt_due`) and whose
        equipment is not in ``busy_equipment``: the one with a null
        ``next_attempt_at`` first, then the earliest ``next_attempt_at``, then
        the oldest. It is only read, not claimed: the worker then calls
        :meth:`transition` to RUNNING, which fails if another got there first.
        """
        if isinstance(busy_equipment, str):
            raise TypeError("busy_equipment must be a collection of equipment ids, not a str")
        busy = sorted({str(e) for e in busy_equipment})
        sql = (
            "SELECT * FROM jobs WHERE state = ?"
            " AND (next_attempt_at IS NULL OR next_attempt_at <= ? OR next_attempt_at > ?)"
        )
        params: list[Any] = [_QUEUED, _ts(now), _beyond(now, max_wait)]
        if busy:
            sql += f" AND equipment_id NOT IN ({', '.join('?' * len(busy))})"
            params.extend(busy)
        sql += " ORDER BY next_attempt_at IS NOT NULL, next_attempt_at, created_at, rowid LIMIT 1"
        with self._locked() as conn:
            row = conn.execute(sql, params).fetchone()
        return None if row is None else _job(row)

    def next_metadata_push(
        self, now: dt.datetime, *, busy_equipment: Collection[str] = (), max_wait: dt.timedelta | None = None
    ) -> SyncJobRow | None:
        """The job whose pending metadata push is due first, or None.

        A VERIFIED or CLEANUP_ELIGIBLE job, or one FAILED ``local_damage``:
        its NAS copy is the verified one, and often the only good one left,
        which must not wait for a ``restore`` to get the manifest it is
        checked against (the push sends only a ``checksums.sha256`` that is
        the verified manifest byte for byte). Only jobs whose
        ``metadata_push_due_at`` is ``<= now`` (or further ahead than
        ``max_wait``: set by a clock since set back, as for
        :func:`attempt_due`) and whose equipment is not in ``busy_equipment``;
        the earliest due first.
        """
        if isinstance(busy_equipment, str):
            raise TypeError("busy_equipment must be a collection of equipment ids, not a str")
        busy = sorted({str(e) for e in busy_equipment})
        sql = (
            "SELECT * FROM jobs WHERE metadata_push_due_at IS NOT NULL"
            " AND (metadata_push_due_at <= ? OR metadata_push_due_at > ?) AND " + _OWES_PUSH
        )
        params: list[Any] = [_ts(now), _beyond(now, max_wait), *_OWES_PUSH_PARAMS]
        if busy:
            sql += f" AND equipment_id NOT IN ({', '.join('?' * len(busy))})"
            params.extend(busy)
        sql += " ORDER BY metadata_push_due_at, created_at, rowid LIMIT 1"
        with self._locked() as conn:
            row = conn.execute(sql, params).fetchone()
        return None if row is None else _job(row)

    def next_metadata_wakeup(self, now: dt.datetime) -> dt.datetime | None:
        """The earliest pending metadata push due after ``now`` (the jobs :meth:`next_metadata_push` takes), or None."""
        with self._locked() as conn:
            row = conn.execute(
                "SELECT MIN(metadata_push_due_at) AS t FROM jobs WHERE metadata_push_due_at > ? AND " + _OWES_PUSH,
                (_ts(now), *_OWES_PUSH_PARAMS),
            ).fetchone()
        return _dt(row["t"])

    def next_dispatch_wakeup(self, now: dt.datetime, *, max_wait: dt.timedelta | None = None) -> dt.datetime | None:
        """The earlier of :meth:`next_wakeup` and :meth:`next_metadata_wakeup`, in one query.

        What the dispatcher sleeps until when it has nothing to start (it
        asks at every tick, so one read instead of two).
        """
        stamp = _ts(now)
        with self._locked() as conn:
            row = conn.execute(
                "SELECT MIN(t) AS t FROM ("
                " SELECT MIN(next_attempt_at) AS t FROM jobs WHERE state = ? AND next_attempt_at > ?"
                " AND next_attempt_at <= ?"
                " UNION ALL SELECT MIN(metadata_push_due_at) FROM jobs"
                " WHERE metadata_push_due_at > ? AND metadata_push_due_at <= ? AND state IN (?, ?))",
                (
                    _QUEUED,
                    stamp,
                    _beyond(now, max_wait),
                    stamp,
                    _beyond(now, max_wait),
                    SyncJobState.VERIFIED.value,
                    SyncJobState.CLEANUP_ELIGIBLE.value,
                ),
            ).fetchone()
        return _dt(row["t"])

    def next_wakeup(
        self, now: dt.datetime | None = None, *, max_wait: dt.timedelta | None = None
    ) -> dt.datetime | None:
        """The earliest ``next_attempt_at`` after ``now`` (default: the clock) among QUEUED jobs.

        None when no QUEUED job waits for a future time. A worker sleeps
        until then (or until woken by a new job). A time further ahead than
        ``max_wait`` is due already (:func:`attempt_due`), not waited for.
        """
        at = now if now is not None else dt.datetime.now(dt.UTC)
        with self._locked() as conn:
            row = conn.execute(
                "SELECT MIN(next_attempt_at) AS t FROM jobs WHERE state = ? AND next_attempt_at > ?"
                " AND next_attempt_at <= ?",
                (_QUEUED, _ts(at), _beyond(at, max_wait)),
            ).fetchone()
        return _dt(row["t"])


# --------------------------------------------------------------------------- lease


def lease_path_for(db_path: Path | str) -> Path:
    """The runner lease's lock file beside a queue database: ``<db>.lease``."""
    db = Path(db_path)
    return db.with_name(db.name + ".lease")


class RunnerLease:
    """Which process runs the workers for a queue database.

    ``path`` is the lock file, conventionally beside the database
    (``RunnerLease(lease_path_for(db_path))``, i.e. ``<db>.lease``).
    :meth:`acquire` takes a non-blocking exclusive lock on it and returns
    whether it got it; the lock is held until :meth:`release` or the death
    of the process (the OS drops it, so a crash never leaves a stale lease).
    Two ``RunnerLease`` objects exclude each other even within one process.
    The holder's pid is written into the file for people; the lock, not the
    file's content, is the lease.

    The file is a :class:`~exlab_wizard.sync.state_dir.PrivateLock`: 0600,
    made anew when others could open it or another user owns it, and the
    lock counts only on the file still at the path (a process that opened the
    old file before it was renamed away takes nothing by locking it).
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._file = PrivateLock(self.path, "the runner lease")
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        """True while this object holds the lease."""
        return self._file.held

    def acquire(self) -> bool:
        """Take the lease if no other holder has it; True when held (also if already held)."""
        with self._lock:
            if self._file.held:
                return True
            make_state_dir(self.path.parent)
            if not self._file.acquire():
                return False
            fd = self._file.fd
            with contextlib.suppress(OSError):  # the pid is for people only
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            return True

    def release(self) -> None:
        """Give the lease up. Idempotent."""
        with self._lock:
            self._file.release()

    def holder_pid(self) -> int | None:
        """The pid last written by a holder (informational; may be stale)."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def holder(self) -> LockHolder | None:
        """Who holds the lease now: the OS's answer where it gives one (Linux), else the pid in the file."""
        found = lock_holder(self.path)
        if found is not None:
            return found
        pid = self.holder_pid()
        return LockHolder.of(pid) if pid else None
