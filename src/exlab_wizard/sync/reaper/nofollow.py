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
A btrfs subvolume inside the run has a device of its own but is no mount
(:func:`is_subvolume`): it is the run's, entered like any folder.

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
from exlab_wizard.sync.reaper.mounts import mount_id, mount_type

__all__ = [
    "CLOEXEC",
    "DIR_FLAGS",
    "FILE_FLAGS",
    "SUBVOLUME_ROOT_INO",
    "RunFolderError",
    "Tree",
    "hash_at",
    "is_subvolume",
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
#: The inode number of every btrfs subvolume's root folder (``BTRFS_FIRST_FREE_OBJECTID``).
SUBVOLUME_ROOT_INO = 256


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


def is_subvolume(parent_fd: int, fd: int) -> bool:
    """Is the folder ``fd``, on another device than its parent folder ``parent_fd``, a btrfs subvolume of the run's?

    A btrfs subvolume (a tool made one, snapper's ``.snapshots``) shows a
    device of its own, its root folder is inode :data:`SUBVOLUME_ROOT_INO`,
    and it is no mount: it is on its parent's mount (the same mount id, read
    from the descriptors themselves), a btrfs one. A file system mounted
    there (a btrfs one's root is inode 256 too) or a subvolume bind-mounted
    there is on a mount of its own: False. False too where the mount ids or
    types cannot be read (not Linux): taken for a mount point, never entered.
    """
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode) or st.st_ino != SUBVOLUME_ROOT_INO:
        return False
    mnt = mount_id(fd)
    return mnt is not None and mnt == mount_id(parent_fd) and mount_type(mnt) == "btrfs"


def open_dir_chain(root_fd: int, parts: Sequence[str]) -> int:
    """Descend from ``root_fd`` through ``parts`` with ``O_NOFOLLOW`` at each step, never across a mount point.

    Returns a new descriptor (the caller closes it). Raises ``OSError``:
    ``ENOENT`` when a folder is gone, ``ELOOP``/``ENOTDIR`` when one was
    replaced by a symlink or a file, ``EXDEV`` when one is on another device
    than its parent (a file system mounted there). A btrfs subvolume of the
    same mount (:func:`is_subvolume`) is descended into.
    """
    fd = os.dup(root_fd)
    try:
        device = os.fstat(fd).st_dev if parts else None
        for part in parts:
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            parent, fd = fd, nxt
            try:
                here = os.fstat(fd).st_dev
                if here != device and not is_subvolume(parent, fd):
                    raise OSError(errno.EXDEV, "a mount point (another file system)", part)
            finally:
                os.close(parent)
            device = here
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
    subvolumes: list[str] = dataclasses.field(default_factory=list)  # btrfs subvolumes: in ``dirs`` too, entered


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
    there) goes to ``tree.mounts`` and nowhere else: never entered; but a
    btrfs subvolume on the parent's own mount (:func:`is_subvolume`) is
    the run's folder, in ``tree.dirs`` and ``tree.subvolumes``, entered. Only
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
                if st.st_dev != device and stat.S_ISDIR(st.st_mode) and st.st_ino != SUBVOLUME_ROOT_INO:
                    tree.mounts.append(path)  # inode 256 may be a subvolume: told apart once opened, below
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
            if os.fstat(sub).st_dev != device:
                if not is_subvolume(dir_fd, sub):  # a mount point, or mounted on since it was listed
                    tree.dirs.discard(path)
                    tree.mounts.append(path)
                    continue
                tree.subvolumes.append(path)
            walk(sub, path, tree, skip_metadata=skip_metadata)
        finally:
            os.close(sub)
