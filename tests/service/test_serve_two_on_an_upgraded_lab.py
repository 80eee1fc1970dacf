"""Two ``serve`` processes on an upgraded lab never both run the workers.

The runner lease an older version left 0644 is made anew by renaming a fresh
file over ``<db>.lease``. A process that opened the old file before the
rename, and flocks it only once the renamer let it go (``run_service``'s
probe takes and drops the lease at once), got the lock of a file renamed away
and believed it held the lease: two ``serve`` processes ran the workers, the
audit and the reaper of one queue (each ``recover()`` resetting the other's
jobs in flight). Now a lock counts only on the file still at the path.

Here with two real ``serve`` processes, the first one's first flock delayed by
``strace`` fault injection (the in-process interleaving:
tests/sync/test_lock_files.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from exlab_wizard.sync.state_dir import lock_holder
from tests.service.test_serve_process import EXE, Serve, write_config


def test_two_serves_on_an_upgraded_lab_never_both_run_the_workers(shared_lab) -> None:
    assert shutil.which("strace"), "strace (scripts/bootstrap.sh installs it)"  # fails, never skips
    lab, procs = shared_lab
    config = write_config(lab)
    first = Serve(config)
    assert first.stop()[0] == 0
    lease = lab.state / "queue.db.lease"
    lab.state.chmod(0o755)  # an older version's modes
    for each in lab.state.iterdir():
        if each.name != "api-token":
            each.chmod(0o644)

    trace = lab.root / "strace.out"
    late = subprocess.Popen(  # its first flock (the probe's) waits 6 s: a process descheduled right after open
        [
            "strace", "-f", "-qq", "-o", str(trace), "-e", "trace=openat,flock",
            "-e", "inject=flock:delay_enter=6000000:when=1",
            EXE, "serve", "--config", str(config), "--port", "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    procs.append(late)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (trace.exists() and "queue.db.lease" in trace.read_text()):
        time.sleep(0.02)
    assert "queue.db.lease" in trace.read_text()

    early = Serve(config)  # starts while the first one sits between its open and its flock
    procs.append(early.proc)
    assert lock_holder(lease) is not None and lock_holder(lease).pid == early.proc.pid

    line = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and late.poll() is None:
        line = late.stdout.readline()
        if "listening on" in line:
            break
    both = late.poll() is None and early.proc.poll() is None and "listening on" in line
    holders = [ln for ln in Path("/proc/locks").read_text().splitlines() if " FLOCK " in ln]
    pids = {early.proc.pid, late.pid}
    children = {int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == late.pid}
    ours = [ln for ln in holders if int(ln.split()[4]) in pids | children]
    try:
        assert not both, (
            f"two serves run the workers of {lab.state / 'queue.db'} at once: pid {early.proc.pid} and the "
            f"late one ({line.strip()!r}); their flocks: {ours}"
        )
    finally:
        early.kill()
        for child in children:  # the traced serve outlives strace
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if late.poll() is None:
            late.kill()
            late.wait()


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])
