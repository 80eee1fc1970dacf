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
import re
from pathlib import Path

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

MOUNTINFO = "/proc/self/mountinfo"

_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> bytes:
    r"""The kernel writes a space, tab, newline and backslash of a mount point as ``\040``, ``\011``, ``\012``, ``\134``."""
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field)


def parse_mountinfo(text: bytes) -> list[str]:
    """The mount point paths of a ``mountinfo`` file's text (field 5 of each line), unescaped, as ``os.fsdecode`` gives them."""
    points: list[str] = []
    for line in text.splitlines():
        fields = line.split(b" ")
        if len(fields) >= 5 and fields[4]:
            points.append(os.fsdecode(_unescape(fields[4])))
    return points


def mount_points(mountinfo: str = MOUNTINFO) -> list[str] | None:
    """Every mount point this process sees; None when the mount table cannot be read (not Linux)."""
    try:
        with open(mountinfo, "rb") as fh:
            return parse_mountinfo(fh.read())
    except OSError:
        return None


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


def mount_type(mnt_id: int, mountinfo: str = MOUNTINFO) -> str | None:
    """The file system type of mount ``mnt_id`` (field 1 of its ``mountinfo`` line); None when not listed."""
    try:
        with open(mountinfo, "rb") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    wanted = str(mnt_id).encode()
    for line in lines:
        left, sep, right = line.partition(b" - ")
        if sep and left.split(b" ", 1)[0] == wanted:
            return os.fsdecode(right.split(b" ", 1)[0])
    return None


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
