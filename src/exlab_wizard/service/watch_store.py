"""The completion watcher's durable memory: one table in the queue database.

``watched_runs`` (created by an entry of :data:`exlab_wizard.sync.queue.MIGRATIONS`)
holds one row per run the watcher has acted on:

- ``status = 'handed_over'``: the run has a job (the watcher enqueued it, or
  found a job made by hand). It is never looked into again; the job is the
  queue's business from then on.
- ``status = 'blocked'``: the gate blocked it; ``fingerprint`` is what the
  run looked like then (:func:`exlab_wizard.service.run_signals.fingerprint`)
  and ``findings`` the blocking findings (JSON list of ``Finding.to_dict()``).

Runs waiting for their completeness signal are not stored: the watcher looks
at them every pass anyway. Rows of runs that disappeared are deleted.

The store has its own SQLite connection to the queue file (WAL,
``synchronous=FULL``, the queue's busy timeout). Reads are plain ``SELECT``
statements that take no write lock; each write is one ``BEGIN IMMEDIATE``
transaction. Times are stored as the queue stores them (ISO 8601 UTC). A
damaged file raises :class:`~exlab_wizard.sync.queue_damage.QueueDamaged`,
as the queue does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from exlab_wizard.sync.queue import BUSY_TIMEOUT_S, CACHE_KIB, WAL_LIMIT_BYTES, JobQueue
from exlab_wizard.sync.queue_damage import classified, known
from exlab_wizard.validator import Finding

__all__ = ["BLOCKED", "HANDED_OVER", "WatchStore", "WatchedRun"]

HANDED_OVER = "handed_over"
BLOCKED = "blocked"


@dataclass(frozen=True)
class WatchedRun:
    """One row of ``watched_runs``."""

    run_path: str
    equipment_id: str
    status: str
    job_id: str | None
    fingerprint: str | None
    findings: tuple[Finding, ...]
    first_seen_at: dt.datetime
    updated_at: dt.datetime


def _iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("naive datetime: the watcher stores aware UTC times")
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _row(row: sqlite3.Row) -> WatchedRun:
    try:
        findings = tuple(Finding.from_dict(item) for item in json.loads(row["findings"]))
    except (ValueError, TypeError):
        findings = ()  # a row we cannot read back only costs one more gate check
    return WatchedRun(
        run_path=row["run_path"],
        equipment_id=row["equipment_id"],
        status=row["status"],
        job_id=row["job_id"],
        fingerprint=row["fingerprint"],
        findings=findings,
        first_seen_at=dt.datetime.fromisoformat(row["first_seen_at"]),
        updated_at=dt.datetime.fromisoformat(row["updated_at"]),
    )


class WatchStore:
    """Read and write ``watched_runs`` in the queue database at ``db_path``.

    Opening applies the queue's migrations when the file is older (or new).
    Synchronous and short; use from one thread at a time.
    """

    def __init__(self, db_path: Path | str):
        self.db_path = Path(db_path)
        JobQueue(self.db_path).close()  # create or migrate the schema, table included
        self._conn = sqlite3.connect(
            self.db_path,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
        self._conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")

    def close(self) -> None:
        """Close the connection. Idempotent."""
        self._conn.close()

    def all(self) -> dict[str, WatchedRun]:
        """Every row, by run path."""
        with self._classified():
            rows = self._conn.execute("SELECT * FROM watched_runs").fetchall()
        return {row["run_path"]: _row(row) for row in rows}

    @contextlib.contextmanager
    def _classified(self) -> Iterator[None]:
        """:class:`QueueDamaged`, untried, once the file is known damaged; SQLite's damage codes as it."""
        damage = known(self.db_path)
        if damage is not None:
            raise damage
        with classified(self.db_path):
            yield

    def _write(self, statements: Iterable[tuple[str, tuple[object, ...]]]) -> None:
        conn = self._conn
        with self._classified():
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    conn.execute(sql, params)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def save(self, runs: Iterable[WatchedRun]) -> None:
        """Insert or replace these rows, all in one transaction."""
        sql = (
            "INSERT OR REPLACE INTO watched_runs (run_path, equipment_id, status, job_id, fingerprint,"
            " findings, first_seen_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        statements = [
            (
                sql,
                (
                    run.run_path,
                    run.equipment_id,
                    run.status,
                    run.job_id,
                    run.fingerprint,
                    json.dumps([finding.to_dict() for finding in run.findings]),
                    _iso(run.first_seen_at),
                    _iso(run.updated_at),
                ),
            )
            for run in runs
        ]
        if statements:
            self._write(statements)

    def forget(self, run_paths: Iterable[str]) -> None:
        """Delete the rows of these runs, in one transaction."""
        statements = [("DELETE FROM watched_runs WHERE run_path = ?", (path,)) for path in run_paths]
        if statements:
            self._write(statements)
