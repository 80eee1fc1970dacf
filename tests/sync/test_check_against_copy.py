"""The local check of a run whose queue was lost, against its verified NAS copy's sizes and mtimes.

Bytes that differ from the run's manifest are damage when the file's mtime is not later than its
NAS copy's by more than 2 s, the coarsest precision a NAS keeps (FAT 2 s, whole seconds in rsync
and sftp listings, exFAT 10 ms, many backends 1 ms, each truncating or rounding the sent time).
A later mtime is an edit: not read, sent as such.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from exlab_wizard.sync.reaper import check_against_copy
from exlab_wizard.sync.transports import RemoteFile

GOOD = b"verified bytes " * 100
BAD = b"verified bytez " * 100  # same size: rot behind the filesystem's back
SECOND = 1_000_000_000
T = 1_767_268_800 * SECOND  # the copy's mtime, a whole second


@pytest.mark.parametrize(
    ("local_ns", "copy_ns", "damaged"),
    [
        (T, T, True),  # the very mtime
        (T + 700_000_000, T, True),  # a listing in whole seconds (rsync, sftp) of a copy sent at .7 s
        (T + 1_500_000_000, T, True),  # FAT's 2 s
        (T + 3 * SECOND, T, False),  # edited 3 s after: later than any share's precision
        (T - 10 * SECOND, T, True),  # an older mtime put back: no editor does that
        # A share keeping ns, 5 us later: an edit within 2 s of the copy's own write is taken for damage
        # (refused, kept locally, named: restore or retry --accept-local), never the reverse.
        (T + 123_000_005_100, T + 123_000_000_100, True),
        (T + 123_456_789, T + 120_000_000, True),  # exFAT: the copy's mtime is the local one truncated to 10 ms
        (T + 123_456_789, T + 123_000_000, True),  # a backend keeping milliseconds
        (T + 123_000_000_600, T + 123_000_000_100, True),  # within 1 us: the same
    ],
)
def test_damage_is_told_from_an_edit_by_the_copys_mtime(tmp_path: Path, local_ns: int, copy_ns: int, damaged: bool):
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "sub" / "a.raw").write_bytes(BAD)
    os.utime(run / "sub" / "a.raw", ns=(local_ns, local_ns))
    manifest = {"sub/a.raw": hashlib.sha256(GOOD).hexdigest()}
    found, rows = check_against_copy(run, manifest, {"sub/a.raw": RemoteFile(len(GOOD), copy_ns)})
    assert found == (("sub/a.raw",) if damaged else ())
    sha, size, mtime_ns, *_rest, trusted, newer = rows["sub/a.raw"]
    assert (sha, size, trusted, newer) == (manifest["sub/a.raw"], len(GOOD), False, None)
    # the stat that stands for the verified one: the file's own mtime where it is its copy's, else the copy's
    assert mtime_ns == (local_ns if damaged and local_ns >= copy_ns else copy_ns)


def test_good_bytes_and_files_the_nas_does_not_hold_are_no_damage(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "good.raw").write_bytes(GOOD)
    (run / "not-on-nas.raw").write_bytes(BAD)
    mtime = (run / "good.raw").stat().st_mtime_ns
    manifest = {rel: hashlib.sha256(GOOD).hexdigest() for rel in ("good.raw", "not-on-nas.raw", "gone.raw")}
    copies = {"good.raw": RemoteFile(len(GOOD), mtime), "gone.raw": RemoteFile(len(GOOD), mtime)}
    found, rows = check_against_copy(run, manifest, copies)
    assert found == ()
    assert set(rows) == {"good.raw"}
