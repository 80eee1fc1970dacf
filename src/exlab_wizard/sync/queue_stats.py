"""Cheap read-only questions to the queue database, for the HTTP API, the dashboard and ``/metrics``.

:class:`QueueStats` opens its own read-only connection (WAL readers never
block the workers' writes), so a scrape or a page of jobs never waits for
the lock of the :class:`~exlab_wizard.sync.queue.JobQueue` the workers use.
Every query is an aggregate or a keyset page over an index, so its cost does
not grow with the events table and stays small with 100,000 jobs.

Example::

    stats = QueueStats(config.queue_db)
    for row in stats.by_equipment_state():
        print(row.equipment_id, row.state, row.jobs)
    stats.oldest_queued(["CONFOCAL_01"])  # {"CONFOCAL_01": <aware datetime>} when one is queued
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exlab_wizard.sync.queue import CACHE_KIB, SyncJobRow
from exlab_wizard.sync.queue import _job as _row  # the one place rows are read from SQL
from exlab_wizard.sync.queue_damage import classified, known
from exlab_wizard.sync.states import SyncJobState

__all__ = ["EquipmentStateCount", "JobPage", "QueueStats", "StoredEvent"]

_QUEUED = SyncJobState.QUEUED.value
_RECLAIMABLE = (SyncJobState.VERIFIED.value, SyncJobState.CLEANUP_ELIGIBLE.value)


def _dt(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class EquipmentStateCount:
    """How many jobs of one equipment are in one state."""

    equipment_id: str
    state: str
    jobs: int


@dataclass(frozen=True)
class JobPage:
    """One page of jobs, oldest first; ``next_after`` is the ``after`` of the next page (None: last page)."""

    jobs: list[SyncJobRow]
    next_after: str | None


@dataclass(frozen=True)
class StoredEvent:
    """One row of the queue's events table with its job's run path and equipment."""

    id: int
    job_id: str
    run_path: str
    equipment_id: str
    at: str
    kind: str
    from_state: str | None
    to_state: str | None
    detail: str
    code: str | None = None  # what the event is, for programs (see ``SyncEvent.code``)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job_id": self.job_id,
            "run_path": self.run_path,
            "equipment_id": self.equipment_id,
            "at": self.at,
            "kind": self.kind,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "detail": self.detail,
            "code": self.code,
        }


class QueueStats:
    """Read-only aggregate queries on the queue database at ``db_path`` (which must exist).

    Thread-safe; every method is synchronous and short. Raises
    :class:`~exlab_wizard.sync.queue_damage.QueueDamaged`, untried, once SQLite
    has said the file is damaged to this process.
    """

    def __init__(self, db_path: Path | str):
        self.db_path = Path(db_path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            damage = known(self.db_path)
            if damage is not None:
                raise damage
            with classified(self.db_path):
                conn = self._connection()
                conn.execute("BEGIN")  # one snapshot for the whole question
                try:
                    yield conn
                finally:
                    conn.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                f"file:{self.db_path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None, timeout=10.0
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")  # a long-lived connection: bounded
            self._conn = conn
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ------------------------------------------------------------------ aggregates

    def by_equipment_state(self) -> list[EquipmentStateCount]:
        """Job counts by equipment and state (only the pairs that have jobs): one pass over a covering index."""
        sql = "SELECT equipment_id, state, COUNT(*) AS n FROM jobs GROUP BY equipment_id, state"
        with self._read() as conn:
            rows = conn.execute(sql).fetchall()
        return [EquipmentStateCount(r["equipment_id"], r["state"], r["n"]) for r in rows]

    def oldest_queued(self, equipment_ids: Iterable[str]) -> dict[str, dt.datetime]:
        """When the oldest QUEUED job of each equipment was created (equipment with none left out); one seek each."""
        return self._per_equipment(
            "SELECT MIN(created_at) FROM jobs WHERE equipment_id = ? AND state = ?", equipment_ids, _QUEUED
        )

    def last_verified(self, equipment_ids: Iterable[str]) -> dict[str, dt.datetime]:
        """The latest ``verified_at`` of each equipment's jobs (never verified: left out); one seek each."""
        return self._per_equipment("SELECT MAX(verified_at) FROM jobs WHERE equipment_id = ?", equipment_ids)

    def _per_equipment(self, sql: str, equipment_ids: Iterable[str], *extra: Any) -> dict[str, dt.datetime]:
        out: dict[str, dt.datetime] = {}
        with self._read() as conn:
            for equipment_id in equipment_ids:
                moment = _dt(conn.execute(sql, (equipment_id, *extra)).fetchone()[0])
                if moment is not None:
                    out[equipment_id] = moment
        return out

    def reclaimable_bytes(self) -> dict[str, int]:
        """Bytes of verified local data that cleanup could free (VERIFIED and CLEANUP_ELIGIBLE jobs), by equipment.

        Read from the sizes recorded at verification; empty when nothing was
        recorded yet. Costs one pass over those jobs' files: call it from a
        background refresh, not from a scrape.
        """
        sql = (
            "SELECT j.equipment_id AS equipment_id, SUM(f.size) AS total FROM jobs j"
            " JOIN verified_files f ON f.job_id = j.id WHERE j.state IN (?, ?) GROUP BY j.equipment_id"
        )
        with self._read() as conn:
            try:
                rows = conn.execute(sql, _RECLAIMABLE).fetchall()
            except sqlite3.OperationalError as exc:  # the reaper's table is made on its first use
                if "no such table" in str(exc):
                    return {}
                raise
        return {r["equipment_id"]: int(r["total"] or 0) for r in rows}

    # ------------------------------------------------------------------ pages

    def page(
        self, *, state: str | None = None, equipment_id: str | None = None, limit: int = 100, after: str | None = None
    ) -> JobPage:
        """Jobs in creation order, ``limit`` at most, after the job ``after`` (an id; unknown: ``KeyError``)."""
        clauses: list[str] = []
        params: list[Any] = []
        with self._read() as conn:
            if after is not None:
                row = conn.execute("SELECT rowid FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise KeyError(after)
                clauses.append("rowid > ?")
                params.append(row[0])
            if state is not None:
                clauses.append("state = ?")
                params.append(state)
            if equipment_id is not None:
                clauses.append("equipment_id = ?")
                params.append(equipment_id)
            where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
            rows = conn.execute(f"SELECT * FROM jobs{where} ORDER BY rowid LIMIT ?", (*params, limit + 1)).fetchall()
        jobs = [_row(r) for r in rows[:limit]]
        return JobPage(jobs, jobs[-1].id if len(rows) > limit and jobs else None)

    # ------------------------------------------------------------------ events

    def last_event_id(self) -> int:
        with self._read() as conn:
            row = conn.execute("SELECT MAX(id) FROM events").fetchone()
        return int(row[0] or 0)

    def events_after(self, event_id: int, limit: int = 500) -> list[StoredEvent]:
        """Events with an id above ``event_id``, oldest first (a primary-key range: cheap)."""
        sql = (
            "SELECT e.id, e.job_id, j.run_path, j.equipment_id, e.at, e.kind, e.from_state, e.to_state, e.detail,"
            " e.code"
            " FROM events e JOIN jobs j ON j.id = e.job_id WHERE e.id > ? ORDER BY e.id LIMIT ?"
        )
        with self._read() as conn:
            rows = conn.execute(sql, (event_id, limit)).fetchall()
        return [StoredEvent(*tuple(r)) for r in rows]
