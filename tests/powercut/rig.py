"""The power-cut rig: the state dir, the local root and the NAS each on its own loop-mounted ext4.

A cut: the engine (a child process, :data:`ENGINE`) stops itself (SIGSTOP)
right after a hooked step, or the parent stops it (and every tool it runs)
at a random instant; the three backing images are copied
(``cp --sparse=always``) while still mounted and with no sync, in the order
lab, state, NAS (the NAS copied last is the most durable, so a rule-1 failure
is never the copy order's doing); the engine is SIGKILLed, the originals
unmounted, and the COPIES mounted at the same places: ext4 replays its
journal as after a crash. ``losetup --direct-io=on``: what ext4 had not
written back is not in the image (:func:`Rig.self_check` proves it).

Loop devices come from ``losetup -f``, mount points are under the caller's
own folder: two rigs (two xdist workers) never meet. Every engine the rig
started is killed and every disk unmounted and detached on the way out,
failures included. Needs root; a missing privilege or tool fails, never skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import exlab_wizard
from tests.fixtures.sshd import kill_tree
from tests.helpers import require_tool

REPO = Path(__file__).resolve().parents[2]
#: The engine the child runs is the one this process imports (PYTHONPATH=/tmp/old/src tests old code).
SRC = str(Path(exlab_wizard.__file__).resolve().parents[1])
TOOLS = ("mkfs.ext4", "losetup", "mount", "umount", "cp", "sync")
IMAGE_MB = 200


def require_root_and_tools() -> None:
    """A missing privilege or tool fails the test (never skips): the suite runs as root."""
    if os.geteuid() != 0:
        pytest.fail("power cuts need root: loop devices and ext4 mounts", pytrace=False)
    for tool in TOOLS:
        require_tool(tool)
    if not (Path("/dev/loop-control").exists() or any(Path("/dev").glob("loop[0-9]*"))):
        pytest.fail("no loop device (/dev/loop-control missing): power cuts cannot be made", pytrace=False)


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout


class Disk:
    """One ext4 image on a loop device (direct io) mounted at ``mountpoint``."""

    def __init__(self, image: Path, mountpoint: Path):
        self.image = image
        self.mountpoint = mountpoint
        self.device = ""

    def make(self, size_mb: int = IMAGE_MB) -> None:
        with open(self.image, "wb") as handle:
            handle.truncate(size_mb << 20)
        _run(["mkfs.ext4", "-q", "-F", str(self.image)])
        self.attach()
        (self.mountpoint / "lost+found").rmdir()

    def attach(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):  # two workers may race for the same free device
            try:
                self.device = _run(["losetup", "-f", "--show", "--direct-io=on", str(self.image)]).strip()
                break
            except RuntimeError:
                if attempt == 4:
                    raise
                time.sleep(0.2)
        try:
            _run(["mount", self.device, str(self.mountpoint)])
        except BaseException:
            subprocess.run(["losetup", "-d", self.device], capture_output=True)
            self.device = ""
            raise

    def detach(self) -> None:
        if not self.device:
            return
        for _ in range(50):
            done = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, text=True)
            if done.returncode == 0 or "not mounted" in done.stderr:
                break
            time.sleep(0.1)
        else:  # still busy after 5 s: detach it from the tree; the kernel frees it when the last user goes
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        subprocess.run(["losetup", "-d", self.device], capture_output=True)
        self.device = ""

    def snapshot(self, to: Path) -> None:
        """The image as the disk holds it now (no sync): what a power cut leaves."""
        _run(["cp", "--sparse=always", str(self.image), str(to)])


class Rig:
    """Three disks under ``root``: ``lab`` (the local root), ``state`` and ``nas``."""

    NAMES = ("lab", "state", "nas")  # the order of the copies at a cut (see the module doc)

    def __init__(self, root: Path, mountpoints: dict[str, Path] | None = None):
        self.root = root
        places = {n: root / n for n in self.NAMES} | (mountpoints or {})
        self.disks = {n: Disk(root / f"{n}.img", places[n]) for n in self.NAMES}
        self.cuts = 0
        self.engines: list[subprocess.Popen] = []

    def make(self) -> None:
        for disk in self.disks.values():
            disk.make()

    def mountpoint(self, name: str) -> Path:
        return self.disks[name].mountpoint

    def sync(self, *names: str) -> None:
        """Make what is on these disks durable (data written long before the cut)."""
        for name in names or self.NAMES:
            _run(["sync", "-f", str(self.disks[name].mountpoint)])

    def start_engine(self, config_file: Path, flow: str, cut_at: str, run: Path) -> subprocess.Popen:
        """The engine in a child process: ``flow`` on ``run``, stopping itself at ``cut_at`` (see ENGINE)."""
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + str(REPO))
        child = subprocess.Popen(
            [sys.executable, "-c", ENGINE, str(config_file), flow, cut_at, str(run)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        self.engines.append(child)
        return child

    def cut(self, child: subprocess.Popen) -> None:
        """``child`` is stopped: copy the images, kill it, mount the copies in the originals' places."""
        self.cuts += 1
        kill_tree(child.pid, signal.SIGSTOP)  # its tools too (a stopped engine spawns none)
        copies = {}
        for name, disk in self.disks.items():
            copy = self.root / f"{name}.cut{self.cuts}.img"
            disk.snapshot(copy)
            copies[name] = copy
        kill_tree(child.pid, signal.SIGKILL)
        child.wait()
        for name, disk in self.disks.items():
            disk.detach()
            old = disk.image
            disk.image = copies[name]
            old.unlink(missing_ok=True)
            disk.attach()

    def self_check(self) -> str | None:
        """None when a cut loses what was not fsynced here (a real cut), else what it kept."""
        nas = self.mountpoint("nas")
        (nas / ".selfcheck-durable").write_bytes(b"d" * 10000)
        self.sync("nas")
        (nas / ".selfcheck-fresh").write_bytes(b"f" * 10000)
        child = subprocess.Popen(["sleep", "60"])
        self.engines.append(child)
        stop_now(child)
        self.cut(child)
        problem = None
        if (nas / ".selfcheck-durable").read_bytes() != b"d" * 10000:
            problem = "the cut lost a file fsynced before it"
        fresh = nas / ".selfcheck-fresh"
        if fresh.exists() and fresh.stat().st_size > 0:
            problem = "the cut kept a file written but never fsynced: the images are not what a power cut leaves"
        for name in (".selfcheck-durable", ".selfcheck-fresh"):
            (nas / name).unlink(missing_ok=True)
        self.sync("nas")
        return problem

    def teardown(self) -> None:
        for child in self.engines:
            if child.poll() is None:
                kill_tree(child.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    child.wait(timeout=10)
        for disk in self.disks.values():
            with contextlib.suppress(Exception):
                disk.detach()
        for image in self.root.glob("*.img"):
            image.unlink(missing_ok=True)


@contextlib.contextmanager
def rig(root: Path, mountpoints: dict[str, Path] | None = None) -> Iterator[Rig]:
    """Three fresh empty disks mounted under ``root`` (or at ``mountpoints``); all gone on the way out."""
    require_root_and_tools()
    made = Rig(root, mountpoints)
    try:
        made.make()
        yield made
    finally:
        made.teardown()


def wait_stopped(child: subprocess.Popen, timeout: float = 120) -> bool:
    """True once ``child`` is stopped; False when it exited or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state == "T":
            return True
        if state == "Z":
            return False
        time.sleep(0.005)
    return False


def wait_ready(child: subprocess.Popen, timeout: float = 60) -> str:
    """Read the engine's output up to its ``READY`` line (its client is initialised); the lines read."""
    lines = []
    deadline = time.monotonic() + timeout
    assert child.stdout is not None
    while time.monotonic() < deadline:
        if not select.select([child.stdout], [], [], 0.05)[0]:
            continue
        line = child.stdout.readline().decode()
        if not line:  # it exited
            break
        lines.append(line)
        if line.strip() == "READY":
            return "".join(lines)
    raise RuntimeError(f"the engine never became ready:\n{''.join(lines)}{child_output(child)}")


def stop_now(child: subprocess.Popen) -> None:
    """The cut's instant: stop ``child`` (its tools are stopped by :meth:`Rig.cut`)."""
    os.kill(child.pid, signal.SIGSTOP)
    if not wait_stopped(child, 10):
        raise RuntimeError(f"process {child.pid} did not stop")


def child_output(child: subprocess.Popen) -> str:
    """What the (dead) engine printed; its stderr's tail after a ``--- stderr ---`` line."""
    try:
        out, err = child.communicate(timeout=5)
    except Exception:
        return ""
    return (out or b"").decode() + "\n--- stderr ---\n" + (err or b"").decode()[-3000:]


def write_config(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


#: The engine's child process: ``python -c ENGINE <config.json> <flow> <cut_at> <run>``.
#: flow: ``sync`` (enqueue, wait for VERIFIED, cleanup passes until CLEANED), ``restore``,
#: ``accept_local`` (``retry --accept-local`` of a FAILED job, wait for VERIFIED).
#: cut_at: ``transition:<state>`` (right after the queue's transition to it), ``metadata_pushed``,
#: ``transport_push_<n>`` (mount), ``deleted_batch_<n>``, ``final_push``, or a flow's own step
#: (``enqueued``, ``synced``, ``cleaned``, ``restored``, ``retried``); ``random``: never stops itself.
ENGINE = textwrap.dedent(
    r"""
    import asyncio, json, os, signal, sys, time
    from pathlib import Path
    from exlab_wizard.config import parse_config
    from exlab_wizard.sync.nas_client import client_from_config
    from exlab_wizard.sync.queue import JobQueue
    from exlab_wizard.sync.states import SyncJobState as S

    config = parse_config(json.loads(Path(sys.argv[1]).read_text()))
    flow = sys.argv[2]
    cut_at = sys.argv[3]
    run = Path(sys.argv[4])

    def say(*words):
        print(*words, flush=True)

    def stop(where):
        say("CUT", where)
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(3600)

    # ---- hooks: the child stops itself right after the chosen step returns
    real_transition = JobQueue.transition
    def transition(self, job_id, from_state, to_state, **kw):
        row = real_transition(self, job_id, from_state, to_state, **kw)
        if cut_at == "transition:" + S(to_state).value:
            stop(cut_at)
        return row
    JobQueue.transition = transition

    real_update = JobQueue.update
    def update(self, job_id, expected_state, **kw):
        row = real_update(self, job_id, expected_state, **kw)
        if cut_at == "metadata_pushed" and "metadata_push_due_at" in kw and kw["metadata_push_due_at"] is None:
            stop(cut_at)
        return row
    JobQueue.update = update

    from exlab_wizard.sync.reaper import deletion
    real_batch = deletion.delete_batch
    batches = [0]
    def delete_batch(run_path, batch, *a, **kw):
        out = real_batch(run_path, batch, *a, **kw)
        batches[0] += 1
        if cut_at == "deleted_batch_%d" % batches[0]:
            stop(cut_at)
        return out
    deletion.delete_batch = delete_batch

    from exlab_wizard.sync import metadata_push
    from exlab_wizard.sync.transports.mount import MountTransport
    real_push = MountTransport.push_metadata
    pushes = [0]
    async def push_metadata(self, *a, **kw):
        out = await real_push(self, *a, **kw)
        pushes[0] += 1
        if cut_at == "transport_push_%d" % pushes[0]:
            stop(cut_at)
        return out
    MountTransport.push_metadata = push_metadata
    real_final = metadata_push.final_push
    async def final_push(*a, **kw):
        out = await real_final(*a, **kw)
        if cut_at == "final_push":
            stop(cut_at)
        return out
    metadata_push.final_push = final_push

    async def main():
        client = client_from_config(config)
        await client.init()
        say("READY")
        if flow == "sync":
            try:
                handle = await client.enqueue(run)
                say("ENQUEUED", handle.job_id)
            except Exception as exc:
                say("ENQUEUE_FAILED", repr(exc))
                if cut_at != "random":
                    raise
            if cut_at == "enqueued":
                stop(cut_at)
            for _ in range(3000):
                await asyncio.sleep(0.02)
                job = await client.job(run)
                if job.state in (S.VERIFIED, S.CLEANUP_ELIGIBLE) and not job.metadata_push_pending:
                    break
            say("SYNCED", job.state.value)
            if cut_at == "synced":
                stop(cut_at)
            if config.nas_cleanup.enabled:
                for _ in range(20):
                    await client.cleanup_once()
                    job = await client.job(run)
                    if job.state in (S.CLEANED, S.FAILED):
                        break
                say("CLEANUP", job.state.value, job.last_error)
                if cut_at == "cleaned":
                    stop(cut_at)
        elif flow == "restore":
            result = await client.restore(run)
            say("RESTORED", result)
            if cut_at == "restored":
                stop(cut_at)
            await client.wait_idle(timeout=60)
        elif flow == "accept_local":
            job = await client.job(run)
            await client.retry(job.id, accept_local=True)
            say("RETRIED")
            if cut_at == "retried":
                stop(cut_at)
            for _ in range(3000):
                await asyncio.sleep(0.02)
                job = await client.job(run)
                if job.state in (S.VERIFIED, S.FAILED) and not job.metadata_push_pending:
                    break
            say("SYNCED", job.state.value)
            if cut_at == "synced":
                stop(cut_at)
        say("DONE")
        if cut_at != "random":
            sys.exit(0)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)
