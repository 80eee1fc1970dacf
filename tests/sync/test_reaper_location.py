"""After the equipment's NAS location changed in the config, the reaper never deletes on the old place's passes (rule 1).

Before, it listed the new place (every file at its size: a copy still being
filled) and deleted on the strength of passes hashed at the old one. The
client-level history (the audit verifying the new place) is in
``tests/client/test_nas_location_moved.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.states import SyncJobState
from tests.lab import VERIFIED_FILES, mark_nas
from tests.lab import VerifiedLab as Lab

S = SyncJobState


@pytest.fixture
def lab(tmp_path: Path):
    lab = Lab.build(tmp_path)
    yield lab
    lab.queue.close()


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
