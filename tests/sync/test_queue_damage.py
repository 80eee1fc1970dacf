"""A damaged queue file told apart from a busy one, by SQLite's result code, on real files.

``SQLITE_CORRUPT`` (a page zeroed: a failing sector) and ``SQLITE_NOTADB``
(the header gone) are :class:`QueueDamaged` with their kind; a lock held past
the busy timeout is not (it may pass: the loops poll again). The start's
check finds a zeroed page of the jobs table and passes a sound queue; once
found, the queue is never tried again by this process.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.queue_damage import QueueDamaged, QueueDamageKind, damage_of
from tests.helpers import Clock
from tests.lab import EQ

PAGE = 4096


def _zero_page(db: Path, page: int) -> None:
    """Page ``page`` (1-based) of the file all zeros, as a failing sector reads back."""
    with open(db, "r+b") as f:
        f.seek((page - 1) * PAGE)
        f.write(b"\0" * PAGE)
        os.fsync(f.fileno())


def _locked_elsewhere(db: Path) -> sqlite3.Connection:
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


@pytest.mark.parametrize(
    ("damage", "kind"),
    [
        ("zero_page", QueueDamageKind.CORRUPT),  # a failing sector inside the file
        ("zero_header", QueueDamageKind.NOT_A_DATABASE),  # the first page gone: not SQLite's any more
        ("locked", None),  # busy past the timeout: may pass, the loops poll again
    ],
)
def test_only_damage_to_the_file_is_queue_damaged(tmp_path: Path, damage: str, kind: QueueDamageKind | None) -> None:
    db = tmp_path / "queue.db"
    JobQueue(db).close()  # the schema, in WAL mode
    holder = None
    if damage == "zero_page":
        _zero_page(db, 2)
    elif damage == "zero_header":
        _zero_page(db, 1)
    else:
        holder = _locked_elsewhere(db)
    try:
        with pytest.raises(sqlite3.DatabaseError) as raised:
            sqlite3.connect(db, timeout=0).execute("INSERT INTO jobs (id) VALUES ('x')")
    finally:
        if holder is not None:
            holder.close()
    found = damage_of(raised.value, db)
    assert (found and found.kind) == kind, (damage, raised.value, found)


def test_the_start_check_finds_a_zeroed_page_and_passes_a_sound_queue(tmp_path: Path) -> None:
    sound, damaged = tmp_path / "sound.db", tmp_path / "damaged.db"
    for db in (sound, damaged):
        with JobQueue(db) as queue:
            for i in range(300):  # more than one page of jobs
                queue.get_or_create(f"/lab/{EQ}/P/Runs/Run_{i}", EQ, f"/nas/Run_{i}", now=Clock()())
    JobQueue(sound).check()
    _zero_page(damaged, 2)
    queue = JobQueue(damaged)  # the schema on page 1 still reads
    with pytest.raises(QueueDamaged) as raised:
        queue.check()
    assert raised.value.kind == QueueDamageKind.CORRUPT and raised.value.db_path == damaged
    with pytest.raises(QueueDamaged):  # found once: never tried again by this process
        queue.list_jobs()
