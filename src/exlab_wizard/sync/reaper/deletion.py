"""Descriptor-relative, no-follow deletion of planned files, and the tidying after it.

Owns every unlink and rmdir the reaper makes:

- :func:`delete_batch`: each planned file is ``lstat``-ed right before it
  is unlinked, through folders opened with ``O_NOFOLLOW`` from the run
  folder down (see :mod:`.nofollow`); it must still be a regular file with
  the planned size, mtime and inode, else nothing more is deleted. One
  whose ctime moved since it was checked (a change that put its size and
  mtime back does that; so does a chmod or a hard link) is hashed again
  and must still hold the verified bytes. It is then renamed, in its folder
  and never over a file, to a private name (``.exlab-reaping-<20 hex>``, the
  same for the same planned file every time), and that name must hold the
  inode checked before it is unlinked: a file renamed over the planned name
  in between is given its name back and the deletion stops. A file whose
  stat cannot vouch for its bytes (another inode number than planned: exFAT
  through FUSE numbers inodes anew after a remount or memory pressure; no
  ctime known: a filesystem that keeps none, a plan of another boot) is hashed after that rename,
  through the private name, and unlinked only when it holds the verified
  bytes. A pass killed between the rename and the unlink leaves the private
  name, which the next one deletes if it holds the planned file (its bytes
  read again; no listing of a run shows such a name meanwhile). Folders are
  fsync-ed after their files are unlinked.
  A run that holds a mount point (the mount table read once per batch, and
  no folder on another device entered) has nothing deleted: the files below
  one are another folder's, reached through the run's names. A btrfs
  subvolume inside the run is no mount (:func:`~.nofollow.is_subvolume`):
  its files are deleted like any other, within their own folder.
- :func:`put_back_set_aside`: at the start of a resumed plan, every file a
  killed pass set aside gets its name back before anything is decided.
- :func:`remove_left_empty`: the folders the deletion left empty, deepest
  first, never the run folder, never a symlink, never outside the run (an
  emptied btrfs subvolume too, where ``rmdir`` may remove one).
- :func:`metadata_snapshot` / :func:`remove_metadata` /
  :func:`remove_run_folder`: with ``retain_cache: false``, the
  ``.exlab-wizard/`` files that did not change since the final push, then
  the run folder when it is empty.

Decides nothing: the reaper pass (:mod:`.passes`) says what to delete and
when. Blocking I/O throughout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from exlab_wizard.fileio import METADATA_DIR, fsync_dir, reaping_name, rename_noreplace
from exlab_wizard.sync.reaper.mounts import describe, mounts_inside
from exlab_wizard.sync.reaper.nofollow import (
    DIR_FLAGS,
    RunFolderError,
    Tree,
    hash_at,
    is_subvolume,
    kind_of,
    open_dir_chain,
    open_run,
    split_path,
    steady,
    walk,
)
from exlab_wizard.sync.reaper.store import PlannedFile

__all__ = [
    "DeleteResult",
    "delete_batch",
    "metadata_snapshot",
    "put_back_set_aside",
    "remove_left_empty",
    "remove_metadata",
    "remove_run_folder",
]


@dataclass
class DeleteResult:
    """What :func:`delete_batch` did: counts, and why it stopped (``stop``), if it did."""

    deleted: int = 0
    gone: int = 0
    bytes_deleted: int = 0
    stop: str | None = None  # a reason: nothing more was deleted
    stop_fatal: bool = False  # the plan can never complete (FAILED) vs. try again later
    stop_path: str | None = None


def delete_batch(run_path: Path, batch: Sequence[PlannedFile]) -> DeleteResult:
    """Unlink the planned files of ``batch`` that still match the plan. Blocking I/O.

    Stops at the first file that does not match (nothing more deleted).
    Folders are fsync-ed after their files are unlinked. Deletes nothing
    while a mount point is inside the run (the mount table is read right
    before the batch; a folder on another device is never entered): a stop,
    not fatal, the plan waits for the mount to go.
    """
    result = DeleteResult()
    try:
        root = open_run(run_path)
    except RunFolderError as exc:
        result.stop = exc.reason
        return result
    try:
        mounted = mounts_inside(run_path)
        if mounted:
            result.stop = describe(mounted)
            return result
        for parents, items in _by_folder(batch).items():
            try:
                folder = open_dir_chain(root, parents)
            except FileNotFoundError:
                result.gone += len(items)  # the whole folder is gone: so are its files
                continue
            except OSError as exc:
                if exc.errno == errno.EXDEV:  # another file system mounted on the way: not the run's files
                    result.stop = describe(["/".join(parents)])
                    return result
                result.stop = f"folder replaced since the plan: {'/'.join(parents)} ({exc.strerror or exc})"
                result.stop_fatal, result.stop_path = True, items[0].path
                return result
            try:
                touched = False  # a rename or unlink here, by this pass or by one killed before its fsync
                for item in items:
                    _, name = split_path(item.path)
                    touched = True
                    try:
                        deleted = _reap(folder, name, item)
                    except _Stop as stop:
                        result.stop, result.stop_path = stop.reason, item.path
                        result.stop_fatal = stop.fatal
                        break
                    if deleted:
                        result.deleted += 1
                        result.bytes_deleted += item.size
                    else:
                        result.gone += 1
                if touched:  # durable before the deletion is recorded as done
                    os.fsync(folder)
            finally:
                os.close(folder)
            if result.stop is not None:
                return result
    finally:
        os.close(root)
    return result


def _by_folder(items: Iterable[PlannedFile]) -> dict[tuple[str, ...], list[PlannedFile]]:
    """The planned files by their folder (its parts below the run folder), in order."""
    groups: dict[tuple[str, ...], list[PlannedFile]] = {}
    for item in items:
        parents, _ = split_path(item.path)
        groups.setdefault(tuple(parents), []).append(item)
    return groups


class _Stop(Exception):
    """A planned file that may not be deleted: nothing more is (``fatal``: the plan can never complete)."""

    def __init__(self, reason: str, *, fatal: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal


def _planned(st: os.stat_result, item: PlannedFile) -> bool:
    """A regular file with the planned size, mtime and inode."""
    return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns, st.st_ino) == (item.size, item.mtime_ns, item.ino)


def _sized(st: os.stat_result, item: PlannedFile) -> bool:
    """A regular file with the planned size and mtime, whatever its inode number."""
    return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (item.size, item.mtime_ns)


def _reap(folder: int, name: str, item: PlannedFile) -> bool:
    """Delete one planned file, ``name`` in ``folder``: True when deleted, False when it was gone. Raises :class:`_Stop`.

    Checked by name, then taken out of reach (renamed to its private name,
    :func:`~exlab_wizard.fileio.reaping_name`, never over a file), then the
    file under the private name is checked to be the one checked by name and
    only then unlinked: an unlink of the name would remove whatever file has
    the name at that instant, such as a new version another program saved
    ("write a temp file, rename it over") after the check. Nothing else
    writes to or renames over a private name.

    A file whose stat cannot vouch for its bytes is read again after the
    rename, through the private name, and unlinked only when it holds the
    verified bytes: one with another inode number than planned (a FUSE
    filesystem without ``use_ino``, exfat-fuse, numbers inodes anew after a
    remount or when the kernel let the inode go), or with no ctime known (a
    filesystem that keeps none, exFAT: :func:`~.local_check.keeps_ctime`; a
    plan written in another boot, whose stats a power cut may have made lie:
    :meth:`~.store.CleanupStore.plan_files`).
    Other bytes: the file gets its name back, a fatal stop.
    """
    private = reaping_name(name, item.ino)
    try:
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return _reap_set_aside(folder, private, item)
    if not stat.S_ISREG(st.st_mode):
        raise _Stop(f"not a regular file any more: {item.path} ({kind_of(st.st_mode)})")
    if not _sized(st, item):
        raise _Stop(f"local file changed since the plan: {item.path}")
    read_after = st.st_ino != item.ino or item.ctime_ns is None
    if read_after and not item.sha256:
        raise _Stop(f"local file changed since the plan: {item.path}")  # nothing to compare its bytes with
    if not read_after and st.st_ctime_ns != item.ctime_ns and not _still_verified(folder, name, item):
        raise _Stop(f"local file changed since the plan (its bytes, not its mtime): {item.path}")
    try:
        rename_noreplace(name, private, dir_fd=folder)
    except FileNotFoundError:
        return False  # deleted meanwhile by someone else: its verified copy is on the NAS
    except FileExistsError:
        raise _Stop(f"cannot delete {item.path}: {_beside(item.path, private)} is in the way") from None
    except OSError as exc:
        raise _Stop(f"cannot delete {item.path}: {exc.strerror or exc}", fatal=False) from None
    try:
        moved = os.stat(private, dir_fd=folder, follow_symlinks=False)
    except OSError as exc:  # nothing else uses the name: should not happen
        raise _Stop(f"cannot delete {item.path}: {_beside(item.path, private)}: {exc.strerror or exc}") from None
    if not _sized(moved, item) or moved.st_ino != st.st_ino:
        _put_back(folder, private, name, item)
    if read_after and not _holds_verified(folder, private, item, moved.st_ino):
        _put_back(folder, private, name, item, bytes_changed=True)
    _unlink_private(folder, private, item)
    return True


def _reap_set_aside(folder: int, private: str, item: PlannedFile) -> bool:
    """A planned file whose name is gone: deleted before, or set aside by a pass killed before its unlink.

    The private name holding the planned file (its size and mtime, and its
    verified bytes read again; where the plan has no SHA-256, its inode) is
    unlinked: True. Its inode number is not asked for: a disk mounted anew
    since (the PC rebooted after the killed pass) may give it another.
    Anything else there is not the plan's: kept, a fatal stop. False when
    there is nothing to delete.
    """
    try:
        st = os.stat(private, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not _sized(st, item) or not (
        _holds_verified(folder, private, item, st.st_ino) if item.sha256 else _planned(st, item)
    ):
        raise _Stop(
            f"local file changed since the plan: {item.path} is gone, and the file an interrupted deletion set "
            f"aside as {_beside(item.path, private)} is not the planned one (kept)"
        )
    _unlink_private(folder, private, item)
    return True


def _put_back(folder: int, private: str, name: str, item: PlannedFile, *, bytes_changed: bool = False) -> NoReturn:
    """The file now under ``private`` may not be deleted: give it its name back.

    Either the name was replaced between its check and the rename, or
    (``bytes_changed``) the file read after the rename does not hold the
    verified bytes. Linked back (never over a file: a link refuses to
    replace one), then the private name unlinked. A fatal stop in every
    case; when a file has the name again already, both are kept and both named.
    """
    if bytes_changed:
        kept = f"local file changed since the plan (its bytes, not its mtime): {item.path}"
    else:
        kept = f"local file changed since the plan: {item.path} was replaced before its deletion"
    found = "that file" if bytes_changed else "the file found in its place"
    try:
        _name_back(folder, private, name)
    except FileExistsError:
        raise _Stop(
            f"{kept}, and again since: {found} is kept as {_beside(item.path, private)}, the newest at {item.path}"
        ) from None
    except OSError as exc:
        raise _Stop(
            f"{kept}: {found} is kept as {_beside(item.path, private)} (cannot be put back: {exc.strerror or exc})"
        ) from None
    raise _Stop(f"{kept}: that file is kept, nothing of it deleted")


def _name_back(folder: int, private: str, name: str) -> None:
    """The file under ``private`` in ``folder`` gets ``name`` again, never over a file (``FileExistsError``).

    Linked back, then the private name unlinked; where the file system has
    no hard links, renamed back with a rename that refuses to replace.
    """
    try:
        os.link(private, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system: renamed back, never over a file
        rename_noreplace(private, name, dir_fd=folder, atomic_only=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(private, dir_fd=folder)  # the same file stays under its name


def put_back_set_aside(run_path: Path, planned: Sequence[PlannedFile]) -> list[str]:
    """Give each planned file a killed pass set aside (its private name) its own name back. Blocking I/O.

    A file there with another inode number than planned (exFAT: renumbered
    by a remount since) is the planned one when it holds the verified bytes.

    A plan found at the start of a pass may have been cut between a file's
    rename to its private name and its unlink. That file was never deleted:
    it is put back under its name before anything else is decided, so the
    resumed plan checks it like any other planned file (and deletes it only
    if it still matches), and a plan dropped instead leaves the file where
    the lab expects it, not hidden under a name no listing shows. Returns the
    run-relative private paths that could not be put back because a file has
    the name again (both kept). Folders are fsync-ed after a rename. Nothing
    is done when the run folder cannot be opened (its disk away: the plan waits).
    """
    blocked: list[str] = []
    try:
        root = open_run(run_path)
    except RunFolderError:
        return blocked
    try:
        for parents, items in _by_folder(planned).items():
            try:
                folder = open_dir_chain(root, parents)
            except OSError:
                continue  # gone or replaced: nothing of the plan set aside in it
            try:
                moved = False
                for item in items:
                    _, name = split_path(item.path)
                    private = reaping_name(name, item.ino)
                    try:
                        st = os.stat(private, dir_fd=folder, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if not _set_aside_here(folder, private, st, item):
                        continue  # not the file set aside: the resume's check keeps it and names it
                    try:
                        _name_back(folder, private, name)
                    except FileExistsError:
                        if not _same_file(folder, name, st):
                            blocked.append(_beside(item.path, private))
                            continue
                        # A put-back killed between its link and the private name's unlink: one file, two names.
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(private, dir_fd=folder)
                        moved = True
                    except OSError:
                        continue  # left set aside: the resume's check deletes it or names it
                    else:
                        moved = True
                if moved:
                    os.fsync(folder)
            finally:
                os.close(folder)
    finally:
        os.close(root)
    return blocked


def _set_aside_here(folder: int, private: str, st: os.stat_result, item: PlannedFile) -> bool:
    """Is the file under ``private`` (stat-ed ``st``) the planned one a killed pass set aside?

    The planned inode, size and mtime; or, with another inode number (the
    disk mounted anew since: exFAT through FUSE renumbers), the planned size
    and mtime and the verified bytes, read again.
    """
    if _planned(st, item):
        return True
    return _sized(st, item) and _holds_verified(folder, private, item, st.st_ino)


def _same_file(folder: int, name: str, st: os.stat_result) -> bool:
    """Is ``name`` in ``folder`` (not followed) the file of ``st``?"""
    try:
        other = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def _unlink_private(folder: int, private: str, item: PlannedFile) -> None:
    try:
        os.unlink(private, dir_fd=folder)
    except FileNotFoundError:
        pass  # nothing else uses the name: should not happen
    except OSError as exc:  # the next pass finds it set aside and deletes it then
        raise _Stop(f"cannot delete {item.path}: {exc.strerror or exc}", fatal=False) from None


def _beside(path: str, private: str) -> str:
    """The run-relative path of ``private`` in ``path``'s folder."""
    parents, _ = split_path(path)
    return "/".join([*parents, private])


def _still_verified(folder: int, name: str, item: PlannedFile) -> bool:
    """Does the file, whose ctime moved since the plan, still hold the verified bytes? Read through ``folder``.

    It must be the planned inode: :func:`_holds_verified` with ``item.ino``.
    """
    return _holds_verified(folder, name, item, item.ino)


def _holds_verified(folder: int, name: str, item: PlannedFile, ino: int) -> bool:
    """Does ``name`` in ``folder``, inode ``ino``, hold the verified bytes? Read through ``folder``.

    Hashed again (nothing followed) and compared with the plan's SHA-256; the
    file read must be inode ``ino`` with the planned size and mtime, and not
    change while it is read. A plan with no SHA-256 (the ``.exlab-wizard/``
    files) has nothing to compare with: False.
    """
    if not item.sha256:
        return False
    try:
        digest, before, after = hash_at(folder, name)
    except OSError:
        return False
    planned = (before.st_size, before.st_mtime_ns, before.st_ino) == (item.size, item.mtime_ns, ino)
    return planned and steady(before, after) and digest == item.sha256.lower()


def remove_left_empty(run_path: Path, paths: Iterable[str], *, kept: list[str] | None = None) -> list[str]:
    """Remove the folders that held the given files and are now empty, deepest first. Blocking I/O.

    Never the run folder itself, never a symlink (``rmdir`` does not follow
    one), never a folder outside the run (descent uses ``O_NOFOLLOW`` and
    crosses no mount point; nothing at or below one is removed). An empty
    btrfs subvolume is removed the same way (``rmdir`` does, as root); one
    it refuses is left, named in ``kept`` (``"sub (Operation not permitted)"``)
    when the caller gives a list: nothing fails for it.
    Returns the folders removed.
    """
    candidates: set[tuple[str, ...]] = set()
    for rel in paths:
        parents, _ = split_path(rel)
        for i in range(1, len(parents) + 1):
            candidates.add(tuple(parents[:i]))
    removed: list[str] = []
    try:
        root = open_run(run_path)
    except RunFolderError:
        return removed
    try:
        mounted = [tuple(m.split("/")) for m in mounts_inside(run_path)]
        for folder in sorted(candidates, key=lambda p: (-len(p), p)):
            if any(folder[: len(m)] == m for m in mounted):
                continue  # a mount point, or below one: another folder's
            try:
                parent = open_dir_chain(root, folder[:-1])
            except OSError:
                continue
            try:
                os.rmdir(folder[-1], dir_fd=parent)
            except OSError as exc:
                # Not empty, already gone, or not a folder: leave it. An empty subvolume rmdir refused: say so.
                if kept is not None and exc.errno not in _NOT_REMOVABLE and _subvolume_at(parent, folder[-1]):
                    kept.append(f"{'/'.join(folder)} ({exc.strerror or exc})")
            else:
                removed.append("/".join(folder))
                os.fsync(parent)
            finally:
                os.close(parent)
    finally:
        os.close(root)
    return removed


#: An ``rmdir`` refusal that says nothing of a subvolume: the folder is not empty, gone, or no folder.
_NOT_REMOVABLE = frozenset({errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR})


def _subvolume_at(parent: int, name: str) -> bool:
    """Is ``name`` in ``parent`` (not followed) a btrfs subvolume of the run's (:func:`~.nofollow.is_subvolume`)?"""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError:
        return False
    try:
        return os.fstat(fd).st_dev != os.fstat(parent).st_dev and is_subvolume(parent, fd)
    finally:
        os.close(fd)


def metadata_snapshot(run_path: Path) -> tuple[list[PlannedFile], list[str]]:
    """Regular files under ``.exlab-wizard/`` as planned files (no SHA-256), and its folders (deepest first)."""
    files: list[PlannedFile] = []
    folders: list[str] = []
    root = open_run(run_path)
    try:
        try:
            meta = os.open(METADATA_DIR, DIR_FLAGS, dir_fd=root)
        except FileNotFoundError:
            return files, folders
        tree = Tree()
        try:
            walk(meta, "", tree, skip_metadata=False)
        finally:
            os.close(meta)
    finally:
        os.close(root)
    if tree.unreadable:
        raise OSError(f"cannot read {METADATA_DIR}/{tree.unreadable[0]}")
    if tree.mounts:
        raise OSError(describe([f"{METADATA_DIR}/{m}" for m in tree.mounts]))
    for rel, st in tree.files.items():
        files.append(PlannedFile(f"{METADATA_DIR}/{rel}", st.st_size, st.st_mtime_ns, st.st_ino, "", st.st_ctime_ns))
    folders = [f"{METADATA_DIR}/{d}" for d in sorted(tree.dirs, key=lambda p: (-p.count("/"), p))]
    folders.append(METADATA_DIR)
    return files, folders


def remove_metadata(run_path: Path, files: Sequence[PlannedFile], folders: Sequence[str]) -> str | None:
    """Delete the snapshotted ``.exlab-wizard/`` files that did not change, then its empty folders.

    Returns a reason when something changed after the snapshot (nothing of
    it deleted then), else None.
    """
    result = delete_batch(run_path, files)
    if result.stop is not None:
        return result.stop
    try:
        root = open_run(run_path)
    except RunFolderError as exc:
        return exc.reason
    try:
        for rel in folders:
            parents, name = split_path(rel)
            try:
                parent = open_dir_chain(root, parents)
            except OSError:
                continue
            try:
                os.rmdir(name, dir_fd=parent)
                os.fsync(parent)
            except OSError:
                pass
            finally:
                os.close(parent)
    finally:
        os.close(root)
    return None


def remove_run_folder(run_path: Path) -> str | None:
    """``rmdir`` the run folder if it is empty (a symlink is never removed this way). None when removed."""
    if os.path.islink(run_path):
        return "run folder is a symlink"
    try:
        os.rmdir(run_path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"run folder kept: {exc.strerror or exc}"
    with contextlib.suppress(OSError):
        fsync_dir(run_path.parent)
    return None
