"""Due times stamped while the clock ran ahead, seen by the queue and the cleanup policy once it is set right.

A ``next_attempt_at`` further ahead than the longest wait the engine sets (``max_wait``: the
longest backoff or a scan interval) is due; a ``verified_at`` after ``now`` counts the age of
interlock 3 from the first verify pass not after ``now``, never from earlier.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from exlab_wizard.sync.policy.cleanup import CleanupCode, CleanupFacts, LocalCheck, RemoteCheck, age_start, decide
from exlab_wizard.sync.queue import JobQueue, attempt_due
from exlab_wizard.sync.states import SyncJobState

S = SyncJobState
NOW = dt.datetime(2024, 5, 6, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
YEAR = dt.timedelta(days=365)
MAX_WAIT = dt.timedelta(seconds=120)


def t(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


@pytest.fixture
def q(tmp_path: Path):
    with JobQueue(tmp_path / "queue.db") as queue:
        yield queue


def queued(q: JobQueue, name: str, at: dt.datetime) -> str:
    job, _ = q.get_or_create(f"/data/lab/{name}/P/Runs/R", name, f"/nas/{name}/R", now=NOW - HOUR)
    q.update(job.id, S.QUEUED, now=NOW - HOUR, next_attempt_at=at)
    return job.id


def test_attempt_due() -> None:
    assert attempt_due(None, NOW, MAX_WAIT) and attempt_due(NOW, NOW, MAX_WAIT)
    assert not attempt_due(t(30), NOW, MAX_WAIT) and not attempt_due(NOW + MAX_WAIT, NOW, MAX_WAIT)
    assert attempt_due(NOW + YEAR, NOW, MAX_WAIT)  # no backoff is that long: the clock was ahead
    assert not attempt_due(NOW + YEAR, NOW)  # with no max_wait, every future time is waited for


def test_a_next_attempt_further_ahead_than_any_wait_is_due(q: JobQueue) -> None:
    backoff = queued(q, "EQ1", t(60))  # a real backoff: waited for
    stuck = queued(q, "EQ2", NOW + YEAR)  # set while the clock ran a year ahead
    assert q.next_due(NOW) is None  # as before when no max_wait is given
    assert q.next_due(NOW, max_wait=MAX_WAIT).id == stuck
    assert q.next_due(NOW, busy_equipment={"EQ2"}, max_wait=MAX_WAIT) is None
    assert q.next_due(t(60), busy_equipment={"EQ2"}, max_wait=MAX_WAIT).id == backoff
    # The wakeups look at the real backoff only: the other is due now, not a year away.
    assert q.next_wakeup(NOW, max_wait=MAX_WAIT) == t(60) == q.next_dispatch_wakeup(NOW, max_wait=MAX_WAIT)
    assert q.next_wakeup(NOW) == t(60)


def test_recover_brings_such_a_next_attempt_forward(q: JobQueue) -> None:
    backoff = queued(q, "EQ1", t(60))
    stuck = queued(q, "EQ2", NOW + YEAR)
    q.recover(now=NOW, max_wait=MAX_WAIT)
    assert q.get(stuck).next_attempt_at == NOW
    assert q.get(backoff).next_attempt_at == t(60)
    assert q.next_wakeup(NOW) == t(60)  # nothing a year away any more, whoever asks


def facts(verified_at: dt.datetime, pass_times: tuple[dt.datetime, ...], now: dt.datetime) -> CleanupFacts:
    """Every interlock holds but maybe the age."""
    return CleanupFacts(
        enabled=True,
        verify_passes=len(pass_times),
        min_verify_passes=2,
        verified_at=verified_at,
        min_age_hours=24,
        now=now,
        remote_reachable=True,
        overrides_no_longer_active=(),
        local=LocalCheck(),
        remote=RemoteCheck(),
        pass_times=pass_times,
    )


def test_a_verified_at_ahead_of_the_clock_counts_from_the_first_pass_after_the_correction() -> None:
    ahead = NOW + YEAR  # the first verification, stamped by a clock a year ahead
    assert age_start(ahead, (ahead,), NOW) is None
    waiting = decide(facts(ahead, (ahead, ahead + 6 * HOUR), NOW))  # two passes, both stamped ahead
    assert (waiting.action, waiting.code) == ("wait", CleanupCode.WAITING_AGE), waiting
    assert "age counts from the next verify pass" in waiting.reason

    passes = (ahead, NOW)  # the clock set right, an audit pass at NOW
    assert age_start(ahead, passes, NOW) == NOW
    assert decide(facts(ahead, passes, NOW + 23 * HOUR)).code == CleanupCode.WAITING_AGE
    assert decide(facts(ahead, passes, NOW + 24 * HOUR)).action == "delete"
    # Once the clock passes the stamp ahead, the age still counts from that first pass.
    assert age_start(ahead, passes, ahead + HOUR) == NOW


def test_a_verified_at_in_the_past_counts_as_before() -> None:
    passes = (NOW - 25 * HOUR, NOW - 19 * HOUR)
    assert age_start(passes[0], passes, NOW) == passes[0]
    assert decide(facts(passes[0], passes, NOW)).action == "delete"
    assert decide(facts(passes[0], passes, NOW - 2 * HOUR)).code == CleanupCode.WAITING_AGE


def test_a_metadata_push_due_further_ahead_than_any_wait_is_due_while_running(q: JobQueue) -> None:
    """The same for a pending metadata push whose retry was stamped by a clock since set back (no restart)."""
    real = queued(q, "EQ1", None)
    stuck = queued(q, "EQ2", None)
    for job_id, due in ((real, t(60)), (stuck, NOW + YEAR)):
        q.update(job_id, S.QUEUED, now=NOW - HOUR, next_attempt_at=None)
        q.transition(job_id, S.QUEUED, S.RUNNING, now=NOW - HOUR)
        q.transition(job_id, S.RUNNING, S.AWAITING_VERIFY, now=NOW - HOUR)
        q.transition(job_id, S.AWAITING_VERIFY, S.VERIFIED, now=NOW - HOUR, manifest_digest="ab" * 32)
        q.update(job_id, S.VERIFIED, now=NOW - HOUR, metadata_push_due_at=due)
    assert q.next_metadata_push(NOW) is None  # as before when no max_wait is given
    assert q.next_metadata_push(NOW, max_wait=MAX_WAIT).id == stuck
    assert q.next_metadata_push(NOW, busy_equipment={"EQ2"}, max_wait=MAX_WAIT) is None
    assert q.next_dispatch_wakeup(NOW, max_wait=MAX_WAIT) == t(60)  # the real retry, not a year away
    assert q.next_dispatch_wakeup(NOW) == t(60)
