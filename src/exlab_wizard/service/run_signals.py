"""What the completion watcher learns from the file system about runs.

Read-only functions, each cheap enough for where it is used:

- :func:`list_runs` lists the run folders of one equipment,
  ``<root>/<PROJECT>/Runs/<run>`` and ``<root>/<PROJECT>/TestRuns/<run>``:
  three levels of folder listings, never a walk into a run.
- :func:`completeness` says whether a run's completeness signal holds
  (``sentinel_file``: one ``lstat``; ``manifest``: read the run's manifest
  and ``lstat`` each listed file). Only for runs not yet handed to the queue.
- :func:`waiting_reason` puts the first two together for one run with no
  job: why the watcher does not enqueue it (``exlab-sync status RUN``).
- :func:`fingerprint` digests what the Pre-Sync Gate looks at in a run (a
  walk of its tree), so a blocked run is gated again only when it changed.

None of them follows a symbolic link below the equipment folder (which may
itself be a link to a data disk) or opens anything but a regular file.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exlab_wizard.cache import CacheError
from exlab_wizard.cache.atomic import read_regular_file
from exlab_wizard.cache.creation import CREATION_MAX_BYTES, CREATION_NAME
from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.fileio import METADATA_DIR

__all__ = [
    "MANIFEST_MAX_BYTES",
    "MODE_FOLDERS",
    "Completeness",
    "RunListing",
    "completeness",
    "fingerprint",
    "list_runs",
    "waiting_reason",
]

#: The largest run manifest read (a run of 100,000 files lists in well under this).
MANIFEST_MAX_BYTES = 32 * 1024 * 1024
#: The folders of a project that hold runs (experimental, test).
MODE_FOLDERS = ("Runs", "TestRuns")


@dataclass
class RunListing:
    """The run folders found under one equipment root.

    ``runs``: absolute paths, sorted. ``unlisted``: folders that exist but
    could not be listed (permissions, I/O); runs known under them must not be
    taken as gone. ``root_missing``: the equipment root is absent or not a
    folder (an unmounted disk is not an empty one).
    """

    runs: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    root_missing: bool = False

    def may_hold(self, run: str) -> bool:
        """Could ``run`` be under a folder this listing could not see?"""
        return self.root_missing or any(run.startswith(folder + os.sep) for folder in self.unlisted)


def _real_folders(folder: str, listing: RunListing) -> list[tuple[str, str]] | None:
    """(name, path) of the sub-folders of ``folder`` that are not symbolic links."""
    try:
        with os.scandir(folder) as it:
            return [(e.name, e.path) for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return None
    except OSError:
        listing.unlisted.append(folder)
        return None


def list_runs(equipment_root: Path | str) -> RunListing:
    """The run folders under ``equipment_root`` (see :class:`RunListing`).

    A run is a folder directly in a project's ``Runs`` or ``TestRuns``
    folder whose name does not start with a dot -- the same rule as
    :meth:`Validator.find_runs`, so a misnamed run (``Runs/TestRun_x``) is
    found and the gate reports it. Unlike ``find_runs`` it does not search
    other folders for runs declared by their creation.json: it lists exactly
    three levels (projects, mode folders, runs), so a pass costs one listing
    per project and mode folder whatever lies elsewhere under the root.
    Symbolic links (to a project, a mode folder or a run) are never followed;
    ``equipment_root`` itself may be one (to the instrument's data disk).
    """
    root = os.path.abspath(os.fspath(equipment_root))
    listing = RunListing()
    try:
        # A link at the equipment folder itself is followed (a data disk linked in as <local_root>/<id>),
        # as the config loader, enqueue and the reaper follow it; never one below it.
        if not stat.S_ISDIR(os.stat(root).st_mode):
            listing.root_missing = True
            return listing
    except OSError:
        listing.root_missing = True
        return listing
    projects = _real_folders(root, listing)
    if projects is None:
        listing.root_missing = root not in listing.unlisted
        return listing
    for name, project in projects:
        if name == METADATA_DIR:
            continue
        modes = _real_folders(project, listing) or []
        for mode_name, mode in modes:
            if mode_name not in MODE_FOLDERS:
                continue
            for run_name, run in _real_folders(mode, listing) or []:
                if not run_name.startswith("."):
                    listing.runs.append(run)
    listing.runs.sort()
    return listing


@dataclass(frozen=True)
class Completeness:
    """Whether a run's completeness signal holds; ``reason`` says why not, in words."""

    complete: bool
    reason: str = ""


def _sentinel(run: str, name: str) -> Completeness:
    path = os.path.join(run, name)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return Completeness(False, f"waiting for the sentinel file {name}")
    except OSError as exc:
        return Completeness(False, f"cannot look at the sentinel file {name}: {exc.strerror or exc}")
    if not stat.S_ISREG(mode):
        return Completeness(False, f"the sentinel {name} is not a regular file")
    return Completeness(True)


def _manifest_entries(raw: Any, name: str) -> list[tuple[str, int]] | str:
    """The (path, size) entries of a parsed manifest, or the reason it is malformed."""
    if not isinstance(raw, dict) or not isinstance(raw.get("files"), list):
        return f'malformed manifest {name}: expected an object with a "files" list'
    entries: list[tuple[str, int]] = []
    for index, item in enumerate(raw["files"]):
        if not isinstance(item, dict):
            return f"malformed manifest {name}: files[{index}] is not an object"
        path, size = item.get("path"), item.get("size")
        if not isinstance(path, str) or not path:
            return f"malformed manifest {name}: files[{index}].path must be a non-empty string"
        parts = path.split("/")
        if path.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\0" in path:
            return f"malformed manifest {name}: files[{index}].path {path!r} is not a relative path inside the run"
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"malformed manifest {name}: files[{index}].size must be a whole number of bytes"
        entries.append((path, size))
    return entries


def _listed_file(run: str, rel: str, size: int, folders: dict[str, bool]) -> str | None:
    """Why the listed file ``rel`` is not yet there as listed, or None when it is."""
    parts = rel.split("/")
    current = run
    for part in parts[:-1]:  # every folder on the way: a real folder, never a link
        current = os.path.join(current, part)
        ok = folders.get(current)
        if ok is None:
            try:
                ok = folders[current] = stat.S_ISDIR(os.lstat(current).st_mode)
            except OSError:
                ok = folders[current] = False
        if not ok:
            return f"waiting for {rel} (its folder is missing or not a folder)"
    try:
        info = os.lstat(os.path.join(current, parts[-1]))
    except FileNotFoundError:
        return f"waiting for {rel} (missing)"
    except OSError as exc:
        return f"cannot look at {rel}: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return f"{rel} is not a regular file"
    if info.st_size != size:
        return f"waiting for {rel} ({info.st_size} of {size} bytes)"
    return None


def _manifest(run: str, name: str) -> Completeness:
    try:
        data = read_regular_file(Path(run, name), MANIFEST_MAX_BYTES)
    except CacheError as exc:
        return Completeness(False, f"cannot use the manifest {name}: {exc.message}")
    if data is None:
        return Completeness(False, f"waiting for the manifest {name}")
    try:
        raw = json.loads(data.removeprefix(b"\xef\xbb\xbf"))
    except (ValueError, RecursionError) as exc:
        return Completeness(False, f"malformed manifest {name}: not valid JSON ({exc})")
    entries = _manifest_entries(raw, name)
    if isinstance(entries, str):
        return Completeness(False, entries)
    folders: dict[str, bool] = {}
    for rel, size in entries:
        reason = _listed_file(run, rel, size, folders)
        if reason is not None:
            return Completeness(False, reason)
    return Completeness(True)


def completeness(equipment: EquipmentConfig, run_path: Path | str) -> Completeness:
    """Does the run's completeness signal (``equipment.completeness_signal``) hold now?

    ``sentinel_file``: ``<run>/<sentinel_filename>`` is a regular file.
    ``manifest``: ``<run>/<manifest_filename>`` is a regular file of at most
    :data:`MANIFEST_MAX_BYTES`, JSON ``{"files": [{"path", "size"}, ...]}``,
    and every listed path (relative, ``/``-separated, inside the run, no
    folder on the way a symbolic link) is a regular file of exactly the
    listed size; an empty list holds. ``none``: never holds. Never raises
    for what it finds on disk: a missing, unreadable or malformed signal is a
    ``Completeness(False, reason)``.
    """
    run = os.path.abspath(os.fspath(run_path))
    signal = equipment.completeness_signal
    if signal == "sentinel_file":
        return _sentinel(run, equipment.sentinel_filename)
    if signal == "manifest":
        return _manifest(run, equipment.manifest_filename)
    return Completeness(False, "completeness_signal is none: enqueue by hand")


def waiting_reason(equipment: EquipmentConfig, run_path: Path | str) -> str | None:
    """Why the completion watcher does not enqueue this run (yet), in words; None when it would.

    What ``GET /api/watcher`` shows under ``incomplete`` for a run with no
    job, computed here without a running service: :func:`completeness`'s
    reason for a run :func:`list_runs` lists under the equipment's root (the
    watcher looks at no other folder), including ``completeness_signal is
    none`` (the watcher never enqueues those runs). None for any other
    folder, or when the signal holds.
    """
    run = os.path.abspath(os.fspath(run_path))
    if run not in list_runs(equipment.equipment_root).runs:
        return None
    check = completeness(equipment, run)
    return None if check.complete else check.reason


def _creation_digest(run: str) -> str:
    """creation.json's content without ``sync_status`` (which the gate itself writes)."""
    try:
        data = read_regular_file(Path(run, METADATA_DIR, CREATION_NAME), CREATION_MAX_BYTES)
    except CacheError as exc:
        return f"unusable:{exc.kind.value}"
    if data is None:
        return "absent"
    try:
        raw = json.loads(data.removeprefix(b"\xef\xbb\xbf"))
    except (ValueError, RecursionError):
        raw = None
    if isinstance(raw, dict):
        raw = {key: value for key, value in raw.items() if key != "sync_status"}
        data = json.dumps(raw, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def _skip_in_metadata(name: str) -> bool:
    # creation.json is digested by content; its lock and the writer's temp files
    # come and go with every write, including the gate's own.
    return (
        name == CREATION_NAME
        or name == CREATION_NAME + ".lock"
        or (name.startswith("." + CREATION_NAME + ".") and name.endswith(".tmp"))
    )


def fingerprint(run_path: Path | str, extra: Mapping[str, Any] | None = None) -> str:
    """A digest of what the gate judges in a run; it changes when any of it changes.

    Covers every name in the run's tree with its kind, and for each
    non-folder its size, modification and change times and inode (a rename,
    an edit, a new or deleted file all change it), plus creation.json's
    content without ``sync_status`` (an override added or revoked changes it;
    the gate recording a block does not). ``extra`` (JSON-ready) is mixed in:
    the validator settings, so a new configuration re-checks blocked runs.
    Walks the whole run without following symbolic links; a folder that
    cannot be listed counts by its error.
    """
    run = os.path.abspath(os.fspath(run_path))
    digest = hashlib.sha256()
    digest.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    digest.update(b"\0creation\0" + _creation_digest(run).encode())
    stack = [(run, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            digest.update(f"\0unlisted\0{rel}\0{exc.errno}".encode())
            continue
        for entry in entries:
            name = entry.name
            if rel == METADATA_DIR + "/" and _skip_in_metadata(name):
                continue
            key = (rel + name).encode("utf-8", "surrogateescape")
            if entry.is_dir(follow_symlinks=False):
                digest.update(b"\0d\0" + key)
                stack.append((entry.path, rel + name + "/"))
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                digest.update(b"\0gone\0" + key)
                continue
            digest.update(
                b"\0f\0"
                + key
                + f"\0{stat.S_IFMT(info.st_mode)}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ctime_ns}\0{info.st_ino}".encode()
            )
    return digest.hexdigest()
