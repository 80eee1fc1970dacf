"""An unexpected error in a job's steps ends in the retry policy; ``enqueue --wait`` keeps its deadline."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from exlab_wizard.cache import CreationWriter
from exlab_wizard.cache.creation import creation_lock_path
from exlab_wizard.sync.nas_client import NASSyncClient
from exlab_wizard.validator import Validator
from tests.fixtures.sshd import free_port
from tests.helpers import cli
from tests.lab import Site

HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Leave the process's logging as it was (configure_logging adds a handler)."""
    root, package = logging.getLogger(), logging.getLogger("exlab_wizard")
    handlers, level = list(root.handlers), package.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    package.setLevel(level)


async def test_a_creation_lock_held_too_long_ends_in_the_retry_policy(site: Site, root_logging: None) -> None:
    from exlab_wizard.cli.sync_cmds import configure_logging

    config = site.config(sync={"backoff_s": [0.5, 0.5], "scan_interval_s": 0.05})
    central_log = configure_logging(config)
    run = site.make_run()

    def client() -> NASSyncClient:
        return NASSyncClient(
            config=config,
            queue_db=config.queue_db,
            validator=Validator(config.validator),
            cache_creation=CreationWriter(lock_timeout_seconds=0.2),
        )

    queuer = client()
    await queuer.init(run_workers=False)
    try:
        job_id = (await queuer.enqueue(run)).job_id
    finally:
        await queuer.close()
    # Another tool takes the run's creation.json lock and keeps it longer than the writer waits.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(creation_lock_path(run))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        worker = client()
        await worker.init()
        try:
            deadline = time.monotonic() + 30
            while (job := await worker.job(job_id)).error_kind is None:
                assert time.monotonic() < deadline, [e.detail for e in job.events]
                await asyncio.sleep(0.01)
            assert job.state.value == "queued" and job.error_kind == "unknown", job.state
            assert "lock" in (job.last_error or "") and job.next_attempt_at is not None
            assert any("lock" in e.detail and e.detail == job.last_error for e in job.events)
            while (job := await worker.job(job_id)).state.value != "failed":  # wait_idle ends while a retry is not due
                assert time.monotonic() < deadline, [e.detail for e in job.events]
                await asyncio.sleep(0.02)
        finally:
            await worker.close()
    finally:
        holder.communicate("")
    # Three attempts (backoff list of two), then FAILED: never RUNNING for ever, never a tight loop.
    assert job.state.value == "failed" and job.error_kind == "unknown" and job.attempts == 3, job.last_error
    assert "no retries left" in (job.last_error or "")
    back = [e for e in job.events if e.kind == "transition" and e.from_state == "running"]
    assert [e.to_state for e in back] == ["queued", "queued", "failed"], [e.detail for e in job.events]
    assert len(site.log_lines("job_error")) == 3
    assert not (site.nas_copy(run)).exists()  # nothing was sent without the run marked pending
    # The traceback went to the central log, not to a terminal nobody reads.
    assert central_log == config.state_dir / "exlab-sync.log"
    text = central_log.read_text()
    assert "Traceback" in text and "lock" in text


def test_enqueue_wait_gives_up_at_its_deadline_and_says_what_it_waits_for(site: Site) -> None:
    run = site.make_run()
    if site.kind == "mount":
        (site.nas_root / ".exlab-nas").unlink()  # the share is not mounted
        config = site.write_config(sync={"backoff_s": [600]})
    else:
        site.transport["ssh_port"] = free_port()  # nothing listens there
        config = site.write_config(sync={"backoff_s": [600]})
    started = time.monotonic()
    out = cli("enqueue", "--wait", "--timeout", "2", str(run), "--config", str(config), timeout=60)
    took = time.monotonic() - started
    assert out.returncode == 1, out.stdout + out.stderr
    assert took < 30
    job = site.job(run)
    assert job.state.value == "queued" and job.error_kind == "network"
    assert f"gave up waiting after 2 s for job {job.id}: queued" in " ".join(out.stdout.split())
    assert "Traceback" not in out.stderr
    assert (site.state / "exlab-sync.log").is_file()
