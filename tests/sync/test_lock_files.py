"""The two lock files of ``state_dir``: the runner lease and the reaper's ``<queue db>.reaper.lock``.

A lease made anew by renaming a fresh file over the path must not be held
twice: a process that opened the old file before the rename and locks it
after the renamer let it go holds the lock of a file no one else looks at
(two ``serve`` processes then run the workers, the audit and the reaper of one
queue). The interleaving is driven in one process, a thread's ``flock``
delayed as a descheduled process's is.

The reaper lock is made 0600 and anew as the lease is (another user holding it
stopped every cleanup pass without a word), and a reaper that finds it held
for :data:`BUSY_PASSES_SAID` passes in a row says so once, naming the holder.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
from pathlib import Path

import pytest

from exlab_wizard.sync.queue import RunnerLease
from tests.lab import VerifiedLab as Lab

BUSY_PASSES_SAID = 10  # exlab_wizard.sync.reaper.passes.BUSY_PASSES_SAID (absent from older code)


@pytest.fixture
def lab(tmp_path: Path):
    lab = Lab.build(tmp_path)
    yield lab
    lab.queue.close()


def _reaper_lock(lab: Lab) -> Path:
    return Path(str(lab.queue.db_path) + ".reaper.lock")


def test_a_lock_taken_on_a_renamed_away_lease_is_not_the_lease(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "queue.db.lease"
    path.write_text("")
    path.chmod(0o644)  # as an older version left it

    opened, go = threading.Event(), threading.Event()
    real_flock = fcntl.flock

    def slow_flock(fd: int, operation: int) -> None:
        if threading.current_thread().name == "late" and not opened.is_set():
            opened.set()  # this process is descheduled between its open and its flock
            go.wait(10)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", slow_flock)
    late_lease = RunnerLease(path)
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(late_lease.acquire()), name="late")
    thread.start()
    assert opened.wait(10)

    probe = RunnerLease(path)  # run_service: the probe takes it (made anew) and lets it go
    assert probe.acquire()
    probe.release()
    serving = RunnerLease(path)  # then the client takes it for real
    assert serving.acquire()
    go.set()
    thread.join(10)
    try:
        assert not (serving.held and got == [True]), (
            "two RunnerLease objects hold the runner lease at once: the late one locked the old, renamed-away file"
        )
        assert got == [False]
    finally:
        serving.release()
        late_lease.release()
    again = RunnerLease(path)
    assert again.acquire()  # the lease is free once the holder let it go
    again.release()


def test_the_reaper_lock_is_made_0600_whatever_the_umask(lab: Lab) -> None:
    old = os.umask(0o022)
    try:
        lab.run_pass()
    finally:
        os.umask(old)
    assert oct(_reaper_lock(lab).stat().st_mode & 0o777) == "0o600"


def test_a_reaper_lock_others_can_open_is_made_anew(lab: Lab, caplog) -> None:
    lock = _reaper_lock(lab)
    lock.touch()
    lock.chmod(0o644)  # an older version's
    before = lock.stat().st_ino
    with caplog.at_level(logging.WARNING):
        lab.run_pass()
    assert oct(lock.stat().st_mode & 0o777) == "0o600"
    assert lock.stat().st_ino != before
    assert f"the reaper lock {lock} was open to other users (mode 0644): made anew, 0600" in caplog.text


def test_a_reaper_held_busy_for_ten_passes_says_so_once_naming_the_holder(lab: Lab, caplog) -> None:
    run, job_id = lab.make_run(eligible=True)
    lock = _reaper_lock(lab)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    reaper = lab.reaper()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: as another process would hold it
        with caplog.at_level(logging.WARNING):
            outcomes = [asyncio.run(reaper.run_pass()) for _ in range(BUSY_PASSES_SAID + 5)]
    finally:
        os.close(fd)
    assert {o.action for each in outcomes for o in each} == {"busy"}
    said = [r.getMessage() for r in caplog.records if "reaper lock" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(
        f"no cleanup pass for {BUSY_PASSES_SAID} passes in a row: the reaper lock {lock} is held by pid {os.getpid()}"
    ), said
    assert [e.code for e in lab.queue.events(job_id) if e.kind == "cleanup_refused"] == ["busy"]
    assert lab.manifest_files_intact(run)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert [o.action for o in asyncio.run(reaper.run_pass())] == ["deleted"]
    assert "cleanup passes run again" in caplog.text
