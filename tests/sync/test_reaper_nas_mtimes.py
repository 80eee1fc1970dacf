"""Interlock 4 compares each planned file's NAS mtime with the one the push gave it, not its size alone.

Every transport copies a file's local mtime to the NAS. A NAS run folder restored from an older
snapshot after the last audit pass brings a same-size file back with its older bytes and older
mtime: a listing of sizes took it for the verified copy and the reaper deleted the local edited
bytes, then held nowhere (rule 1). Now such a file is sent again and nothing is deleted; a NAS that
keeps mtimes coarsely (FAT's 2 s, whole seconds as rsync lists them) still cleans.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.reaper import deletion
from exlab_wizard.sync.reaper.interlocks import narrow_times
from exlab_wizard.sync.states import SyncJobState
from tests.lab import VERIFIED_FILES as FILES
from tests.lab import VerifiedLab as Lab
from tests.lab import deletion_killed_after_two

S = SyncJobState
SECOND = 1_000_000_000
RESTORED = "sub/deeper/stack.raw"


@pytest.fixture
def lab(tmp_path: Path):
    lab = Lab.build(tmp_path)
    yield lab
    lab.queue.close()


def shift_nas_mtime(lab: Lab, run: Path, rel: str, by_ns: int) -> None:
    """The NAS copy of ``rel`` given its local file's mtime moved by ``by_ns`` (bytes and size unchanged)."""
    local = os.stat(run / rel)
    os.utime(lab.nas_copy(run) / rel, ns=(local.st_atime_ns, local.st_mtime_ns + by_ns))


def restore_older(lab: Lab, run: Path, rel: str) -> None:
    """The admin's restore from a snapshot: older bytes of the same size, with their older mtime."""
    nas = lab.nas_copy(run) / rel
    nas.write_bytes(b"O" * len(FILES[rel]))
    shift_nas_mtime(lab, run, rel, -3600 * SECOND)


def intact(lab: Lab, run: Path) -> bool:
    return lab.manifest_files_intact(run)


def plan_rows(lab: Lab) -> int:
    with lab.queue.transaction() as conn:
        return conn.execute("SELECT COUNT(*) FROM cleanup_plan").fetchone()[0]


def test_a_file_restored_from_an_older_snapshot_is_sent_again_and_nothing_is_deleted(lab: Lab) -> None:
    run, job_id = lab.make_run()
    restore_older(lab, run, RESTORED)
    outcomes = lab.run_pass()
    assert [o.action for o in outcomes] == ["promoted", "requeued"], outcomes
    assert outcomes[1].code == CleanupCode.NAS_COPY_CHANGED and outcomes[1].paths == (RESTORED,)
    assert (
        outcomes[1].reason
        == f"NAS copy changed since it was sent: other mtime on the NAS than the push gave: {RESTORED}"
    )
    assert intact(lab, run) and plan_rows(lab) == 0
    job = lab.job(job_id)
    assert job.state == S.QUEUED and job.error_kind == "hash_mismatch"
    assert job.rewrite_paths == (RESTORED,) and job.mismatch_count == 1 and job.verified_at is None


def test_the_dry_run_shows_it(lab: Lab) -> None:
    run, job_id = lab.make_run()
    restore_older(lab, run, RESTORED)
    [outcome] = asyncio.run(lab.reaper().plan(dry_run=True))
    assert outcome.action == "would_requeue" and outcome.code == CleanupCode.NAS_COPY_CHANGED
    assert outcome.paths == (RESTORED,) and lab.job(job_id).state == S.VERIFIED
    assert intact(lab, run)


def test_a_resumed_plan_lists_the_mtimes_again(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    run, job_id = lab.make_run(eligible=True)
    monkeypatch.setattr(deletion, "delete_batch", lambda r, b: (_ for _ in ()).throw(RuntimeError("killed")))
    lab.run_pass()  # the plan is written, then the process dies before the first unlink
    monkeypatch.undo()
    assert plan_rows(lab) == len(FILES)
    restore_older(lab, run, RESTORED)  # while the machine was down
    outcomes = lab.run_pass()
    assert [o.action for o in outcomes] == ["requeued"] and outcomes[0].paths == (RESTORED,)
    assert intact(lab, run) and plan_rows(lab) == 0
    assert lab.job(job_id).rewrite_paths == (RESTORED,)


def test_a_resumed_plan_part_deleted_stops(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"f{i:02d}.bin": bytes([i]) * 100 for i in range(6)}
    run, job_id = lab.make_run(files=files, eligible=True)
    with deletion_killed_after_two(monkeypatch):
        lab.run_pass()
    shift_nas_mtime(lab, run, "f04.bin", -3600 * SECOND)
    outcomes = lab.run_pass()
    assert outcomes[0].action == "aborted" and outcomes[0].code == CleanupCode.REMOTE_CHANGED_DURING_CLEANUP
    job = lab.job(job_id)
    assert job.state == S.FAILED and job.error_kind == "remote_changed_during_cleanup" and "f04.bin" in job.last_error
    assert all((run / f"f{i:02d}.bin").read_bytes() == files[f"f{i:02d}.bin"] for i in range(2, 6))


@pytest.mark.parametrize(
    "by_ns",
    [
        -1_999_999_999,  # FAT truncates to 2 s
        +1_500_000_000,  # a FAT writer that rounds up
        -999_999_999,  # whole seconds, as rsync and sftp list mtimes
        -9_999_999,  # exFAT's 10 ms
    ],
)
def test_a_nas_that_keeps_mtimes_coarsely_still_cleans(lab: Lab, by_ns: int) -> None:
    run, job_id = lab.make_run()
    for rel in FILES:
        shift_nas_mtime(lab, run, rel, by_ns)
    assert [o.action for o in lab.run_pass()] == ["promoted", "deleted"]
    assert lab.job(job_id).state == S.CLEANED


def test_more_than_two_seconds_off_is_not_the_copy_sent(lab: Lab) -> None:
    run, job_id = lab.make_run()
    shift_nas_mtime(lab, run, "image_001.tif", 2 * SECOND + 1)
    assert [o.action for o in lab.run_pass()] == ["promoted", "requeued"]
    assert intact(lab, run) and lab.job(job_id).rewrite_paths == ("image_001.tif",)


def test_a_local_file_touched_since_verification_still_cleans(lab: Lab) -> None:
    """Touched, same bytes: the local mtime moved, the NAS keeps the verified one (recorded at verification)."""
    run, job_id = lab.make_run()
    os.utime(run / "image_001.tif")  # now: re-hashed by the local check, the same bytes
    assert [o.action for o in lab.run_pass()] == ["promoted", "deleted"]
    assert lab.job(job_id).state == S.CLEANED


@pytest.mark.parametrize(
    ("sent_s", "stored_s"),
    [
        (1_700_000_000, 1_700_000_000),  # within 32 bits: the time itself
        (-631_152_000, 3_663_815_296),  # 1950 on SFTP v3 (unsigned seconds): 2086
        (7_258_118_400, 2_963_151_104),  # 2200 on SFTP v3: 2063
        (2_208_988_800, -2_085_978_496),  # 2040 on an rsync before protocol 30 (signed seconds): 1903
        (-2_208_988_800, 2_085_978_496),  # 1900 there: 2036
    ],
)
def test_a_32_bit_store_of_a_sent_mtime_counts_as_sent(sent_s: int, stored_s: int) -> None:
    assert stored_s * 1_000_000_000 in narrow_times(sent_s * 1_000_000_000 + 123)
    assert sent_s * 1_000_000_000 + 123 in narrow_times(sent_s * 1_000_000_000 + 123)
    assert len(narrow_times(1_700_000_000_000_000_000)) == 1  # 2023 to the ns: nothing else accepted
