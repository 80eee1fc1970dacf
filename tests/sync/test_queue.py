"""The durable queue: transitions, events, crash safety, concurrency, the runner lease."""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from exlab_wizard.sync import queue as queue_mod
from exlab_wizard.sync.queue import (
    JobNotFound,
    JobQueue,
    QueueSchemaError,
    RunnerLease,
    SyncEvent,
    SyncJobRow,
    lease_path_for,
)
from exlab_wizard.sync.states import TRANSITIONS, IllegalTransition, SyncJobState

S = SyncJobState
NOW = dt.datetime(2024, 5, 6, 12, 0, tzinfo=dt.UTC)


def t(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "queue.db"


@pytest.fixture
def q(db: Path):
    with JobQueue(db) as queue:
        yield queue


def make(q: JobQueue, name: str, equipment: str = "CONFOCAL_01", *, now: dt.datetime = NOW) -> SyncJobRow:
    job, created = q.get_or_create(f"/data/lab/{equipment}/P/Runs/{name}", equipment, f"/nas/P/Runs/{name}", now=now)
    assert created
    return job


def path_to(state: SyncJobState) -> list[SyncJobState]:
    """A shortest legal path of states from QUEUED to ``state``."""
    paths = {S.QUEUED: [S.QUEUED]}
    frontier = [S.QUEUED]
    while frontier:
        nxt = []
        for src in frontier:
            for dst in sorted(TRANSITIONS[src]):
                if dst not in paths:
                    paths[dst] = [*paths[src], dst]
                    nxt.append(dst)
        frontier = nxt
    return paths[state]


def put_in(q: JobQueue, job: SyncJobRow, state: SyncJobState) -> SyncJobRow:
    steps = path_to(state)
    for src, dst in zip(steps, steps[1:], strict=False):
        job = q.transition(job.id, src, dst, now=NOW, detail="setup")
    return job


def child(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


# --------------------------------------------------------------------------- basics


def test_open_sets_pragmas_and_schema(q: JobQueue, db: Path):
    with q.transaction() as conn:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(queue_mod.MIGRATIONS)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with q.transaction() as conn:  # a long-lived connection's page cache is bounded, not SQLite's 2 MB
        assert conn.execute("PRAGMA cache_size").fetchone()[0] == -queue_mod.CACHE_KIB


def test_get_or_create_is_one_job_per_run(q: JobQueue):
    job, created = q.get_or_create("/data/lab/X/P/Runs/Run_1/", "X", "/nas/P/Runs/Run_1", now=NOW)
    assert created and job.state is S.QUEUED and job.run_path == "/data/lab/X/P/Runs/Run_1"
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    assert (job.created_at, job.updated_at, job.attempts, job.next_attempt_at) == (NOW, NOW, 0, None)
    again, created = q.get_or_create("/data/lab/X/P/Runs/Run_1", "Y", "/elsewhere", now=t(5))
    assert not created and again == job
    assert q.by_run("/data/lab/X/P/Runs/./Run_1") == job
    assert q.get(job.id) == job and q.get("nope") is None and q.by_run("/nope") is None
    [event] = q.events(job.id)
    assert (event.kind, event.from_state, event.to_state, event.detail, event.at) == (
        "transition",
        None,
        "queued",
        "enqueued",
        NOW,
    )


def test_refuses_naive_times_and_relative_runs(q: JobQueue):
    with pytest.raises(ValueError):
        q.get_or_create("/data/r", "X", "/n/r", now=dt.datetime(2024, 1, 1))
    with pytest.raises(ValueError):
        q.get_or_create("data/r", "X", "/n/r", now=NOW)
    assert q.list_jobs() == []


def test_fields_round_trip_and_to_dict(q: JobQueue):
    job = make(q, "Run_1")
    other_tz = dt.timezone(dt.timedelta(hours=2))
    job = q.transition(
        job.id,
        S.QUEUED,
        S.RUNNING,
        now=t(1),
        detail="go",
        attempts=2,
        next_attempt_at=None,
        error_kind="network",
        last_error="refused",
        verify_passes=1,
        verified_at=t(2).astimezone(other_tz),
        mismatch_count=1,
        overrides_relied_on=["a", "b"],
        manifest_digest="ff" * 32,
        last_verify_at=t(3),
        pass_times=[t(2), t(3)],
        rewrite_paths=("x/y.tif", "a b.txt"),
    )
    assert job == q.get(job.id)
    assert job.verified_at == t(2) and job.verified_at.utcoffset() == dt.timedelta(0)
    assert job.overrides_relied_on == ("a", "b") and job.pass_times == (t(2), t(3))
    assert job.rewrite_paths == ("x/y.tif", "a b.txt") and job.updated_at == t(1)
    data = json.loads(json.dumps(q.job_with_events(job.id).to_dict()))
    assert data["state"] == "running" and data["verified_at"] == "2024-05-06T12:00:02.000000+00:00"
    assert [e["to_state"] for e in data["events"]] == ["queued", "running"]
    # None clears a nullable field; omitted fields stay
    job = q.update(job.id, S.RUNNING, now=t(4), error_kind=None)
    assert job.error_kind is None and job.last_error == "refused" and job.updated_at == t(4)


def test_bad_fields_write_nothing(q: JobQueue):
    job = make(q, "Run_1")
    for bad in (
        {"state": "failed"},
        {"updated_at": NOW},
        {"attempts": "1"},
        {"attempts": True},
        {"rewrite_paths": "abc"},
        {"pass_times": [dt.datetime(2024, 1, 1)]},
        {"last_error": 3},
    ):
        with pytest.raises((TypeError, ValueError)):
            q.transition(job.id, S.QUEUED, S.RUNNING, now=t(1), **bad)
        with pytest.raises((TypeError, ValueError)):
            q.update(job.id, S.QUEUED, now=t(1), **bad)
    assert q.get(job.id) == job and len(q.events(job.id)) == 1
    with pytest.raises(ValueError):
        q.update(job.id, S.QUEUED, now=t(1), event_kind="transition")
    with pytest.raises(ValueError):
        q.record_event(job.id, "transition", "x", now=t(1))
    with pytest.raises(JobNotFound):
        q.transition("nope", S.QUEUED, S.RUNNING, now=t(1))
    with pytest.raises(JobNotFound):
        q.record_event("nope", "note", "x", now=t(1))


# --------------------------------------------------------------------------- transitions


@pytest.mark.parametrize("src", list(S), ids=str)
def test_every_transition_pair(q: JobQueue, src: SyncJobState):
    for dst in S:
        job = put_in(q, make(q, f"Run_{src}_{dst}"), src)
        assert job.state is src
        before_events = q.events(job.id)
        if dst in TRANSITIONS[src]:
            moved = q.transition(job.id, src, dst, now=t(9), detail=f"{src}->{dst}")
            assert moved.state is dst and moved.updated_at == t(9) and q.get(job.id) == moved
            events = q.events(job.id)
            assert events[:-1] == before_events
            assert (events[-1].kind, events[-1].from_state, events[-1].to_state, events[-1].detail) == (
                "transition",
                src.value,
                dst.value,
                f"{src}->{dst}",
            )
        else:
            with pytest.raises(IllegalTransition):
                q.transition(job.id, src, dst, now=t(9), attempts=99, last_error="no")
            assert q.get(job.id) == job
            assert q.events(job.id) == before_events


def test_stale_transition_between_two_queues(db: Path):
    with JobQueue(db) as a, JobQueue(db) as b:
        job = make(a, "Run_1")
        assert b.get(job.id).state is S.QUEUED
        a.transition(job.id, S.QUEUED, S.RUNNING, now=t(1))
        with pytest.raises(IllegalTransition, match=f"stale: job {job.id} is in state running, not queued"):
            b.transition(job.id, S.QUEUED, S.FAILED, now=t(2), last_error="x")
        with pytest.raises(IllegalTransition, match="stale"):
            b.update(job.id, S.QUEUED, now=t(2), event_kind="note", detail="x", attempts=5)
        row = b.get(job.id)
        assert row.state is S.RUNNING and row.attempts == 0 and row.last_error is None
        assert [e.to_state for e in b.events(job.id)] == ["queued", "running"]


def test_an_event_keeps_its_code_for_programs(q: JobQueue):
    """A refusal's or a hold's code is stored beside its text and read back everywhere events are read."""
    from exlab_wizard.sync.queue_stats import QueueStats

    job = make(q, "Run_1")
    q.record_event(job.id, "cleanup_refused", "remote unreachable: timed out", now=t(1), code="remote_unreachable")
    q.record_event(job.id, "note", "no code", now=t(2))
    refused, note = q.events(job.id)[-2:]
    assert (refused.code, note.code) == ("remote_unreachable", None)
    assert refused.to_dict()["code"] == "remote_unreachable"
    assert q.job_with_events(job.id).events[-2].code == "remote_unreachable"
    stored = QueueStats(q.db_path).events_after(0)
    assert [(e.kind, e.code) for e in stored][-2:] == [("cleanup_refused", "remote_unreachable"), ("note", None)]
    assert stored[-2].to_dict()["code"] == "remote_unreachable"


def test_update_and_events(q: JobQueue):
    job = make(q, "Run_1")
    job = q.update(job.id, S.QUEUED, now=t(1), event_kind="gate_hold", detail="held", next_attempt_at=t(30))
    assert job.state is S.QUEUED and job.next_attempt_at == t(30)
    q.update(job.id, S.QUEUED, now=t(2), attempts=1)  # no event
    event = q.record_event(job.id, "cleanup_refused", "waiting: 1 of 2 verify passes", now=t(3))
    assert isinstance(event, SyncEvent) and event.kind == "cleanup_refused" and event.from_state is None
    assert q.get(job.id).updated_at == t(2)  # an event alone changes nothing on the job
    events = q.events(job.id)
    assert [e.kind for e in events] == ["transition", "gate_hold", "cleanup_refused"]
    assert q.events(job.id, limit=2) == events[1:]
    for i in range(60):
        q.record_event(job.id, "note", f"n{i}", now=t(10 + i))
    full = q.job_with_events(job.id)
    assert len(full.events) == 50 and full.events[0].detail == "n10" and full.events[-1].detail == "n59"
    assert q.job_with_events(job.run_path, limit=3).events == full.events[-3:]
    assert q.job_with_events(job.run_path + "/").id == job.id
    assert q.job_with_events("/no/such/run") is None and q.job_with_events("nope") is None
    assert q.get(job.id).events == ()


def test_list_and_counts(q: JobQueue):
    a = make(q, "A", "EQ1", now=t(3))
    b = make(q, "B", "EQ2", now=t(1))
    c = make(q, "C", "EQ1", now=t(2))
    q.transition(c.id, S.QUEUED, S.RUNNING, now=t(4))
    assert [j.id for j in q.list_jobs()] == [b.id, c.id, a.id]
    assert [j.id for j in q.list_jobs(state=S.QUEUED)] == [b.id, a.id]
    assert [j.id for j in q.list_jobs(equipment_id="EQ1")] == [c.id, a.id]
    assert [j.id for j in q.list_jobs(state="running", equipment_id="EQ1")] == [c.id]
    counts = q.counts()
    assert counts[S.QUEUED] == 2 and counts[S.RUNNING] == 1 and counts[S.CLEANED] == 0 and len(counts) == len(S)


def test_iter_jobs_reads_page_by_page_and_sees_moves(q: JobQueue, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(queue_mod, "JOB_PAGE", 3)
    jobs = [put_in(q, make(q, f"R{i:02d}", now=t(i)), S.VERIFIED) for i in range(8)]
    make(q, "Q")  # another state: never yielded
    assert [j.id for j in q.iter_jobs(S.VERIFIED)] == [j.id for j in jobs]
    seen = []
    for job in q.iter_jobs("verified"):
        seen.append(job.id)
        if len(seen) == 1:  # moves made during the pass: the later pages show them
            q.transition(jobs[5].id, S.VERIFIED, S.CLEANUP_ELIGIBLE, now=t(10))
            put_in(q, make(q, "LATE", now=t(11)), S.VERIFIED)
    assert seen[:5] == [j.id for j in jobs[:5]] and jobs[5].id not in seen
    assert seen[5:7] == [jobs[6].id, jobs[7].id] and len(seen) == 8  # and LATE, after them
    assert list(q.iter_jobs(S.FAILED)) == []


# --------------------------------------------------------------------------- scheduling


def test_next_due_and_next_wakeup(q: JobQueue):
    retried = make(q, "Retried", "EQ1", now=t(-100))
    q.update(retried.id, S.QUEUED, now=t(-50), next_attempt_at=t(-10))
    fresh1 = make(q, "Fresh1", "EQ1", now=t(-5))
    fresh2 = make(q, "Fresh2", "EQ2", now=t(-4))
    later = make(q, "Later", "EQ3", now=t(-200))
    q.update(later.id, S.QUEUED, now=t(-1), next_attempt_at=t(60))
    soon = make(q, "Soon", "EQ4", now=t(-300))
    q.update(soon.id, S.QUEUED, now=t(-1), next_attempt_at=t(30))
    put_in(q, make(q, "Running", "EQ5", now=t(-1000)), S.RUNNING)

    assert q.next_due(NOW).id == fresh1.id  # null next_attempt_at first
    assert q.next_due(NOW, busy_equipment={"EQ1"}).id == fresh2.id
    assert q.next_due(NOW, busy_equipment=["EQ2"]).id == fresh1.id
    q.transition(fresh1.id, S.QUEUED, S.RUNNING, now=NOW)
    assert q.next_due(NOW).id == fresh2.id
    assert q.next_due(NOW, busy_equipment={"EQ2"}).id == retried.id  # due, earlier retry time
    assert q.next_due(NOW, busy_equipment={"EQ1", "EQ2"}) is None  # the rest wait for the future
    assert q.next_due(t(30), busy_equipment={"EQ1", "EQ2"}).id == soon.id  # <= now counts as due
    assert q.next_due(t(61), busy_equipment={"EQ1", "EQ2", "EQ4"}).id == later.id
    assert q.next_due(t(61), busy_equipment={"EQ1", "EQ2", "EQ3", "EQ4"}) is None
    with pytest.raises(TypeError):
        q.next_due(NOW, busy_equipment="EQ1")

    assert q.next_wakeup(NOW) == t(30)
    assert q.next_wakeup(t(30)) == t(60)
    assert q.next_wakeup(t(60)) is None
    assert q.next_wakeup() is None  # the real clock is long past these times


def test_next_dispatch_wakeup_is_the_earlier_of_a_retry_and_a_metadata_push(q: JobQueue):
    assert q.next_dispatch_wakeup(NOW) is None
    retry = make(q, "Retry", "EQ1")
    q.update(retry.id, S.QUEUED, now=NOW, next_attempt_at=t(60))
    pushed = put_in(q, make(q, "Pushed", "EQ2"), S.VERIFIED)
    q.update(pushed.id, S.VERIFIED, now=NOW, metadata_push_due_at=t(30))
    assert q.next_dispatch_wakeup(NOW) == t(30) == q.next_metadata_wakeup(NOW)
    assert q.next_dispatch_wakeup(t(30)) == t(60) == q.next_wakeup(t(30))
    assert q.next_dispatch_wakeup(t(60)) is None


def test_recover(q: JobQueue):
    running = put_in(q, make(q, "R"), S.RUNNING)
    running = q.update(running.id, S.RUNNING, now=NOW, attempts=3)
    awaiting = put_in(q, make(q, "A"), S.AWAITING_VERIFY)
    verified = put_in(q, make(q, "V"), S.VERIFIED)
    queued = make(q, "Q")
    back = q.recover(now=t(100))
    assert [j.id for j in back] == [awaiting.id]
    row = q.get(running.id)
    assert (row.state, row.attempts, row.next_attempt_at, row.updated_at) == (S.QUEUED, 3, t(100), t(100))
    last = q.events(running.id)[-1]
    assert (last.from_state, last.to_state, last.detail) == ("running", "queued", "recovered after restart")
    assert q.get(verified.id) == verified and q.get(queued.id) == queued and q.get(awaiting.id) == awaiting
    assert q.recover(now=t(200)) == [q.get(awaiting.id)]


# --------------------------------------------------------------------------- transactions


def test_transaction_commits_rolls_back_and_nests(q: JobQueue):
    job = make(q, "Run_1")
    with pytest.raises(RuntimeError), q.transaction():
        q.transition(job.id, S.QUEUED, S.RUNNING, now=t(1))
        q.record_event(job.id, "note", "inside", now=t(1))
        raise RuntimeError("abort")
    assert q.get(job.id) == job and len(q.events(job.id)) == 1

    with q.transaction() as conn:
        q.transition(job.id, S.QUEUED, S.RUNNING, now=t(2))
        with pytest.raises(IllegalTransition):  # inner failure, caught: the outer work stands
            q.transition(job.id, S.QUEUED, S.RUNNING, now=t(2))
        assert conn.execute("SELECT state FROM jobs WHERE id = ?", (job.id,)).fetchone()["state"] == "running"
    assert q.get(job.id).state is S.RUNNING
    assert [e.to_state for e in q.events(job.id)] == ["queued", "running"]


def test_a_migration_is_one_list_entry(db: Path, monkeypatch: pytest.MonkeyPatch):
    with JobQueue(db) as q:
        make(q, "Run_1")
    extra = "CREATE TABLE deletion_plans (job_id TEXT NOT NULL REFERENCES jobs (id), path TEXT NOT NULL);"
    monkeypatch.setattr(queue_mod, "MIGRATIONS", [*queue_mod.MIGRATIONS, extra])
    with JobQueue(db) as q:
        job = q.list_jobs()[0]
        with q.transaction() as conn:
            conn.execute("INSERT INTO deletion_plans VALUES (?, ?)", (job.id, "a.tif"))
            assert conn.execute("PRAGMA user_version").fetchone()[0] == len(queue_mod.MIGRATIONS)
            with pytest.raises(sqlite3.IntegrityError):  # foreign keys are on
                conn.execute("INSERT INTO deletion_plans VALUES ('nope', 'b.tif')")
    monkeypatch.undo()
    with pytest.raises(QueueSchemaError, match="newer"):
        JobQueue(db)


def test_jobs_that_ran_before_the_claim_event_existed_count_as_claimed(db: Path, monkeypatch: pytest.MonkeyPatch):
    """Migration 9: a job an attempt of which ran may have written to its NAS folder; one never run did not."""
    monkeypatch.setattr(queue_mod, "MIGRATIONS", queue_mod.MIGRATIONS[:8])
    with JobQueue(db) as q:
        ran = make(q, "Run_1")
        q.transition(ran.id, S.QUEUED, S.RUNNING, now=t(1))
        q.transition(ran.id, S.RUNNING, S.QUEUED, now=t(2))
        q.transition(ran.id, S.QUEUED, S.RUNNING, now=t(3))
        waiting = make(q, "Run_2")
    monkeypatch.undo()
    with JobQueue(db) as q:
        claims = [e for e in q.events(ran.id) if e.kind == queue_mod.NAS_CLAIMED_EVENT]
        assert [e.at for e in claims] == [t(1)]
        assert not [e for e in q.events(waiting.id) if e.kind == queue_mod.NAS_CLAIMED_EVENT]
        later = make(q, "Run_3")
        q.transition(later.id, S.QUEUED, S.RUNNING, now=t(4))  # after the upgrade: only a push claims
    with JobQueue(db) as q:
        assert not [e for e in q.events(later.id) if e.kind == queue_mod.NAS_CLAIMED_EVENT]


def test_threads_share_one_queue(q: JobQueue):
    errors: list[BaseException] = []
    runs = [f"/data/lab/EQ/P/Runs/Run_{i}" for i in range(20)]

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for run in rng.sample(runs, len(runs)):
                job, _ = q.get_or_create(run, "EQ", "/nas/x", now=NOW)
                q.record_event(job.id, "note", f"thread {seed}", now=NOW)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    jobs = q.list_jobs()
    assert len(jobs) == 20 and all(len(q.events(j.id)) == 9 for j in jobs)


def test_closed_queue_refuses(db: Path):
    q = JobQueue(db)
    q.close()
    q.close()
    with pytest.raises(RuntimeError, match="closed"):
        q.list_jobs()


# --------------------------------------------------------------------------- processes

KILL_LOOP = """
    import datetime as dt, sys
    from exlab_wizard.sync.queue import JobQueue
    from exlab_wizard.sync.states import SyncJobState as S
    q = JobQueue(sys.argv[1])
    job_id = sys.argv[2]
    print("ready", flush=True)
    while True:
        row = q.get(job_id)
        target = S.RUNNING if row.state is S.QUEUED else S.QUEUED
        q.transition(job_id, row.state, target, now=dt.datetime.now(dt.UTC),
                     detail=f"step {row.attempts + 1}", attempts=row.attempts + 1)
"""


def test_state_and_event_agree_after_sigkill(db: Path):
    with JobQueue(db) as q:
        job = make(q, "Run_1")
    rng = random.Random(1234)
    for _ in range(20):
        proc = child(KILL_LOOP, str(db), job.id)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        threading.Event().wait(rng.uniform(0.0, 0.04))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        with JobQueue(db) as q:
            row = q.get(job.id)
            transitions = [e for e in q.events(job.id) if e.kind == "transition"]
            assert transitions[-1].to_state == row.state.value
            assert len(transitions) == row.attempts + 1  # one event per committed step, no more, no less
            assert transitions[-1].detail == ("enqueued" if row.attempts == 0 else f"step {row.attempts}")
            with q.transaction() as conn:
                assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert row.attempts > 20  # the loop really ran between kills


GET_OR_CREATE = """
    import datetime as dt, json, random, sys
    from exlab_wizard.sync.queue import JobQueue
    q = JobQueue(sys.argv[1])
    runs = [f"/data/lab/EQ/P/Runs/Run_{i:02d}" for i in range(50)]
    random.Random(int(sys.argv[2])).shuffle(runs)
    print("ready", flush=True)
    sys.stdin.readline()
    out = {}
    for run in runs:
        job, created = q.get_or_create(run, "EQ", "/nas/" + run, now=dt.datetime.now(dt.UTC))
        out[run] = [job.id, created]
    print(json.dumps(out), flush=True)
"""


def test_four_processes_create_each_job_once(db: Path):
    JobQueue(db).close()
    procs = [child(GET_OR_CREATE, str(db), str(seed)) for seed in range(4)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    for proc in procs:  # start them together
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    ids = [{run: v[0] for run, v in r.items()} for r in results]
    assert ids[0] == ids[1] == ids[2] == ids[3] and len(set(ids[0].values())) == 50
    created = collections.Counter(run for r in results for run, v in r.items() if v[1])
    assert len(created) == 50 and set(created.values()) == {1}
    with JobQueue(db) as q:
        jobs = q.list_jobs()
        assert len(jobs) == 50 and {j.run_path: j.id for j in jobs} == ids[0]
        assert all(len(q.events(j.id)) == 1 for j in jobs)


HOLD_LEASE = """
    import sys, time
    from exlab_wizard.sync.queue import RunnerLease
    lease = RunnerLease(sys.argv[1])
    print("held" if lease.acquire() else "refused", flush=True)
    time.sleep(60)
"""


def test_runner_lease(db: Path):
    path = lease_path_for(db)
    assert path == db.with_name("queue.db.lease")
    path.parent.mkdir(parents=True)
    holder = child(HOLD_LEASE, str(path))
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        lease = RunnerLease(path)
        assert lease.acquire() is False and not lease.held
        assert lease.holder_pid() == holder.pid
    finally:
        holder.kill()
        holder.communicate()
    assert lease.acquire() is True and lease.held and lease.acquire() is True
    assert lease.holder_pid() == os.getpid()
    other = RunnerLease(path)  # excluded within one process too
    assert other.acquire() is False
    second = child(HOLD_LEASE, str(path))
    assert second.stdout.readline().strip() == "refused"
    second.kill()
    second.communicate()
    lease.release()
    lease.release()
    assert not lease.held and other.acquire() is True
    other.release()


@pytest.mark.parametrize("version", [9, 10])
def test_untrusted_stats_recorded_before_newer_existed_are_marked_legacy(
    db: Path, monkeypatch: pytest.MonkeyPatch, version: int
):
    """Migration 11: an untrusted row an engine before 10 recorded may stand for bytes written after the hashing.

    Migration 10 left such rows NULL ("the verified bytes"); 11 marks them ``''``. Trusted rows (their
    stat is exact) and rows with a recorded digest keep theirs, and so do the rows written after it.
    """
    from exlab_wizard.sync.reaper.store import LEGACY_NEWER, CleanupStore

    newer = "ab" * 32
    monkeypatch.setattr(queue_mod, "MIGRATIONS", queue_mod.MIGRATIONS[:version])
    with JobQueue(db) as q:
        job = make(q, "Run_1")
        with q.transaction() as conn:
            for path, trusted in ((b"grown.tif", 0), (b"kept.tif", 1)):
                conn.execute(
                    "INSERT INTO verified_files (job_id, path, sha256, size, mtime_ns, ctime_ns, ino, trusted,"
                    " recorded_at) VALUES (?, ?, ?, 1, 2, 3, '4', ?, ?)",
                    (job.id, path, "0" * 64, trusted, "2026-01-01T00:00:00+00:00"),
                )
            if version >= 10:  # an engine at 10 recorded the bytes it read again
                conn.execute(
                    "INSERT INTO verified_files (job_id, path, sha256, size, mtime_ns, ctime_ns, ino, trusted,"
                    " recorded_at, newer_sha256) VALUES (?, ?, ?, 1, 2, 3, '4', 0, ?, ?)",
                    (job.id, b"read.tif", "0" * 64, "2026-01-01T00:00:00+00:00", newer),
                )
    monkeypatch.undo()
    with JobQueue(db) as q:
        stats = CleanupStore(q).verified_stats(job.id)
        assert (stats["grown.tif"].newer_sha256, stats["grown.tif"].legacy) == (LEGACY_NEWER, True)
        assert (stats["kept.tif"].newer_sha256, stats["kept.tif"].legacy) == (None, False)
        if version >= 10:
            assert (stats["read.tif"].newer_sha256, stats["read.tif"].legacy) == (newer, False)
        row = ("0" * 64, 1, 2, 3, 4, False, None)  # untrusted, recorded by this version
        CleanupStore(q).record_verified(job.id, {"new.tif": "0" * 64}, {"new.tif": row}, NOW)
    with JobQueue(db) as q:  # opened again: no migration runs twice
        (stat,) = CleanupStore(q).verified_stats(job.id).values()
        assert (stat.path, stat.trusted, stat.newer_sha256, stat.legacy) == ("new.tif", False, None, False)


def test_a_new_previous_stamp_is_past_every_stamp_the_job_named(q: JobQueue) -> None:
    """A reserved stamp one second ahead of its own event: the next round's stamp is past the stamp."""
    from exlab_wizard.sync.recovery import PREVIOUS_KEPT_EVENT, PREVIOUS_RESERVED_EVENT, new_previous_stamp

    job = make(q, "Run_stamps")
    at = dt.datetime(2026, 12, 6, 10, 23, 52, 600_000, tzinfo=dt.UTC)
    q.record_event(
        job.id, PREVIOUS_KEPT_EVENT, "the NAS keeps 1 file(s) under .exlab-wizard/previous/20261206T102352Z/: a", now=at
    )
    q.record_event(
        job.id, PREVIOUS_RESERVED_EVENT, "the push keeps ... under .exlab-wizard/previous/20261206T102353Z/", now=at
    )
    later = at + dt.timedelta(milliseconds=80)
    assert new_previous_stamp(q, job, later) == "20261206T102354Z"  # not ...53Z, the reserved one
    # An event naming no stamp (older engines) still counts by its time.
    q.record_event(job.id, PREVIOUS_KEPT_EVENT, "kept", now=at + dt.timedelta(seconds=5))
    assert new_previous_stamp(q, job, later) == "20261206T102358Z"


def test_the_wal_is_cut_back_after_a_burst(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of writes grows queue.db-wal; once checkpointed, the next write cuts it back to
    WAL_LIMIT_BYTES instead of keeping the burst's size for the life of the service."""
    monkeypatch.setattr(queue_mod, "WAL_LIMIT_BYTES", 64 << 10, raising=False)
    with JobQueue(db) as queue:
        with queue.transaction() as conn:  # one big transaction: no checkpoint inside it
            for i in range(3000):
                run = f"/data/lab/CONFOCAL_01/P/Runs/burst-{i:05d}-" + "x" * 200
                conn.execute(
                    "INSERT INTO jobs (id, run_path, equipment_id, remote_path, state, created_at, updated_at)"
                    " VALUES (?, ?, 'CONFOCAL_01', ?, 'queued', ?, ?)",
                    (f"j{i:05d}", run, run, "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00"),
                )
        wal = db.with_name(db.name + "-wal")
        burst = wal.stat().st_size
        assert burst > 1 << 20
        with queue.snapshot() as conn:
            assert conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0
        make(queue, "after-the-burst")  # the first write after a whole checkpoint restarts the WAL
        assert wal.stat().st_size <= 64 << 10
