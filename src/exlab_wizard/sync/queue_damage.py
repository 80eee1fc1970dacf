"""A damaged queue database, told apart from a busy one.

SQLite answers a queue that cannot be used *for now* (locked past the busy
timeout, the disk full, an I/O error that may pass) with
``sqlite3.OperationalError``: the loops poll again. It answers a file whose
pages are damaged (a failing sector, a partial copy, another program's file)
with ``SQLITE_CORRUPT`` or ``SQLITE_NOTADB``: no retry helps, and a service
polling on would log a traceback per poll and sync nothing for ever. Those two
codes become :class:`QueueDamaged` here, in one place, by result code (never
by message text); everything else passes through unchanged.

The first damage found on a file is recorded and logged once per process
(:func:`record`); from then on every connection of this process to that file
refuses to use it (:func:`known`), whichever one found it: the loops stop
(nothing is sent, verified or deleted) and the service reports it
(``/healthz``, the dashboard) until it is stopped and the file repaired.

Example::

    with classified(db_path):
        conn.execute("SELECT ...")   # SQLITE_CORRUPT -> QueueDamaged(kind=corrupt)
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

__all__ = [
    "CHECKED_TABLES",
    "QueueDamageKind",
    "QueueDamaged",
    "check_tables",
    "classified",
    "damage_of",
    "known",
    "record",
]

logger = logging.getLogger(__name__)

#: The tables the start check reads (``PRAGMA quick_check(<table>)``, each with its indexes): one row per run
#: (jobs) or per planned deletion, never per file or per event, so the check stays well under a second on a
#: queue of 100,000 runs. Damage in the other tables is found when it is read, and stops the service as well.
CHECKED_TABLES = ("jobs", "cleanup_progress", "cleanup_plan")

#: The first damage found on each file (by absolute path), in this process.
_known: dict[str, QueueDamaged] = {}
_known_lock = threading.Lock()


class QueueDamageKind(StrEnum):
    """What is wrong with the file (SQLite's primary result code)."""

    CORRUPT = "corrupt"  # SQLITE_CORRUPT: a page does not hold what the file's structure says
    NOT_A_DATABASE = "not_a_database"  # SQLITE_NOTADB: the header is not SQLite's (zeroed, overwritten)


_KINDS = {sqlite3.SQLITE_CORRUPT: QueueDamageKind.CORRUPT, sqlite3.SQLITE_NOTADB: QueueDamageKind.NOT_A_DATABASE}


class QueueDamaged(sqlite3.DatabaseError):
    """The queue database is damaged for good: no retry helps; stop, move it aside or put back a backup.

    ``kind`` says how, ``db_path`` which file, ``detail`` SQLite's words. A
    ``sqlite3.DatabaseError``, so code that handles any database error still does.
    """

    def __init__(self, kind: QueueDamageKind, db_path: Path | str, detail: str):
        self.kind = kind
        self.db_path = Path(db_path)
        self.detail = detail
        super().__init__(
            f"{self.db_path} is damaged ({detail}): nothing is synced or deleted until it is repaired; stop "
            "exlab-sync serve, then move the file aside or put back a backup (docs/recovery.md)"
        )

    def again(self) -> QueueDamaged:
        """A fresh exception saying the same (raising one instance again and again grows its traceback)."""
        return QueueDamaged(self.kind, self.db_path, self.detail)


def damage_of(exc: BaseException, db_path: Path | str) -> QueueDamaged | None:
    """``exc`` as :class:`QueueDamaged` when SQLite says the file is damaged; None for any other error."""
    if isinstance(exc, QueueDamaged):
        return exc
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.DatabaseError) else None
    kind = _KINDS.get(code & 0xFF) if isinstance(code, int) else None  # extended codes keep the primary in the low byte
    return None if kind is None else QueueDamaged(kind, db_path, str(exc))


def record(damage: QueueDamaged) -> None:
    """Remember ``damage`` for its file and log it as one ERROR line, the first time only."""
    key = os.path.abspath(damage.db_path)
    with _known_lock:
        if key in _known:
            return
        _known[key] = damage
    logger.error("%s", damage)


def known(db_path: Path | str) -> QueueDamaged | None:
    """A fresh copy of the damage this process found on ``db_path``, or None (a dict lookup)."""
    damage = _known.get(os.path.abspath(db_path)) if _known else None
    return None if damage is None else damage.again()


@contextlib.contextmanager
def classified(db_path: Path | str) -> Iterator[None]:
    """Raise :class:`QueueDamaged` (recorded, logged once) for a damaged file; others pass unchanged."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        damage = damage_of(exc, db_path)
        if damage is None or damage is exc:
            raise
        record(damage)
        raise damage from exc


def check_tables(conn: sqlite3.Connection, db_path: Path | str, tables: tuple[str, ...] = CHECKED_TABLES) -> None:
    """``PRAGMA quick_check`` of ``tables``; :class:`QueueDamaged` (recorded, logged once) when one is damaged."""
    with classified(db_path):
        for table in tables:
            rows = [row[0] for row in conn.execute(f"PRAGMA quick_check({table})").fetchall()]
            if rows != ["ok"]:
                damage = QueueDamaged(QueueDamageKind.CORRUPT, db_path, f"quick_check of {table}: {rows[0]}")
                record(damage)
                raise damage
