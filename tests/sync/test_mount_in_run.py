"""A mount point inside a run: its files are another folder's, never trusted, deleted or written through (rule 1).

A folder bind-mounted over ``<run>/sub`` shows another folder's files under
the run's names, with no ctime moved and (on the same file system) the
source folder's own device and inode. The mount table (``/proc/self/mountinfo``,
read once per scan or deletion batch) names it; a folder on another device
than the run folder is a mount point too, found without the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.reaper import deletion, load_verified_stats, mounts, record_verified_stat, scan_run
from exlab_wizard.sync.reaper.store import CleanupStore, PlannedFile
from exlab_wizard.sync.recovery import restore_damaged, verified_manifest
from exlab_wizard.sync.states import SyncJobState
from tests.lab import VERIFIED_FILES, settled_since
from tests.lab import VerifiedLab as Lab

S = SyncJobState


@pytest.fixture
def as_root() -> None:
    """A real mount needs root: a machine without it fails here, never skips (CI runs every real part)."""
    assert os.geteuid() == 0, "mounts need root"


root_only = pytest.mark.usefixtures("as_root")
HASHES = {rel: hashlib.sha256(data).hexdigest() for rel, data in VERIFIED_FILES.items()}


# --------------------------------------------------------------------------- the mount table


def test_mountinfo_names_are_unescaped() -> None:
    text = (
        b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        b"40 22 8:1 /data/other /data/lab/Run\\0401/sub\\011tab rw shared:1 - ext4 /dev/sda1 rw\n"
        b"41 22 8:1 /x /data/new\\012line/back\\134slash rw - ext4 /dev/sda1 rw\n"
        b"42 22 8:1 /x /data/raw\\377name rw - ext4 /dev/sda1 rw\n"
        b"\n"
    )
    assert mounts.parse_mountinfo(text) == [
        "/",
        "/data/lab/Run 1/sub\ttab",
        "/data/new\nline/back\\slash",
        os.fsdecode(b"/data/raw\xffname"),
    ]


def test_only_mount_points_strictly_inside_the_run_count(tmp_path: Path) -> None:
    run = tmp_path / "Run_1"
    (run / "sub").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    points = [
        "/",
        str(tmp_path),
        str(run),  # the run folder itself on its own disk: that is where its files are
        str(tmp_path / "Run_10"),  # a sibling sharing the name's start
        str(run / "sub"),
        str(run / "sub" / "deeper"),
    ]
    assert mounts.mounts_inside(run, points) == ["sub", "sub/deeper"]
    assert mounts.mounts_inside(link / "Run_1", points) == ["sub", "sub/deeper"]  # compared resolved
    assert mounts.mounts_inside(run, ["/", str(tmp_path)]) == []
    assert mounts.describe(["sub", "sub/deeper"]) == "run holds a mount point: sub, sub/deeper"


def test_no_mount_table_finds_nothing(tmp_path: Path) -> None:
    assert mounts.mount_points(str(tmp_path / "no-such-mountinfo")) is None


# --------------------------------------------------------------------------- real mounts


@contextlib.contextmanager
def mounted(*args: str) -> Iterator[None]:
    """``mount <args>``, always unmounted again (the target is the last argument)."""
    subprocess.run(["mount", *args], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", args[-1]], check=False)


@pytest.fixture
def lab(tmp_path: Path):
    lab = Lab.build(tmp_path)
    yield lab
    lab.queue.close()


def _other_sub(tmp_path: Path) -> Path:
    """Another folder holding the run's ``sub/`` names and sizes, other bytes."""
    other = tmp_path / "elsewhere" / "sub"
    for rel, data in VERIFIED_FILES.items():
        if rel.startswith("sub/"):
            path = other / rel.removeprefix("sub/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes(255 - b for b in data))
    return other


@root_only
def test_the_reaper_waits_while_a_folder_is_bind_mounted_in_the_run(lab: Lab, tmp_path: Path) -> None:
    run, job_id = lab.make_run()
    other = _other_sub(tmp_path)
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    with mounted("--bind", str(other), str(run / "sub")):
        outcome = lab.run_pass()[-1]
        assert (outcome.action, outcome.code, outcome.reason) == (
            "waiting",
            CleanupCode.RUN_HOLDS_MOUNT,
            "run holds a mount point: sub",
        )
        assert lab.job(job_id).state != S.CLEANED
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
    assert lab.manifest_files_intact(run)
    lab.run_pass()  # the mount gone: the run's own files are checked and cleaned
    assert lab.job(job_id).state == S.CLEANED
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


@root_only
def test_a_deletion_batch_reads_the_mount_table_again_and_deletes_nothing(lab: Lab, tmp_path: Path) -> None:
    run, _ = lab.make_run()
    plan = [
        PlannedFile(rel, st.st_size, st.st_mtime_ns, st.st_ino, HASHES[rel], st.st_ctime_ns)
        for rel in sorted(VERIFIED_FILES)
        for st in [os.lstat(run / rel)]
    ]
    other = _other_sub(tmp_path)
    with mounted("--bind", str(other), str(run / "sub")):  # after the plan, before the batch
        result = deletion.delete_batch(run, plan)
    assert (result.stop, result.stop_fatal, result.deleted) == ("run holds a mount point: sub", False, 0)
    assert lab.manifest_files_intact(run)


@root_only
def test_a_folder_of_another_file_system_is_found_without_the_mount_table(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, job_id = lab.make_run()
    monkeypatch.setattr(mounts, "mount_points", lambda *a: None)  # no /proc: the device check alone
    with mounted("-t", "tmpfs", "tmpfs", str(run / "sub")):
        (run / "sub" / "notes.txt").write_bytes(VERIFIED_FILES["sub/notes.txt"])
        manifest = verified_manifest(lab.job(job_id), lab.queue)
        scan = scan_run(run, manifest, load_verified_stats(lab.queue, job_id))
        assert (scan.check.refusal, scan.check.refusal_code) == (
            "run holds a mount point: sub",
            CleanupCode.RUN_HOLDS_MOUNT,
        )
        plan = [PlannedFile("sub/notes.txt", 12, 0, 0, HASHES["sub/notes.txt"], 0)]
        result = deletion.delete_batch(run, plan)
        assert (result.stop, result.stop_fatal, result.deleted) == ("run holds a mount point: sub", False, 0)
        assert (run / "sub" / "notes.txt").exists()


@root_only
def test_stats_recorded_below_a_mount_point_are_not_trusted(lab: Lab, tmp_path: Path) -> None:
    run, job_id = lab.make_run()
    CleanupStore(lab.queue).forget_verified(job_id)
    other = _other_sub(tmp_path)
    with mounted("--bind", str(other), str(run / "sub")):
        record_verified_stat(lab.queue, job_id, run, HASHES, lab.now, hashed_since=settled_since())
    trusted = {rel: row.trusted for rel, row in load_verified_stats(lab.queue, job_id).items()}
    assert trusted == {
        "image_001.tif": True,
        "image_002.tif": True,
        "sub/deeper/stack.raw": False,
        "sub/notes.txt": False,
    }


@root_only
def test_empty_folders_below_a_mount_point_are_never_removed(lab: Lab, tmp_path: Path) -> None:
    run, _ = lab.make_run()
    other = tmp_path / "elsewhere" / "sub"
    (other / "deeper").mkdir(parents=True)
    with mounted("--bind", str(other), str(run / "sub")):
        removed = deletion.remove_left_empty(run, ["sub/deeper/stack.raw"])
    assert removed == []
    assert (other / "deeper").is_dir()


class _NasCopy:
    """A transport whose ``fetch`` gives the verified bytes."""

    async def fetch(self, run_path: Path, paths, into: Path) -> dict[str, Path]:
        out = {}
        for rel in paths:
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            (into / rel).write_bytes(VERIFIED_FILES[rel])
            out[rel] = into / rel
        return out


@root_only
def test_restore_writes_nothing_through_a_mount_point(lab: Lab, tmp_path: Path) -> None:
    run, job_id = lab.make_run()
    other = tmp_path / "elsewhere" / "sub"
    other.mkdir(parents=True)
    with mounted("--bind", str(other), str(run / "sub")):
        restored, refused, _ = asyncio.run(
            restore_damaged(lab.queue, lab.job(job_id), _NasCopy(), [], missing=["sub/notes.txt"])
        )
    assert restored == ()
    assert refused == {"sub/notes.txt": "run holds a mount point: sub; nothing written through it"}
    assert list(other.iterdir()) == []
