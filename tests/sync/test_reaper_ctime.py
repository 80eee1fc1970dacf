"""A planned file changed after the plan with its size, mtime and inode kept is never deleted (rule 1).

The plan keeps each file's ctime; a file whose ctime moved is hashed again
right before its unlink and must still hold the verified bytes. Before, the
check before the unlink compared size, mtime and inode only: a change that
put the mtime back (``touch -r``, ``exiftool -P``) made after the plan (a
crash between the plan and the deletion, or during the NAS listing) was deleted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exlab_wizard.sync.reaper import deletion
from exlab_wizard.sync.states import SyncJobState
from tests.lab import VerifiedLab as Lab

S = SyncJobState


@pytest.fixture
def lab(tmp_path: Path):
    lab = Lab.build(tmp_path)
    yield lab
    lab.queue.close()


def test_a_resumed_plan_never_deletes_bytes_changed_with_the_mtime_put_back(lab: Lab, monkeypatch):
    files = {f"f{i:02d}.bin": bytes([i]) * 100 for i in range(6)}
    run, job_id = lab.make_run(files=files, eligible=True)
    # The plan is written, then the process dies before the first unlink.
    monkeypatch.setattr(deletion, "delete_batch", lambda r, b: (_ for _ in ()).throw(RuntimeError("killed")))
    lab.run_pass()
    monkeypatch.undo()
    # While the machine was down: new bytes written in place, same size, the old mtime put back
    # (the same change made before the plan is FAILED local_damage, nothing deleted:
    # test_local_damage_same_size_and_mtime_fails_and_deletes_nothing).
    target = run / "f04.bin"
    st = target.stat()
    new = b"N" * 100
    with open(target, "r+b") as fh:
        fh.write(new)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_ino == st.st_ino and target.stat().st_ctime_ns != st.st_ctime_ns
    # The NAS never held these bytes.
    assert (lab.nas_copy(run) / "f04.bin").read_bytes() != new
    outcomes = lab.run_pass()
    # Rule 1: bytes without a verified NAS copy must not be deleted.
    assert target.exists(), f"unverified local bytes deleted: {[(o.action, o.reason) for o in outcomes]}"


def test_an_edit_with_the_mtime_put_back_during_the_listing_is_never_deleted(lab: Lab):
    """No crash needed: the change lands while the reaper awaits the NAS listing (after the local check)."""
    files = {f"f{i:02d}.bin": bytes([i]) * 100 for i in range(6)}
    run, job_id = lab.make_run(files=files, eligible=True)
    target = run / "f04.bin"
    new = b"N" * 100

    async def listing_while_edited(job):
        st = target.stat()
        with open(target, "r+b") as fh:
            fh.write(new)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        return await lab._remote_listing(job)

    outcomes = lab.run_pass(remote_listing=listing_while_edited)
    assert target.exists(), f"unverified local bytes deleted: {[(o.action, o.reason) for o in outcomes]}"


def test_a_resumed_plan_deletes_a_file_whose_ctime_alone_moved(lab: Lab, monkeypatch):
    """A chmod (or a hard link) moves the ctime only: hashed again, still the verified bytes, deleted."""
    files = {f"f{i:02d}.bin": bytes([i]) * 100 for i in range(3)}
    run, job_id = lab.make_run(files=files, eligible=True)
    monkeypatch.setattr(deletion, "delete_batch", lambda r, b: (_ for _ in ()).throw(RuntimeError("killed")))
    lab.run_pass()
    monkeypatch.undo()
    target = run / "f01.bin"
    before = target.stat().st_ctime_ns
    os.chmod(target, 0o600)
    assert target.stat().st_ctime_ns != before
    outcomes = lab.run_pass()
    assert not any((run / rel).exists() for rel in files), [(o.action, o.reason) for o in outcomes]
    assert lab.job(job_id).state == S.CLEANED
