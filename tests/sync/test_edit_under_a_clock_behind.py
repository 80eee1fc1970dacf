"""An edit stamped by a clock behind the one that stamped the record: damage or edit, by the local check.

Found by review: a run written while the PC's clock ran a day ahead (then NTP) carries file
times a day in the future. An edit made after its verification is stamped by the corrected
clock, earlier than the recorded mtime; the rule "new bytes under the recorded mtime or an
older one are damage" failed it ``local_damage``, and ``restore`` put the NAS's old bytes over
the only copy of the edit. A file of another size whose mtime and ctime a write stamped alike,
earlier than the record's times, is an edit (sent again, its NAS copy kept under ``previous/``).
What stays damage: the same size (DESIGN section 6), and an mtime put back by a tool (``cp -p``
of an older version: its ctime is the ``utime``'s, now, later than the record's).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from exlab_wizard.sync.reaper import VerifiedStat, check_against_copy, scan_run
from exlab_wizard.sync.transports import RemoteFile

GOOD = b"acquired ok\n"
REL = "notes.txt"
SHA = hashlib.sha256(GOOD).hexdigest()
DAY_NS = 86_400 * 1_000_000_000


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "Run_0001"
    run.mkdir()
    (run / REL).write_bytes(GOOD)
    return run


def _ahead_record(run: Path, *, trusted: bool = True, newer_sha256: str | None = None) -> VerifiedStat:
    """The stat recorded at verification, its times stamped by a clock a day ahead of the file's now."""
    st = os.stat(run / REL)
    ahead = time.time_ns() + DAY_NS
    return VerifiedStat(REL, SHA, st.st_size, ahead, ahead, st.st_ino, trusted, newer_sha256)


def _verdict(run: Path, record: VerifiedStat) -> str:
    check = scan_run(run, {REL: SHA}, {REL: record}).check
    return "damaged" if check.damaged else "changed" if check.changed else "clean"


@pytest.mark.parametrize(
    ("trusted", "newer_sha256"),
    [(True, None), (False, None), (False, "")],  # trusted, untrusted, an untrusted row from before migration 10
)
def test_a_line_appended_under_a_clock_behind_the_record_is_an_edit(
    tmp_path: Path, trusted: bool, newer_sha256: str | None
) -> None:
    run = _run(tmp_path)
    record = _ahead_record(run, trusted=trusted, newer_sha256=newer_sha256)
    with open(run / REL, "ab") as f:  # the kernel stamps mtime and ctime now: a day before the record's
        f.write(b"operator: focus drifted after frame 812\n")
    assert _verdict(run, record) == "changed"


def test_a_file_saved_through_a_temp_file_and_a_rename_under_a_clock_behind_is_an_edit(tmp_path: Path) -> None:
    run = _run(tmp_path)
    record = _ahead_record(run)
    (run / "notes.txt.tmp").write_bytes(b"rewritten by an editor\n")
    os.replace(run / "notes.txt.tmp", run / REL)
    assert _verdict(run, record) == "changed"


def test_the_same_size_under_a_clock_behind_stays_damage(tmp_path: Path) -> None:
    """DESIGN: damage keeps the size. A same-size change is never sent over the NAS copy by this rule."""
    run = _run(tmp_path)
    record = _ahead_record(run)
    (run / REL).write_bytes(b"acquired OK\n")
    assert _verdict(run, record) == "damaged"


def test_another_size_with_an_old_mtime_put_back_stays_damage(tmp_path: Path) -> None:
    """``cp -p`` / ``rsync -a`` of an older version: the mtime is put back, the ctime is the utime's (now)."""
    run = _run(tmp_path)
    st = os.stat(run / REL)
    record = VerifiedStat(REL, SHA, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, True)
    (run / REL).write_bytes(b"an older, shorter\n" * 3)
    old = st.st_mtime_ns - 3 * DAY_NS
    os.utime(run / REL, ns=(old, old))
    assert _verdict(run, record) == "damaged"
    # under a clock behind the record as well: the mtime put back is far from the utime's ctime
    assert _verdict(run, _ahead_record(run)) == "damaged"


def test_the_queue_lost_an_edit_under_a_clock_behind_its_copy_is_no_damage(tmp_path: Path) -> None:
    """The same rule against the NAS copy's size and mtime (the verified stats lost with the queue)."""
    run = _run(tmp_path)
    copy = RemoteFile(len(GOOD), time.time_ns() + DAY_NS)  # sent with the local mtime, a day ahead
    with open(run / REL, "ab") as f:
        f.write(b"operator: focus drifted\n")
    damaged, rows = check_against_copy(run, {REL: SHA}, {REL: copy})
    assert damaged == ()
    # and the stats recorded from the copy keep it an edit for the reaper and restore
    sha, size, mtime_ns, ctime_ns, ino, trusted, newer = rows[REL]
    row = VerifiedStat(REL, sha, size, mtime_ns, ctime_ns, ino, trusted, newer)
    assert _verdict(run, row) == "changed"
    # same size under the copy's time: damage, as before
    (run / REL).write_bytes(b"acquired OK\n")
    assert check_against_copy(run, {REL: SHA}, {REL: copy})[0] == (REL,)
