"""A btrfs subvolume inside a run folder on a btrfs instrument disk: part of the run, cleaned with it.

``<run>/sub`` is a subvolume (an acquisition tool made one, or snapper keeps
``.snapshots`` in a run that is itself a subvolume). It is no mount point:
the mount table names nothing inside the run, only its ``st_dev`` differs.
The push sends and verifies its files like any other. The reaper took every
folder on another device for a mount point and waited "run holds a mount
point: sub" on every pass, for ever: nothing the operator could unmount.
Now it is walked, its files re-hashed and deleted, and it is removed once
empty. A file system mounted inside a run stays refused
(``tests/sync/test_mount_in_run.py``).

A loop image per test, mounted at the lab's local_root. Needs root and
mkfs.btrfs (fails, never skips, without them).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.reaper import deletion, load_verified_stats, mounts, scan_run
from exlab_wizard.sync.reaper.store import PlannedFile
from exlab_wizard.sync.recovery import verified_manifest
from exlab_wizard.sync.states import SyncJobState
from tests.fixtures.local_disks import fs_disk
from tests.helpers import Clock
from tests.lab import VERIFIED_FILES, Lab, VerifiedLab, cleanup_config, ready, running

S = SyncJobState


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def _verdict(job) -> tuple:
    return job.state.value, job.error_kind, job.last_error


async def test_a_run_holding_a_btrfs_subvolume_is_cleaned(tmp_path: Path) -> None:
    with fs_disk("btrfs", tmp_path / "lab"):
        lab = Lab.build(tmp_path)
        run = lab.make_run("Run_2026-01-01", files={"image_001.tif": b"I" * 3000})
        _run("btrfs", "subvolume", "create", str(run / "sub"))
        (run / "sub" / "stack.raw").write_bytes(b"B" * 5000)
        time.sleep(2.5)
        clock = Clock()
        async with running(cleanup_config(lab), clock) as client:
            await ready(client, clock, run)
            nas_sub = (lab.nas_copy(run) / "sub" / "stack.raw").read_bytes()
            reasons = []
            for _ in range(3):
                outcomes = await client.cleanup_once()
                reasons += [(o.action, o.reason) for o in outcomes if o.run_path == str(run)]
                clock.advance(24)
                await client.audit_once()
            job = await client.job(run)
            in_mountinfo = [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(run) in ln]
            left = sorted(p.name for p in run.iterdir()) if run.exists() else []
    assert nas_sub == b"B" * 5000, "the subvolume's file was verified on the NAS"
    assert not in_mountinfo
    assert job.state == S.CLEANED, f"a verified run is never cleaned: {_verdict(job)}; passes said {reasons}"
    assert "sub" not in left, f"the emptied subvolume is removed with rmdir: {left}"


async def test_an_emptied_subvolume_rmdir_refuses_is_left_and_said(tmp_path: Path) -> None:
    """The subvolume is the disk's default one: rmdir refuses it (EPERM). Cleaned all the same; the outcome says so."""
    with fs_disk("btrfs", tmp_path / "lab"):
        lab = Lab.build(tmp_path)
        run = lab.make_run("Run_2026-01-01", files={"image_001.tif": b"I" * 3000})
        _run("btrfs", "subvolume", "create", str(run / "sub"))
        (run / "sub" / "stack.raw").write_bytes(b"B" * 5000)
        _run("btrfs", "subvolume", "set-default", str(run / "sub"))
        time.sleep(2.5)
        clock = Clock()
        async with running(cleanup_config(lab), clock) as client:
            await ready(client, clock, run)
            outcomes = [o for o in await client.cleanup_once() if o.run_path == str(run)]
            job = await client.job(run)
        left = sorted(p.name for p in (run / "sub").iterdir())
        _run("btrfs", "subvolume", "set-default", "5", str(tmp_path / "lab"))
    assert job.state == S.CLEANED, _verdict(job)
    assert left == []
    assert [o.action for o in outcomes] == ["promoted", "deleted"]
    assert outcomes[-1].reason.endswith("; empty btrfs subvolume kept: sub (Operation not permitted)"), outcomes


HASHES = {rel: hashlib.sha256(data).hexdigest() for rel, data in VERIFIED_FILES.items()}


@contextlib.contextmanager
def _mounted(*args: str) -> Iterator[None]:
    _run("mount", *args)
    try:
        yield
    finally:
        subprocess.run(["umount", "-d", args[-1]], check=False)


@pytest.mark.parametrize("what", ["a subvolume bind-mounted", "a btrfs disk mounted"])
def test_a_btrfs_mount_inside_a_run_stays_a_mount_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """A btrfs folder mounted at ``<run>/sub`` is inode 256 on another device, like a subvolume, but on a mount of
    its own: refused, nothing deleted or removed through it, even with no mount table to name it."""
    with fs_disk("btrfs", tmp_path / "lab"):
        lab = VerifiedLab.build(tmp_path)
        try:
            run, job_id = lab.make_run()
            other = tmp_path / "lab" / "other"
            if what == "a subvolume bind-mounted":
                _run("btrfs", "subvolume", "create", str(other))
                source = ("--bind", str(other))
            else:
                image = tmp_path / "other.img"
                _run("truncate", "-s", "300M", str(image))
                _run("mkfs.btrfs", "-q", "-f", str(image))
                other.mkdir()
                source = ("-o", "loop", str(image))
            plan = [
                PlannedFile(rel, st.st_size, st.st_mtime_ns, st.st_ino, HASHES[rel], st.st_ctime_ns)
                for rel in sorted(VERIFIED_FILES)
                for st in [os.lstat(run / rel)]
            ]
            monkeypatch.setattr(mounts, "mount_points", lambda *a: None)  # no table: the descriptors alone tell
            with _mounted(*source, str(run / "sub")):
                (run / "sub" / "deeper").mkdir()
                for rel in ("sub/notes.txt", "sub/deeper/stack.raw"):
                    (run / rel).write_bytes(VERIFIED_FILES[rel])
                assert os.stat(run / "sub").st_ino == 256
                manifest = verified_manifest(lab.job(job_id), lab.queue)
                scan = scan_run(run, manifest, load_verified_stats(lab.queue, job_id))
                result = deletion.delete_batch(run, [p for p in plan if p.path == "sub/notes.txt"])
                (run / "sub" / "notes.txt").unlink()
                (run / "sub" / "deeper" / "stack.raw").unlink()
                removed = deletion.remove_left_empty(run, ["sub/deeper/stack.raw"])
                still = (run / "sub" / "deeper").is_dir()
        finally:
            lab.queue.close()
    assert (scan.check.refusal, scan.check.refusal_code) == (
        "run holds a mount point: sub",
        CleanupCode.RUN_HOLDS_MOUNT,
    )
    assert (result.stop, result.stop_fatal, result.deleted) == ("run holds a mount point: sub", False, 0)
    assert removed == [] and still
