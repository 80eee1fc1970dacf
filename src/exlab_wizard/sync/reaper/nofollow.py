"""No-follow access to a run folder: directory descriptors opened with ``O_NOFOLLOW``.

Owns how the reaper reaches a file inside a run without ever following a
symlink: the run folder is opened as a directory descriptor (never through
a symlink at its last component), every folder below it is opened relative
to its parent with ``O_NOFOLLOW``, and files are hashed or listed through
those descriptors. A folder swapped for a symlink between two steps is
refused (``ELOOP``/``ENOTDIR``), never followed out of the run. Nor is a
mount point crossed: a folder on another device than the run folder is
never descended into or listed as the run's (:class:`Tree`'s
``mounts``; ``EXDEV`` from :func:`open_dir_chain`). A bind mount of a folder
of the same file system shows no other device: :mod:`.mounts` finds those.

Used by the local check (:mod:`.local_check`) and the deletion
(:mod:`.deletion`). Blocking I/O throughout.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from exlab_wizard.fileio import BLOCK_SIZE, METADATA_DIR, hash_fd, is_reaping_name, open_regular
from exlab_wizard.sync.policy.cleanup import CleanupCode

__all__ = [
    "CLOEXEC",
    "DIR_FLAGS",
    "FILE_FLAGS",
    "RunFolderError",
    "Tree",
    "hash_at",
    "kind_of",
    "open_dir_chain",
    "open_run",
    "split_path",
    "steady",
    "walk",
]

CLOEXEC = getattr(os, "O_CLOEXEC", 0)
DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | CLOEXEC
FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | CLOEXEC


class RunFolderError(Exception):
    """The run folder cannot be opened as a real folder; ``reason`` says why, ``code`` what it is."""

    def __init__(self, reason: str, code: CleanupCode = CleanupCode.RUN_UNOPENABLE):
        super().__init__(reason)
        self.reason = reason
        self.code = code


def open_run(run_path: Path) -> int:
    """The run folder as a directory descriptor; never through a symlink at its last component."""
    try:
        return os.open(run_path, DIR_FLAGS)
    except FileNotFoundError:
        raise RunFolderError("run folder missing", CleanupCode.RUN_MISSING) from None
    except OSError as exc:
        if os.path.islink(run_path):
            raise RunFolderError("run folder is a symlink", CleanupCode.RUN_SYMLINK) from None
        if exc.errno in (getattr(os, "ELOOP", -1), getattr(os, "ENOTDIR", -1)):
            raise RunFolderError("run folder is not a folder") from None
        raise RunFolderError(f"cannot open run folder: {exc.strerror or exc}") from None


def open_dir_chain(root_fd: int, parts: Sequence[str]) -> int:
    """Descend from ``root_fd`` through ``parts`` with ``O_NOFOLLOW`` at each step, never across a mount point.

    Returns a new descriptor (the caller closes it). Raises ``OSError``:
    ``ENOENT`` when a folder is gone, ``ELOOP``/``ENOTDIR`` when one was
    replaced by a symlink or a file, ``EXDEV`` when one is on another device
    than ``root_fd`` (a file system mounted there).
    """
    fd = os.dup(root_fd)
    try:
        device = os.fstat(fd).st_dev if parts else None
        for part in parts:
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if os.fstat(fd).st_dev != device:
                raise OSError(errno.EXDEV, "a mount point (another file system)", part)
    except BaseException:
        os.close(fd)
        raise
    return fd


def split_path(rel: str) -> tuple[list[str], str]:
    """``"a/b/c.tif"`` -> ``(["a", "b"], "c.tif")``."""
    parts = rel.split("/")
    return parts[:-1], parts[-1]


def hash_at(dir_fd: int, name: str) -> tuple[str, os.stat_result, os.stat_result]:
    """SHA-256 of a regular file opened without following symlinks, with its stat before and after.

    Raises ``OSError`` (``ELOOP`` for a symlink, ``EINVAL`` for anything not
    a regular file, ``FileNotFoundError`` when gone).
    """
    fd, before = open_regular(name, dir_fd=dir_fd)
    try:
        digest = hash_fd(fd, memoryview(bytearray(BLOCK_SIZE)))
        after = os.fstat(fd)
    finally:
        os.close(fd)
    return digest, before, after


def steady(before: os.stat_result, after: os.stat_result) -> bool:
    """Same size, mtime and ctime before and after a read (:func:`hash_at`): nothing wrote to the file meanwhile."""
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )


@dataclass
class Tree:
    """What :func:`walk` found under a folder, by path relative to it."""

    files: dict[str, os.stat_result] = dataclasses.field(default_factory=dict)
    others: dict[str, str] = dataclasses.field(default_factory=dict)  # symlinks, sockets, ...
    dirs: set[str] = dataclasses.field(default_factory=set)
    unreadable: list[str] = dataclasses.field(default_factory=list)
    mounts: list[str] = dataclasses.field(default_factory=list)  # on another device: mount points, never entered


def kind_of(mode: int) -> str:
    """What a non-regular entry is, in words for a reason."""
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "folder"
    return "special file"


def walk(dir_fd: int, rel: str, tree: Tree, *, skip_metadata: bool = True) -> None:
    """Every entry under ``dir_fd`` (lstat), never following a symlink; ``.exlab-wizard/`` skipped at the top.

    With ``skip_metadata`` (a run's data) a regular file with one of the
    reaper's private names (:func:`~exlab_wizard.fileio.is_reaping_name`: set
    aside for its unlink) is left out too, wherever it is.

    Only the top-level *folder* of that exact name is skipped (metadata, as
    :func:`exlab_wizard.fileio.is_metadata_path` has it); a file so named is data.

    A folder on another device than its parent (a file system mounted
    there) goes to ``tree.mounts`` and nowhere else: never entered. Only
    folders are compared: overlayfs may give a file of a lower layer a
    device of its own, never a folder.
    """
    subdirs = []
    try:
        device = os.fstat(dir_fd).st_dev
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                name = entry.name
                path = f"{rel}/{name}" if rel else name
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if skip_metadata and not rel and name == METADATA_DIR and stat.S_ISDIR(st.st_mode):
                    continue
                if st.st_dev != device and stat.S_ISDIR(st.st_mode):
                    tree.mounts.append(path)
                elif stat.S_ISREG(st.st_mode):
                    if skip_metadata and is_reaping_name(name):
                        continue  # set aside by a deletion for its unlink (see .deletion): not data
                    tree.files[path] = st
                elif stat.S_ISDIR(st.st_mode):
                    tree.dirs.add(path)
                    subdirs.append((name, path))
                else:
                    tree.others[path] = kind_of(st.st_mode)
    except OSError as exc:
        tree.unreadable.append(f"{rel or '.'} ({exc.strerror or exc})")
        return
    for name, path in subdirs:
        try:
            sub = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            tree.dirs.discard(path)
            continue
        except OSError as exc:
            if exc.errno in (getattr(os, "ELOOP", -1), getattr(os, "ENOTDIR", -1)):
                tree.dirs.discard(path)
                tree.others[path] = "symlink"
                continue
            tree.unreadable.append(f"{path} ({exc.strerror or exc})")
            continue
        try:
            if os.fstat(sub).st_dev != device:  # mounted on since it was listed
                tree.dirs.discard(path)
                tree.mounts.append(path)
                continue
            walk(sub, path, tree, skip_metadata=skip_metadata)
        finally:
            os.close(sub)
