"""A tool (rsync, rclone, ssh) never outlives the process that started it.

A service killed with SIGKILL gets no chance to stop its tools. One that lived
on would keep writing into the NAS copy of a run while the next service
pushes, verifies and deletes the same run. Each spawn path is run in a child
Python process that is then SIGKILLed; its tool must be gone right after.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import exlab_wizard
from exlab_wizard.sync.transports import _process
from tests.helpers import tool_processes
from tests.lab import RUN_REL, make_hostile_run, rsync_equipment
from tests.transports.test_rsync_ssh import receiving

SRC = str(Path(exlab_wizard.__file__).resolve().parents[1])
RSYNC_SSH = frozenset({b"rsync", b"ssh"})

# The tool writes its pid, then sleeps; the child prints "started" once the pid file is there.
STARTERS = {
    "run_tool": """
        from exlab_wizard.sync.transports._process import run_tool
        async def start(argv):
            asyncio.ensure_future(run_tool(argv))
    """,
    "remote_watcher": """
        from exlab_wizard.sync.transports.rsync_ssh import _RemoteWatcher
        async def start(argv):
            await _RemoteWatcher().start(argv, b"\\0")
    """,
}


WITHOUT_SETPRIV = """
from exlab_wizard.sync.transports import _process
_process._setpriv = lambda: None
"""
WATCHING_SETPRIV = """
from exlab_wizard.sync.transports import _process
_dying_with = _process.dying_with
def watched(*args):
    open({via!r}, "w").close()
    return _dying_with(*args)
_process.dying_with = watched
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that may never come does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


@pytest.mark.parametrize("setpriv", ["setpriv", "preexec_fn"])
@pytest.mark.parametrize("path", sorted(STARTERS))
def test_a_tool_dies_with_the_process_that_started_it(tmp_path: Path, path: str, setpriv: str) -> None:
    """Both ways the death signal is set: util-linux's setpriv, and a preexec_fn where there is none."""
    if setpriv == "setpriv":
        assert _process._setpriv() is not None, "setpriv (util-linux) with --pdeathsig is not installed"
    pid_file = tmp_path / "tool.pid"
    via = tmp_path / "via-setpriv"  # written when the tool is started through setpriv
    way = WITHOUT_SETPRIV if setpriv == "preexec_fn" else WATCHING_SETPRIV.format(via=str(via))
    script = (
        way
        + textwrap.dedent(STARTERS[path])
        + textwrap.dedent(f"""
        import asyncio, os, sys
        async def main():
            await start(["sh", "-c", "echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file} && exec sleep 60"])
            while not os.path.exists({str(pid_file)!r}):
                await asyncio.sleep(0.02)
            print("started", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """)
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC}
    )
    tool = None
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started"
        tool = int(pid_file.read_text())
        assert _alive(tool)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 5
        while _alive(tool) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(tool), f"the tool ({path}) outlived the process that started it"
        assert via.exists() == (setpriv == "setpriv")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if tool is not None and _alive(tool):
            os.kill(tool, signal.SIGKILL)


def test_a_tool_whose_starter_ended_before_the_signal_was_set_never_runs(tmp_path: Path) -> None:
    """The race setpriv alone would leave: the starter gone before the death signal was set in the tool."""
    setpriv = _process._setpriv()
    assert setpriv is not None
    ran = tmp_path / "ran"
    tool = ["sh", "-c", f"touch {ran}"]
    not_the_parent = 1  # what the tool's parent is once the one that started it has ended (or a subreaper)
    late = subprocess.run(_process.dying_with(not_the_parent, tool, setpriv), capture_output=True)
    assert late.returncode == 255 and not ran.exists()
    alive = subprocess.run(_process.dying_with(os.getpid(), tool, setpriv), capture_output=True)
    assert alive.returncode == 0 and ran.exists()


@pytest.mark.parametrize("setpriv", ["setpriv", "preexec_fn"])
@pytest.mark.parametrize("tool", ["/nonexistent/rsync", "no-such-tool-anywhere", "/etc"])
async def test_a_tool_that_cannot_start_raises_as_exec_does(
    monkeypatch: pytest.MonkeyPatch, tool: str, setpriv: str
) -> None:
    """Never a shell's exit 127 taken for the tool's own: the caller learns it is missing (doctor's hint)."""
    if setpriv == "preexec_fn":
        monkeypatch.setattr(_process, "_setpriv", lambda: None)
    with pytest.raises(PermissionError if tool == "/etc" else FileNotFoundError):
        await _process.spawn([tool, "--version"])


async def test_a_tool_starts_while_every_thread_of_the_pool_is_stuck() -> None:
    """A silent share may hold the event loop's thread pool: a tool for another NAS must still start."""
    first = await _process.spawn(["true"])  # setpriv looked for (once, on a thread)
    assert await first.wait() == 0
    loop = asyncio.get_running_loop()
    stuck = threading.Event()
    held = [loop.run_in_executor(None, stuck.wait) for _ in range(64)]  # more than the pool has threads
    try:
        tool = await asyncio.wait_for(_process.spawn(["true"]), 10)
        assert await asyncio.wait_for(tool.wait(), 10) == 0
    finally:
        stuck.set()
        await asyncio.gather(*held)


@pytest.mark.network
def test_a_push_cut_off_by_a_sigkill_stops_writing_to_the_nas(tmp_path: Path, sshd, remote_dir: Path) -> None:
    """The real thing: rsync over ssh, slowed to 100 KiB/s, its engine SIGKILLed in the middle."""
    eq = rsync_equipment(tmp_path, sshd, remote_dir)
    run = make_hostile_run(eq.local_root, {"big.bin": os.urandom(3_000_000)}, symlink=False)
    script = textwrap.dedent(f"""
        import asyncio, json
        from pathlib import Path
        from exlab_wizard.config.models import EquipmentConfig
        from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport
        eq = EquipmentConfig.model_validate(json.loads({json.dumps(eq.model_dump(mode="json", exclude_unset=True))!r}))
        asyncio.run(RsyncSshTransport(eq).push(Path({str(run)!r}), bwlimit_kibps=100))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": SRC})
    remote_run = remote_dir / RUN_REL
    try:
        deadline = time.monotonic() + 30
        while not receiving(remote_run, "big.bin") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiving(remote_run, "big.bin"), "the push never started writing"
        assert tool_processes(str(run), RSYNC_SSH)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 5
        while tool_processes(str(run), RSYNC_SSH) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tool_processes(str(run), RSYNC_SSH).values()) == []

        def written() -> int:
            return sum(p.stat().st_size for p in remote_run.rglob("*") if p.is_file())

        before = written()
        time.sleep(1.5)  # at 100 KiB/s a live writer adds about 150 KB
        assert written() == before, "something still writes into the NAS copy"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pid in tool_processes(str(run), RSYNC_SSH):  # what a failing run of this test left
            os.kill(pid, signal.SIGKILL)
