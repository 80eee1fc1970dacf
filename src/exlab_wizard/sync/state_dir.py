"""The state folder belongs to the user that runs the engine: made 0700, its files 0600.

Any local user who can open a file in ``state_dir`` can lock it: an exclusive
``flock`` on the runner lease needs only a read-only descriptor, and a read
lock on the queue's ``-shm`` holds SQLite's writers. Such a lock stops
``serve`` for good. So the engine makes ``state_dir`` 0700 and creates the
runner lease, the queue database (SQLite gives ``-wal`` and ``-shm`` the
database's mode), the central log and ``service-url`` 0600, whatever the
umask. A folder an admin made with group access on purpose (systemd's
``StateDirectoryMode=0750``) is left as it is; one owned by another user, or
writable by every user, is named by :func:`state_dir_warnings` (``serve`` at
start, ``doctor``), as is a lease other users can open.

Root must not write there either: what root creates in the service user's
``state_dir`` (a central log rolled over, the lease, ``service-url``, a new
queue database) is root's, and the service can no longer open it. So
:func:`check_writer` refuses a process running as root on a ``state_dir``
another user owns (:class:`ForeignStateDirError`); the CLI calls it before any
command touches the folder.

:func:`lock_holder` says who holds a ``flock`` (``/proc/locks`` on Linux) and
whether that process is an exlab-sync one, for the message of a ``serve``
that finds the lease taken.

:class:`PrivateLock` is the one lock file of both the runner lease and the
reaper's ``<queue db>.reaper.lock``: 0600, made anew when others could open it
(or another user owns it), and a lock counts only on the file still at its
path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "ForeignStateDirError",
    "LockHolder",
    "PrivateLock",
    "check_writer",
    "create_private",
    "is_mine",
    "lock_holder",
    "make_state_dir",
    "private_opener",
    "state_dir_warnings",
    "user_name",
]

logger = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
#: Opens of a lock file's path by :meth:`PrivateLock.acquire` when each file it locked was renamed away.
LOCK_ATTEMPTS = 5
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: What names a process as this program's in its command line (the console script, ``python -m``).
_OUR_COMMANDS = ("exlab-sync", "exlab_wizard", "exlab-wizard")


def _euid() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def is_mine(info: os.stat_result) -> bool:
    """True when this user owns the file (always where there are no uids)."""
    me = _euid()
    return me is None or info.st_uid == me


def user_name(uid: int) -> str:
    """``uid 1003 (attacker)``, or ``uid 1003`` when the name is unknown."""
    name = _login_name(uid)
    return f"uid {uid} ({name})" if name else f"uid {uid}"


def _login_name(uid: int) -> str | None:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return None


class ForeignStateDirError(PermissionError):
    """Root was about to write into a ``state_dir`` that another user (the service's) owns.

    ``kind`` is ``"state_dir_foreign_owner"``; ``path`` the folder, ``uid`` its
    owner. The message is the one line the CLI prints.
    """

    kind = "state_dir_foreign_owner"

    def __init__(self, path: Path, uid: int):
        self.path, self.uid = path, uid
        name = _login_name(uid)
        owner, sudo_user = (name, name) if name else (f"uid {uid}", f"'#{uid}'")
        super().__init__(
            f"state_dir {path} belongs to {owner}: run this as that user (sudo -u {sudo_user} exlab-sync ...)"
        )


def check_writer(state_dir: Path | str) -> None:
    """Raise :class:`ForeignStateDirError` when this process runs as root and ``state_dir`` is another user's.

    A missing folder, or any other user, passes: root making its own
    ``state_dir`` is fine, and another user is stopped by the folder's mode.
    """
    if _euid() != 0:
        return
    try:
        owner = os.stat(state_dir).st_uid
    except OSError:
        return
    if owner != 0:
        raise ForeignStateDirError(Path(state_dir), owner)


def make_state_dir(path: Path | str) -> None:
    """``mkdir -p`` the state folder, 0700 when this makes it (a folder already there keeps its mode).

    Raises ``OSError`` (``FileExistsError`` when a file is in the way).
    """
    Path(path).mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)


def create_private(path: Path | str) -> bool:
    """Create ``path`` empty and 0600 when missing (never through a symbolic link); True when made."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def private_opener(path: str, flags: int) -> int:
    """An ``opener`` for :func:`open`: a file it creates is 0600."""
    return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE_MODE)


def state_dir_warnings(state_dir: Path | str, lease: Path | str) -> list[str]:
    """One line per thing in ``state_dir`` another local user could use to stop the engine.

    The folder: owned by another user (root excepted), or writable by every
    user. The runner lease: owned by another user, or open to group or others
    (opening it is all a ``flock`` needs). Group access to the folder is
    fine. Missing paths are no warning. Root looking at another user's folder
    (``doctor``) is told to run as that user (:class:`ForeignStateDirError`'s
    line), and the lease is judged for the folder's owner.
    """
    me = _euid()
    if me is None:
        return []
    found: list[str] = []
    folder = Path(state_dir)
    whose = "this user"
    with contextlib.suppress(OSError):
        info = os.stat(folder)
        mode = stat.S_IMODE(info.st_mode)
        if me == 0 and info.st_uid != 0:
            found.append(str(ForeignStateDirError(folder, info.st_uid)))
            me, whose = info.st_uid, "the state_dir's owner"  # what follows is judged for the service user
        if info.st_uid not in (me, 0):
            found.append(
                f"state_dir {folder} (mode {mode:04o}) is owned by {user_name(info.st_uid)}, not by this user "
                f"({user_name(me)}): that user can replace the queue and hold the runner lease; "
                "run exlab-sync as the folder's owner, or chown it"
            )
        elif mode & 0o002:
            found.append(
                f"state_dir {folder} is writable by every local user (mode {mode:04o}): any of them can replace "
                "the queue and hold the runner lease; chmod o-w it (0700, or 0750 for a group)"
            )
    path = Path(lease)
    with contextlib.suppress(OSError):
        info = os.stat(path, follow_symlinks=False)
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid != me:
            found.append(
                f"the runner lease {path} (mode {mode:04o}) is owned by {user_name(info.st_uid)}, not by {whose} "
                f"({user_name(me)}): its owner can hold it and stop serve; serve makes it anew (0600) when it takes it"
            )
        elif mode & 0o077:
            found.append(
                f"the runner lease {path} is open to other users (mode {mode:04o}): any of them can hold it and "
                "stop serve; serve makes it anew (0600) when it takes it"
            )
    return found


@dataclass(frozen=True)
class LockHolder:
    """A process holding a lock: its pid, its user and command line when ``/proc`` tells (None otherwise)."""

    pid: int
    uid: int | None = None
    command: str | None = None

    @property
    def is_exlab(self) -> bool | None:
        """True for an exlab-sync process, False for another program, None when the command is unknown."""
        if self.command is None:
            return None
        return any(name in self.command for name in _OUR_COMMANDS)

    def describe(self) -> str:
        """``pid N, uid U (name), 'command'``, and that it is no exlab-sync process when /proc says so."""
        text = f"pid {self.pid}"
        if self.uid is not None:
            text += f", {user_name(self.uid)}"
        if self.command:
            text += f", {self.command[:200]!r}"
        if self.is_exlab is False:
            text += " (not an exlab-sync process: another user's lock?)"
        return text

    @classmethod
    def of(cls, pid: int) -> LockHolder:
        """What ``/proc/<pid>`` says about ``pid`` (a process gone, or hidden, leaves both unknown)."""
        proc = Path("/proc") / str(pid)
        uid = command = None
        with contextlib.suppress(OSError):
            uid = os.stat(proc).st_uid
        with contextlib.suppress(OSError):
            raw = (proc / "cmdline").read_bytes()
            command = raw.replace(b"\0", b" ").decode(errors="replace").strip() or None
        return cls(pid, uid, command)


def lock_holder(path: Path | str) -> LockHolder | None:
    """The process holding a ``flock`` on ``path``, from ``/proc/locks`` (None: not held, or not Linux)."""
    try:
        info = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2459193 0 EOF"; a waiter's line has "->" after the number.
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[5] != device:
            continue
        with contextlib.suppress(ValueError):
            pid = int(fields[4])
            if pid > 0:  # 0 or -1: a holder outside this pid namespace, or an open file description lock
                return LockHolder.of(pid)
    return None


def _try_lock(fd: int) -> bool:
    """A non-blocking exclusive lock on ``fd`` (``flock``; ``msvcrt`` on Windows): True when taken."""
    if fcntl is None:
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(path: Path, info: os.stat_result) -> bool:
    """True when ``path`` names the file ``info`` is of (a lock on a file renamed away is no one's lock)."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)


class PrivateLock:
    """A non-blocking exclusive lock on a 0600 file of ``state_dir``: the runner lease, the reaper's lock.

    ``what`` names it in log lines (``"the runner lease"``). :meth:`acquire`
    opens ``path`` (made 0600 when missing), locks it, and keeps the lock only
    when the file it locked is still the one at ``path`` (same device and
    inode): another process may have renamed a fresh file over it between the
    open and the lock, and a lock on the file renamed away excludes no one.
    Then it opens the path again, at most :data:`LOCK_ATTEMPTS` times.

    A ``flock`` needs only a read-only descriptor, so a file others can open,
    or one another user owns (an older version's 0644, root's), is made anew
    by the process that takes it: a fresh 0600 file, locked, renamed over it.
    The old one stays locked too until :meth:`release`, for an older engine
    that does not look which file it locked. A file this user may only read
    (root's 0644 in the service user's folder) is locked read-only and made
    anew the same way: the folder's owner may rename in it.

    Not thread-safe by itself: the caller serialises :meth:`acquire` and
    :meth:`release`. Raises ``OSError`` when the path cannot be opened at all.
    """

    def __init__(self, path: Path | str, what: str):
        self.path = Path(path)
        self.what = what
        self._fds: list[int] = []

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return bool(self._fds)

    @property
    def fd(self) -> int | None:
        """The descriptor of the file at :attr:`path` while held (writable unless it could not be made anew)."""
        return self._fds[0] if self._fds else None

    def acquire(self) -> bool:
        """Take the lock if no other holder has it; True when held (also if already held)."""
        if self._fds:
            return True
        for _ in range(LOCK_ATTEMPTS):
            fds = self._attempt()
            if fds is None:
                return False
            if fds:
                self._fds = fds
                return True
        logger.warning("%s %s was replaced %d times while being taken: not taken", self.what, self.path, LOCK_ATTEMPTS)
        return False

    def release(self) -> None:
        """Let the lock go. Idempotent."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)  # closing the only descriptor drops the lock

    def _open(self) -> tuple[int, bool]:
        """A descriptor of the file at the path, and whether it is read-only (this user may not write it)."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | _CLOEXEC, PRIVATE_FILE_MODE), False
        except PermissionError as exc:
            if exc.errno != errno.EACCES:
                raise
            try:
                return os.open(self.path, os.O_RDONLY | _CLOEXEC), True
            except OSError:
                raise exc from None

    def _attempt(self) -> list[int] | None:
        """The held descriptors (the file at the path first); None: another holds it; []: renamed away, again."""
        fd, read_only = self._open()
        fds = [fd]
        try:
            if not _try_lock(fd):
                os.close(fd)
                return None
            info = os.fstat(fd)
            if not _same_file(self.path, info):
                os.close(fd)
                return []
            if read_only or not is_mine(info) or stat.S_IMODE(info.st_mode) & 0o077:
                fresh = self._renew(info)
                if fresh is not None:
                    fds.insert(0, fresh)
                    if not _same_file(self.path, os.fstat(fresh)):  # replaced again by someone else
                        for each in fds:
                            os.close(each)
                        return []
        except BaseException:
            for each in fds:
                os.close(each)
            raise
        return fds

    def _renew(self, old: os.stat_result) -> int | None:
        """A fresh 0600 file, locked and renamed over :attr:`path`; None (logged) when it cannot be made."""
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _CLOEXEC, PRIVATE_FILE_MODE)
        except OSError as exc:
            logger.warning("cannot make %s %s anew: %s", self.what, self.path, exc.strerror or exc)
            return None
        try:
            if not _try_lock(fd):  # a name no one else knows: cannot be locked already
                raise OSError(f"{tmp} is locked")
            os.replace(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            logger.warning("cannot make %s %s anew: %s", self.what, self.path, getattr(exc, "strerror", None) or exc)
            return None
        owner = "" if is_mine(old) else f", owned by {user_name(old.st_uid)}"
        logger.warning(
            "%s %s was open to other users (mode %04o%s): made anew, 0600",
            self.what,
            self.path,
            stat.S_IMODE(old.st_mode),
            owner,
        )
        return fd
