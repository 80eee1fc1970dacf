"""Running the external tools of the network transports (ssh, rsync, rclone).

One place that starts a tool in its own process group (and, on Linux, bound
to die with this process: :func:`spawn`), streams its output to
callbacks, stops it on a deadline or on request (a bandwidth window edge), kills
the whole group when the caller is cancelled, and writes what ran and how it
ended to the equipment log. Also the local listing of a run that both network
transports compare against the remote before writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import hashlib
import mmap
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from exlab_wizard.fileio import (
    BLOCK_SIZE,
    METADATA_DIR,
    OpenFolders,
    is_data_path,
    is_metadata_path,
    is_reaping_name,
)
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.verifier import hash_run_file, side_by_side

T = TypeVar("T")

__all__ = [
    "LocalTree",
    "ToolResult",
    "checked_rewrite",
    "failure_text",
    "gather_or_cancel",
    "hash_local_files",
    "hashed_beside",
    "local_metadata_folder",
    "local_run_folder",
    "local_tree",
    "log_tool_exit",
    "new_failure",
    "run_tool",
    "spawn",
    "tail",
]

#: How much of a tool's stderr goes into one equipment-log line.
LOG_STDERR_CHARS = 4000
#: Seconds between SIGTERM and SIGKILL when stopping a tool.
TERM_GRACE_S = 3.0


@dataclass
class ToolResult:
    """How one run of an external tool ended."""

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float
    #: stopped by us (deadline or stop request), not ended on its own
    stopped: bool = False
    timed_out: bool = False

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.stopped


def tail(text: str, limit: int = LOG_STDERR_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    # The tool runs in its own session: its process group id is its pid, so
    # this reaches the tool and its children (rsync's ssh) and nothing else.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


#: Resolved here, not in the child: between fork and exec nothing may import or load.
_PRCTL = _load_prctl()


def _die_with(parent: int) -> None:
    """In the child, before exec: the kernel sends it SIGKILL when ``parent`` ends.

    A killed service must leave no writer behind: an rsync or rclone that
    outlived it would go on writing into the NAS copy while the next service
    pushes, verifies and deletes the same run. The tool's own children (rsync's
    ssh) see their pipe close and end with it. If ``parent`` already ended
    during the fork, the child leaves at once.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(255)


#: :func:`_die_with` as a shell line run after ``setpriv --pdeathsig KILL``: ``$1`` is the pid of
#: the process that started the tool, the rest the tool's own argv.
_DIE_WITH_SH = 'test "$PPID" = "$1" || exit 255; shift; exec "$@"'


@functools.cache
def _setpriv() -> str | None:
    """util-linux's ``setpriv`` when it sets the parent-death signal here, else None.

    With it a tool starts through a plain ``vfork`` and ``exec``. A Python
    ``preexec_fn`` (the way without it) makes Python ``fork`` instead, which
    copies the page tables of this whole process and then takes a fault on
    each page either side writes: from a process of 250 MB, 50 ms and 24 ms
    of CPU for every tool started, against 6 ms and 3 ms through ``setpriv``
    and ``sh`` (measured on this two-core PC; docs/transports.md).
    """
    found = shutil.which("setpriv")
    if _PRCTL is None or found is None:
        return None
    try:
        tried = subprocess.run(
            [found, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", "exit 0"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return found if tried.returncode == 0 else None


def _startable(tool: str, env: object) -> None:
    """Raise what ``exec`` would for a tool that cannot be started; through ``sh`` it would only exit 127 or 126."""
    path = (env if isinstance(env, dict) else os.environ).get("PATH", os.defpath)
    if shutil.which(tool, path=path) is not None:
        return
    if os.sep in tool and os.path.exists(tool):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), tool)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), tool)


def dying_with(parent: int, argv: Sequence[str], setpriv: str) -> list[str]:
    """``argv`` run by ``setpriv`` and ``sh`` so that it dies with ``parent``, as :func:`_die_with` makes it.

    ``setpriv`` sets the death signal, then ``sh`` leaves at once (255)
    unless its parent is still ``parent``: one that ended before the signal was
    set would never send it. Same process throughout: the tool's pid is the
    one spawned.
    """
    return [setpriv, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _DIE_WITH_SH, "sh", str(parent), *argv]


async def spawn(argv: Sequence[str], **kwargs: object) -> asyncio.subprocess.Process:
    """``asyncio.create_subprocess_exec`` for a tool: its own session, and killed with this process (Linux)."""
    looked = getattr(_setpriv, "cache_info", None)
    if looked is not None and looked().currsize == 0:
        # Looked for once, off the event loop; never again through the thread pool, which a silent
        # share may hold (a tool for another NAS must still start).
        setpriv = await asyncio.to_thread(_setpriv)
    else:
        setpriv = _setpriv()
    if setpriv is not None:
        _startable(argv[0], kwargs.get("env"))
        return await asyncio.create_subprocess_exec(
            *dying_with(os.getpid(), argv, setpriv),
            start_new_session=True,
            **kwargs,  # type: ignore[arg-type]
        )
    return await asyncio.create_subprocess_exec(
        *argv,
        start_new_session=True,
        preexec_fn=functools.partial(_die_with, os.getpid()),
        **kwargs,  # type: ignore[arg-type]
    )


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), TERM_GRACE_S)
    except TimeoutError:
        _signal_group(proc, signal.SIGKILL)
        await proc.wait()


async def _pump(stream: asyncio.StreamReader | None, sink: bytearray, callback: Callable[[bytes], None] | None) -> None:
    if stream is None:
        return
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        sink += chunk
        if callback is not None:
            callback(chunk)


class _PolledFile:
    """A tool's output into an anonymous file in memory, read from it every ``every`` seconds.

    The tool's descriptor shares the file's offset: this side reads with ``pread`` at its own.
    Only what is new goes to ``callback``; the result keeps the last :data:`POLLED_TAIL_BYTES`.
    """

    def __init__(self, callback: Callable[[bytes], None] | None, every: float):
        if hasattr(os, "memfd_create"):  # no disk: a full /tmp on a full instrument disk never stops a push
            self.fd = os.memfd_create("exlab-tool-out", os.MFD_CLOEXEC)
        else:
            self.fd, name = tempfile.mkstemp(prefix="exlab-tool-out-")
            os.unlink(name)
        self.callback, self.every = callback, every
        self.offset = 0

    def read_new(self) -> None:
        while chunk := os.pread(self.fd, 1 << 20, self.offset):
            self.offset += len(chunk)
            if self.callback is not None:
                self.callback(chunk)

    def tail(self) -> bytes:
        start = max(0, self.offset - POLLED_TAIL_BYTES)
        return os.pread(self.fd, self.offset - start, start)

    async def poll(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.read_new()

    def close(self) -> None:
        os.close(self.fd)


#: What a tool run with ``stdout_every`` keeps of its output: its last lines (rsync's ``--stats``).
POLLED_TAIL_BYTES = 64 << 10


async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """Await all of ``aws`` side by side; the first to raise cancels the others (and their tools)."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def run_tool(
    argv: Sequence[str],
    *,
    stdin: bytes | None = None,
    timeout: float | None = None,
    stop_after: float | None = None,
    stop_if: Callable[[], bool] | None = None,
    check_every: float = 5.0,
    on_stdout: Callable[[bytes], None] | None = None,
    on_stderr: Callable[[bytes], None] | None = None,
    stdout_every: float | None = None,
    log: EquipmentLog | None = None,
    run_path: object = None,
    step: str = "",
    env: dict[str, str] | None = None,
    quiet: bool = False,
) -> ToolResult:
    """Run ``argv`` to completion and return its exit code and output.

    ``timeout``: seconds after which the tool is killed and the result marked
    ``timed_out`` (a hung network). ``stop_after``: seconds after which the
    tool is stopped on purpose (``stopped``), e.g. at a bandwidth window edge.
    ``stop_if``: asked every ``check_every`` seconds while the tool runs; the
    tool is stopped on purpose once it answers True (a limit that changed
    because the wall clock was stepped, which ``stop_after`` cannot see).
    Cancelling the caller kills the tool's whole process group before the
    cancellation propagates. Never raises for a failing tool: the caller
    classifies the result. ``quiet`` logs only failures, and the same failure
    of the same run and step once an hour at most (:data:`QUIET_REPEAT_S`).
    ``stdout_every``: the tool's output goes to an anonymous file in memory,
    read every that many seconds and once it has ended (each new piece given
    to ``on_stdout``), not through a pipe: a tool printing a line a file
    (rsync's progress: 20,000 lines for 20,000 files) woke this loop
    thousands of times (0.2-0.3 CPU-seconds of this process for 20,000
    files). The result's ``stdout`` is then its last :data:`POLLED_TAIL_BYTES`.
    """
    argv = [str(a) for a in argv]
    tool = os.path.basename(argv[0])
    if log is not None and not quiet:
        log.info(run_path, "tool_start", tool=tool, step=step, argv=shlex.join(argv))
    started = time.monotonic()
    out, err = bytearray(), bytearray()
    polled = None if stdout_every is None else _PolledFile(on_stdout, stdout_every)
    try:
        proc = await spawn(
            argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if polled is None else polled.fd,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except BaseException:
        if polled is not None:
            polled.close()
        raise
    stopped = timed_out = False
    pumps: asyncio.Future | None = None
    polling = None if polled is None else asyncio.ensure_future(polled.poll())
    try:
        if stdin is not None:
            assert proc.stdin is not None
            try:
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the tool exited early; its exit code tells why
            finally:
                proc.stdin.close()
        pumps = asyncio.gather(
            _pump(proc.stdout, out, on_stdout) if polled is None else proc.wait(),
            _pump(proc.stderr, err, on_stderr),
        )
        limits = [t for t in (timeout, stop_after) if t is not None]
        deadline = time.monotonic() + min(limits) if limits else None
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            checking = stop_if is not None and (left is None or check_every < left)
            try:
                await asyncio.wait_for(asyncio.shield(pumps), check_every if checking else left)
                break
            except TimeoutError:
                if checking:
                    assert stop_if is not None
                    if not stop_if():
                        continue
                    stopped = True
                elif stop_after is not None and (timeout is None or stop_after <= timeout):
                    stopped = True
                else:
                    timed_out = stopped = True
                await _stop(proc)
                break
        await pumps
        await proc.wait()
        if polled is not None:
            polled.read_new()  # what it printed last
            out += polled.tail()
    except BaseException:
        await asyncio.shield(_stop(proc))
        if pumps is not None:
            pumps.cancel()
            with contextlib.suppress(BaseException):
                await pumps
        raise
    finally:
        if polling is not None:
            polling.cancel()
            with contextlib.suppress(BaseException):
                await polling
        if polled is not None:
            polled.close()
    result = ToolResult(
        argv,
        proc.returncode if proc.returncode is not None else -1,
        bytes(out),
        bytes(err),
        time.monotonic() - started,
        stopped,
        timed_out,
    )
    if log is not None and (not quiet or new_failure(log, str(run_path), step, result)):
        log_tool_exit(log, run_path, step, result)
    return result


#: A quiet step's failure is written again only after this many seconds, unless it changed.
QUIET_REPEAT_S = 3600.0
#: How many failures :func:`new_failure` remembers; past that the longest unseen is forgotten
#: (a run that ends without a later success would otherwise stay for the life of the service).
QUIET_FAILURES_KEPT = 4096
#: (log file, scope, step) -> (exit code, digest of the normalised stderr) of the last failure
#: written, and when; oldest seen first.
_QUIET_FAILURES: OrderedDict[tuple[str, str, str], tuple[tuple[int, bytes], float]] = OrderedDict()

#: What differs between two runs of a tool that fail the same way: rclone's per-line clock
#: (``2026/12/06 14:30:22[.123456] ``, or ``"time":...`` of a JSON log record), its stats'
#: elapsed time, the local port of a TCP connection (``10.0.0.2:54321->``), a byte count
#: received before a connection dropped (rsync), a pid, an S3 request's ids.
_VARYING = [
    (re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(?:\.\d+)? ", re.M), ""),
    (re.compile(r'"time":\s*"[^"]*",?\s*'), ""),
    (re.compile(r"(Elapsed time:\s*)\S+"), r"\1#"),
    (re.compile(r":\d+->"), ":#->"),
    (re.compile(r"\(\d+ bytes received so far\)"), "(# bytes received so far)"),
    (re.compile(r"\bpid[ =:]\s*\d+", re.I), "pid #"),
    (re.compile(r"\b(request ?id|host ?id|x-amz-request-id|x-amz-id-2)(\s*[:=]\s*)[^\s,;]+", re.I), r"\1\2#"),
]


def failure_text(stderr: str) -> str:
    """``stderr`` with what differs between two runs of the same failure taken out (a comparison key only)."""
    for pattern, repl in _VARYING:
        stderr = pattern.sub(repl, stderr)
    return tail(stderr)


def new_failure(log: EquipmentLog, scope: str, step: str, result: ToolResult) -> bool:
    """Should this result of a step asked over and over be logged? A failure, unless the same one
    (exit code and :func:`failure_text`) was logged for this log, ``scope`` (a run, or the remote root
    of a reachability probe) and step within :data:`QUIET_REPEAT_S` (a NAS folder that cannot be
    listed, asked again on every reaper pass for weeks: the queue records the wait once; the equipment
    log need not say it 2,880 times a day). A success logs nothing and forgets the failure."""
    key = (str(getattr(log, "path", id(log))), scope, step)
    if result.returncode == 0:
        _QUIET_FAILURES.pop(key, None)
        return False
    digest = hashlib.blake2b(failure_text(result.stderr_text).encode(), digest_size=16).digest()
    said, now = (result.returncode, digest), time.monotonic()
    last = _QUIET_FAILURES.get(key)
    if last is not None and last[0] == said and now - last[1] < QUIET_REPEAT_S:
        _QUIET_FAILURES.move_to_end(key)
        return False
    _QUIET_FAILURES[key] = (said, now)
    _QUIET_FAILURES.move_to_end(key)
    while len(_QUIET_FAILURES) > QUIET_FAILURES_KEPT:
        _QUIET_FAILURES.popitem(last=False)
    return True


def log_tool_exit(log: EquipmentLog, run_path: object, step: str, result: ToolResult) -> None:
    """Write the ``tool_exit`` line of ``result`` (what :func:`run_tool` writes as a tool ends)."""
    fields: dict[str, object] = {
        "tool": os.path.basename(result.argv[0]),
        "step": step,
        "rc": result.returncode,
        "seconds": f"{result.seconds:.2f}",
    }
    if result.stopped:
        fields["stopped"] = "timeout" if result.timed_out else "window_edge"
    if result.stderr.strip():
        fields["stderr"] = tail(result.stderr_text)
    level = "INFO" if result.returncode == 0 or (result.stopped and not result.timed_out) else "WARNING"
    log.write(level, run_path, "tool_exit", **fields)


@dataclass
class LocalTree:
    """The regular files and folders of a local run, as relative POSIX paths."""

    files: dict[str, int] = field(default_factory=dict)  # path -> size
    dirs: set[str] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)  # symlinks and other non-regular entries


def local_tree(run_path: Path) -> LocalTree:
    """List a run without following symlinks (they are never copied).

    A data file with one of the reaper's private names is left out (set aside
    for its unlink: :func:`~exlab_wizard.fileio.is_reaping_name`).
    """
    tree = LocalTree()
    root = os.fspath(run_path)
    for folder, dirnames, filenames in os.walk(root, followlinks=False):
        rel_folder = os.path.relpath(folder, root)
        prefix = "" if rel_folder == "." else rel_folder.replace(os.sep, "/") + "/"
        kept = []
        for name in dirnames:
            if os.path.islink(os.path.join(folder, name)):
                tree.skipped.append(prefix + name)
            else:
                kept.append(name)
                tree.dirs.add(prefix + name)
        dirnames[:] = kept
        for name in filenames:
            try:
                st = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                if is_metadata_path(prefix + name) or not is_reaping_name(name):  # not data: set aside
                    tree.files[prefix + name] = st.st_size
            else:
                tree.skipped.append(prefix + name)
    return tree


def local_run_folder(run_path: Path) -> Path:
    """The run's absolute path; ``LOCAL_FILE_VANISHED`` when it is not a folder any more."""
    run = Path(os.path.abspath(run_path))
    if not run.is_dir():
        raise TransportError(TransportErrorKind.LOCAL_FILE_VANISHED, f"run folder {run} does not exist")
    return run


def local_metadata_folder(run_path: Path) -> tuple[Path, Path]:
    """``(run, run/.exlab-wizard)``; ``LOCAL_FILE_VANISHED`` unless both are real folders."""
    run = local_run_folder(run_path)
    source = run / METADATA_DIR
    if source.is_symlink() or not source.is_dir():
        raise TransportError(TransportErrorKind.LOCAL_FILE_VANISHED, f"{source} is not a folder")
    return run, source


def checked_rewrite(local: LocalTree, rewrite: Iterable[str]) -> list[str]:
    """The paths to send again after a hash mismatch, each relative and still a file of the run."""
    paths = []
    for path in rewrite:
        if path.startswith("/") or ".." in path.split("/"):
            raise TransportError(TransportErrorKind.UNKNOWN, f"rewrite path {path!r} is not relative to the run")
        if path not in local.files:
            raise TransportError(
                TransportErrorKind.LOCAL_FILE_VANISHED, f"{path!r} must be sent again but is no longer in the run"
            )
        paths.append(path)
    return paths


#: Files at least this large are hashed on a thread of their own (hashlib lets go of the
#: interpreter lock while it digests a large block; for small files the interpreter's own
#: work per file is the cost, and a second thread only fights the first for the lock).
LARGE_FILE_BYTES = 1 << 20


def hash_local_files(run_path: Path, tree: LocalTree, abort: threading.Event) -> dict[str, str]:
    """``{path: sha256 hex}`` of the data files of ``tree`` (``.exlab-wizard/`` left out).

    The run is not walked again: the push's own listing says what to hash,
    so the local manifest names exactly the files the push was given. Small
    files are hashed on one thread and large ones (:data:`LARGE_FILE_BYTES`)
    on another. Blocking; stops early (returning what it has) once ``abort``
    is set. Raises ``TransportError(LOCAL_FILE_VANISHED)`` naming a file gone
    (or no longer a regular file) before it was read, and the ``OSError`` of
    any other failed read.
    """
    root = os.fspath(run_path)
    small = [rel for rel, size in tree.files.items() if size < LARGE_FILE_BYTES and is_data_path(rel)]
    large = [rel for rel, size in tree.files.items() if size >= LARGE_FILE_BYTES and is_data_path(rel)]
    hashes: dict[str, str] = {}

    def loop(paths: list[str]) -> None:
        view = memoryview(mmap.mmap(-1, BLOCK_SIZE))
        folders = OpenFolders(root)  # each file opened in its folder, no folder entered through a symlink
        try:
            for rel in paths:
                if abort.is_set():
                    return
                hashes[rel] = hash_run_file(root, rel, view, folders=folders)
        finally:
            folders.close()

    side_by_side([functools.partial(loop, paths) for paths in (small, large) if paths], abort)
    return hashes


async def hashed_beside(run_path: Path, tree: LocalTree, send: Callable[[], Awaitable[T]]) -> tuple[T, dict[str, str]]:
    """``(send()'s result, the local hashes)``: :func:`hash_local_files` of ``tree`` runs beside the send.

    One read pass of the local run each: the send's tool reads the files for
    the transfer, this thread for the manifest, from the same listing. Any
    error (or a cancel) stops the hashing before it is raised.
    """
    abort = threading.Event()
    hashing = asyncio.ensure_future(asyncio.to_thread(hash_local_files, run_path, tree, abort))
    try:
        result = await send()
        return result, await hashing
    except BaseException:
        abort.set()
        with contextlib.suppress(BaseException):
            await asyncio.shield(hashing)
        raise
