"""The remote-conflict check every transport makes before its first write.

A push refuses a remote run folder that holds entries not from this run
(``REMOTE_CONFLICT``, nothing written): two runs that map to the same remote
folder, or someone else's files, are never mixed with ours. :func:`sort_remote`
is that rule, written once as a pure function over what the transport listed;
each transport only says which remote names are its own leftovers (a temp file
of an interrupted copy) and turns the result into removals and an error.

Remote entries the run does not have that are *not* a conflict: the transport's
own leftovers (removed by the push), files inside the run's ``.exlab-wizard/``
(metadata pushed earlier: ours), and files named in ``cleaned`` (this run's
verified files whose local copies the reaper deleted).

One entry of ``.exlab-wizard/`` is not taken on trust: the verified manifest
(:data:`NAS_MANIFEST`). A remote run folder that holds one holds the verified
copy of *some* run, and it is this run's only when that file is the run's own
``checksums.sha256`` or one the run was verified with (:func:`foreign_copy_error`).
Two runs reach one NAS folder through a share that folds letter case
(``Run_A`` and ``Run_a`` on SMB, exFAT, macOS), two instruments on one share
with a project and a run name in common, or two instrument PCs configured
alike; the files of the second have the names of the first, and without this
check its push would overwrite the first run's only verified copy.

A verified copy has no manifest on the NAS for a while: the metadata push after
VERIFIED writes it, and it may fail and wait for its retry. So a job that has
never run before (``fresh``) takes no data file on the NAS for its own: data
files of the run's names in a NAS folder no attempt of the job wrote to are
another's, unless the folder's manifest says the run is its owner
(:func:`unclaimed_files_error`). A job that ran before may have left them there
itself (a push cut off), and resumes.

What says a job ran there is on the NAS itself: before its first write into
the folder, a push names its job in ``.exlab-wizard/claims/<job id>``
(:data:`CLAIMS_DIR`), and a folder holding another job's claim, and no
verified manifest of the run, is that job's (:func:`ownership_error`): a job
whose push claimed the folder and then wrote nothing (the share gone a moment
later) never takes for its own what another run put there since.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import tempfile
import unicodedata
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from exlab_wizard.fileio import METADATA_DIR, hash_file, is_metadata_path
from exlab_wizard.sync.manifest_format import MANIFEST_NAME
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind

__all__ = [
    "DIR",
    "FILE",
    "CLAIMS_DIR",
    "NAS_MANIFEST",
    "OTHER",
    "RemoteExtras",
    "conflict_error",
    "check_owner",
    "claim_body",
    "claim_markers",
    "claim_path",
    "ownership_error",
    "foreign_copy_error",
    "fold_clash",
    "fold_twins",
    "folded_name",
    "local_manifest_digest",
    "sort_remote",
    "unclaimed_files_error",
]

#: The run's verified manifest, relative to the run folder: on the NAS, the mark of a verified copy.
NAS_MANIFEST = f"{METADATA_DIR}/{MANIFEST_NAME}"

#: Where a push names the job it writes for, one empty-ish file a job: ``<CLAIMS_DIR>/<job id>``.
CLAIMS_DIR = f"{METADATA_DIR}/claims"

#: Kinds of remote entries: a regular file, a folder, anything else (a symlink, a device).
FILE, DIR, OTHER = "f", "d", "o"

#: ``leftover(path, kind)``: the path to remove when ``path`` is the transport's own
#: leftover (the entry itself, or the folder holding it), else None.
Leftover = Callable[[str, str], "str | None"]


class RemoteExtras(NamedTuple):
    """What the remote run folder holds beyond this run: ``(leftovers, foreign)``.

    ``leftovers``: the transport's own leftovers to remove (sorted, no
    duplicates). ``foreign``: entries that are someone else's (sorted by
    their bytes; a folder where the run has a file ends with ``/``).
    ``claimed``: see :func:`sort_remote`'s ``fresh``.
    """

    leftovers: list[str]
    foreign: list[str]
    #: with ``fresh``: the data files the remote folder holds under the run's names (sorted by bytes)
    claimed: tuple[str, ...] = ()


def _never(path: str, kind: str) -> str | None:
    return None


def sort_remote(
    local_files: Collection[str],
    local_dirs: Collection[str],
    remote: Mapping[str, str],
    cleaned: Collection[str] = frozenset(),
    *,
    leftover: Leftover = _never,
    fresh: bool = False,
) -> RemoteExtras:
    """Split the remote run folder's entries into the transport's leftovers and foreign ones.

    ``local_files``/``local_dirs``: the run's regular files and folders;
    ``remote``: every remote entry (relative path -> :data:`FILE`,
    :data:`DIR` or :data:`OTHER`; a listing of files alone is fine). For each
    remote entry, in this order:

    - a folder is foreign where the run has a file, else fine;
    - a regular file where the run has one is ours (compared by the push);
      with ``fresh`` (no attempt of this job has written to the folder), a
      data file there is listed in ``claimed`` too (see
      :func:`unclaimed_files_error`);
    - the transport's own leftover (``leftover``) is to be removed;
    - anything where the run has a file or a folder (a symlink, a file in
      place of a folder) is foreign;
    - a file inside ``.exlab-wizard/``, or named in ``cleaned``, is ours;
    - anything else is foreign.
    """
    leftovers: set[str] = set()
    foreign: list[str] = []
    claimed: list[str] = []
    for path, kind in remote.items():
        if kind == DIR:
            if path in local_files:
                foreign.append(path + "/")
            continue
        if kind == FILE and path in local_files:
            if fresh and not is_metadata_path(path):
                claimed.append(path)
            continue
        junk = leftover(path, kind)
        if junk is not None:
            leftovers.add(junk)
        elif path in local_files or path in local_dirs or not (is_metadata_path(path) or path in cleaned):
            foreign.append(path)
    return RemoteExtras(sorted(leftovers), sorted(foreign, key=os.fsencode), tuple(sorted(claimed, key=os.fsencode)))


def conflict_error(remote_run: str, foreign: Collection[str]) -> TransportError:
    """The ``REMOTE_CONFLICT`` error naming the first few foreign entries."""
    names = sorted(foreign, key=os.fsencode)
    shown = ", ".join(repr(p) for p in names[:5]) + (" ..." if len(names) > 5 else "")
    return TransportError(
        TransportErrorKind.REMOTE_CONFLICT,
        f"remote run folder {remote_run} already holds {len(names)} entries that are not in this run "
        f"({shown}); nothing was written",
    )


def unclaimed_files_error(remote_run: str, claimed: Collection[str]) -> TransportError | None:
    """``REMOTE_CONFLICT`` for a job's first push into a NAS folder that holds data files of its names; else None.

    ``claimed``: :class:`RemoteExtras`'s, from a listing that showed no
    manifest of this run (:data:`NAS_MANIFEST` absent, or one
    :func:`foreign_copy_error` found to be the run's own: pass nothing then).
    No attempt of the job wrote to the folder, so the files are another's: most
    often another run's verified copy whose manifest is not there yet (its
    metadata push waits for its retry), or one a lost queue's job sent.
    """
    if not claimed:
        return None
    names = sorted(claimed, key=os.fsencode)
    shown = ", ".join(repr(p) for p in names[:5]) + (" ..." if len(names) > 5 else "")
    return TransportError(
        TransportErrorKind.REMOTE_CONFLICT,
        f"remote run folder {remote_run} already holds {len(names)} data files with this run's names ({shown}) "
        f"that no push of this job wrote, and no manifest of this run: another run's copy, or one sent by a "
        f"queue since lost; nothing was written",
    )


#: A job id: 32 lowercase hex digits (a uuid4's). Nothing else in :data:`CLAIMS_DIR` is a claim: a
#: transport's temp file of a claim upload cut off (rsync ``.<id>.<6 random characters>``, rclone
#: ``<id>.<hex>.partial``) names no job, and must never lock its own job out of its folder.
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def claim_markers(paths: Iterable[str]) -> set[str]:
    """The job ids named by claims among the remote run folder's regular files ``paths``."""
    prefix = CLAIMS_DIR + "/"
    return {path[len(prefix) :] for path in paths if path.startswith(prefix) and _JOB_ID.fullmatch(path[len(prefix) :])}


def claim_path(owner: str) -> str:
    """Where job ``owner`` claims a remote run folder, relative to it."""
    return f"{CLAIMS_DIR}/{owner}"


def claim_body(equipment_id: str, run: os.PathLike[str] | str) -> bytes:
    """What a claim file holds, for a person looking at the NAS: the equipment and the local run."""
    return f"{equipment_id} {os.fspath(run)}\n".encode(errors="surrogateescape")


def ownership_error(
    remote_run: str, *, claimed: Collection[str], markers: Collection[str], owner: str | None, fresh: bool
) -> TransportError | None:
    """``REMOTE_CONFLICT`` for a remote run folder that holds no verified manifest of this run and is not its; else None.

    ``markers``: the job ids claiming the folder (:func:`claim_markers`);
    ``owner``: this job's id (None: a caller that names no job, and claims
    are not looked at). Another job's claim makes the folder that job's.
    This job's own claim makes the files there its own (a push cut off).
    With neither, ``fresh`` decides (:func:`unclaimed_files_error`).
    """
    if owner is not None:
        others = sorted(m for m in markers if m != owner)
        if others:
            return TransportError(
                TransportErrorKind.REMOTE_CONFLICT,
                f"remote run folder {remote_run} is claimed by another job ({', '.join(others[:3])}"
                f"{' ...' if len(others) > 3 else ''}): its push wrote there first, and the folder holds no "
                f"verified manifest of this run; nothing was written",
            )
        if owner in markers:
            return None
    return unclaimed_files_error(remote_run, claimed) if fresh else None


def local_manifest_digest(run: os.PathLike[str] | str) -> str | None:
    """SHA-256 of the run's own ``checksums.sha256``; None when it has none (never followed through a symlink)."""
    try:
        return hash_file(os.path.join(run, NAS_MANIFEST))
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symlink, a folder, unreadable: not a manifest this run can vouch for
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM):
            return None
        raise


def foreign_copy_error(
    remote_run: str, *, theirs: str | None, own: Collection[str], local: str | None
) -> TransportError | None:
    """``REMOTE_CONFLICT`` when the remote run folder holds another run's verified copy; else None.

    ``theirs``: SHA-256 of the remote run folder's :data:`NAS_MANIFEST`
    (None: it has none). It is this run's when it is ``local``, the SHA-256
    of the run's own ``checksums.sha256`` (a run folder moved to a new disk,
    or a queue lost, carries its manifest with it), or one of ``own``, the
    manifests the run was verified with (the queue keeps the last whole, its
    events the first 12 hex digits of each).
    """
    if theirs is None or any(mine and theirs.startswith(mine) for mine in (*own, local)):
        return None
    return TransportError(
        TransportErrorKind.REMOTE_CONFLICT,
        f"remote run folder {remote_run} holds the verified copy of another run (its {NAS_MANIFEST} is not "
        f"one of this run's: two runs reach one NAS folder, e.g. names differing only in letter case on a "
        f"share that folds case, or two instrument PCs configured alike); nothing was written",
    )


async def check_owner(
    run: Path,
    remote_run: str,
    fetch: Callable[[Path, Collection[str], Path], Awaitable[Mapping[str, Path]]],
    own: Collection[str],
) -> None:
    """Raise :func:`foreign_copy_error`'s error for a remote run folder listed with a :data:`NAS_MANIFEST`.

    ``fetch``: how the transport reads the named files back, as the remote
    stores them, into a folder; ``own``: as there. Call it only when a
    listing showed the manifest: one
    that cannot be read now raises ``NETWORK`` (never taken for none).
    """
    with tempfile.TemporaryDirectory(prefix="exlab-owner-") as into:
        fetched = await fetch(run, [NAS_MANIFEST], Path(into))
        path = fetched.get(NAS_MANIFEST)
        if path is None:
            raise TransportError(
                TransportErrorKind.NETWORK,
                f"{remote_run}/{NAS_MANIFEST} is listed but could not be read; nothing was written",
            )
        theirs = await asyncio.to_thread(hash_file, path)
    local = await asyncio.to_thread(local_manifest_digest, run)
    error = foreign_copy_error(remote_run, theirs=theirs, own=own, local=local)
    if error is not None:
        raise error


def folded_name(name: str) -> str:
    """``name`` as a share that folds letter case and Unicode forms (SMB, exFAT, macOS) compares it."""
    return unicodedata.normalize("NFC", name).casefold()


def fold_twins(files: Iterable[str], dirs: Iterable[str] = ()) -> tuple[str, str] | None:
    """Two entries of the run (relative paths) in one folder whose names differ only in letter case or
    Unicode form, or None: two files, two folders (``Sub/``, ``sub/``: their files meet on the NAS), or a
    file and a folder. ``files`` lists each folder's files together (``scan_run``'s order), so one
    folder's file names are held at a time, beside every folder's (a few).
    """

    def fold(rel: str) -> tuple[str, str]:
        parent, _, name = rel.rpartition("/")
        return parent, folded_name(name)

    by_parent: dict[str, dict[str, str]] = {}  # folder -> its folders' folded names
    for rel in dirs:
        parent, folded = fold(rel)
        other = by_parent.setdefault(parent, {}).setdefault(folded, rel)
        if other != rel:
            return other, rel
    folder, seen = None, {}
    for rel in files:
        parent, folded = fold(rel)
        if parent != folder:
            folder, seen = parent, dict(by_parent.get(parent, {}))
        other = seen.setdefault(folded, rel)
        if other != rel:
            return other, rel
    return None


def fold_clash(
    local_files: Iterable[str], local_dirs: Iterable[str], remote_files: Iterable[str]
) -> tuple[str, str] | None:
    """A path of the run (file or folder) the remote folder does not hold by its name, and the remote entry of
    another spelling that a share folding letter case and Unicode forms takes for it: ``(ours, theirs)``, or None.

    ``remote_files``: the remote run folder's files (their folders are entries too). Shallowest first, so
    ``sub/A.tif`` against a NAS ``Sub/A.tif`` is the folders ``sub`` and ``Sub``.
    """
    remote = set(remote_files)
    if not remote:
        return None  # an empty (or new) remote folder holds no other spelling
    for rel in list(remote):
        parent = rel.rpartition("/")[0]
        while parent and parent not in remote:
            remote.add(parent)
            parent = parent.rpartition("/")[0]
    by_fold: dict[str, str] = {}
    for rel in sorted(remote, key=os.fsencode):
        by_fold.setdefault(_folded_path(rel), rel)
    # The shallowest path of the run the remote folder does not hold by its name that meets one.
    met = [rel for rel in {*local_dirs, *local_files} if rel not in remote and _folded_path(rel) in by_fold]
    if not met:
        return None
    ours = min(met, key=lambda p: (p.count("/"), os.fsencode(p)))
    return ours, by_fold[_folded_path(ours)]


def tree_fold_twins(files: Iterable[str], dirs: Iterable[str]) -> tuple[str, str] | None:
    """:func:`fold_twins` of a run's files and folders in any order (sorted here into the order it reads)."""
    in_folders = sorted(files, key=lambda rel: (rel.rpartition("/")[0], os.fsencode(rel)))
    return fold_twins(in_folders, sorted(dirs, key=lambda rel: rel.count("/")))


def clash_lookup(clash: tuple[str, str], remote_files: Collection[str]) -> str:
    """A remote file at or below ``theirs`` of :func:`fold_clash`'s answer, spelled as the run spells
    ``ours``: the name to ask the remote for (found: it folds names)."""
    ours, theirs = clash
    known = theirs if theirs in remote_files else min(p for p in remote_files if p.startswith(f"{theirs}/"))
    return ours + known[len(theirs) :]


def twins_refused(twins: tuple[str, str], *, where: str = "remote") -> TransportError:
    """``REMOTE_WRITE_REFUSED`` for two entries of the run a NAS that folds names takes for one."""
    return TransportError(
        TransportErrorKind.REMOTE_WRITE_REFUSED,
        f"the {where} takes {twins[0]!r} and {twins[1]!r} for one file (it ignores letter case or Unicode"
        " form): it cannot hold both files of this run; nothing was written, rename one of them",
    )


def clash_refused(clash: tuple[str, str]) -> TransportError:
    """``REMOTE_WRITE_REFUSED`` for a path of the run a NAS that folds names takes for its own other spelling."""
    ours, theirs = clash
    return TransportError(
        TransportErrorKind.REMOTE_WRITE_REFUSED,
        f"the remote takes {ours!r} for its {theirs!r} (it ignores letter case or Unicode form):"
        f" the run's {ours!r} would land on that copy; nothing was written, rename {ours!r}",
    )


def _folded_path(rel: str) -> str:
    return "/".join(folded_name(part) for part in rel.split("/"))
