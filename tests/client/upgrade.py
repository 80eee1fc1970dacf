"""An upgrade in place: a queue database the current engine wrote, turned into one an older engine left.

``as_version(db, k)`` rebuilds ``db`` as schema version ``k``: a fresh file
with ``MIGRATIONS[:k]`` applied and every row copied with the columns that
schema had (rows of tables it lacks dropped, unless ``ad_hoc_reaper`` keeps
the reaper's, which engines before version 4 made on first use). Events an
older engine did not write are dropped (``nas_claimed`` before version 9);
``edit`` changes the rows as that engine would have left them. The next
:class:`~exlab_wizard.sync.queue.JobQueue` to open it runs the migrations
from ``k`` on, as an upgraded engine would.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from exlab_wizard.sync import queue as queue_mod
from exlab_wizard.sync.queue import NAS_CLAIMED_EVENT, _statements


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def _tables(conn: sqlite3.Connection) -> list[str]:
    query = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    return [row[0] for row in conn.execute(query)]


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def as_version(
    db: Path,
    k: int,
    *,
    ad_hoc_reaper: bool = False,
    edit: Callable[[sqlite3.Connection], None] | None = None,
) -> None:
    """Rewrite ``db`` (closed by every queue) in place as schema version ``k`` (see the module)."""
    new = db.with_name(db.name + ".new")
    _remove(new)
    dst = sqlite3.connect(new, isolation_level=None)
    dst.execute("PRAGMA journal_mode = WAL")
    dst.execute("BEGIN")
    for step in queue_mod.MIGRATIONS[:k]:
        assert isinstance(step, str)
        for statement in _statements(step):
            dst.execute(statement)
    if ad_hoc_reaper and k < 4:
        reaper_tables = queue_mod.MIGRATIONS[3]  # CREATE TABLE IF NOT EXISTS: the tables as made on first use
        assert isinstance(reaper_tables, str)
        for statement in _statements(reaper_tables):
            dst.execute(statement)
    dst.execute(f"PRAGMA user_version = {k}")
    src = sqlite3.connect(db)
    kept = set(_tables(dst))
    for table in _tables(src):
        if table not in kept:
            continue
        cols = [c for c in _columns(src, table) if c in set(_columns(dst, table))]
        where = f" WHERE kind != '{NAS_CLAIMED_EVENT}'" if table == "events" and k < 9 else ""
        rows = src.execute(f"SELECT {', '.join(cols)} FROM {table}{where} ORDER BY rowid").fetchall()
        dst.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)
    if edit is not None:
        edit(dst)
    dst.execute("COMMIT")
    src.close()
    dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    dst.close()
    _remove(db)
    os.replace(new, db)
    _remove(new)


def user_version(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()
