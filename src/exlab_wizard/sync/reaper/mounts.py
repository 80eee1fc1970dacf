"""Mount points inside a run folder: the files below one are someone else's.

A folder mounted inside a run (``mount --bind /elsewhere <run>/sub``, a
disk mounted there) shows another folder's files under the run's names. A
bind mount changes no ctime and, on the same file system, shows the source
folder's own device and inode, so no stat of the run tells it from the run's
own folder: only the mount table does. The local check, the verified stats,
the deletion and ``restore`` refuse a run that holds one (the run folder
itself may be a mount point: that is where its files are).

:func:`mounts_inside` reads ``/proc/self/mountinfo`` once per call (a scan,
a deletion batch), never per file; where there is no such file (not Linux)
it finds nothing, and the callers' device check (a folder whose ``st_dev`` is
not the run folder's) still catches a mount of another file system.

:func:`mount_id` and :func:`mount_type` name the mount a descriptor is on
(``/proc/self/fdinfo``) and its file system type: a btrfs subvolume inside a
run has a device of its own but is on the run's own mount (see
:func:`~.nofollow.is_subvolume`). Blocking I/O.
"""

from __future__ import annotations

import os
from pathlib import Path

from exlab_wizard.fileio import MOUNTINFO, mountinfo, parse_mountinfo_lines
from exlab_wizard.sync.policy.cleanup import name_paths

__all__ = [
    "MOUNTINFO",
    "describe",
    "mount_id",
    "mount_points",
    "mount_refusal",
    "mount_type",
    "mounts_inside",
    "parse_mountinfo",
]


def parse_mountinfo(text: bytes) -> list[str]:
    """The mount point paths of a ``mountinfo`` file's text (field 5 of each line), unescaped, as ``os.fsdecode`` gives them."""
    return [os.fsdecode(entry.point) for entry in parse_mountinfo_lines(text)]


def mount_points(path: str = MOUNTINFO) -> list[str] | None:
    """Every mount point this process sees; None when the mount table cannot be read (not Linux)."""
    entries = mountinfo(path)
    return None if entries is None else [os.fsdecode(entry.point) for entry in entries]


def mount_id(fd: int) -> int | None:
    """The id of the mount the open file ``fd`` is on (``mnt_id`` of ``/proc/self/fdinfo``); None where not told."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as fh:
            for line in fh:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def mount_type(mnt_id: int, path: str = MOUNTINFO) -> str | None:
    """The file system type of mount ``mnt_id`` (field 1 of its ``mountinfo`` line); None when not listed."""
    entries = mountinfo(path) or []
    return next((os.fsdecode(entry.fstype) for entry in entries if entry.mount_id == mnt_id), None)


def mounts_inside(run_path: Path | str, points: list[str] | None = None) -> list[str]:
    """The mount points strictly inside the run folder, relative to it, sorted (the run's resolved path compared).

    ``points``: :func:`mount_points`' answer when the caller has it; read here otherwise.
    """
    if points is None:
        points = mount_points() or []
    real = os.path.realpath(run_path)
    prefix = real.rstrip("/") + "/"
    return sorted(
        {p[len(prefix) :].rstrip("/") for p in points if p.startswith(prefix) and p[len(prefix) :].strip("/")}
    )


def describe(inside: list[str]) -> str:
    """A refusal's sentence: ``run holds a mount point: sub``."""
    return f"run holds a mount point: {name_paths(inside)}"


def mount_refusal(run_path: Path | str) -> str | None:
    """``run holds a mount point: ...`` when the mount table names one inside the run, else None."""
    inside = mounts_inside(run_path)
    return describe(inside) if inside else None
