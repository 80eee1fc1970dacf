"""The programs rsync_ssh runs on the remote host are real files: valid, shipped, and doing their job here."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from exlab_wizard.sync.transports import rsync_ssh
from exlab_wizard.sync.transports.remote_programs import PROGRAMS, remote_program

HERE = Path(rsync_ssh.__file__).parent / "remote_programs"


def test_every_program_is_a_file_of_the_package_and_is_what_rsync_ssh_sends() -> None:
    assert sorted(p.name for p in HERE.iterdir() if p.suffix in (".py", ".sh") and p.name != "__init__.py") == sorted(
        PROGRAMS
    )
    assert (HERE / "remote_hash.py").read_text() == rsync_ssh._PY_HASH
    assert (HERE / "remote_watch.py").read_text() == rsync_ssh._PY_WATCH
    assert (HERE / "keep_previous.sh").read_text() == rsync_ssh._SH_KEEP_PREVIOUS
    with pytest.raises(ValueError):
        remote_program("../rsync_ssh.py")


@pytest.mark.parametrize("name", [p for p in PROGRAMS if p.endswith(".py")])
def test_python_programs_compile_and_import_only_the_standard_library(name: str) -> None:
    source = remote_program(name)
    compile(source, name, "exec")
    assert "exlab_wizard" not in source


def test_the_shell_program_parses() -> None:
    sh = shutil.which("sh")
    assert sh is not None
    subprocess.run([sh, "-n", str(HERE / "keep_previous.sh")], check=True, timeout=30)


def test_remote_hash_hashes_a_run_as_hashlib_does(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run = root / "Run_1"
    files = {"a.txt": b"a", "sub/big.raw": os.urandom((1 << 20) + 5), "sub/empty": b"", "new\nline": b"n"}
    for rel, data in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    (run / "link").symlink_to("a.txt")  # never followed nor listed
    program = remote_program("remote_hash.py")
    done = subprocess.run(
        [sys.executable, "-c", program, str(run), str(root)], input=b"", capture_output=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    records = [r for r in done.stdout.split(b"\0") if r]
    got = {os.fsdecode(r[66:]): r[:64].decode() for r in records}
    assert got == {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    missing = subprocess.run(
        [sys.executable, "-c", program, str(root / "absent"), str(root)], capture_output=True, check=False, timeout=60
    )
    assert (missing.returncode, missing.stdout) == (0, b"")
    gone = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path / "x" / "y"), str(tmp_path / "x")], check=False, timeout=60
    )
    assert gone.returncode == 3


def _hash_with(program: str, run: Path, root: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", program, str(run), str(root)], input=b"", capture_output=True, check=False, timeout=60
    )


# A prelude run before remote_hash.py in the same interpreter: it logs to stderr every syncfs
# (the folder its fd names, when it starts and when it has returned, after a pause), every
# file opened for hashing, and the program's end.
_TRACE_PRELUDE = """
import atexit, ctypes, os, sys, time
_CDLL, _open = ctypes.CDLL, os.open
class _Traced:
    def __init__(self, *a, **k):
        self._lib = _CDLL(*a, **k)
    def __getattr__(self, name):
        real = getattr(self._lib, name)
        if name != "syncfs":
            return real
        def syncfs(fd):
            sys.stderr.write("syncfs %s\\n" % os.readlink("/proc/self/fd/%d" % fd))
            sys.stderr.flush()
            time.sleep(0.5)
            try:
                return real(fd)
            finally:
                sys.stderr.write("syncfs returned\\n")
                sys.stderr.flush()
        return syncfs
def _traced_open(path, flags, *a, **k):
    if not flags & getattr(os, "O_DIRECTORY", 0):
        os.write(2, ("open %s\\n" % os.fsdecode(path)).encode())
    return _open(path, flags, *a, **k)
ctypes.CDLL, os.open = _Traced, _traced_open
atexit.register(lambda: sys.stderr.write("end\\n"))
"""


def _run_with_files(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    run = root / "Run_1"
    (run / "sub").mkdir(parents=True)
    (run / "a.txt").write_bytes(b"a")
    (run / "sub" / "b.raw").write_bytes(b"b" * 5000)
    return root, run


def test_remote_hash_ends_only_once_the_run_is_durable_and_hashes_while_it_is_made_so(tmp_path: Path) -> None:
    root, run = _run_with_files(tmp_path)
    done = _hash_with(_TRACE_PRELUDE + remote_program("remote_hash.py"), run, root)
    assert done.returncode == 0, done.stderr
    trace = done.stderr.decode().splitlines()
    assert trace.count(f"syncfs {run}") == 1, trace  # one flush of the run's filesystem
    assert trace[-2:] == ["syncfs returned", "end"], trace  # nothing is reported as hashed before it returned
    opens = [i for i, line in enumerate(trace) if line.startswith("open ")]
    assert sorted(trace[i] for i in opens) == [f"open {run}/a.txt", f"open {run}/sub/b.raw"]
    assert max(opens) < trace.index("syncfs returned")  # the hashing ran beside the flush, not after it
    assert len([r for r in done.stdout.split(b"\0") if r]) == 2


@pytest.mark.parametrize("program", ["_SH_SHA256SUM", "_SH_OPENSSL"])
def test_the_shell_hashing_programs_sync_the_run_before_they_hash(tmp_path: Path, program: str) -> None:
    root, run = _run_with_files(tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls"
    for tool in ("sync", "sha256sum", "openssl"):  # each logs its call, then runs the real one
        real = shutil.which(tool)
        if real is not None:
            (fake / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexec {real} "$@"\n')
            (fake / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    script = getattr(rsync_ssh, program)
    done = subprocess.run(
        ["sh", "-c", script, "sh", str(run), str(root)], env=env, capture_output=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "sync -f .", calls  # run from inside the run folder, before any hashing
    assert len(calls) > 1 and all(not c.startswith("sync") for c in calls[1:])


# A prelude that makes remote_hash.py's syncfs fail with the errno in EXLAB_SYNCFS_ERRNO.
_FAILING_SYNCFS_PRELUDE = """
import ctypes, os
_CDLL = ctypes.CDLL
class _Failing:
    def __init__(self, *a, **k):
        self._lib = _CDLL(*a, **k)
    def __getattr__(self, name):
        if name != "syncfs":
            return getattr(self._lib, name)
        def syncfs(fd):
            ctypes.set_errno(int(os.environ["EXLAB_SYNCFS_ERRNO"]))
            return -1
        return syncfs
ctypes.CDLL = _Failing
"""


@pytest.mark.parametrize(("code", "flushed"), [("EIO", False), ("ENOSPC", False), ("ENOSYS", True)])
def test_remote_hash_exits_6_when_syncfs_fails_and_syncs_whole_only_without_syncfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, flushed: bool
) -> None:
    """EIO/ENOSPC (a thin volume whose pool is full) is no flush: exit 6; ENOSYS (no syncfs): a whole sync."""
    root, run = _run_with_files(tmp_path)
    monkeypatch.setenv("EXLAB_SYNCFS_ERRNO", str(getattr(errno, code)))
    done = _hash_with(_FAILING_SYNCFS_PRELUDE + remote_program("remote_hash.py"), run, root)
    if flushed:
        assert done.returncode == 0, done.stderr
        assert len([r for r in done.stdout.split(b"\0") if r]) == 2
    else:
        assert done.returncode == rsync_ssh._SYNC_FAILED, done.stderr
        assert os.strerror(getattr(errno, code)) in done.stderr.decode()


def _fake_sync(tmp_path: Path, how: str) -> tuple[dict[str, str], Path]:
    """A ``sync`` on PATH: ``old`` knows no ``-f`` (coreutils < 8.24), ``eio`` fails ``-f`` with an I/O error."""
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls"
    refuse = {
        "old": "echo \"sync: invalid option -- 'f'\" >&2",
        "eio": "echo \"sync: error syncing '$2': Input/output error\" >&2",
    }[how]
    (fake / "sync").write_text(f'#!/bin/sh\necho "sync $*" >> {log}\nif [ "$1" = -f ]; then {refuse}; exit 1; fi\n')
    (fake / "sync").chmod(0o755)
    return {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}, log


@pytest.mark.parametrize("how", ["old", "eio"])
@pytest.mark.parametrize("program", ["_SH_SHA256SUM", "_SH_OPENSSL", "_SH_SHA256SUM_STDIN"])
def test_the_shell_hashing_programs_sync_whole_only_where_sync_has_no_f(tmp_path: Path, program: str, how: str) -> None:
    """A whole ``sync`` reports no error: it stands in for ``sync -f`` only where ``-f`` is unknown."""
    root, run = _run_with_files(tmp_path)
    env, log = _fake_sync(tmp_path, how)
    done = subprocess.run(
        ["sh", "-c", getattr(rsync_ssh, program), "sh", str(run), str(root)],
        env=env,
        capture_output=True,
        check=False,
        timeout=60,
    )
    calls = log.read_text().splitlines()
    if how == "old":
        assert done.returncode == 0, done.stderr
        assert calls == ["sync -f .", "sync "]
        assert done.stdout.count(b"a.txt") == 1
    else:
        assert (done.returncode, done.stdout) == (rsync_ssh._SYNC_FAILED, b""), done.stderr
        assert calls == ["sync -f ."]  # never the whole sync that would report nothing
        assert b"Input/output error" in done.stderr


@pytest.mark.parametrize("how", ["old", "eio"])
def test_keep_previous_fails_when_sync_f_fails_and_syncs_whole_only_where_it_has_no_f(tmp_path: Path, how: str) -> None:
    root, run = _run_with_files(tmp_path)
    env, log = _fake_sync(tmp_path, how)
    keep = run / ".exlab-wizard" / "previous" / "20261205T073000Z"
    done = subprocess.run(
        ["sh", "-c", remote_program("keep_previous.sh"), "sh", str(root), str(run), str(keep), "new", "a.txt"],
        env=env,
        capture_output=True,
        check=False,
        timeout=60,
    )
    calls = log.read_text().splitlines()
    assert calls[0] == f"sync -f -- {keep}"
    if how == "old":
        assert (done.returncode, calls[1:]) == (0, ["sync "]), done.stderr
    else:
        assert (done.returncode, calls[1:]) == (rsync_ssh._SYNC_FAILED, []), done.stderr
        assert b"Input/output error" in done.stderr


def _watcher(run: Path, flush: str, env: dict[str, str]) -> subprocess.Popen:
    watcher = subprocess.Popen(
        [sys.executable, "-c", remote_program("remote_watch.py"), str(run), flush],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert watcher.stdin is not None
    watcher.stdin.write(b"\0\0")  # no large file to hash
    watcher.stdin.flush()
    return watcher


def _slow_sync(tmp_path: Path, *, logged: str, seconds: int) -> tuple[Path, Path, dict[str, str]]:
    """A run folder, and a ``sync`` on PATH that writes ``sync <logged>`` to a log, then takes
    ``seconds``; the environment has it first, and TMPDIR (where the watcher's lock file goes) here."""
    run = tmp_path / "Run_1"
    run.mkdir()
    fake, log = tmp_path / "bin", tmp_path / "sync.log"
    fake.mkdir()
    (fake / "sync").write_text(f'#!/bin/sh\necho "sync {logged}" >> {log}\nsleep {seconds}\n')
    (fake / "sync").chmod(0o755)
    return run, log, {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}


@pytest.mark.parametrize("flush", ["0.05", "0"])
def test_the_watcher_syncs_the_nas_while_the_push_runs_and_never_waits_for_its_sync(tmp_path: Path, flush: str) -> None:
    """A plain ``sync`` (sync(2): it consumes no writeback error the verify pass's syncfs must report)
    every flush interval until the push ends; at the end the watcher leaves at once, a slow sync
    running on by itself (it holds no output of the session)."""
    run, log, env = _slow_sync(tmp_path, logged="$*", seconds=3)
    watcher = _watcher(run, flush, env)
    try:
        for _ in range(100):
            if log.exists() or flush == "0":
                break
            subprocess.run(["sleep", "0.05"], check=True)
        subprocess.run(["sleep", "0.3"], check=True)
        if flush == "0":
            assert watcher.poll() == 0  # nothing to hash, nothing to flush: gone before the push ends
        else:
            assert watcher.poll() is None  # flushing until the push ends
            assert log.read_text().splitlines() == ["sync "]  # whole, no -f; one at a time
        started = subprocess.run(["date", "+%s.%N"], capture_output=True, check=True, text=True).stdout
        out, err = watcher.communicate(b"", timeout=2)  # EOF: the push ended
        ended = subprocess.run(["date", "+%s.%N"], capture_output=True, check=True, text=True).stdout
    finally:
        watcher.kill()
    assert (watcher.returncode, out, err) == (0, b"", b"")
    assert float(ended) - float(started) < 1.5  # not the 3 s of the sync still running
    assert log.exists() == (flush != "0")


# In a forked child of remote_hash.py: exit at once, writing nothing (a child killed, out of memory).
_DYING_CHILD_PRELUDE = """
import os
_fork = os.fork
def _dying_fork():
    pid = _fork()
    if pid == 0:
        os._exit(9)
    return pid
os.fork = _dying_fork
"""


@pytest.mark.parametrize("children", ["working", "dying", "no_fork"])
def test_remote_hash_shares_a_run_of_many_files_among_processes_and_misses_none(tmp_path: Path, children: str) -> None:
    """Every file once, as hashlib hashes it, whether the forked processes do their share, die
    without a word (their share is hashed again by the first), or cannot be forked at all."""
    root = tmp_path / "root"
    run = root / "Run_1"
    files = {f"d{i % 7}/f{i}.bin": os.urandom(i % 300) for i in range(200)}
    files["big/x.raw"] = os.urandom((1 << 20) + 3)
    for rel, data in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    program = remote_program("remote_hash.py")
    assert "FORK_MIN_FILES = 2000\n" in program
    program = program.replace("FORK_MIN_FILES = 2000\n", "FORK_MIN_FILES = 100\n")
    by_pid = "import os\n_op = os.open\nos.open = lambda *a, **k: (os.write(2, b'by %d\\n' % os.getpid()), _op(*a, **k))[1]\n"
    prelude = {"working": by_pid, "dying": _DYING_CHILD_PRELUDE, "no_fork": "import os\ndel os.fork\n"}[children]
    done = _hash_with(_TRACE_PRELUDE + prelude + program, run, root)
    assert done.returncode == 0, done.stderr
    records = [r for r in done.stdout.split(b"\0") if r]
    assert len(records) == len(files)  # none twice
    assert {os.fsdecode(r[66:]): r[:64].decode() for r in records} == {
        rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()
    }
    trace = done.stderr.decode().splitlines()
    opened = Counter(line[len(f"open {run}/") :] for line in trace if line.startswith("open "))
    # each file read by one process only (a large one is opened to look at, then to hash); the
    # dead children opened nothing, so their shares were read by the first process alone
    assert opened == {rel: 2 if rel == "big/x.raw" else 1 for rel in files}
    if children == "working":  # one process a core, up to 4
        readers = {line for line in trace if line.startswith("by ")}
        assert len(readers) == min(os.cpu_count() or 1, 4), readers
    assert trace[-2:] == ["syncfs returned", "end"], trace[-3:]


def _sigchld_ignored() -> None:  # inherited across exec, as from a NAS wrapper's `trap '' CHLD`
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)


@pytest.mark.parametrize("syncfs", ["works", "EIO"])
def test_remote_hash_forks_and_waits_for_its_children_even_when_started_with_sigchld_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs: str
) -> None:
    """The kernel reaps the children of a process whose SIGCHLD is ignored, and waiting for them
    failed: the program died after printing its own share (half a manifest, exit 1), and with a
    failing flush too, exit 1 instead of 6. Found by the review of the forked hashing."""
    root = tmp_path / "root"
    run = root / "Run_1"
    files = {f"d{i % 9}/f{i}.bin": os.urandom(i % 100) for i in range(300)}
    for rel, data in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    program = remote_program("remote_hash.py").replace("FORK_MIN_FILES = 2000\n", "FORK_MIN_FILES = 100\n")
    if syncfs == "EIO":
        monkeypatch.setenv("EXLAB_SYNCFS_ERRNO", str(errno.EIO))
        program = _FAILING_SYNCFS_PRELUDE + program
    done = subprocess.run(
        [sys.executable, "-c", program, str(run), str(root)],
        input=b"",
        capture_output=True,
        check=False,
        timeout=120,
        preexec_fn=_sigchld_ignored,
    )
    if syncfs == "EIO":
        assert done.returncode == rsync_ssh._SYNC_FAILED, done.stderr  # never a plain crash: exit 6
        return
    assert done.returncode == 0, done.stderr
    records = [r for r in done.stdout.split(b"\0") if r]
    assert len(records) == len(files)
    assert {os.fsdecode(r[66:]): r[:64].decode() for r in records} == {
        rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()
    }


def test_a_hanging_sync_is_never_joined_by_another_one_from_the_next_push(tmp_path: Path) -> None:
    """A NAS whose sync hangs (a dead mount elsewhere on it): one push's watcher started one, the
    next push's watcher starts none while it runs (a stuck process a push would pile up), and
    starts one again once it has ended."""
    run, log, env = _slow_sync(tmp_path, logged="$$", seconds=2)

    def calls() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    first = _watcher(run, "0.05", env)
    for _ in range(100):
        if calls():
            break
        subprocess.run(["sleep", "0.05"], check=True)
    first.communicate(b"", timeout=5)  # the first push ends; its sync hangs on
    second = _watcher(run, "0.05", env)
    try:
        subprocess.run(["sleep", "1"], check=True)
        assert calls() == 1  # still the first one's, hanging: none more
        subprocess.run(["sleep", "2"], check=True)
        assert calls() >= 2  # the first has ended: this push flushes again
    finally:
        second.communicate(b"", timeout=5)
    assert second.returncode == 0
