"""``JobQueue.transition(..., unless_planned=True)``: no move out of a job the reaper has a deletion plan for.

The audit's send-back and failures of a verified run looked for the reaper's
plan in one statement and moved the job in another; a reaper in another
process could write its plan (and delete) in between. The plan is now part
of the move's own UPDATE, so the one written first wins, across processes.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.reaper.store import CleanupStore, PlannedFile
from exlab_wizard.sync.states import DeletionPlanned, IllegalTransition, SyncJobState

S = SyncJobState
NOW = dt.datetime(2024, 5, 6, 12, 0, tzinfo=dt.UTC)


def _eligible(q: JobQueue) -> str:
    job, _ = q.get_or_create("/data/lab/CONFOCAL_01/P/Runs/R1", "CONFOCAL_01", "/nas/P/Runs/R1", now=NOW)
    for src, dst in ((S.QUEUED, S.RUNNING), (S.RUNNING, S.AWAITING_VERIFY), (S.AWAITING_VERIFY, S.VERIFIED)):
        q.transition(job.id, src, dst, now=NOW, manifest_digest="d" * 64)
    q.transition(job.id, S.VERIFIED, S.CLEANUP_ELIGIBLE, now=NOW)
    return job.id


@pytest.mark.parametrize("to_state", [S.QUEUED, S.FAILED])
def test_a_plan_written_first_stops_the_move(tmp_path: Path, to_state: SyncJobState) -> None:
    with JobQueue(tmp_path / "queue.db") as q:
        job_id = _eligible(q)
        planned = CleanupStore(q).write_plan(
            q.get(job_id), [PlannedFile("a.tif", 3, 1, 2, "e" * 64)], NOW, "cleanup planned"
        )
        assert planned is not None
        events = len(q.events(job_id))
        with pytest.raises(DeletionPlanned, match="deletion plan"):
            q.transition(job_id, S.CLEANUP_ELIGIBLE, to_state, now=NOW, unless_planned=True)
        assert issubclass(DeletionPlanned, IllegalTransition)  # callers that catch a stale move catch it
        assert q.get(job_id).state == S.CLEANUP_ELIGIBLE and len(q.events(job_id)) == events
        # The paths meant to stop a deletion do not ask for it: the move goes ahead.
        assert q.transition(job_id, S.CLEANUP_ELIGIBLE, to_state, now=NOW).state == to_state


def test_no_plan_the_move_goes_ahead(tmp_path: Path) -> None:
    with JobQueue(tmp_path / "queue.db") as q:
        job_id = _eligible(q)
        moved = q.transition(job_id, S.CLEANUP_ELIGIBLE, S.QUEUED, now=NOW, unless_planned=True)
        assert moved.state == S.QUEUED
        # A stale from-state is still told as such, not as a plan.
        with pytest.raises(IllegalTransition, match="not cleanup_eligible") as stale:
            q.transition(job_id, S.CLEANUP_ELIGIBLE, S.QUEUED, now=NOW, unless_planned=True)
        assert not isinstance(stale.value, DeletionPlanned)
