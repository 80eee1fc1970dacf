"""Which run paths the HTTP API accepts: absolute, inside a configured equipment's root, for real.

A path is refused (:class:`OutsideRoots`, HTTP 400) when it is relative, holds
a ``..`` segment, or is not inside any ``<local_root>/<id>`` -- both as
written and once every symbolic link in it is resolved, so a link that
points out of the lab's folders never lets the API touch what it points at.
A path the file system refuses to look at (a segment longer than 255 bytes,
a loop of links, a folder that may not be searched) is refused the same way:
its links cannot be resolved, so it cannot be shown to be inside a root.
The root check is :meth:`Config.equipment_holding`, the one ``enqueue`` makes.
A path that does not exist is let through: the routes answer 422 (not a run).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from exlab_wizard.config.models import Config, EquipmentConfig, RunOutsideRoots

__all__ = ["OutsideRoots", "resolve_run_path"]


class OutsideRoots(ValueError):
    """The path is not inside any configured equipment root."""


#: What ``lstat`` says of a path that is only absent (the routes answer 422: not a run folder).
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR})


def _lookable(written: str, text: str) -> None:
    """:class:`OutsideRoots` when the file system refuses to look at ``written`` (realpath does not say)."""
    try:
        os.lstat(written)
    except OSError as exc:
        if exc.errno not in _ABSENT:
            raise OutsideRoots(f"{text} cannot be checked against the roots: {exc.strerror or exc}") from None


def resolve_run_path(config: Config, text: str) -> tuple[Path, EquipmentConfig]:
    """The run path (as written, normalised) and its equipment; :class:`OutsideRoots` otherwise."""
    if "\x00" in text:
        raise OutsideRoots("the path holds a NUL character")
    if not os.path.isabs(text):
        raise OutsideRoots(f"{text!r} is not an absolute path")
    if ".." in Path(text).parts:
        raise OutsideRoots(f"{text!r} holds a '..' segment")
    written = os.path.normpath(text)
    try:
        _, equipment = config.equipment_holding(written, strict=True)  # the CLI's and the workers' check, and more
    except RunOutsideRoots as exc:
        raise OutsideRoots(str(exc)) from None
    _lookable(written, text)
    return Path(written), equipment
