"""Small helpers shared by the tests: tools, the console script, waiting, clocks, file trees."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import os
import pwd
import shutil
import ssl
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.sync.manifest_format import format_manifest

__all__ = [
    "BOMB",
    "EXE",
    "NESTED_IN_A_FIELD",
    "Clock",
    "assert_sha256sum_check",
    "cli",
    "data_only",
    "finishes",
    "flip_byte_keep_stat",
    "hold_lock_in_child",
    "regular_tree",
    "release_child",
    "require_tool",
    "sha256_tree",
    "processes",
    "table_row",
    "tool_processes",
    "tree",
    "until",
    "wait_until",
]

#: the installed console script (the worktree's src wins through PYTHONPATH)
EXE = str(Path(sys.executable).parent / "exlab-sync")

#: nested brackets deep enough to exhaust a recursive parser
BOMB = b"[" * 100_000 + b"]" * 100_000
NESTED_IN_A_FIELD = b'{"schema_version": "1.0", "level": "run", "notes": ' + BOMB + b"}"


#: Taken around every useradd/usermod of the suite: pytest-xdist's workers start at once, and two
#: runs for one name (or two at once: /etc/passwd's and /etc/shadow's lock files) fail one of them.
USERS_LOCK = Path("/tmp/exlab-test-users.lock")


_USERS_HELD = threading.RLock()
_users_depth = 0


@contextlib.contextmanager
def users_lock() -> Iterator[None]:
    """Held while this process adds or changes a local login (see :data:`USERS_LOCK`); re-entrant."""
    global _users_depth
    with _USERS_HELD:
        if _users_depth:
            _users_depth += 1
            try:
                yield
            finally:
                _users_depth -= 1
            return
        with open(USERS_LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            _users_depth = 1
            try:
                yield
            finally:
                _users_depth = 0


def ensure_user(name: str, *useradd_args: str) -> pwd.struct_passwd:
    """The local login ``name``, made with ``useradd <useradd_args> name`` when missing.

    Left in place afterwards (a worker removing it would pull it from under another's test).
    """
    with users_lock():
        try:
            return pwd.getpwnam(name)
        except KeyError:
            subprocess.run([require_tool("useradd"), *useradd_args, name], check=True, capture_output=True)
            return pwd.getpwnam(name)


@functools.cache
def client_tls() -> ssl.SSLContext:
    """One TLS context for the suite's HTTP clients: pass it as ``httpx.Client(verify=client_tls())``.

    The clients talk plain http to 127.0.0.1 and never use it, but httpx builds a context for each
    client it makes, loading the CA bundle: 45 ms of CPU a client here, against 0.2 ms with this one.
    The API fuzzer makes a client for every example, the torture harness one for every request.
    """
    return ssl.create_default_context()


def require_tool(name: str) -> str:
    """Path of an external tool the test needs.

    A missing tool fails the test (never skips): ``scripts/bootstrap.sh``
    installs every tool the suite uses, so a missing one is a broken setup.
    """
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        for folder in ("/usr/sbin", "/sbin"):
            candidate = Path(folder) / name
            if candidate.exists():
                return str(candidate)
        pytest.fail(f"{name} is not installed; run scripts/bootstrap.sh", pytrace=False)
    return found


def cli(*args: str, columns: int = 200, timeout: float = 120, **run: Any) -> subprocess.CompletedProcess[str]:
    """Run the console script ``exlab-sync`` with ``args``; ``run``: more :func:`subprocess.run` arguments."""
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=timeout, **run)


# --------------------------------------------------------------------------- waiting


async def until(predicate: Any, timeout: float = 30.0) -> None:
    """Poll an async predicate until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a plain predicate from a coroutine until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def finishes(call: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Run ``call`` in a thread; fail (instead of hanging) when it blocks, e.g. on a FIFO."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the call blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class Clock:
    """Real UTC time plus an offset that only moves forward."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def advance(self, hours: float) -> None:
        self.offset += dt.timedelta(hours=hours)


# --------------------------------------------------------------------------- another process holding a lock


HOLD_FLOCK = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()  # hold until the parent closes our stdin
    """
)


def hold_lock_in_child(lock_path: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_FLOCK, str(lock_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "locked"
    return child


def release_child(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


# --------------------------------------------------------------------------- files


def flip_byte_keep_stat(path: Path, offset: int = 0) -> None:
    """Change one byte; size and mtime stay as they were (damage behind the filesystem's back)."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def tree(root: Path) -> dict[str, bytes]:
    """Regular files under ``root`` -> bytes; a symlink shows as ``<symlink>``."""
    out: dict[str, bytes] = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            out[rel] = b"<symlink>" if path.is_symlink() else path.read_bytes()
    return out


def regular_tree(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(root).items() if v != b"<symlink>" or not (root / k).is_symlink()}


def sha256_tree(root: Path) -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in regular_tree(root).items()}


def data_only(hashes: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in hashes.items() if not k.startswith(".exlab-wizard/")}


def assert_sha256sum_check(remote_run: Path, local_run: Path) -> None:
    """Real coreutils ``sha256sum -c`` over the remote copy, manifest built from the local files."""
    manifest = remote_run / ".exlab-wizard" / "checksums.sha256"
    manifest.write_bytes(format_manifest(data_only(sha256_tree(local_run))))
    done = subprocess.run(
        [require_tool("sha256sum"), "-c", "--strict", ".exlab-wizard/checksums.sha256"],
        cwd=remote_run,
        capture_output=True,
    )
    assert done.returncode == 0, done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    manifest.unlink()


def table_row(output: str, needle: object) -> str:
    """The one line of a rich table in ``output`` that shows ``needle``, its cells separated by single spaces."""
    [line] = [line for line in output.splitlines() if str(needle) in line]
    return " ".join(line.replace("│", " ").split())


#: What the engine runs: its tools, and (through sshd) the remote ends of rsync and the remote programs.
TOOL_NAMES = frozenset({b"rsync", b"rclone", b"ssh", b"sh", b"python3"})


def processes() -> Iterator[tuple[int, bytes, bytes]]:
    """(pid, command line with NULs, state letter) of every other process that can be read in /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_bytes().rpartition(b")")[2].split()[0]
        except OSError:
            continue
        yield int(entry), cmdline, state


def tool_processes(text: str, names: frozenset[bytes] = TOOL_NAMES) -> dict[int, str]:
    """Running processes named in ``names`` whose command line holds ``text``: {pid: command line}.

    Zombies (ended, waiting for a reaper that may never come) and ssh's shared
    connection (``[mux]``, kept on purpose) are left out.
    """
    return {
        pid: cmdline.replace(b"\0", b" ").decode(errors="replace")
        for pid, cmdline, state in processes()
        if text.encode() in cmdline
        and state not in (b"Z", b"X")
        and b"[mux]" not in cmdline
        and os.path.basename(cmdline.split(b"\0")[0]) in names
    }


# --------------------------------------------------------------------------- power cuts


class Durability:
    """Directory entries made under ``root``, and whether their folder was synced since: a power cut's model.

    POSIX makes a new entry (a mkdir, a rename) durable once its folder is
    fsynced, or the filesystem synced (the mount transport's ``_syncfs``).
    """

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = os.path.realpath(root)
        self.pending: set[tuple[str, str]] = set()  # (folder, name) not durable yet
        real_mkdir, real_replace, real_rename, real_fsync = os.mkdir, os.replace, os.rename, os.fsync
        from exlab_wizard.sync.transports import mount as mount_module

        real_syncfs, real_noreplace = mount_module._syncfs, mount_module.rename_noreplace

        def folder_of(path, dir_fd):
            if dir_fd is not None:
                base = os.readlink(f"/proc/self/fd/{dir_fd}")
                full = os.path.join(base, os.fspath(path))
            else:
                full = os.path.abspath(os.fspath(path))
            return os.path.realpath(os.path.dirname(full)), os.path.basename(full)

        def made(path, dir_fd=None):
            folder, name = folder_of(path, dir_fd)
            if folder == self.root or folder.startswith(self.root + os.sep):
                self.pending.add((folder, name))

        def mkdir(path, mode=0o777, *, dir_fd=None):
            real_mkdir(path, mode, dir_fd=dir_fd)
            made(path, dir_fd)

        def replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            made(dst, dst_dir_fd)

        def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            made(dst, dst_dir_fd)

        def rename_noreplace(src, dst, *, dir_fd, dst_dir_fd=None, atomic_only=False):
            real_noreplace(src, dst, dir_fd=dir_fd, dst_dir_fd=dst_dir_fd, atomic_only=atomic_only)
            made(dst, dir_fd if dst_dir_fd is None else dst_dir_fd)

        def fsync(fd):
            real_fsync(fd)
            fd = fd if isinstance(fd, int) else fd.fileno()
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                folder = os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))
                self.pending = {(f, n) for f, n in self.pending if f != folder}

        def syncfs(path):
            real_syncfs(path)
            self.pending.clear()

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(mount_module, "_syncfs", syncfs)
        monkeypatch.setattr(mount_module, "rename_noreplace", rename_noreplace)

    def power_cut(self) -> list[str]:
        """Remove every entry not made durable; the paths removed, relative to the root."""
        lost = []
        for folder, name in sorted(self.pending, key=lambda fn: len(fn[0])):
            path = os.path.join(folder, name)
            if not os.path.lexists(path):
                continue
            lost.append(os.path.relpath(path, self.root))
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        self.pending.clear()
        return lost

    def lost(self, nas: Path, rels) -> list[str]:
        """The files under ``nas`` a power cut now would take away (one of their path's entries not durable)."""
        out = []
        for rel in rels:
            path = os.path.realpath(nas / rel)
            while path != self.root and path.startswith(self.root + os.sep):
                folder, name = os.path.dirname(path), os.path.basename(path)
                if (folder, name) in self.pending:
                    out.append(rel)
                    break
                path = folder
        return sorted(out)
