"""A planned file replaced between the reaper's last check and its deletion is never deleted (rule 1).

``delete_batch`` checked each planned file by name (lstat: size, mtime,
inode; ctime, else a re-hash), then unlinked the *name*, which removes
whatever file has that name at that instant. A program saving the usual way
("write a temp file, rename it over": instrument software, editors, rsync)
that landed in between had its new, never verified bytes deleted, and the
job ended CLEANED. Now the file is renamed (never over a file) to a private
name first, and only the planned inode found there is unlinked; anything
else is given its name back and the deletion stops.

Also: a pass killed between that rename and the unlink (the next pass
deletes the set-aside file if it is the planned one, else stops), the
``.exlab-wizard/`` files of ``retain_cache: false``, the private names left
out of every listing of a run, and the no-replace rename itself.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import sys
from pathlib import Path

import pytest

from exlab_wizard import fileio
from exlab_wizard.fileio import is_reaping_name, reaping_name, rename_noreplace
from exlab_wizard.sync.audit import _data_after_cleanup
from exlab_wizard.sync.failures import FailureKind
from exlab_wizard.sync.reaper import deletion, load_verified_stats, scan_run
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports._process import local_tree
from exlab_wizard.sync.verifier import hash_tree, walk_run
from tests.lab import VERIFIED_FILES
from tests.lab import VerifiedLab as Lab

S = SyncJobState
METADATA = fileio.METADATA_DIR


@pytest.fixture
def lab(tmp_path: Path):
    lab = Lab.build(tmp_path)
    yield lab
    lab.queue.close()


def _set_aside(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(fileio.REAPING_PREFIX))


def _in_deletion() -> bool:
    """Called (two frames up) from the deletion's per-file step, old code or new."""
    return sys._getframe(2).f_code.co_name in ("delete_batch", "_reap")


def _replace_after_check(monkeypatch, target: Path, new: bytes, fired: list[str]) -> None:
    """Another program saves ``target`` (temp file, rename over) right after the deletion's check of it."""
    real_stat = os.stat

    def stat(path, *args, dir_fd=None, **kwargs):
        st = real_stat(path, *args, dir_fd=dir_fd, **kwargs)
        if not fired and dir_fd is not None and os.fsdecode(path) == target.name and _in_deletion():
            fired.append(target.name)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(new)
            os.rename(tmp, target)
        return st

    monkeypatch.setattr(os, "stat", stat)


def _kill_after_the_rename(monkeypatch, killed: list[str], armed: list[bool] | None = None) -> None:
    """The process dies between the rename to the private name and its unlink (SIGKILL, power cut).

    ``armed``: only once it holds something (else at the first such unlink).
    """
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if (armed is None or armed) and is_reaping_name(os.path.basename(os.fsdecode(path))):
            killed.append(os.fsdecode(path))
            raise RuntimeError("killed")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)


# ---------------------------------------------------------------- renamed over between check and deletion


@pytest.mark.parametrize("links", ["hard_links", "no_hard_links"])
def test_a_file_renamed_over_a_planned_file_after_its_check_is_never_deleted(lab: Lab, monkeypatch, links: str):
    run, job_id = lab.make_run(eligible=True)
    target = run / "image_001.tif"
    new = b"N" * len(VERIFIED_FILES["image_001.tif"])  # same size, other bytes: never sent, never verified
    fired: list[str] = []
    _replace_after_check(monkeypatch, target, new, fired)
    if links == "no_hard_links":  # some shares: put back by a rename that never replaces a file
        assert fileio._renameat2() is not None, "no renameat2 in this C library (glibc 2.28+, musl 1.2.3+)"

        def no_link(*args, **kwargs):
            raise PermissionError(errno.EPERM, "hard links not supported")

        monkeypatch.setattr(os, "link", no_link)
    outcomes = lab.run_pass()
    monkeypatch.undo()
    assert fired, "the reaper never came to delete image_001.tif"
    job = lab.job(job_id)
    assert target.exists() and target.read_bytes() == new, (
        "bytes written after the reaper's check, never on the NAS, were deleted",
        job.state,
    )
    assert job.state == S.FAILED and job.error_kind == FailureKind.LOCAL_CHANGED_DURING_CLEANUP
    assert "local file changed since the plan: image_001.tif" in job.last_error
    assert outcomes[-1].paths == ("image_001.tif",)
    assert _set_aside(run) == []  # given its name back, nothing left under the private name


def test_a_file_saved_again_while_the_replaced_one_is_put_back_keeps_both(lab: Lab, monkeypatch):
    """The name is taken again before the put-back: the file under the private name stays, both named."""
    run, job_id = lab.make_run(eligible=True)
    target = run / "image_001.tif"
    first, second = b"1" * 3000, b"2" * 3000
    fired: list[str] = []
    _replace_after_check(monkeypatch, target, first, fired)
    real_rename = deletion.rename_noreplace

    def rename(src, dst, *, dir_fd):
        real_rename(src, dst, dir_fd=dir_fd)
        if src == target.name:
            target.write_bytes(second)  # saved once more, right after the reaper's rename

    monkeypatch.setattr(deletion, "rename_noreplace", rename)
    lab.run_pass()
    monkeypatch.undo()
    kept = _set_aside(run)
    assert len(kept) == 1
    private = run / kept[0]
    assert target.read_bytes() == second and private.read_bytes() == first  # nothing of either deleted
    job = lab.job(job_id)
    assert job.state == S.FAILED and job.error_kind == FailureKind.LOCAL_CHANGED_DURING_CLEANUP
    assert kept[0] in job.last_error and "image_001.tif" in job.last_error


def test_a_file_saved_under_the_name_after_the_rename_is_kept(lab: Lab, monkeypatch):
    """Once set aside, the planned file is deleted under its private name: a new file at the name is not touched."""
    run, job_id = lab.make_run(eligible=True)
    target = run / "image_002.tif"
    new = b"N" * 2000
    real_rename = deletion.rename_noreplace

    def rename(src, dst, *, dir_fd):
        real_rename(src, dst, dir_fd=dir_fd)
        if src == target.name:
            tmp = target.with_name(".image_002.tif.tmp")
            tmp.write_bytes(new)
            os.rename(tmp, target)

    monkeypatch.setattr(deletion, "rename_noreplace", rename)
    lab.run_pass()
    monkeypatch.undo()
    assert target.read_bytes() == new
    assert not (run / "image_001.tif").exists() and _set_aside(run) == []
    assert lab.job(job_id).state == S.CLEANED  # every planned file was deleted; the new one is late data


# ---------------------------------------------------------------- killed between the rename and the unlink


def test_a_deletion_killed_after_the_rename_is_finished_by_the_next_pass(lab: Lab, monkeypatch):
    run, job_id = lab.make_run(eligible=True)
    inodes = {rel: (run / rel).stat().st_ino for rel in VERIFIED_FILES}
    killed: list[str] = []
    _kill_after_the_rename(monkeypatch, killed)
    lab.run_pass()
    monkeypatch.undo()
    assert len(killed) == 1 and lab.job(job_id).state == S.CLEANUP_ELIGIBLE
    (name,) = [rel for rel in VERIFIED_FILES if "/" not in rel and not (run / rel).exists()]
    private = run / reaping_name(name, inodes[name])  # found again from the plan alone
    assert _set_aside(run) == [private.name] and private.read_bytes() == VERIFIED_FILES[name]

    # Meanwhile no listing of the run shows the set-aside file as the run's data: not pushed, not
    # "added" to the local check, not late data.
    assert private.name not in walk_run(run) and private.name not in hash_tree(run, include_metadata=True)
    assert private.name not in local_tree(run).files and private.name not in _data_after_cleanup(run)
    stats = load_verified_stats(lab.queue, job_id)
    check = scan_run(run, {rel: rec.sha256 for rel, rec in stats.items()}, stats).check
    assert check.added == () and check.missing == (name,)

    outcomes = lab.run_pass()
    assert lab.job(job_id).state == S.CLEANED, [(o.action, o.reason) for o in outcomes]
    assert not private.exists() and _set_aside(run) == []
    assert not any((run / rel).exists() for rel in VERIFIED_FILES)


@pytest.mark.parametrize("change", ["replaced", "edited_in_place_mtime_put_back"])
def test_a_set_aside_file_that_is_not_the_planned_one_is_kept(lab: Lab, monkeypatch, change: str):
    run, job_id = lab.make_run(eligible=True)
    killed: list[str] = []
    _kill_after_the_rename(monkeypatch, killed)
    lab.run_pass()
    monkeypatch.undo()
    (left,) = _set_aside(run)
    private = run / left
    before = {rel: (run / rel).read_bytes() for rel in VERIFIED_FILES if (run / rel).exists()}
    new = b"N" * private.stat().st_size
    st = private.stat()
    if change == "replaced":  # another file under that name (other inode, same size and mtime)
        tmp = run / ".tmp"
        tmp.write_bytes(new)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.rename(tmp, private)
    else:  # the same inode, other bytes, the mtime put back
        with open(private, "r+b") as fh:
            fh.write(new)
        os.utime(private, ns=(st.st_atime_ns, st.st_mtime_ns))
    lab.run_pass()
    job = lab.job(job_id)
    assert job.state == S.FAILED and job.error_kind == FailureKind.LOCAL_CHANGED_DURING_CLEANUP
    assert {rel: (run / rel).read_bytes() for rel in VERIFIED_FILES if (run / rel).exists() and rel in before} == before
    if change == "replaced":  # another inode: not the file set aside, kept where it is and named
        assert private.read_bytes() == new, "a set-aside file that is not the planned one was deleted"
        assert left in job.last_error
    else:  # the planned inode: its name back first, then found changed by the resumed check
        name = next(rel for rel in VERIFIED_FILES if rel not in before)
        assert not private.exists() and (run / name).read_bytes() == new, "the edited file was not kept"
        assert name in job.last_error


def test_a_set_aside_file_gets_its_name_back_when_the_plan_is_dropped(lab: Lab, monkeypatch):
    """Killed after the rename, then the job left CLEANUP_ELIGIBLE (an audit mismatch, a retry): nothing is
    deleted, and the planned file is the lab's again under its own name, not hidden under the private one."""
    run, job_id = lab.make_run(eligible=True)
    killed: list[str] = []
    _kill_after_the_rename(monkeypatch, killed)
    lab.run_pass()
    monkeypatch.undo()
    (left,) = _set_aside(run)
    (name,) = [rel for rel in VERIFIED_FILES if "/" not in rel and not (run / rel).exists()]
    lab.queue.transition(job_id, S.CLEANUP_ELIGIBLE, S.QUEUED, now=lab.now, detail="audit mismatch")
    outcomes = lab.run_pass()
    assert [o.code for o in outcomes if o.job_id == job_id][0].value == "plan_dropped", outcomes
    assert (run / name).read_bytes() == VERIFIED_FILES[name], (
        "the planned file stayed hidden after its plan was dropped"
    )
    assert _set_aside(run) == []
    assert name in walk_run(run)  # the run's data again: the next push and check see it


def test_a_set_aside_file_whose_name_was_taken_is_kept_and_named(lab: Lab, monkeypatch):
    """Killed after the rename; the instrument then writes a new file under the name: both kept, the job FAILED."""
    run, job_id = lab.make_run(eligible=True)
    killed: list[str] = []
    _kill_after_the_rename(monkeypatch, killed)
    lab.run_pass()
    monkeypatch.undo()
    (left,) = _set_aside(run)
    (name,) = [rel for rel in VERIFIED_FILES if "/" not in rel and not (run / rel).exists()]
    (run / name).write_bytes(b"new acquisition")
    lab.run_pass()
    job = lab.job(job_id)
    assert (run / name).read_bytes() == b"new acquisition"
    assert (run / left).read_bytes() == VERIFIED_FILES[name]
    assert job.state == S.FAILED and job.error_kind == FailureKind.LOCAL_CHANGED_DURING_CLEANUP
    assert left in job.last_error and "saved again" in job.last_error


# ---------------------------------------------------------------- retain_cache: false, the .exlab-wizard/ files


def test_a_metadata_file_renamed_over_after_its_check_is_never_deleted(lab: Lab, monkeypatch):
    lab.cleanup(retain_cache=False)
    run, job_id = lab.make_run(eligible=True)
    target = run / METADATA / "acquisition.log"
    target.write_bytes(b"log\n" * 100)
    new = b"N" * 400  # written after the final push: not on the NAS
    fired: list[str] = []
    _replace_after_check(monkeypatch, target, new, fired)
    outcomes = lab.run_pass()
    monkeypatch.undo()
    assert fired, "the reaper never came to delete .exlab-wizard/acquisition.log"
    assert target.exists() and target.read_bytes() == new, "metadata written after the final push was deleted"
    assert _set_aside(target.parent) == []
    job = lab.job(job_id)
    assert job.state == S.CLEANUP_ELIGIBLE, [(o.action, o.reason) for o in outcomes]  # waits, pushes again
    assert "acquisition.log" in outcomes[-1].reason

    lab.run_pass()  # pushed again (the new bytes reach the NAS), then deleted
    assert lab.job(job_id).state == S.CLEANED
    assert (lab.nas_copy(run) / METADATA / "acquisition.log").read_bytes() == new
    assert not run.exists()


def test_a_metadata_deletion_killed_after_the_rename_is_finished_by_the_next_pass(lab: Lab, monkeypatch):
    """Its plan is a snapshot taken each pass: the set-aside file is metadata like any other then, pushed, deleted."""
    lab.cleanup(retain_cache=False)
    run, job_id = lab.make_run(eligible=True)
    killed: list[str] = []
    armed: list[bool] = []
    _kill_after_the_rename(monkeypatch, killed, armed)
    real = deletion.remove_metadata

    def remove_metadata(*args):
        armed.append(True)  # the data files are deleted: killed during the .exlab-wizard/ ones
        return real(*args)

    monkeypatch.setattr(deletion, "remove_metadata", remove_metadata)
    lab.run_pass()
    monkeypatch.undo()
    assert len(killed) == 1 and lab.job(job_id).state == S.CLEANUP_ELIGIBLE
    (left,) = _set_aside(run / METADATA)
    held = (run / METADATA / left).read_bytes()
    # The final push lists .exlab-wizard/ with hash_tree, and sends it whole: the set-aside file too.
    assert f"{METADATA}/{left}" in hash_tree(run, include_metadata=True)
    outcomes = lab.run_pass()
    assert lab.job(job_id).state == S.CLEANED, [(o.action, o.reason) for o in outcomes]
    assert not run.exists()  # nothing left behind to keep the run folder
    assert (lab.nas_copy(run) / METADATA / left).read_bytes() == held  # on the NAS before it was deleted


# ---------------------------------------------------------------- the private name and the listings


def test_private_names_are_short_deterministic_and_never_data(tmp_path: Path):
    long = "x" * 255
    name = reaping_name(long, 12345)
    assert name == reaping_name(long, 12345) and len(name) == 35 and is_reaping_name(name)
    assert reaping_name(long, 12346) != name and reaping_name("y", 12345) != name
    assert not is_reaping_name(".exlab-reaping-notours") and not is_reaping_name(name + "x")

    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / METADATA).mkdir()
    (run / "sub" / "a.bin").write_bytes(b"a")
    (run / "sub" / name).write_bytes(b"set aside")
    (run / ".exlab-reaping-notours").write_bytes(b"data")  # not such a name: data as any other
    (run / METADATA / name).write_bytes(b"metadata set aside")  # metadata: the final push sends it
    data = [".exlab-reaping-notours", "sub/a.bin"]
    assert walk_run(run) == data and sorted(hash_tree(run)) == data and _data_after_cleanup(run) == data
    assert sorted(hash_tree(run, include_metadata=True)) == sorted([f"{METADATA}/{name}", *data])
    assert sorted(local_tree(run).files) == sorted([f"{METADATA}/{name}", *data])
    # The reaper's own walk (interlock 6, and recovery.check_local behind the audit and the push):
    check = scan_run(run, {"sub/a.bin": hashlib.sha256(b"a").hexdigest()}, {}).check
    assert check.added == (".exlab-reaping-notours",)


@pytest.mark.parametrize("how", ["renameat2", "no_renameat2", "flag_refused"])
def test_rename_noreplace_never_replaces_a_file(tmp_path: Path, monkeypatch, how: str):
    if how == "no_renameat2":
        monkeypatch.setattr(fileio, "_renameat2", lambda: None)
    elif how == "flag_refused":

        def refused(*args):
            ctypes.set_errno(errno.EINVAL)
            return -1

        monkeypatch.setattr(fileio, "_renameat2", lambda: refused)
    else:
        assert fileio._renameat2() is not None, "no renameat2 in this C library (glibc 2.28+, musl 1.2.3+)"
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    folder = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(FileExistsError):
            rename_noreplace("a", "b", dir_fd=folder)
        assert (tmp_path / "a").read_bytes() == b"a" and (tmp_path / "b").read_bytes() == b"b"
        rename_noreplace("a", "c", dir_fd=folder)
        assert not (tmp_path / "a").exists() and (tmp_path / "c").read_bytes() == b"a"
        with pytest.raises(FileNotFoundError):
            rename_noreplace("a", "d", dir_fd=folder)
        if how != "renameat2":  # the look-up-then-rename fallback refused where any name may be raced
            with pytest.raises(OSError) as raised:
                rename_noreplace("c", "e", dir_fd=folder, atomic_only=True)
            assert raised.value.errno == errno.ENOTSUP and (tmp_path / "c").exists()
    finally:
        os.close(folder)
