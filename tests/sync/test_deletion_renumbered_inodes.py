"""The deletion where a planned file's inode number says nothing: renumbered, or no ctime kept (exFAT).

exfat-fuse (any FUSE filesystem without ``use_ino``) numbers inodes anew
after a remount or when the kernel let an inode go, and keeps no ctime. The
deletion required the planned inode and failed the job ("local file changed
since the plan") on a file nobody touched; a plan with no ctime (a disk that
keeps none) must read every file again before its unlink. Simulated here on
the test machine's filesystem: a plan that names another inode number than
the file's (renumbered) or no ctime.

Whatever the inode, the file unlinked is the one read, and only when it
holds the verified bytes (rule 1).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest

from exlab_wizard.fileio import reaping_name
from exlab_wizard.sync.reaper import deletion
from exlab_wizard.sync.reaper.store import PlannedFile
from tests.fixtures.local_disks import local_disk

DATA = b"verified frame " * 300


def _planned(run: Path, name: str, **changes: object) -> PlannedFile:
    st = (run / name).stat()
    item = PlannedFile(name, st.st_size, st.st_mtime_ns, st.st_ino, hashlib.sha256(DATA).hexdigest(), st.st_ctime_ns)
    return replace(item, **changes)


def _rewrite_keeping_size_and_mtime(path: Path, new: bytes) -> None:
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    folder = tmp_path / "Run_1"
    folder.mkdir()
    (folder / "f.bin").write_bytes(DATA)
    return folder


RENUMBERED = {"renumbered": lambda item: {"ino": item.ino + 7919}, "no ctime": lambda item: {"ctime_ns": None}}


@pytest.mark.parametrize("why", sorted(RENUMBERED))
def test_the_verified_bytes_are_deleted_whatever_the_inode_number(run: Path, why: str) -> None:
    item = _planned(run, "f.bin")
    item = replace(item, **RENUMBERED[why](item))
    result = deletion.delete_batch(run, [item])
    assert (result.deleted, result.stop) == (1, None)
    assert list(run.iterdir()) == []


@pytest.mark.parametrize("why", sorted(RENUMBERED))
def test_other_bytes_under_the_same_size_and_mtime_are_kept_under_their_name(run: Path, why: str) -> None:
    item = _planned(run, "f.bin")
    item = replace(item, **RENUMBERED[why](item))
    _rewrite_keeping_size_and_mtime(run / "f.bin", b"E" * len(DATA))
    result = deletion.delete_batch(run, [item])
    assert result.deleted == 0 and result.stop_fatal and "its bytes" in (result.stop or "")
    assert [p.name for p in run.iterdir()] == ["f.bin"] and (run / "f.bin").read_bytes() == b"E" * len(DATA)


def test_a_renumbered_file_set_aside_by_a_killed_pass_is_deleted_when_it_holds_the_verified_bytes(run: Path) -> None:
    item = _planned(run, "f.bin")
    planned = replace(item, ino=item.ino + 7919)  # the plan's number, before the remount
    os.rename(run / "f.bin", run / reaping_name("f.bin", planned.ino))
    result = deletion.delete_batch(run, [planned])
    assert (result.deleted, result.stop) == (1, None)
    assert list(run.iterdir()) == []


def test_a_renumbered_set_aside_file_with_other_bytes_is_kept(run: Path) -> None:
    item = _planned(run, "f.bin")
    planned = replace(item, ino=item.ino + 7919)
    private = run / reaping_name("f.bin", planned.ino)
    os.rename(run / "f.bin", private)
    _rewrite_keeping_size_and_mtime(private, b"E" * len(DATA))
    assert deletion.put_back_set_aside(run, [planned]) == []
    assert private.exists(), "a file that is not the planned one was given the planned name"
    result = deletion.delete_batch(run, [planned])
    assert result.deleted == 0 and result.stop_fatal and private.name in (result.stop or "")
    assert private.read_bytes() == b"E" * len(DATA)


def test_a_renumbered_set_aside_file_gets_its_name_back(run: Path) -> None:
    item = _planned(run, "f.bin")
    planned = replace(item, ino=item.ino + 7919)
    os.rename(run / "f.bin", run / reaping_name("f.bin", planned.ino))
    assert deletion.put_back_set_aside(run, [planned]) == []
    assert [p.name for p in run.iterdir()] == ["f.bin"] and (run / "f.bin").read_bytes() == DATA


def test_the_bytes_read_are_those_of_the_file_unlinked(run: Path, monkeypatch) -> None:
    """A file saved over the name between the check and the rename (same size and mtime): never unlinked."""
    item = _planned(run, "f.bin")
    item = replace(item, ino=item.ino + 7919)
    real = deletion.rename_noreplace
    swapped: list[int] = []

    def save_over_then_rename(src: str, dst: str, **kw: object) -> None:
        if not swapped:
            swapped.append(1)
            st = (run / "f.bin").stat()
            (run / ".new").write_bytes(b"N" * len(DATA))
            os.utime(run / ".new", ns=(st.st_atime_ns, st.st_mtime_ns))
            os.rename(run / ".new", run / "f.bin")
        real(src, dst, **kw)

    monkeypatch.setattr(deletion, "rename_noreplace", save_over_then_rename)
    result = deletion.delete_batch(run, [item])
    assert swapped and result.deleted == 0 and result.stop_fatal
    assert (run / "f.bin").read_bytes() == b"N" * len(DATA)


def test_on_exfat_other_bytes_found_after_the_rename_are_kept_and_named(tmp_path: Path, monkeypatch) -> None:
    """exFAT has neither hard links nor a rename that refuses to replace: the file cannot get its name back,
    so it stays under the private name, which the reason names; nothing of it is deleted."""
    with local_disk("exfat", tmp_path / "disk"):
        run = tmp_path / "disk" / "Run_1"
        run.mkdir()
        (run / "f.bin").write_bytes(DATA)
        item = replace(_planned(run, "f.bin"), ctime_ns=None)  # planned on a disk that keeps no ctime
        real = deletion.rename_noreplace

        def rewritten_as_it_is_renamed(src: str, dst: str, **kw: object) -> None:
            real(src, dst, **kw)
            _rewrite_keeping_size_and_mtime(run / dst, b"E" * len(DATA))  # a writer with the file open

        monkeypatch.setattr(deletion, "rename_noreplace", rewritten_as_it_is_renamed)
        result = deletion.delete_batch(run, [item])
        private = reaping_name("f.bin", item.ino)
        assert result.deleted == 0 and result.stop_fatal and private in (result.stop or ""), result.stop
        assert (run / private).read_bytes() == b"E" * len(DATA)
