"""File times in nanoseconds outside signed 64 bits are stored, read back and compared exactly.

``st_mtime_ns`` of a file dated after 2262-04-11 is past 2**63 - 1 (and one
dated before 1677-09-21 below -2**63, where a file system keeps it). The
reaper's verified stats and deletion plan must give back the very int they
were given: the reaper compares them with a fresh stat before it deletes,
so a rounded or clamped value would either block the deletion for ever or
let another time pass for this one. The mount transport's stat key must
tell such times apart too (it packed them as signed 64 bits and raised).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.reaper.store import CleanupStore, PlannedFile
from exlab_wizard.sync.transports import mount

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)

TIMES = [
    2**63 - 1,
    2**63,
    10_500_000_000 * 10**9 + 123,  # a file dated 2302
    2**64 + 7,
    0,
    -1,
    -631_152_000 * 10**9,  # 1950
    -(2**63),
    -(2**63) - 1,
    -(2**64) - 9,
]


@pytest.fixture
def store(tmp_path: Path):
    with JobQueue(tmp_path / "queue.db") as queue:
        yield CleanupStore(queue)


def _eligible_job(store: CleanupStore, tmp_path: Path):
    queue = store.queue
    job, _ = queue.get_or_create(str(tmp_path / "Runs" / "Run_1"), "CONF_01", "/nas/Run_1", now=NOW)
    with queue.transaction() as conn:
        conn.execute("UPDATE jobs SET state = 'cleanup_eligible', manifest_digest = 'd1' WHERE id = ?", (job.id,))
    return queue.get(job.id)


def test_verified_stats_keep_every_time_exactly(store: CleanupStore, tmp_path: Path) -> None:
    job = _eligible_job(store, tmp_path)
    data = {f"f{i}.bin": f"{i:064x}" for i in range(len(TIMES))}
    rows = {
        f"f{i}.bin": (data[f"f{i}.bin"], 10, ns, TIMES[-1 - i], 2**64 - 1 - i, True, None) for i, ns in enumerate(TIMES)
    }
    assert store.record_verified(job.id, data, rows, NOW) == len(TIMES)
    got = store.verified_stats(job.id)
    for i, ns in enumerate(TIMES):
        stat = got[f"f{i}.bin"]
        assert (stat.mtime_ns, stat.ctime_ns) == (ns, TIMES[-1 - i]), (ns, stat)
        assert type(stat.mtime_ns) is int and type(stat.ctime_ns) is int
        real = SimpleNamespace(st_size=10, st_mtime_ns=ns, st_ctime_ns=TIMES[-1 - i], st_ino=2**64 - 1 - i)
        assert stat.matches(real)
        assert not stat.matches(SimpleNamespace(**{**vars(real), "st_mtime_ns": ns + 1}))


def test_the_deletion_plan_keeps_every_time_exactly(store: CleanupStore, tmp_path: Path) -> None:
    job = _eligible_job(store, tmp_path)
    files = [PlannedFile(f"f{i}.bin", 10, ns, 7 + i, f"{i:064x}", TIMES[-1 - i]) for i, ns in enumerate(TIMES)]
    assert store.write_plan(job, files, NOW, "planned") is not None
    assert store.plan_files(job.id) == sorted(files, key=lambda f: os.fsencode(f.path))
    for planned in store.plan_files(job.id):
        assert type(planned.mtime_ns) is int and type(planned.ctime_ns) is int


def test_mount_stat_keys_tell_every_time_apart() -> None:
    def key(mtime_ns: int) -> bytes:
        info = SimpleNamespace(st_ino=2**64 - 1, st_size=10, st_mtime_ns=mtime_ns, st_ctime_ns=-mtime_ns)
        return mount._stat_key(info)

    keys = [key(ns) for ns in TIMES]
    assert len(set(keys)) == len(TIMES)
    assert key(2**64 + 5) != key(5)  # never folded onto another time (no 64-bit mask)
    assert key(10_500_000_000 * 10**9) == key(10_500_000_000 * 10**9)
