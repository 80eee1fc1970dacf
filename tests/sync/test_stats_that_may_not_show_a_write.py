"""Verified stats that may not show a write: from another boot, or stamped within the writeback window.

A power cut can keep an in-place save's bytes and lose its new times (XFS's
lazily forced log after ``fdatasync``, btrfs ``nodatacow`` writeback before
the transaction commit); a store through a memory mapping into a page still
dirty stamps no time at all. Either leaves other bytes under the very stat
recorded. Such a stat never spares a file its read before a deletion; the
other bytes found under it stay damage all the same (never sent over the
verified NAS copy: a bad sector looks alike), and the damage message names
``retry --accept-local`` for an unstamped save. The end-to-end cases on btrfs
and XFS: tests/client/test_writes_the_stat_does_not_show.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import uuid
from pathlib import Path

import pytest

from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.reaper import deletion, local_check, store
from exlab_wizard.sync.reaper.local_check import load_verified_stats, record_verified_stat, scan_run
from exlab_wizard.sync.reaper.store import CleanupStore, PlannedFile, VerifiedStat
from exlab_wizard.sync.states import SyncJobState
from tests.client.upgrade import as_version
from tests.lab import VERIFIED_FILES, settled_since
from tests.lab import VerifiedLab as Lab

S = SyncJobState
HASHES = {rel: hashlib.sha256(data).hexdigest() for rel, data in VERIFIED_FILES.items()}


@pytest.fixture
def lab(tmp_path: Path):
    built = Lab.build(tmp_path)
    yield built
    built.queue.close()


def _boot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The PC boots again: a new boot id."""
    path = tmp_path / f"boot_id.{uuid.uuid4().hex}"
    path.write_text(f"{uuid.uuid4()}\n")
    monkeypatch.setattr(store, "BOOT_ID_FILE", str(path), raising=False)


def _scan(lab: Lab, run: Path, job_id: str):
    return scan_run(run, HASHES, load_verified_stats(lab.queue, job_id), verified_at=lab.now)


# --------------------------------------------------------------------------- another boot


def test_stats_recorded_in_another_boot_are_read_again(lab: Lab, monkeypatch, tmp_path: Path) -> None:
    run, job_id = lab.make_run()
    assert _scan(lab, run, job_id).rehashed == ()  # this boot: the stats vouch for the bytes
    _boot(monkeypatch, tmp_path)
    stats = load_verified_stats(lab.queue, job_id)
    assert all(s.trusted and s.other_boot for s in stats.values())
    scan = _scan(lab, run, job_id)
    assert scan.check.clean
    assert scan.rehashed == tuple(sorted(HASHES, key=os.fsencode))


def test_a_boot_that_cannot_be_told_trusts_no_stat(lab: Lab, monkeypatch, tmp_path: Path) -> None:
    run, job_id = lab.make_run()
    monkeypatch.setattr(store, "BOOT_ID_FILE", str(tmp_path / "no-such-file"))
    assert store.current_boot() is None
    assert all(s.other_boot for s in load_verified_stats(lab.queue, job_id).values())
    assert len(_scan(lab, run, job_id).rehashed) == len(HASHES)


def test_stats_recorded_before_migration_13_are_from_another_boot(tmp_path: Path) -> None:
    run = tmp_path / "Run_1"
    run.mkdir()
    (run / "a.raw").write_bytes(b"A" * 100)
    db = tmp_path / "queue.db"
    queue = JobQueue(db)
    job, _ = queue.get_or_create(str(run), "CONF_01", "/nas/Run_1", now=dt.datetime.now(dt.UTC))
    record_verified_stat(
        queue,
        job.id,
        run,
        {"a.raw": hashlib.sha256(b"A" * 100).hexdigest()},
        dt.datetime.now(dt.UTC),
        hashed_since=settled_since(),
    )
    assert not load_verified_stats(queue, job.id)["a.raw"].other_boot
    queue.close()
    as_version(db, 12)  # an engine before 13 left it: no boot stored
    queue = JobQueue(db)
    try:
        (row,) = load_verified_stats(queue, job.id).values()
        assert row.trusted and row.other_boot and not row.writeback
    finally:
        queue.close()


def test_a_new_boot_records_its_own_stats(lab: Lab, monkeypatch, tmp_path: Path) -> None:
    """The first trusted stat recorded for a content stands, within its boot only."""
    run, job_id = lab.make_run()
    _boot(monkeypatch, tmp_path)
    assert record_verified_stat(lab.queue, job_id, run, HASHES, lab.now, hashed_since=settled_since()) == len(HASHES)
    stats = load_verified_stats(lab.queue, job_id)
    assert all(s.trusted and not s.other_boot for s in stats.values())
    assert _scan(lab, run, job_id).rehashed == ()
    # and within this boot, kept as before
    assert record_verified_stat(lab.queue, job_id, run, HASHES, lab.now, hashed_since=settled_since()) == 0


def test_a_plan_written_in_another_boot_reads_each_file_before_its_unlink(
    lab: Lab, monkeypatch, tmp_path: Path
) -> None:
    """The planned stat of a file whose bytes are no longer the verified ones (a save the cut left unstamped)."""
    run, job_id = lab.make_run(eligible=True)
    rel = "image_001.tif"
    st = os.lstat(run / rel)
    other = hashlib.sha256(b"the bytes the NAS holds").hexdigest()  # not what the file holds now
    planned = PlannedFile(rel, st.st_size, st.st_mtime_ns, st.st_ino, other, st.st_ctime_ns)
    job = lab.job(job_id)
    cs = CleanupStore(lab.queue)
    assert cs.write_plan(job, [planned], lab.now, "test") is not None
    assert cs.plan_files(job_id) == [planned]  # this boot: the stat vouches, the file is not read
    _boot(monkeypatch, tmp_path)
    (again,) = cs.plan_files(job_id)
    assert again == dataclasses.replace(planned, ctime_ns=None)
    result = deletion.delete_batch(run, [again])
    assert result.deleted == 0 and result.stop is not None and "its bytes" in result.stop
    assert (run / rel).read_bytes() == VERIFIED_FILES[rel]


# --------------------------------------------------------------------------- the writeback window


def test_the_writeback_window_is_the_kernels(monkeypatch, tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "dirty_expire_centisecs").write_text("6000\n")
    (vm / "dirty_writeback_centisecs").write_text("1500\n")
    monkeypatch.setattr(local_check, "_VM", str(vm))
    assert local_check.writeback_window_ns() == 80_000_000_000  # 60 s + 15 s + 5 s
    (vm / "dirty_writeback_centisecs").write_text("0\n")  # no periodic writeback: no bound
    assert local_check.writeback_window_ns() is None
    monkeypatch.setattr(local_check, "_VM", str(tmp_path / "none"))
    assert local_check.writeback_window_ns() == 40_000_000_000  # the kernel's defaults


@pytest.mark.parametrize(
    ("before_s", "trusted"),
    [(10, False), (30, False), (None, True)],
    ids=["10 s before", "30 s before", "past the window"],
)
def test_a_file_stamped_within_the_writeback_window_is_read_again(
    lab: Lab, before_s: int | None, trusted: bool
) -> None:
    """Stamped less than ~40 s before the hashing: a store through a mapping may follow, stamping nothing."""
    run, job_id = lab.make_run()
    now = dt.datetime.now(dt.UTC)
    since = settled_since() if before_s is None else now + dt.timedelta(seconds=before_s)
    CleanupStore(lab.queue).forget_verified(job_id)
    record_verified_stat(lab.queue, job_id, run, HASHES, lab.now, hashed_since=since)
    stats = load_verified_stats(lab.queue, job_id)
    assert {s.trusted for s in stats.values()} == {trusted}
    assert {s.writeback for s in stats.values()} == {not trusted}
    assert len(_scan(lab, run, job_id).rehashed) == (0 if trusted else len(HASHES))


def test_no_file_is_trusted_without_periodic_writeback(lab: Lab, monkeypatch) -> None:
    monkeypatch.setattr(local_check, "writeback_window_ns", lambda: None)
    run, job_id = lab.make_run()
    assert not any(s.trusted for s in load_verified_stats(lab.queue, job_id).values())


# --------------------------------------------------------------------------- other bytes under the very stat


def _record(path: Path, sha: str, **flags: bool) -> VerifiedStat:
    st = os.lstat(path)
    return VerifiedStat(
        path.name, sha, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, trusted=False, newer_sha256=None, **flags
    )


@pytest.mark.parametrize(
    ("flags", "put_back"),
    [
        ({"other_boot": True}, False),
        ({"writeback": True}, False),
        ({}, False),
        ({"other_boot": True}, True),
        ({"writeback": True}, True),
    ],
    ids=["another boot", "writeback window", "neither", "another boot, mtime put back", "window, mtime put back"],
)
def test_other_bytes_under_the_very_stat_are_damage_whatever_the_row(
    tmp_path: Path, flags: dict[str, bool], put_back: bool
) -> None:
    """Other bytes under the very stat recorded are never sent as an edit: after a reboot (every row from another
    boot) that would send a bad sector's bytes over the verified NAS copy. The operator tells an unstamped save
    apart and accepts it."""
    run = tmp_path / "Run_1"
    run.mkdir()
    path = run / "frame.raw"
    path.write_bytes(b"N" * 4096)  # the bytes on disk now; the manifest says other ones
    if put_back:
        st = os.lstat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))
    st = os.lstat(path)
    assert (st.st_ctime_ns == st.st_mtime_ns) != put_back, "precondition: a write stamps mtime and ctime alike"
    sha = hashlib.sha256(b"V" * 4096).hexdigest()
    check = scan_run(run, {"frame.raw": sha}, {"frame.raw": _record(path, sha, **flags)}, verified_at=None).check
    assert (check.changed, check.damaged) == ((), ("frame.raw",))
