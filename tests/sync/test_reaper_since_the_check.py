"""What changed after the reaper's checks never gets a local byte deleted (rule 1).

- A planned file changed after the plan with its size, mtime and inode kept.
  The plan keeps each file's ctime; a file whose ctime moved is hashed again
  right before its unlink and must still hold the verified bytes. Before, the
  check before the unlink compared size, mtime and inode only: a change that
  put the mtime back (``touch -r``, ``exiftool -P``) made after the plan (a
  crash between the plan and the deletion, or during the NAS listing) was
  deleted.
- The equipment's NAS location changed in the config after the verification.
  Before, the reaper listed the new place (every file at its size: a copy
  still being filled) and deleted on the strength of passes hashed at the old
  one. The client-level history (the audit verifying the new place) is in
  ``tests/client/test_nas_location_moved.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.reaper import deletion
from exlab_wizard.sync.states import SyncJobState
from tests.lab import VERIFIED_FILES, mark_nas
from tests.lab import VerifiedLab as Lab

S = SyncJobState


@pytest.fixture
def lab(tmp_path: Path):
    lab = Lab.build(tmp_path)
    yield lab
    lab.queue.close()


def _plan_then_die(lab: Lab, monkeypatch) -> None:
    """A pass writes its plan, then the process dies before the first unlink."""
    monkeypatch.setattr(deletion, "delete_batch", lambda r, b: (_ for _ in ()).throw(RuntimeError("killed")))
    lab.run_pass()
    monkeypatch.undo()


# ---------------------------------------------------------------- a file changed after the plan


def test_a_resumed_plan_never_deletes_bytes_changed_with_the_mtime_put_back(lab: Lab, monkeypatch):
    files = {f"f{i:02d}.bin": bytes([i]) * 100 for i in range(6)}
    run, job_id = lab.make_run(files=files, eligible=True)
    _plan_then_die(lab, monkeypatch)
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
    _plan_then_die(lab, monkeypatch)
    target = run / "f01.bin"
    before = target.stat().st_ctime_ns
    os.chmod(target, 0o600)
    assert target.stat().st_ctime_ns != before
    outcomes = lab.run_pass()
    assert not any((run / rel).exists() for rel in files), [(o.action, o.reason) for o in outcomes]
    assert lab.job(job_id).state == S.CLEANED


# ---------------------------------------------------------------- the NAS moved after the verification


def test_config_moved_to_a_new_share_with_same_sized_unverified_copy(lab: Lab):
    run, job_id = lab.make_run(eligible=True)  # verified (2 passes) on share 1
    # The lab moves the equipment to a new share; a copy is under way there (Windows Explorer /
    # robocopy preallocate every file at its final size, then fill it): right sizes, wrong bytes.
    new_share = lab.tmp / "nas2"
    mark_nas(new_share)
    rel_run = lab.nas_copy(run).relative_to(lab.nas)
    for rel, data in VERIFIED_FILES.items():
        target = new_share / rel_run / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            fh.truncate(len(data))  # preallocated, not yet filled
    eq = lab.config.equipment_by_id(lab.EQ)
    moved = eq.model_copy(update={"transport": eq.transport.model_copy(update={"mount_path": new_share})})
    lab.config = lab.config.model_copy(update={"equipment": [moved]})
    # The job still records the old remote path.
    assert lab.job(job_id).remote_path == str(lab.nas_copy(run))
    outcomes = lab.run_pass()
    # Rule 1: the copy the equipment now points at was never hashed; nothing may be deleted.
    assert all((run / r).exists() for r in VERIFIED_FILES), [(o.action, o.reason) for o in outcomes]
    assert [o.code for o in outcomes if o.action != "promoted"] == [CleanupCode.NAS_LOCATION_CHANGED]
