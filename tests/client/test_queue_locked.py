"""The job queue refusing writes: locked by another program past the busy timeout, or its disk full.

A backup tool, an admin's ``sqlite3`` shell or a second process can hold
``queue.db``'s write lock; SQLite then gives up after the busy timeout. The
state folder usually sits on the acquisition PC's system disk, which
instrument software fills. The service must not lose its dispatcher over
either, nor leave a job whose outcome could not be written RUNNING (or
AWAITING_VERIFY) for ever: once writes go through again, every job ends
verified, as after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from exlab_wizard.sync import job_runner
from exlab_wizard.sync import queue as queue_module
from exlab_wizard.sync.states import SyncJobState as S
from exlab_wizard.sync.transports.mount import MountTransport
from tests.lab import EQ, Lab, act_once_in, running


def clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class WriteLock:
    """Another program's write transaction on the queue database, held from :meth:`take` to :meth:`drop`."""

    def __init__(self, db: Path):
        self.db = db
        self.conn: sqlite3.Connection | None = None

    def take(self) -> None:
        self.conn = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN IMMEDIATE")

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lab:
    monkeypatch.setattr(queue_module, "BUSY_TIMEOUT_S", 0.2)  # SQLite gives up after 0.2 s, not 10
    return Lab.build(tmp_path, equipment=(EQ,))


async def until(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_job_whose_outcome_could_not_be_written_is_not_left_running(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = lab.make_run(files={"a.bin": b"a" * 5000, "b.bin": b"b" * 3000})
    lock = WriteLock(lab.state / "queue.db")
    real_push = MountTransport.push
    pushes: list[int] = []

    async def push_then_lock(self, *args, **kwargs):
        outcome = await real_push(self, *args, **kwargs)
        pushes.append(1)
        if len(pushes) == 1:
            lock.take()  # the push's outcome, and the crash report after it, cannot be written
            threading.Timer(1.5, lock.drop).start()
        return outcome

    monkeypatch.setattr(MountTransport, "push", push_then_lock)
    try:
        async with running(lab.config(), clock) as client:
            await client.enqueue(run)
            await until(lambda: pushes, "the push ran")
            await until(lambda: lock.conn is None, "the lock was dropped")
            queue = client._ctx.require_queue()
            await until(
                lambda: queue.by_run(str(run)).state == S.VERIFIED,  # type: ignore[union-attr]
                "the job went on once the queue could be written again",
            )
    finally:
        lock.drop()
    job = lab.job(run)
    assert job.state == S.VERIFIED
    assert (lab.nas_copy(run) / "a.bin").read_bytes() == b"a" * 5000
    assert any("could not be written to the job queue" in (e.detail or "") for e in job.events)


async def test_the_dispatcher_outlives_a_queue_it_could_not_read(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    run = lab.make_run()
    real_next_due = queue_module.JobQueue.next_due
    failures: list[int] = []

    def locked_twice(self, *args, **kwargs):
        if len(failures) < 2:
            failures.append(1)
            raise sqlite3.OperationalError("database is locked")
        return real_next_due(self, *args, **kwargs)

    monkeypatch.setattr(queue_module.JobQueue, "next_due", locked_twice)
    async with running(lab.config(), clock) as client:
        await client.enqueue(run)
        await until(lambda: len(failures) == 2, "the queue was read")
        await client.wait_idle(timeout=20)
        job = await client.job(run)
        assert job.state == S.VERIFIED, job.last_error
        dispatch = [t for t in client._tasks if t.get_name() == "sync-dispatch"]
        assert dispatch and not dispatch[0].done()


def test_settling_forgets_a_job_only_once_the_queue_answered() -> None:
    """The dispatcher's bookkeeping: ids stay in ``ended`` while the queue fails."""

    class Failing:
        def get(self, job_id: str):
            raise sqlite3.OperationalError("database is locked")

    class Ctx:
        ended = {"job-1"}
        inflight_jobs: dict[str, str] = {}

        def require_queue(self):
            return Failing()

    ctx = Ctx()
    with pytest.raises(sqlite3.OperationalError):
        job_runner._settle_ended(ctx)  # type: ignore[arg-type]
    assert ctx.ended == {"job-1"}


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4M"):
    """A real 4 MiB tmpfs at ``path``, unmounted at the end."""
    assert os.geteuid() == 0, "a tmpfs mount needs root"
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Another program fills the disk to the last byte."""
    for name, chunk in (("other.big", 65536), ("other.last", 1)):
        with contextlib.suppress(OSError), open(path / name, "wb") as f:
            while True:
                f.write(b"\0" * chunk)
                f.flush()


async def test_a_job_in_flight_when_the_state_disk_fills_goes_on_once_space_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab.build(tmp_path, equipment=(EQ,))
    with small_disk(lab.state):
        run = lab.make_run(files={"a.bin": b"a" * 5000, "sub/b.bin": b"b" * 3000})
        fired = act_once_in(monkeypatch, MountTransport, "push", lambda *a, **kw: True, lambda: fill(lab.state))
        async with running(lab.config(), clock) as client:
            await client.enqueue(run)
            await until(lambda: fired, "the push began")
            await asyncio.sleep(1.0)  # the push and its bookkeeping meet the full disk
            for name in ("other.big", "other.last"):
                (lab.state / name).unlink()  # space is back
            monkeypatch.undo()
            queue = client._ctx.require_queue()
            await until(
                lambda: queue.by_run(str(run)).state == S.VERIFIED,  # type: ignore[union-attr]
                "the job went on once the disk had space again",
            )
        assert (lab.nas_copy(run) / "sub/b.bin").read_bytes() == b"b" * 3000
