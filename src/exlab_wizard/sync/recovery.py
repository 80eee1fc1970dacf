"""Local damage: the check before every transfer, and the two ways out of it.

A run with a verified manifest (the job's ``manifest_digest`` and the
recorded ``checksums.sha256`` agree) may hold a file whose bytes differ from
the manifest while its size and mtime are the ones recorded at verification:
local damage (bit rot, a bad disk, a tool writing behind the filesystem's
back). Such bytes are never sent over the good NAS copy. The classification
is the reaper's (:func:`exlab_wizard.sync.reaper.scan_run`): a file whose
recorded stat is lost counts as edited only when its mtime is after the
verification, otherwise as damaged.

- :func:`find_damage` is run by the client before every transfer of such a
  run (retry, re-enqueue, audit, mismatch rewrite all pass through it).
- :func:`check_nas_copy` stands in for it when the queue holds no verified
  manifest of the run (lost, or restored from before the verification): the
  run's own ``checksums.sha256``, when its NAS folder holds the same one,
  and the NAS copies' sizes and mtimes in place of the recorded stats.
- :func:`restore_damaged` copies the verified bytes back from the NAS:
  fetched into a scratch folder inside the run, each checked against the
  manifest, given the recorded mtime, fsynced, then renamed over the damaged
  file, whose bytes are kept first under ``.exlab-wizard/replaced/<stamp>/``
  (:data:`REPLACED_DIR`). A NAS copy that does not match the manifest is not
  restored.
- ``retry --accept-local`` (:func:`rearm`) makes the local bytes the new
  truth; the transport's ``keep_previous`` keeps the replaced NAS files.
- :func:`restore` and :func:`rearm` are the client's ``restore`` and
  ``retry``: they check, act and record the outcome on the job.

Usage::

    damaged = find_damage(queue, job)          # () when nothing is damaged
    if damaged:
        raise LocalDamageError(job.id, job.run_path, damaged)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import re
import secrets
import shlex
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exlab_wizard.cache.atomic import CacheError, read_regular_file
from exlab_wizard.config import EquipmentConfig
from exlab_wizard.config.models import RunOutsideRoots
from exlab_wizard.fileio import METADATA_DIR, fsync_dir, hash_file, is_data_path
from exlab_wizard.sync.context import ClientContext
from exlab_wizard.sync.failures import FailureKind
from exlab_wizard.sync.manifest_format import (
    MANIFEST_MAX_BYTES,
    ManifestFormatError,
    has_digest,
    manifest_digest,
    manifest_path,
    parse_manifest,
    read_manifest_and_digest,
)
from exlab_wizard.sync.policy.cleanup import LocalCheck, name_paths
from exlab_wizard.sync.queue import TRANSITION_EVENT, JobQueue, SyncJobRow
from exlab_wizard.sync.reaper import (
    check_against_copy,
    cleanup_planned,
    load_verified_stats,
    mount_refusal,
    record_copy_stats,
    scan_run,
)
from exlab_wizard.sync.remote import RemoteAccess
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import (
    PREVIOUS_DIR,
    Transport,
    TransportError,
    TransportErrorKind,
    previous_stamps,
)
from exlab_wizard.sync.transports.conflict import NAS_MANIFEST
from exlab_wizard.sync.verifier import scan_run as list_run

__all__ = [
    "LOCAL_DAMAGE",
    "PREVIOUS_KEPT_EVENT",
    "PREVIOUS_RESERVED_EVENT",
    "REPLACED_DIR",
    "LocalDamageError",
    "NasCopyCheck",
    "RestoreError",
    "RestoreResult",
    "RunFolderMissingError",
    "RunIncompleteError",
    "adopt_nas_copy",
    "check_local",
    "check_nas_copy",
    "cleaned_here",
    "damage_message",
    "damage_ways_out",
    "find_damage",
    "missing_message",
    "nas_copy_place",
    "new_previous_stamp",
    "previous_stamp",
    "used_previous_stamps",
    "rearm",
    "refuse_local_damage",
    "restore",
    "restore_damaged",
    "restore_detail",
    "verified_manifest",
]

LOCAL_DAMAGE = FailureKind.LOCAL_DAMAGE
S = SyncJobState
_SCRATCH_PREFIX = ".restore-"
#: Where ``restore`` keeps the local bytes it replaces (``<stamp>/<relative path>``): never data,
#: pushed with ``.exlab-wizard/`` (so a cleanup removes them only once proved on the NAS), never
#: deleted by the engine otherwise.
REPLACED_DIR = f"{METADATA_DIR}/replaced"


class LocalDamageError(Exception):
    """The run holds local damage: the job is not re-armed into a transfer.

    ``kind`` is ``"local_damage"``; ``paths`` the damaged files (relative to
    the run). The message names the two ways out: ``exlab-sync restore`` and
    ``exlab-sync retry --accept-local``.
    """

    kind = LOCAL_DAMAGE

    def __init__(self, job_id: str, run_path: str, paths: Sequence[str]):
        self.job_id = job_id
        self.run_path = run_path
        self.paths = tuple(paths)
        super().__init__(damage_message(job_id, run_path, self.paths))


class RunFolderMissingError(Exception):
    """``retry`` of a job FAILED ``run_folder_missing`` whose run folder is still not there: not re-armed.

    ``kind`` is ``"run_folder_missing"``. Re-armed, the transfer would only
    fail again (``local_file_vanished``) and lose the reason.
    """

    kind = FailureKind.RUN_FOLDER_MISSING

    def __init__(self, job_id: str, run_path: str):
        self.job_id = job_id
        self.run_path = run_path
        super().__init__(
            f"job {job_id}: the run folder {run_path} is still missing; put it back where it was, then retry"
        )


class RunIncompleteError(Exception):
    """``retry`` of a job whose cleanup stopped part way: the files it deleted cannot all be put back; not re-armed.

    ``kind`` is ``"run_incomplete"``. Re-armed without them, the push would
    take their NAS copies for another's files (``remote_conflict``), and the
    verification could not pass. ``paths``: the files not put back.
    """

    kind = "run_incomplete"

    def __init__(self, job_id: str, run_path: str, why: str, paths: Sequence[str] = ()):
        self.job_id = job_id
        self.run_path = run_path
        self.paths = tuple(paths)
        super().__init__(f"job {job_id}: {why}; the job stays failed")


class RestoreError(Exception):
    """``restore`` could not run at all; nothing was changed.

    ``kind``: ``no_job``, ``no_verified_manifest``, ``busy`` (a transfer is in
    flight, or another restore of the run), ``cleaned`` (the local files were deleted once verified: the
    message names the NAS copy to copy back from), ``unreachable`` (the NAS cannot be reached now), ``mount_point``
    (a folder is mounted inside the run: its files are another folder's, never
    written through), ``linked_away`` (a symbolic link on the run's path leads
    into another equipment's folder or out of every one: never written through).
    """

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True)
class RestoreResult:
    """What ``restore`` did.

    ``restored``: files whose verified bytes are back. ``refused``: damaged
    files left as they are, with the reason (the NAS copy does not match the
    manifest, is not on the NAS, or the local file changed meanwhile).
    ``state``: the job's state afterwards. ``kept``: for each damaged file
    restored, where its replaced local bytes are now (relative to the run,
    under :data:`REPLACED_DIR`).
    """

    job_id: str
    run_path: str
    restored: tuple[str, ...] = ()
    refused: Mapping[str, str] = field(default_factory=dict)
    state: SyncJobState | None = None
    kept: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.refused


def damage_message(job_id: str, run_path: str, paths: Sequence[str]) -> str:
    """The one-line reason for a ``local_damage`` failure, naming the files and the ways out."""
    return (
        f"local damage (content differs from the verified copy or cannot be read, mtime not moved on by an edit): "
        f"{name_paths(list(paths))}; nothing sent. " + damage_ways_out(job_id, run_path)
    )


def damage_ways_out(job_id: str, run_path: str) -> str:
    """The two commands that end a ``local_damage`` failure, as one sentence."""
    return (
        f"`exlab-sync restore {shlex.quote(run_path)}` brings the verified bytes back from the NAS "
        f"(the local ones kept under {REPLACED_DIR}/), "
        f"`exlab-sync retry --accept-local {job_id}` sends the local bytes as the new truth "
        f"(the NAS keeps the replaced files under {PREVIOUS_DIR}/); a file saved just before a power cut, or "
        f"written through a memory map, can look damaged so: accept it if its new bytes are wanted"
    )


#: the event a transfer records once it has kept NAS copies under ``previous/<stamp>/``
PREVIOUS_KEPT_EVENT = "previous_kept"
#: A folder ``previous/<stamp>/`` reserved for the NAS files a push replaces (its detail names it).
PREVIOUS_RESERVED_EVENT = "previous_reserved"


def previous_stamp(now: dt.datetime) -> str:
    """The ``previous/<stamp>/`` folder name for an accept-local decided at ``now`` (UTC)."""
    return now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def new_previous_stamp(queue: JobQueue, job: SyncJobRow, now: dt.datetime, on_nas: Iterable[str] = ()) -> str:
    """A ``previous/<stamp>/`` for a new round of kept NAS copies: ``now``, or later than every stamp the job used.

    A round never shares its folder with an earlier one: a keep finding its
    file already under the stamp takes it as kept by its own round (a retry)
    and leaves the NAS file in place, so two rounds within one second would
    let the second one's verified copy be overwritten. The stamps used are
    the ones the job's ``previous_kept`` and ``previous_reserved`` events name,
    and, for an event that names none, its time (a stamp is chosen at or
    before its round's first such event). A stamp may lie ahead of its event's
    time (it was itself pushed one second past an earlier one): the event's
    time alone, plus one second, can fall within that very stamp's second.
    And later than every stamp ``on_nas`` (a listing of the NAS run folder)
    shows: a job that lost its queue, or a new job on an old NAS folder, names
    none of the rounds kept there, and a clock set back can be at their second.
    """
    latest = now
    for stamp in previous_stamps(on_nas):
        latest = max(latest, _stamp_time(stamp) + dt.timedelta(seconds=1))
    for event in queue.events(job.id):
        if event.kind not in (PREVIOUS_KEPT_EVENT, PREVIOUS_RESERVED_EVENT):
            continue
        named = _NAMED_STAMP.search(event.detail or "")
        used = event.at if named is None else _stamp_time(named.group(1))
        latest = max(latest, used + dt.timedelta(seconds=1))
    return previous_stamp(latest)


def used_previous_stamps(queue: JobQueue, job: SyncJobRow) -> set[str]:
    """The stamps the job's ``previous_kept`` and ``previous_reserved`` events name: folders its own rounds made."""
    used: set[str] = set()
    for event in queue.events(job.id):
        if event.kind in (PREVIOUS_KEPT_EVENT, PREVIOUS_RESERVED_EVENT):
            named = _NAMED_STAMP.search(event.detail or "")
            if named is not None:
                used.add(named.group(1))
    return used


#: The stamp an event's detail names: ``.../previous/<stamp>/...``.
_NAMED_STAMP = re.compile(rf"{re.escape(PREVIOUS_DIR)}/([0-9]{{8}}T[0-9]{{6}}Z)/")


def _stamp_time(stamp: str) -> dt.datetime:
    return dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)


def verified_manifest(job: SyncJobRow, queue: JobQueue | None = None) -> dict[str, str] | None:
    """The run's verified manifest (data files only), or None when the run has none.

    Verified means: the job records a manifest digest and the run's
    ``checksums.sha256`` has that digest (:func:`has_digest`: its bytes, or
    its entries rendered). When that file is gone or altered,
    the SHA-256 of each file recorded in the queue at verification (given
    ``queue``) stand in for it, if together they have the job's digest: the
    verified truth outlives a deleted or edited ``checksums.sha256``.
    Blocking I/O.
    """
    if not job.manifest_digest:
        return None
    try:
        recorded = read_manifest_and_digest(Path(job.run_path))
    except (ManifestFormatError, OSError):
        recorded = None
    manifest = None
    if recorded is not None and has_digest(recorded[0], job.manifest_digest, file_sha256=recorded[1]):
        manifest = recorded[0]
    elif queue is not None:
        manifest = _recorded_manifest(queue, job)
    if manifest is None:
        return None
    return {k: v for k, v in manifest.items() if is_data_path(k)}


def _recorded_manifest(queue: JobQueue, job: SyncJobRow) -> dict[str, str] | None:
    """The per-file SHA-256 recorded at verification, when they are exactly the job's manifest."""
    recorded = {rel: rec.sha256.lower() for rel, rec in load_verified_stats(queue, job.id).items()}
    # None (the record is lost) unless they are the job's digest; ``{}`` is when the verified manifest was empty.
    if not has_digest(recorded, job.manifest_digest):
        return None
    return recorded


def _verified_since(queue: JobQueue, job: SyncJobRow) -> dt.datetime | None:
    """When the current manifest was verified: ``verified_at``, else the last move to VERIFIED.

    A re-queue clears ``verified_at``; the event trail still says when the
    manifest on disk was verified, which is what tells an edit (newer mtime)
    from damage when the per-file stats are lost.
    """
    if job.verified_at is not None:
        return job.verified_at
    for event in reversed(queue.events(job.id)):
        if event.kind == TRANSITION_EVENT and event.to_state == SyncJobState.VERIFIED.value:
            return event.at
    return None


def check_local(queue: JobQueue, job: SyncJobRow, manifest: Mapping[str, str] | None = None) -> LocalCheck | None:
    """The reaper's local check of a run with a verified manifest; None without one. Blocking I/O.

    ``manifest``: the verified manifest when the caller has it already (data files only). An
    empty one (a run verified with no data files) is checked too: every data file found is added.
    """
    if manifest is None:
        manifest = verified_manifest(job, queue)
    if manifest is None:
        return None
    scan = scan_run(job.run_path, manifest, load_verified_stats(queue, job.id), verified_at=_verified_since(queue, job))
    return scan.check


def find_damage(queue: JobQueue, job: SyncJobRow) -> tuple[str, ...]:
    """The run's locally damaged files (sorted), () when none or the run has no verified manifest.

    A run folder that cannot be checked (gone, a symlink, unreadable) gives
    (): the transfer then fails on its own. Blocking I/O: re-hashes the
    files whose stat differs from the one recorded at verification.
    """
    check = check_local(queue, job)
    return () if check is None else tuple(check.damaged)


# --------------------------------------------------------------------------- no verified manifest in the queue


@dataclass(frozen=True)
class NasCopyCheck:
    """:func:`check_nas_copy`'s answer: the run's verified copy on the NAS, and the local files damaged against it.

    ``digest``: the manifest digest of the run's ``checksums.sha256``, which
    the NAS folder holds byte for byte; ``manifest``: its data files;
    ``damaged``: the local files whose bytes differ from it while their mtime
    is not later than their NAS copy's; ``rows``: the stats the NAS copies
    vouch for (:func:`~exlab_wizard.sync.reaper.check_against_copy`);
    ``missing``: its files the NAS holds and the run lacks.
    """

    digest: str
    manifest: Mapping[str, str]
    damaged: tuple[str, ...]
    rows: Mapping[str, Any]
    #: the manifest's files the NAS folder holds and the run does not (a cleanup, whole or stopped part way)
    missing: tuple[str, ...] = ()


async def check_nas_copy(
    run: Path, remote: RemoteAccess, verified: tuple[str, Mapping[str, str]] | None = None
) -> NasCopyCheck | None:
    """The local check of a run against its verified NAS copy, for a queue that holds no verified manifest of it
    (or one of files gone locally: a cleanup the queue does not know of).

    The run's own ``.exlab-wizard/checksums.sha256`` says which bytes were
    verified, when its NAS folder holds the very same file (the run's own
    verified copy, as the push itself recognises it); else ``verified`` (the
    job's manifest digest and its data files), when the NAS's
    ``checksums.sha256`` has that digest. The NAS copies' sizes and mtimes
    stand in for the stats the lost queue recorded. None when neither holds
    (nothing verified there to protect: the push's own checks apply). Raises
    ``TransportError`` (``NETWORK`` for a manifest listed that cannot be read:
    never taken for none). Reads only; hashes only the local files whose
    mtime is not later than their copy's.
    """
    try:
        raw = await asyncio.to_thread(read_regular_file, manifest_path(run), MANIFEST_MAX_BYTES)
        listed = parse_manifest(raw) if raw is not None else None
    except (CacheError, ManifestFormatError, OSError):
        raw = listed = None
    manifest = {rel: sha.lower() for rel, sha in (listed or {}).items() if is_data_path(rel)}
    if (raw is None or not manifest) and not (verified and verified[1]):
        return None
    copies = await remote.stats(run)
    if NAS_MANIFEST not in copies:
        return None
    with tempfile.TemporaryDirectory(prefix="exlab-nas-manifest-") as into:
        fetched = (await remote.fetch(run, [NAS_MANIFEST], Path(into))).get(NAS_MANIFEST)
        if fetched is None:
            raise TransportError(
                TransportErrorKind.NETWORK, f"the NAS copy's {NAS_MANIFEST} is listed but could not be read"
            )
        try:
            theirs_raw = await asyncio.to_thread(read_regular_file, fetched, MANIFEST_MAX_BYTES)
        except CacheError:
            return None  # not a manifest this engine wrote
    if theirs_raw is None:
        return None
    theirs = hashlib.sha256(theirs_raw).hexdigest()
    if raw is not None and manifest and theirs == hashlib.sha256(raw).hexdigest():
        digest = manifest_digest(listed or {})
    elif verified and verified[1] and _has_digest_bytes(theirs_raw, verified[0], theirs):
        digest, manifest = verified[0], dict(verified[1])
    else:
        return None
    damaged, rows = await asyncio.to_thread(check_against_copy, run, manifest, copies)
    missing = await asyncio.to_thread(_lacked, run, [rel for rel in manifest if rel in copies])
    return NasCopyCheck(digest, manifest, damaged, rows, missing)


def _has_digest_bytes(raw: bytes, digest: str, file_sha256: str) -> bool:
    """Is ``raw`` (a NAS copy's ``checksums.sha256``) the manifest of ``digest``?"""
    try:
        return has_digest(parse_manifest(raw), digest, file_sha256=file_sha256)
    except ManifestFormatError:
        return False


def _lacked(run: Path, paths: Iterable[str]) -> tuple[str, ...]:
    """The ``paths`` nothing is at in ``run`` (sorted). Blocking I/O."""
    return tuple(sorted((rel for rel in paths if not os.path.lexists(run / rel)), key=os.fsencode))


def cleaned_here(run: Path, found: NasCopyCheck, writer: Any) -> bool:
    """Was the run cleaned, its verified copy being ``found`` on the NAS? Blocking I/O.

    True when every file of the manifest is on the NAS and none is here, no
    data file is left in the run, and its ``creation.json`` records the
    reaper's ``local_cleaned`` of that very manifest (``writer``: a
    ``CreationWriter``). For a run cleaned while its queue was lost, or put
    back since from a backup taken before the cleanup.
    """
    if not found.manifest or set(found.missing) != set(found.manifest):
        return False
    try:
        if any(not e.is_dir and is_data_path(e.rel) for e in list_run(run)):
            return False
        record = writer.read(run)
    except (OSError, CacheError):
        return False
    cleaned = record.get("local_cleaned") if record is not None else None
    return isinstance(cleaned, Mapping) and cleaned.get("manifest_digest") == found.digest


def missing_message(job_id: str, run_path: str, paths: Sequence[str]) -> str:
    """The one-line reason for a job whose run lacks files of its verified NAS copy (the queue lost, or older)."""
    return (
        f"{len(paths)} file(s) of the run's verified checksums.sha256 (its NAS folder holds the same) are gone "
        f"locally, their NAS copies there (a cleanup stopped part way, or deleted by mistake): "
        f"{name_paths(list(paths))}; nothing sent. `exlab-sync restore {shlex.quote(run_path)}` brings them back "
        f"from the NAS and re-arms job {job_id}"
    )


def adopt_nas_copy(queue: JobQueue, job: SyncJobRow, found: NasCopyCheck, now: dt.datetime) -> SyncJobRow:
    """Make the run's verified NAS copy the job's verified manifest (``manifest_digest``, the copies' stats).

    For a job about to fail ``local_damage`` on :func:`check_nas_copy`'s
    answer: ``retry`` and ``enqueue`` then refuse it while the damage is
    there, ``restore`` brings the verified bytes back, ``retry
    --accept-local`` sends the local ones keeping the NAS copies, as for a run
    this queue verified. ``verified_at`` stays unset: this queue verified
    nothing, and a restored run is transferred and verified again.
    """
    record_copy_stats(queue, job.id, found.manifest, found.rows, now)
    return queue.update(
        job.id,
        job.state,
        now=now,
        event_kind="note",
        detail=f"the run's checksums.sha256 (manifest {found.digest[:12]}), which its NAS folder holds too, is the "
        f"job's verified manifest now (the queue's: {(job.manifest_digest or '')[:12] or 'none'})",
        manifest_digest=found.digest,
    )


# --------------------------------------------------------------------------- restore


@dataclass(frozen=True)
class _Seen:
    size: int
    mtime_ns: int
    atime_ns: int = field(compare=False)  # a reader elsewhere may move it: not a change
    ino: int = 0
    mode: int = 0


def _lstat(path: Path) -> _Seen | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return _Seen(st.st_size, st.st_mtime_ns, st.st_atime_ns, st.st_ino, st.st_mode)


def _put_back(fetched: Path, target: Path, seen: _Seen, mtime_ns: int) -> None:
    """Give the checked copy the damaged file's mode and the recorded mtime, then rename it over the file."""
    os.chmod(fetched, stat.S_IMODE(seen.mode))
    os.utime(fetched, ns=(seen.atime_ns, mtime_ns))
    _fsync_file(fetched)  # its bytes, mode and mtime, before the rename makes it the run's file
    os.replace(fetched, target)
    fsync_dir(target.parent)


def _keep_local(run: Path, target: Path, kept: str, seen: _Seen) -> None:
    """Keep the bytes of the damaged file ``target`` at ``run/kept`` (``seen``: its stat) before they are replaced.

    A hard link (same inode: whatever the file holds until the rename is
    kept), else, where the filesystem has none, a copy with its mtime, made
    durable. The folders on the way are made, never followed through a
    symlink; nothing there is ever overwritten. Raises ``OSError`` when the
    bytes cannot be kept: the file is then not restored.
    """
    *parts, name = kept.split("/")
    folder = run
    for part in parts:
        folder = folder / part
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                raise NotADirectoryError(f"{folder} is not a folder") from None
        else:
            fsync_dir(folder.parent)
    dest = folder / name
    try:
        os.link(target, dest, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, exFAT, some shares): a copy
        src = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                while chunk := os.read(src, 1 << 20):
                    os.write(dst, chunk)
                os.utime(dst, ns=(seen.atime_ns, seen.mtime_ns))
                os.fsync(dst)
            except OSError:
                os.unlink(dest)  # a part kept is no keeping: the file is not restored
                raise
            finally:
                os.close(dst)
        finally:
            os.close(src)
    fsync_dir(folder)


def _replaced_stamp(run: Path, now: dt.datetime) -> str:
    """A ``replaced/<stamp>`` folder name for this restore: ``now`` (UTC), suffixed when a restore used it."""
    base = previous_stamp(now)
    stamp, n = base, 1
    while os.path.lexists(run / REPLACED_DIR / stamp):
        n += 1
        stamp = f"{base}-{n}"
    return stamp


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put_missing(fetched: Path, run: Path, rel: str, mtime_ns: int | None) -> str | None:
    """Put the checked copy where a file the run lost was; the reason when it cannot be put there.

    The folders on the way are made (durably) when gone, never followed
    through a symlink; the file is linked in only if nothing appeared there
    meanwhile (no clobber), then the scratch name is removed.
    """
    folder = run
    for part in rel.split("/")[:-1]:
        folder = folder / part
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            try:
                os.mkdir(folder)
            except OSError as exc:
                return f"cannot make its folder: {exc.strerror or exc}"
            fsync_dir(folder.parent)
            continue
        if not stat.S_ISDIR(st.st_mode):
            return f"{folder.relative_to(run)} is not a folder here any more"
    if mtime_ns is not None:
        os.utime(fetched, ns=(mtime_ns, mtime_ns))
    _fsync_file(fetched)  # its bytes and mtime, before the link makes it the run's file
    try:
        os.link(fetched, folder / rel.rsplit("/", 1)[-1])
    except FileExistsError:
        return "appeared locally during the restore"
    os.unlink(fetched)
    fsync_dir(folder)
    return None


def _scratch(run: Path) -> tuple[Path, int | None]:
    """A new scratch folder in the run's ``.exlab-wizard/``, and the descriptor holding the run's restore lock.

    The lock (``flock`` on ``.exlab-wizard/`` itself: no file left behind,
    released by the kernel when a restore is killed) is held until the
    scratch is removed: a second restore of the run meanwhile (another
    ``exlab-sync restore``, a ``retry`` putting files back) gets
    ``RestoreError("busy")`` instead of sweeping the first's scratch folder
    away as stale under it. A filesystem with no ``flock`` gets no lock (None).
    """
    meta = run / METADATA_DIR
    if meta.is_symlink() or not meta.is_dir():
        raise RestoreError("no_verified_manifest", f"{meta} is not a folder")
    fd: int | None = os.open(meta, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RestoreError("busy", f"another restore of {run} is under way; nothing restored by this one") from None
    except OSError:
        os.close(fd)  # no flock here (some network filesystems): as before, unlocked
        fd = None
    try:
        for stale in meta.glob(_SCRATCH_PREFIX + "*"):  # left by a restore that was killed
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        scratch = meta / f"{_SCRATCH_PREFIX}{secrets.token_hex(6)}"
        scratch.mkdir(mode=0o700)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return scratch, fd


def _drop_scratch(scratch: Path, fd: int | None) -> None:
    """Remove the scratch folder, then let the run's restore lock go."""
    try:
        shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)


async def restore_damaged(
    queue: JobQueue,
    job: SyncJobRow,
    transport: Transport | RemoteAccess,
    damaged: Sequence[str],
    *,
    missing: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
    now: dt.datetime | None = None,
) -> tuple[tuple[str, ...], dict[str, str], dict[str, str]]:
    """Bring the verified bytes of ``damaged`` and ``missing`` back from the NAS; (restored, refused, kept).

    ``refused``: the files not restored, with the reason; ``kept``: for each
    damaged file restored, where its local bytes are now (relative to the run).

    ``missing``: files of the manifest the run lost (a cleanup stopped part
    way, a file deleted by mistake): put back where they were, only where
    nothing appeared meanwhile, with the mtime recorded at verification when
    that record is trusted.

    Each file is fetched into a scratch folder inside the run's
    ``.exlab-wizard/`` (same filesystem, so the final rename is atomic),
    hashed and compared with the manifest, given the mtime recorded
    at verification when that record is trusted, else the damaged file's own
    (so it matches its verified stat again), and the damaged
    file's mode, fsynced, and renamed over the damaged file only if that file has not
    changed since it was looked at, and only once the damaged file's bytes are
    kept under ``.exlab-wizard/replaced/<stamp>/<path>`` (``now``, UTC; a hard link,
    else a copy): restore never destroys local bytes, which may be an edit the
    NAS never had (a change the local check could not tell from damage). A
    file whose bytes cannot be kept is not restored. A NAS copy that does not match the
    manifest, or is missing there, is not restored. Raises
    ``TransportError`` from the transport (nothing restored then beyond the
    files already renamed) and ``RestoreError`` for a run that cannot hold
    the scratch folder. Nothing is written while a mount point is inside the
    run (the mount table read again once the files are fetched): every file
    is refused then.
    """
    run = Path(job.run_path)
    manifest = verified_manifest(job, queue) or {}
    stats = load_verified_stats(queue, job.id)
    seen = {rel: _lstat(run / rel) for rel in damaged}
    scratch, lock_fd = await asyncio.to_thread(_scratch, run)
    restored: list[str] = []
    refused: dict[str, str] = {}
    kept: dict[str, str] = {}
    stamp = _replaced_stamp(run, now or dt.datetime.now(dt.UTC)) if damaged else ""
    try:
        wanted = [rel for rel, s in seen.items() if s is not None] + list(missing)
        fetched = await transport.fetch(run, wanted, scratch)
        mounted = await asyncio.to_thread(mount_refusal, run)
        if mounted is not None:
            refused.update(dict.fromkeys([*damaged, *missing], f"{mounted}; nothing written through it"))
            return (), refused, {}

        async def checked(rel: str) -> Path | None:
            """The fetched copy of ``rel``, durable and holding the verified bytes; None (refused) when not."""
            copy = fetched.get(rel)
            if copy is None:
                refused[rel] = "not on the NAS"
                return None
            digest = await asyncio.to_thread(hash_file, copy, progress=progress)
            if digest != manifest.get(rel, "").lower():
                refused[rel] = "the NAS copy does not match the verified manifest either"
                return None
            return copy

        for rel in missing:
            copy = await checked(rel)
            if copy is None:
                continue
            record = stats.get(rel)
            trusted_mtime = record.mtime_ns if record is not None and record.trusted else None
            why = await asyncio.to_thread(_put_missing, copy, run, rel, trusted_mtime)
            if why is None:
                restored.append(rel)
            else:
                refused[rel] = why
        for rel in damaged:
            before = seen[rel]
            if before is None:
                refused[rel] = "not a regular file here any more"
                continue
            copy = await checked(rel)
            if copy is None:
                continue
            if _lstat(run / rel) != before:
                refused[rel] = "changed locally during the restore"
                continue
            aside = f"{REPLACED_DIR}/{stamp}/{rel}"
            try:
                await asyncio.to_thread(_keep_local, run, run / rel, aside, before)
            except OSError as exc:
                refused[rel] = f"cannot keep its local bytes under {REPLACED_DIR}/: {exc.strerror or exc}"
                continue
            if _lstat(run / rel) != before:  # a copy, and the file changed meanwhile
                refused[rel] = f"changed locally during the restore (its bytes kept at {aside})"
                continue
            record = stats.get(rel)
            # An untrusted record may hold a half-done rewrite's mtime: the damaged file keeps the verified one.
            mtime_ns = before.mtime_ns
            if record is not None and record.trusted and record.mtime_ns is not None:
                mtime_ns = record.mtime_ns
            await asyncio.to_thread(_put_back, copy, run / rel, before, mtime_ns)
            restored.append(rel)
            kept[rel] = aside
    finally:
        await asyncio.to_thread(_drop_scratch, scratch, lock_fd)
    return tuple(restored), refused, kept


def restore_detail(
    restored: Sequence[str], refused: Mapping[str, str], digest: str, kept: Mapping[str, str] | None = None
) -> str:
    """The event detail of a restore."""
    parts = []
    if restored:
        parts.append(f"restored from the NAS: {name_paths(list(restored))} (manifest {digest[:12]})")
    if kept:
        folder = next(iter(kept.values())).split("/")[: REPLACED_DIR.count("/") + 2]
        parts.append(f"the replaced local bytes kept under {'/'.join(folder)}/")
    for rel, why in sorted(refused.items()):
        parts.append(f"not restored: {rel}: {why}")
    return "; ".join(parts) or "nothing to restore: the local files match the verified manifest"


# ---------------------------------------------------------------------- the client's two ways out


async def refuse_local_damage(queue: JobQueue, job: SyncJobRow) -> None:
    """Raise :class:`LocalDamageError` when a job FAILED ``local_damage`` still has damaged files."""
    if job.error_kind != LOCAL_DAMAGE:
        return
    damaged = await asyncio.to_thread(find_damage, queue, job)
    if damaged:
        raise LocalDamageError(job.id, job.run_path, damaged)


async def rearm(ctx: ClientContext, job_id: str, *, accept_local: bool = False) -> SyncJobRow:
    """``FAILED -> QUEUED`` for ``retry``, with ``--accept-local`` recorded (see ``NASSyncClient.retry``).

    A job FAILED by a cleanup stopped part way (``local_changed_during_cleanup``,
    ``remote_changed_during_cleanup``) first gets the files the cleanup
    deleted back from their verified NAS copies (:func:`_put_back_deleted`).

    Raises ``KeyError`` (no such job), :class:`LocalDamageError` (damage
    still there, not accepted), :class:`RunFolderMissingError` (FAILED
    ``run_folder_missing`` and the folder still not there),
    :class:`RunIncompleteError` (deleted files that cannot be put back) and
    ``IllegalTransition`` (not FAILED).
    """
    queue = ctx.require_queue()
    job = queue.get(job_id)
    if job is None:
        raise KeyError(f"no job {job_id}")
    if job.state == S.FAILED and job.error_kind in _PART_DELETED:
        await _put_back_deleted(ctx, job)
    if job.state == S.FAILED and job.error_kind == FailureKind.RUN_FOLDER_MISSING:
        run = Path(job.run_path)
        if not await asyncio.to_thread(os.path.isdir, run) or await asyncio.to_thread(os.path.islink, run):
            raise RunFolderMissingError(job.id, job.run_path)
    damaged: tuple[str, ...] = ()
    if job.state == S.FAILED and (accept_local or job.error_kind == LOCAL_DAMAGE):
        damaged = await asyncio.to_thread(find_damage, queue, job)
    already = set(damaged) <= set(job.accept_local_paths)  # accepted earlier, and that retry failed otherwise
    if damaged and not accept_local and not already:
        raise LocalDamageError(job.id, job.run_path, damaged)
    now = ctx.clock()
    fields: dict[str, Any] = {}
    detail = "retry requested"
    if damaged and accept_local and not already:
        stamp = new_previous_stamp(queue, job, now)
        fields = {"accept_local_paths": damaged, "previous_stamp": stamp, "previous_kept_at": None}
        detail = (
            f"retry --accept-local: the local bytes of {len(damaged)} damaged file(s) are the new truth: "
            f"{name_paths(list(damaged))}; the NAS keeps the verified ones under "
            f"{METADATA_DIR}/previous/{stamp}/"
        )
    elif accept_local:
        detail = "retry requested (--accept-local: " + ("accepted already)" if damaged else "no local damage found)")
    job = queue.transition(
        job.id,
        S.FAILED,
        S.QUEUED,
        now=now,
        detail=detail,
        attempts=0,
        mismatch_count=0,
        next_attempt_at=None,
        error_kind=None,
        last_error=None,
        **fields,
    )
    equipment = ctx.equipment(job)
    if fields and equipment is not None:
        ctx.log(equipment).warning(
            job.run_path, "accept_local", job=job.id, files=len(damaged), previous=fields["previous_stamp"]
        )
    ctx.kick()
    return job


#: Failures of a cleanup stopped part way: the run lacks files the plan deleted (verified on the NAS first).
_PART_DELETED = frozenset({FailureKind.LOCAL_CHANGED_DURING_CLEANUP, FailureKind.REMOTE_CHANGED_DURING_CLEANUP})


async def _put_back_deleted(ctx: ClientContext, job: SyncJobRow) -> None:
    """Before ``retry`` re-arms a cleanup stopped part way: the files it deleted are put back from the NAS.

    Each from its NAS copy, checked against the verified manifest (as
    ``restore`` puts back lost files; recorded as a ``restore`` event), so
    the transfer sends a whole run: the NAS copies of those files are the
    run's own again, never another's (``remote_conflict``), and the files
    the job names to send again (``rewrite_paths``: those the audit found
    different on the NAS) go from their local copies. Raises
    :class:`RunIncompleteError` when one cannot be put back (its NAS copy is
    not the verified bytes, or the NAS is away): nothing is re-armed.
    """
    queue = ctx.require_queue()
    run = Path(job.run_path)
    check = await asyncio.to_thread(check_local, queue, job)
    missing = () if check is None or check.refusal is not None else tuple(check.missing)
    if not missing:
        return
    why = f"{len(missing)} file(s) the stopped cleanup deleted ({name_paths(list(missing))}) cannot be put back"
    equipment = ctx.equipment(job)
    if equipment is None:
        raise RunIncompleteError(job.id, job.run_path, f"{why}: equipment {job.equipment_id} is no longer configured")
    mounted = await asyncio.to_thread(mount_refusal, run)
    if mounted is not None:
        raise RunIncompleteError(job.id, job.run_path, f"{why}: {mounted}")
    try:
        await asyncio.to_thread(ctx.config.equipment_holding, run)
    except RunOutsideRoots as exc:
        raise RunIncompleteError(job.id, job.run_path, f"{why}: {exc}") from None
    if not await ctx.remotes.reachable(job):
        raise RunIncompleteError(job.id, job.run_path, f"{why} now: the NAS is not reachable")
    try:
        restored, refused, _kept = await restore_damaged(
            queue, job, ctx.remotes.access(equipment), (), missing=missing, now=ctx.clock()
        )
    except (TransportError, RestoreError) as exc:
        raise RunIncompleteError(job.id, job.run_path, f"{why} now: {exc}") from None
    queue.record_event(job.id, "restore", restore_detail(restored, refused, job.manifest_digest or ""), now=ctx.clock())
    ctx.log(equipment).info(run, "restore", job=job.id, restored=len(restored), refused=len(refused))
    if refused:
        lost = "; ".join(f"{rel}: {reason}" for rel, reason in refused.items())
        raise RunIncompleteError(
            job.id,
            job.run_path,
            f"not put back from the NAS: {lost}; put their verified bytes back into the run (an older copy: a NAS "
            f"snapshot, a backup), then retry",
            tuple(refused),
        )


async def restore(ctx: ClientContext, run: Path, *, progress: Callable[[int], None] | None = None) -> RestoreResult:
    """Restore the run's damaged files from the NAS and record it (see ``NASSyncClient.restore``)."""
    queue = ctx.require_queue()
    job = queue.by_run(str(run))
    if job is None:
        raise RestoreError("no_job", f"{run} has no sync job")
    if job.state == S.CLEANED:
        place = nas_copy_place(ctx.equipment(job), job.remote_path)
        raise RestoreError(
            "cleaned",
            f"job {job.id} is cleaned: its local files were deleted once verified, so restore has nothing to "
            f"check against; the verified copy is on the NAS at {place}: copy the files back from there",
        )
    if job.state in (S.RUNNING, S.AWAITING_VERIFY):
        raise RestoreError("busy", f"job {job.id} is {job.state.value}: nothing can be restored now")
    if await asyncio.to_thread(verified_manifest, job, queue) is None:
        raise RestoreError("no_verified_manifest", f"{run} has no verified checksums.sha256 to restore against")
    equipment = ctx.equipment(job)
    if equipment is None:
        raise RestoreError("no_job", f"equipment {job.equipment_id} is no longer configured")
    mounted = await asyncio.to_thread(mount_refusal, run)
    if mounted is not None:
        raise RestoreError("mount_point", f"{run}: {mounted}; nothing restored")
    try:
        await asyncio.to_thread(ctx.config.equipment_holding, run)
    except RunOutsideRoots as exc:
        raise RestoreError("linked_away", f"{exc}; nothing restored") from None
    damaged, missing = await asyncio.to_thread(_to_restore, queue, job)
    restored: tuple[str, ...] = ()
    refused: dict[str, str] = {}
    kept: dict[str, str] = {}
    if damaged or missing:
        if not await ctx.remotes.reachable(job):
            raise RestoreError("unreachable", f"the NAS for {job.equipment_id} is not reachable now; nothing restored")
        remote = ctx.remotes.access(equipment)
        restored, refused, kept = await restore_damaged(
            queue, job, remote, damaged, missing=missing, progress=progress, now=ctx.clock()
        )
    detail = restore_detail(restored, refused, job.manifest_digest or "", kept)
    log = ctx.log(equipment)
    (log.warning if refused else log.info)(run, "restore", job=job.id, restored=len(restored), refused=len(refused))
    check = None if refused else await asyncio.to_thread(check_local, queue, job)
    job = _after_restore(ctx, job, detail, bool(refused), check)
    return RestoreResult(job.id, job.run_path, restored, refused, job.state, kept)


def nas_copy_place(equipment: EquipmentConfig | None, remote_path: str) -> str:
    """Where a job's NAS copy is, as a person reaches it: the run folder's ``remote_path``.

    For rsync over ssh it follows ``user@host:`` (and names a port other than
    22); rclone's ``remote:path`` and a mount's folder are given as they are.
    """
    transport = equipment.transport if equipment is not None else None
    if transport is not None and transport.type == "rsync_ssh":
        port = f" (ssh port {transport.ssh_port})" if transport.ssh_port != 22 else ""
        return f"{transport.ssh_target}:{remote_path}{port}"
    return remote_path


def _to_restore(queue: JobQueue, job: SyncJobRow) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(damaged, missing): the files ``restore`` brings back. Blocking I/O.

    Missing files are brought back only when no deletion is planned for the
    run: a reaper at work removes them on purpose.
    """
    check = check_local(queue, job)
    if check is None:
        return (), ()
    missing = () if cleanup_planned(queue, job.id) else tuple(check.missing)
    return tuple(check.damaged), missing


#: Failures a restore of the run's lost or damaged files may end. After anything but local
#: damage the run goes back to QUEUED: a new transfer and verification prove the NAS copy again.
_RESTORE_ENDS = frozenset(
    {
        LOCAL_DAMAGE,
        FailureKind.LOCAL_FILE_VANISHED,
        FailureKind.LOCAL_CHANGED_DURING_CLEANUP,
        FailureKind.REMOTE_CHANGED_DURING_CLEANUP,
    }
)


def _after_restore(
    ctx: ClientContext, job: SyncJobRow, detail: str, refused: bool, check: LocalCheck | None
) -> SyncJobRow:
    """Record the restore; a job FAILED for lost or damaged files (``_RESTORE_ENDS``) whose run is whole leaves FAILED."""
    queue = ctx.require_queue()
    now = ctx.clock()
    fresh = queue.get(job.id) or job
    if refused or fresh.state != S.FAILED or fresh.error_kind not in _RESTORE_ENDS:
        queue.record_event(job.id, "restore", detail, now=now)
        return fresh
    if check is not None and check.missing:
        queue.record_event(job.id, "restore", detail + f"; still missing: {name_paths(list(check.missing))}", now=now)
        return fresh
    if check is not None and check.damaged:
        queue.record_event(job.id, "restore", detail + f"; still damaged: {name_paths(list(check.damaged))}", now=now)
        return fresh
    cleared: dict[str, Any] = {
        "attempts": 0,
        "mismatch_count": 0,
        "next_attempt_at": None,
        "error_kind": None,
        "last_error": None,
        "accept_local_paths": (),
        "previous_stamp": None,
        "previous_kept_at": None,
    }
    if check is not None and check.clean and fresh.verified_at is not None and fresh.error_kind == LOCAL_DAMAGE:
        fresh = queue.transition(
            job.id,
            S.FAILED,
            S.VERIFIED,
            now=now,
            detail=f"{detail}; the local run matches the verified manifest again",
            **cleared,
        )
        with contextlib.suppress(Exception):
            ctx.cache.set_sync_status(Path(job.run_path), "synced")
    else:
        fresh = queue.transition(
            job.id,
            S.FAILED,
            S.QUEUED,
            now=now,
            detail=f"{detail}; the run changed since verification: transfer again",
            **cleared,
        )
        ctx.kick()
    ctx.notify_state(fresh)
    return fresh
