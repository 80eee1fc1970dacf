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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from typing import NamedTuple

from exlab_wizard.fileio import is_metadata_path
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind

__all__ = ["DIR", "FILE", "OTHER", "RemoteExtras", "conflict_error", "sort_remote"]

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
    """

    leftovers: list[str]
    foreign: list[str]


def _never(path: str, kind: str) -> str | None:
    return None


def sort_remote(
    local_files: Collection[str],
    local_dirs: Collection[str],
    remote: Mapping[str, str],
    cleaned: Collection[str] = frozenset(),
    *,
    leftover: Leftover = _never,
) -> RemoteExtras:
    """Split the remote run folder's entries into the transport's leftovers and foreign ones.

    ``local_files``/``local_dirs``: the run's regular files and folders;
    ``remote``: every remote entry (relative path -> :data:`FILE`,
    :data:`DIR` or :data:`OTHER`; a listing of files alone is fine). For each
    remote entry, in this order:

    - a folder is foreign where the run has a file, else fine;
    - a regular file where the run has one is ours (compared by the push);
    - the transport's own leftover (``leftover``) is to be removed;
    - anything where the run has a file or a folder (a symlink, a file in
      place of a folder) is foreign;
    - a file inside ``.exlab-wizard/``, or named in ``cleaned``, is ours;
    - anything else is foreign.
    """
    leftovers: set[str] = set()
    foreign: list[str] = []
    for path, kind in remote.items():
        if kind == DIR:
            if path in local_files:
                foreign.append(path + "/")
            continue
        if kind == FILE and path in local_files:
            continue
        junk = leftover(path, kind)
        if junk is not None:
            leftovers.add(junk)
        elif path in local_files or path in local_dirs or not (is_metadata_path(path) or path in cleaned):
            foreign.append(path)
    return RemoteExtras(sorted(leftovers), sorted(foreign, key=os.fsencode))


def conflict_error(remote_run: str, foreign: Collection[str]) -> TransportError:
    """The ``REMOTE_CONFLICT`` error naming the first few foreign entries."""
    names = sorted(foreign, key=os.fsencode)
    shown = ", ".join(repr(p) for p in names[:5]) + (" ..." if len(names) > 5 else "")
    return TransportError(
        TransportErrorKind.REMOTE_CONFLICT,
        f"remote run folder {remote_run} already holds {len(names)} entries that are not in this run "
        f"({shown}); nothing was written",
    )
