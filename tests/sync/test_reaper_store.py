"""The reaper's tables as a queue migration, and reads of them that never wait for a writer.

A database used by an earlier version made the tables on first use, outside
the queue's migrations, and sits at schema version 3: it must open, upgrade
and keep its plan. A dry run or a status read beside a running pass (or the
CLI beside ``serve``) must not wait for another connection's write lock.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from pathlib import Path

import pytest

from exlab_wizard.sync import queue as queue_mod
from exlab_wizard.sync import reaper
from exlab_wizard.sync.queue import JobQueue

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
REAPER_TABLES = {"verified_files", "cleanup_progress", "cleanup_plan"}

#: How the reaper made its tables before they were a migration (on first use, in the queue database).
OLD_AD_HOC_SCHEMA = """
CREATE TABLE IF NOT EXISTS verified_files (
    job_id TEXT NOT NULL REFERENCES jobs (id), path BLOB NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, ino TEXT, trusted INTEGER NOT NULL,
    recorded_at TEXT NOT NULL, PRIMARY KEY (job_id, path));
CREATE TABLE IF NOT EXISTS cleanup_progress (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id), run_path TEXT NOT NULL, manifest_digest TEXT NOT NULL,
    planned_at TEXT NOT NULL, files INTEGER NOT NULL, bytes INTEGER NOT NULL, data_deleted_at TEXT);
CREATE TABLE IF NOT EXISTS cleanup_plan (
    job_id TEXT NOT NULL REFERENCES jobs (id), path BLOB NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ino TEXT NOT NULL, sha256 TEXT NOT NULL, manifest_digest TEXT NOT NULL,
    PRIMARY KEY (job_id, path));
"""


def _tables(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


def _version(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def _version_3_database(db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A queue database as version 3 left it, with one job; returns the job's id."""
    with monkeypatch.context() as patch:
        patch.setattr(queue_mod, "MIGRATIONS", queue_mod.MIGRATIONS[:3])
        with JobQueue(db) as queue:
            job, _ = queue.get_or_create(str(tmp_path / "Runs" / "Run_1"), "CONF_01", "/nas/Run_1", now=NOW)
    assert _version(db) == 3
    return job.id


def _plan_one_file(queue: JobQueue, job_id: str, path: str) -> None:
    with queue.transaction() as conn:
        conn.execute(
            "INSERT INTO cleanup_progress (job_id, run_path, manifest_digest, planned_at, files, bytes)"
            " VALUES (?, ?, 'd1', ?, 1, 3)",
            (job_id, "/r", NOW.isoformat()),
        )
        conn.execute(
            "INSERT INTO cleanup_plan (job_id, path, size, mtime_ns, ino, sha256, manifest_digest)"
            " VALUES (?, ?, 3, 1, '7', 'ab', 'd1')",
            (job_id, os.fsencode(path)),
        )


def test_a_version_3_database_gets_the_reaper_tables_when_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    db = tmp_path / "queue.db"
    _version_3_database(db, tmp_path, monkeypatch)
    assert not REAPER_TABLES & _tables(db)
    JobQueue(db).close()  # opening alone: no reaper call made
    assert _tables(db) >= REAPER_TABLES
    assert _version(db) == len(queue_mod.MIGRATIONS)


def test_a_database_with_the_old_ad_hoc_tables_upgrades_and_keeps_its_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    db = tmp_path / "queue.db"
    job_id = _version_3_database(db, tmp_path, monkeypatch)
    conn = sqlite3.connect(db)
    conn.executescript(OLD_AD_HOC_SCHEMA)
    conn.close()
    with monkeypatch.context() as patch:
        patch.setattr(queue_mod, "MIGRATIONS", queue_mod.MIGRATIONS[:3])
        with JobQueue(db) as queue:
            _plan_one_file(queue, job_id, "sub/a.tif")
    assert _version(db) == 3
    with JobQueue(db) as queue:
        assert _version(db) == len(queue_mod.MIGRATIONS) > 3
        assert reaper.planned_paths(queue, job_id) == {"sub/a.tif"}
        assert reaper.local_data_deleted_at(queue, job_id) is None


def test_reading_the_plan_does_not_wait_for_another_connections_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A short busy timeout: a read that waited for the lock would fail fast instead of after 10 s.
    monkeypatch.setattr(queue_mod, "BUSY_TIMEOUT_S", 0.2)
    db = tmp_path / "queue.db"
    queue = JobQueue(db)
    job, _ = queue.get_or_create(str(tmp_path / "Runs" / "Run_1"), "CONF_01", "/nas/Run_1", now=NOW)
    reaper.ensure_cleanup_schema(queue)
    _plan_one_file(queue, job.id, "a.tif")
    reaper.record_verified_stat(queue, job.id, tmp_path, {}, NOW)
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE cleanup_progress SET data_deleted_at = ? WHERE job_id = ?", (NOW.isoformat(), job.id))
        # The other connection holds the write lock: reads see the committed plan, and do not wait.
        assert reaper.planned_paths(queue, job.id) == {"a.tif"}
        assert reaper.local_data_deleted_at(queue, job.id) is None
        assert reaper.load_verified_stats(queue, job.id) == {}
        writer.execute("COMMIT")
    finally:
        writer.close()
    assert reaper.local_data_deleted_at(queue, job.id) == NOW
    queue.close()


def test_the_store_reads_take_no_write_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from exlab_wizard.sync.reaper.store import CleanupStore

    monkeypatch.setattr(queue_mod, "BUSY_TIMEOUT_S", 0.2)
    db = tmp_path / "queue.db"
    with JobQueue(db) as queue:
        job, _ = queue.get_or_create(str(tmp_path / "Runs" / "Run_1"), "CONF_01", "/nas/Run_1", now=NOW)
        _plan_one_file(queue, job.id, "a.tif")
        store = CleanupStore(queue)
        writer = sqlite3.connect(db, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("DELETE FROM cleanup_plan")
            assert list(store.progress_rows()) == [job.id]
            assert [f.path for f in store.plan_files(job.id)] == ["a.tif"]
            assert store.verified_stats(job.id) == {}
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                store.drop_plan(job.id)  # a write does wait (and here gives up): the lock is real
        finally:
            writer.close()
