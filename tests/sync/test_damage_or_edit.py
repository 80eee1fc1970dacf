"""Damage or edit: the local check against every order of a rewrite and the verified stats' record.

Found by the torture harness: a tool rewrote a verified file's bytes and put
its old mtime back (damage behind the filesystem's back) while the client
was recording the verified stats. The record caught the file half way (new
bytes, the rewrite's mtime) and, not trusted, still served as the mtime of
the verified bytes: once the old mtime was back the file looked edited, and
its damaged bytes were sent over the good NAS copy and verified as the new
truth. Whatever the order, damage must stay damage and an edit an edit.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
from pathlib import Path

import pytest

from exlab_wizard.fileio import BLOCK_SIZE, hash_fd, open_regular
from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.reaper import (
    check_against_copy,
    load_verified_stats,
    local_check,
    record_verified_stat,
    scan_run,
)
from exlab_wizard.sync.transports import RemoteFile

GOOD = b"verified bytes " * 200
REL = "sub/stack.raw"
NOW = dt.datetime.now(dt.UTC)
#: (how long before the hashing the file was written, how far the client's clock is ahead of the
#: file times). The file's ctime is the test's own time: the record is not trusted, except with
#: the client's clock an hour ahead, which makes a stat taken after the hashing look older than it.
CASES = {
    "written 1 s before": (dt.timedelta(seconds=1), dt.timedelta(0)),
    "mtime 3 days old": (dt.timedelta(days=3), dt.timedelta(0)),
    "client clock 1 h ahead": (dt.timedelta(seconds=1), dt.timedelta(hours=1)),
}


def _ns(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)


def _rewrite(path: Path, data: bytes, mtime_ns: int) -> None:
    """Write ``data`` in place and give the file ``mtime_ns`` (the kernel stamps the write first)."""
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _flipped() -> bytes:
    data = bytearray(GOOD)
    data[100] ^= 0xFF
    return bytes(data)


@pytest.fixture(params=sorted(CASES))
def verified(request: pytest.FixtureRequest, tmp_path: Path):
    """A run whose file was hashed at NOW; returns (queue, job id, run, the file's mtime at hashing, record)."""
    run = tmp_path / "Run_0001"
    (run / "sub").mkdir(parents=True)
    path = run / REL
    path.write_bytes(GOOD)
    written_before, ahead = CASES[request.param]
    original = _ns(NOW - written_before)
    os.utime(path, ns=(original, original))
    queue = JobQueue(tmp_path / "queue.db")
    job, _ = queue.get_or_create(str(run), "CONF_01", "/nas/Run_0001", now=NOW)

    def record() -> None:
        hashes = {REL: hashlib.sha256(GOOD).hexdigest()}
        record_verified_stat(
            queue, job.id, run, hashes, NOW + ahead + dt.timedelta(seconds=1), hashed_since=NOW + ahead
        )

    yield queue, job.id, run, original, record
    queue.close()


def _check(queue: JobQueue, job_id: str, run: Path):
    manifest = {REL: hashlib.sha256(GOOD).hexdigest()}
    return scan_run(run, manifest, load_verified_stats(queue, job_id), verified_at=NOW + dt.timedelta(seconds=1)).check


# The rewrite is two steps (new bytes stamped with the time of the write; the old mtime put back);
# the record of the verified stats lands before, between or after them.
ORDERS = ["record, bytes, mtime back", "bytes, record, mtime back", "bytes, mtime back, record"]


@pytest.mark.parametrize("order", ORDERS)
def test_bytes_rewritten_with_the_old_mtime_put_back_are_damage_whenever_the_stats_are_recorded(verified, order):
    queue, job_id, run, original, record = verified
    path = run / REL
    steps = {
        "record": record,
        "bytes": lambda: _rewrite(path, _flipped(), _ns(NOW + dt.timedelta(seconds=1))),
        "mtime back": lambda: os.utime(path, ns=(original, original)),
    }
    for step in order.split(", "):
        steps[step]()
    check = _check(queue, job_id, run)
    assert check.damaged == (REL,) and check.changed == (), order


@pytest.mark.parametrize("order", ["record, edit", "edit begun, record, edit ends"])
def test_an_edit_after_the_hashing_is_an_edit_whenever_the_stats_are_recorded(verified, order):
    queue, job_id, run, original, record = verified
    path = run / REL
    if order == "record, edit":
        record()
        _rewrite(path, b"re-acquired " * 300, _ns(NOW + dt.timedelta(seconds=5)))
    else:
        _rewrite(path, b"re-acq", _ns(NOW + dt.timedelta(seconds=1)))
        record()
        _rewrite(path, b"re-acquired " * 300, _ns(NOW + dt.timedelta(seconds=5)))
    check = _check(queue, job_id, run)
    assert check.changed == (REL,) and check.damaged == (), order


def test_with_no_stat_recorded_the_verification_time_decides(verified):
    queue, job_id, run, original, _record = verified
    path = run / REL
    _rewrite(path, _flipped(), original)
    assert _check(queue, job_id, run).damaged == (REL,)
    _rewrite(path, b"re-acquired " * 300, _ns(NOW + dt.timedelta(seconds=5)))
    assert _check(queue, job_id, run).changed == (REL,)


def test_new_bytes_with_an_older_mtime_put_back_are_damage(verified):
    """No edit moves the mtime back: bytes rewritten under an older mtime are not sent as the new truth."""
    queue, job_id, run, original, record = verified
    record()
    _rewrite(run / REL, _flipped(), original - 60_000_000_000)
    check = _check(queue, job_id, run)
    assert check.damaged == (REL,) and check.changed == ()


def test_with_no_stat_recorded_and_file_times_ahead_of_the_client_damage_is_still_damage(tmp_path: Path):
    """The run on a share whose server's clock is an hour ahead: file times are after ``verified_at``.

    With no recorded stat (lost in a crash right after VERIFIED), new bytes under the file's
    own mtime must not read as an edit because that mtime is later than the client's
    verification time: the bound is also the manifest's write, stamped by the same clock.
    """
    run = tmp_path / "Run_0001"
    (run / "sub").mkdir(parents=True)
    (run / ".exlab-wizard").mkdir()
    path = run / REL
    path.write_bytes(GOOD)
    server_ahead = dt.timedelta(hours=1)
    verified_at = dt.datetime.now(dt.UTC)  # the client's clock
    written = _ns(verified_at + server_ahead - dt.timedelta(minutes=10))  # by the server's, before the hashing
    os.utime(path, ns=(written, written))
    manifest = {REL: hashlib.sha256(GOOD).hexdigest()}
    # The manifest written at the verification: stamped by the server's clock too (an hour ahead).
    (run / ".exlab-wizard" / "checksums.sha256").write_text(f"{manifest[REL]}  {REL}\n")
    at_verification = _ns(verified_at + server_ahead)
    os.utime(run / ".exlab-wizard" / "checksums.sha256", ns=(at_verification, at_verification))
    _rewrite(path, _flipped(), written)
    check = scan_run(run, manifest, {}, verified_at=verified_at).check
    assert check.damaged == (REL,) and check.changed == ()


@pytest.mark.parametrize(
    ("newer_sha256", "trusted", "older_mtime", "verdict"),
    [
        ("", False, False, "changed"),  # before migration 10, never read again: maybe the edit the hashing missed
        ("", False, True, "damaged"),  # no write puts an mtime back, whoever recorded the stat
        (None, False, False, "damaged"),  # recorded by this version: the stat stands for the verified bytes
        ("", True, False, "damaged"),  # a trusted stat is exact, however old
    ],
)
def test_a_stat_recorded_before_migration_10_may_be_an_edit_the_hashing_missed(
    tmp_path: Path, newer_sha256: str | None, trusted: bool, older_mtime: bool, verdict: str
):
    """Queue migration 11 marks such untrusted rows (``newer_sha256 = ''``): new bytes under their mtime are an edit."""
    from exlab_wizard.sync.reaper import VerifiedStat

    run = tmp_path / "Run_0001"
    (run / "sub").mkdir(parents=True)
    path = run / REL
    path.write_bytes(GOOD + b"frame")  # a frame appended after the hashing, then stat-ed
    st = path.stat()
    sha = hashlib.sha256(GOOD).hexdigest()
    record = VerifiedStat(REL, sha, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, trusted, newer_sha256)
    if older_mtime:
        _rewrite(path, _flipped(), st.st_mtime_ns - 60_000_000_000)
    elif trusted:
        _rewrite(path, _flipped() + b"frame", st.st_mtime_ns)  # the stat no longer matches (ctime)
    check = scan_run(run, {REL: sha}, {REL: record}, verified_at=NOW).check
    assert getattr(check, verdict) == (REL,), (check.changed, check.damaged)


# --------------------------------------------------------------------------- a write landing during the check's read


def _write_during_reads(monkeypatch: pytest.MonkeyPatch, write, reads: int = 1) -> list[str]:
    """The check's first ``reads`` reads each have ``write()`` land between their open and their read."""
    real = local_check.hash_at
    calls: list[str] = []

    def hash_at(folder: int, name: str):
        calls.append(name)
        if len(calls) > reads:
            return real(folder, name)
        fd, before = open_regular(name, dir_fd=folder)
        try:
            write()
            digest = hash_fd(fd, memoryview(bytearray(BLOCK_SIZE)))
            after = os.fstat(fd)
        finally:
            os.close(fd)
        return digest, before, after

    monkeypatch.setattr(local_check, "hash_at", hash_at)
    return calls


def test_damage_landing_during_the_checks_read_is_damage_not_an_edit_under_way(verified, monkeypatch):
    """Found by the torture harness: a byte flipped (old mtime put back) while the pre-transfer check read
    the file. That read saw the ctime move and called the file "being written right now": an edit, whose
    damaged bytes the push sent over the verified NAS copy and verified as the new truth."""
    queue, job_id, run, original, record = verified
    record()
    path = run / REL
    calls = _write_during_reads(monkeypatch, lambda: _rewrite(path, _flipped(), original))
    check = _check(queue, job_id, run)
    assert check.damaged == (REL,) and check.changed == ()
    assert calls == ["stack.raw", "stack.raw"]  # read again once the write was over


def test_damage_landing_during_the_read_against_the_nas_copy_is_damage(tmp_path: Path, monkeypatch):
    """The same for a run whose queue was lost: checked against its NAS copy's sizes and mtimes."""
    run = tmp_path / "Run_0001"
    (run / "sub").mkdir(parents=True)
    path = run / REL
    path.write_bytes(GOOD)
    st = os.stat(path)
    calls = _write_during_reads(monkeypatch, lambda: _rewrite(path, _flipped(), st.st_mtime_ns))
    manifest = {REL: hashlib.sha256(GOOD).hexdigest()}
    found, _rows = check_against_copy(run, manifest, {REL: RemoteFile(len(GOOD), st.st_mtime_ns)})
    assert found == (REL,)
    assert calls == ["stack.raw", "stack.raw"]


def test_a_file_written_during_every_read_is_an_edit_under_way(verified, monkeypatch):
    """A writer still at work (each read sees a write, its mtime moving on): never damage, never read for ever."""
    queue, job_id, run, original, record = verified
    record()
    path = run / REL
    stamps = iter(range(1, 100))

    def acquire() -> None:
        _rewrite(path, b"re-acquired " * 300, _ns(NOW + dt.timedelta(seconds=next(stamps))))

    calls = _write_during_reads(monkeypatch, acquire, reads=100)
    check = _check(queue, job_id, run)
    assert check.changed == (REL,) and check.damaged == ()
    assert len(calls) == local_check.STEADY_READS


def test_damage_landing_during_the_records_read_is_no_newer_edit(tmp_path: Path, monkeypatch):
    """Found by the torture harness: a file stamped after the hashing began is read again when its stats are
    recorded, and other bytes there are the edit the hashing missed (``newer_sha256``). A byte flipped with the
    old mtime put back between the record's stat and that read was recorded so: the reaper took the damage for
    that edit, and the re-transfer sent it over the verified NAS copy."""
    run = tmp_path / "Run_0001"
    (run / "sub").mkdir(parents=True)
    path = run / REL
    path.write_bytes(GOOD)
    st = os.stat(path)
    queue = JobQueue(tmp_path / "queue.db")
    job, _ = queue.get_or_create(str(run), "CONF_01", "/nas/Run_0001", now=NOW)
    real = local_check.open_regular
    flips: list[str] = []

    def open_regular(where, **kwargs):
        flips.append(str(where))
        _rewrite(path, _flipped(), st.st_mtime_ns)  # lands after the record's stat, before its read
        return real(where, **kwargs)

    monkeypatch.setattr(local_check, "open_regular", open_regular)
    began = dt.datetime.fromtimestamp(st.st_mtime_ns / 1e9, dt.UTC) - dt.timedelta(seconds=5)
    manifest = {REL: hashlib.sha256(GOOD).hexdigest()}
    record_verified_stat(queue, job.id, run, manifest, began + dt.timedelta(seconds=6), hashed_since=began)
    monkeypatch.undo()
    assert flips == [str(path)]  # stamped after the hashing began: read again
    stats = load_verified_stats(queue, job.id)
    assert stats[REL].newer_sha256 is None
    check = scan_run(run, manifest, stats, verified_at=began + dt.timedelta(seconds=6)).check
    assert check.damaged == (REL,) and check.changed == ()
    queue.close()


def test_an_edit_the_hashing_missed_is_still_recorded_as_newer_bytes(tmp_path: Path):
    """The other side: bytes written after the hashing began, read steady by the record, are that edit."""
    run = tmp_path / "Run_0001"
    (run / "sub").mkdir(parents=True)
    path = run / REL
    path.write_bytes(GOOD + b"one more frame")
    st = os.stat(path)
    queue = JobQueue(tmp_path / "queue.db")
    job, _ = queue.get_or_create(str(run), "CONF_01", "/nas/Run_0001", now=NOW)
    began = dt.datetime.fromtimestamp(st.st_mtime_ns / 1e9, dt.UTC) - dt.timedelta(seconds=5)
    manifest = {REL: hashlib.sha256(GOOD).hexdigest()}  # what the hashing read, before the frame
    record_verified_stat(queue, job.id, run, manifest, began + dt.timedelta(seconds=6), hashed_since=began)
    stats = load_verified_stats(queue, job.id)
    assert stats[REL].newer_sha256 == hashlib.sha256(GOOD + b"one more frame").hexdigest()
    check = scan_run(run, manifest, stats, verified_at=began + dt.timedelta(seconds=6)).check
    assert check.changed == (REL,) and check.damaged == ()
    queue.close()


def test_a_file_replaced_during_the_check_is_judged_by_its_mtime(verified, monkeypatch):
    """Another inode than the listing saw (a copy of other bytes renamed into place, the old mtime put back,
    as ``cp -p`` or an ``exiftool -P`` leaves it) is damage; one saved through a rename (a new mtime) is an edit."""
    queue, job_id, run, original, record = verified
    record()
    path = run / REL

    def replace(data: bytes, mtime_ns: int) -> None:
        swap = run / "sub" / ".swap"
        swap.write_bytes(data)
        os.utime(swap, ns=(mtime_ns, mtime_ns))
        os.replace(swap, path)

    real = local_check.hash_at
    pending: list = []

    def hash_at(folder: int, name: str):
        while pending:
            pending.pop()()  # after the listing, before the read
        return real(folder, name)

    monkeypatch.setattr(local_check, "hash_at", hash_at)
    pending.append(lambda: replace(_flipped(), original))
    check = _check(queue, job_id, run)
    assert check.damaged == (REL,) and check.changed == ()
    pending.append(lambda: replace(b"re-acquired " * 300, _ns(NOW + dt.timedelta(seconds=5))))
    check = _check(queue, job_id, run)
    assert check.changed == (REL,) and check.damaged == ()


def test_rot_under_metadata_that_churns_through_every_read_is_damage(verified, monkeypatch):
    """A byte flipped (mtime kept), then a tagger or a scanner moving the ctime during every read: the
    mtime never moved on, so no edit is under way; the bytes are damage, not sent."""
    queue, job_id, run, original, record = verified
    record()
    path = run / REL
    _rewrite(path, _flipped(), original)
    calls = _write_during_reads(monkeypatch, lambda: os.chmod(path, 0o640 ^ (os.stat(path).st_mode & 0o004)), 100)
    check = _check(queue, job_id, run)
    assert check.damaged == (REL,) and check.changed == ()
    assert len(calls) == local_check.STEADY_READS


def test_a_file_that_cannot_be_read_for_a_bad_sector_is_damage_never_sent(verified, monkeypatch):
    """EIO is no edit: sent, or its NAS copy moved aside for it, the verified bytes would stand on the NAS alone."""
    queue, job_id, run, original, record = verified
    record()
    _rewrite(run / REL, _flipped(), original)  # ctime moved: the check reads the file

    def bad_sector(folder: int, name: str):
        raise OSError(errno.EIO, "Input/output error", name)

    monkeypatch.setattr(local_check, "hash_at", bad_sector)
    check = _check(queue, job_id, run)
    assert check.damaged == (REL,) and check.changed == ()


def test_churning_metadata_over_the_verified_bytes_is_no_change(verified, monkeypatch):
    """The same churn over intact bytes: nothing to send, nothing damaged (the deletion reads it again)."""
    queue, job_id, run, original, record = verified
    record()
    path = run / REL
    _write_during_reads(monkeypatch, lambda: os.chmod(path, 0o640 ^ (os.stat(path).st_mode & 0o004)), 100)
    check = _check(queue, job_id, run)
    assert check.damaged == () and check.changed == () and check.missing == ()


def test_rot_under_churning_metadata_is_damage_against_the_nas_copy_too(tmp_path: Path, monkeypatch):
    """The same for a run whose queue was lost, checked against its NAS copy's sizes and mtimes."""
    run = tmp_path / "Run_0001"
    (run / "sub").mkdir(parents=True)
    path = run / REL
    path.write_bytes(_flipped())
    st = os.stat(path)
    _write_during_reads(monkeypatch, lambda: os.chmod(path, 0o640 ^ (os.stat(path).st_mode & 0o004)), 100)
    manifest = {REL: hashlib.sha256(GOOD).hexdigest()}
    found, _rows = check_against_copy(run, manifest, {REL: RemoteFile(len(GOOD), st.st_mtime_ns)})
    assert found == (REL,)
