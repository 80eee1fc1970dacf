"""SIGTERM to ``exlab-sync serve`` while its push is blocked in a NAS share that stopped answering.

docs/service.md: the stop is bounded (systemd's ``TimeoutStopSec=15`` kills
after that). The push's thread cannot be stopped while the share is silent:
``serve`` names the share and exits without it; the queue brings the job
back at the next start, which sends it and leaves no temp file on the share.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.fixtures.silent_share import silent_share
from tests.lab import MARKER, client_lab
from tests.service.test_serve_process import Serve
from tests.service.test_silent_share_threads import _config, _enqueue, _wait_state


@pytest.mark.timeout(180)
def test_sigterm_while_a_push_is_stuck_in_a_silent_share_exits_in_time(tmp_path: Path) -> None:
    lab = client_lab(tmp_path)
    with silent_share(tmp_path) as (share, freezer):
        run = lab.make_run("Run_A", {"a.bin": b"a" * 5000})
        config = _config(lab, share)
        serve = Serve(config)
        try:
            freezer.freeze()
            job_id = _enqueue(serve, lab, run)
            assert _wait_state(serve, job_id, {"running"}, 10) == "running"
            time.sleep(1.0)  # its push is now blocked in the share
            started = time.monotonic()
            serve.proc.send_signal(signal.SIGTERM)
            try:
                code = serve.proc.wait(timeout=15)
            except Exception:
                code = None
            took = time.monotonic() - started
        finally:
            freezer.thaw()
            thawed = time.monotonic()
            try:
                late = serve.proc.wait(timeout=30)
            except Exception:
                late = None
                serve.kill()
            after = time.monotonic() - thawed
        said = serve.proc.stderr.read()
        assert code is not None, (
            f"serve did not exit within 15 s of SIGTERM while a push was blocked in the silent share "
            f"(it exited {after:.1f} s after the share answered again, code {late})"
        )
        assert code == 0 and took < 10, (code, took)
        assert str(share) in said and "does not answer" in said, said
        left = sorted(p.name for p in share.rglob("*") if ".exlab-tmp" in p.name or p.name.endswith(".tmp"))
        assert left == [], left

        again = Serve(config)  # the share answers again: the job left RUNNING is sent
        try:
            assert _wait_state(again, job_id, {"verified", "failed"}, 30) == "verified"
        finally:
            again.stop(timeout=30)
        left = sorted(p.name for p in share.rglob("*") if p.name.startswith(".") and p.name != MARKER)
        assert not [name for name in left if "tmp" in name], left


@pytest.mark.timeout(180)
def test_sigterm_while_a_file_is_half_written_into_a_silent_share(tmp_path: Path) -> None:
    """Frozen with the push's temp file open: serve gives up on it in time and exits.

    The kernel then holds the last thread until the share answers (closing a
    FUSE file waits for its daemon, uninterruptibly; a hard NFS mount is the
    same): the main thread has exited, the process ends once the share
    answers. The next start's push removes the temp file left, sends the run
    whole and verifies it.
    """
    lab = client_lab(tmp_path)
    with silent_share(tmp_path) as (share, freezer):
        run = lab.make_run("Run_A", {"a.bin": b"a" * (1 << 20)})
        slow = _config(lab, share, bandwidth={"upload_mbps": 0.4})  # 1 MiB in about 20 s
        serve = Serve(slow)
        try:
            job_id = _enqueue(serve, lab, run)
            deadline = time.monotonic() + 20
            while not _temps(share) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _temps(share), "the push wrote no temp file"
            freezer.freeze()
            started = time.monotonic()
            serve.proc.send_signal(signal.SIGTERM)
            while not _main_thread_gone(serve.proc.pid) and time.monotonic() - started < 15:
                time.sleep(0.05)
            took = time.monotonic() - started
        finally:
            freezer.thaw()
            try:
                code = serve.proc.wait(timeout=10)
            except Exception:
                code = None
                serve.kill()
        said = serve.proc.stderr.read()
        assert took < 10, f"serve's main thread still ran {took:.1f} s after SIGTERM: {said}"
        assert code == 0, (code, said)
        assert str(share) in said and "does not answer" in said, said
        again = Serve(_config(lab, share))
        try:
            assert _wait_state(again, job_id, {"verified", "failed"}, 30) == "verified"
        finally:
            again.stop(timeout=30)
        assert _temps(share) == []
        assert (share / "PROJ-1" / "Runs" / "Run_A" / "a.bin").read_bytes() == b"a" * (1 << 20)


def _main_thread_gone(pid: int) -> bool:
    """The process's main thread has exited (a zombie, or the process reaped)."""
    try:
        stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _temps(share: Path) -> list[str]:
    return sorted(p.name for p in share.rglob("*") if ".exlab-tmp" in p.name or p.name.endswith(".tmp"))
