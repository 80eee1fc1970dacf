"""The metadata push: sending a run's refreshed ``.exlab-wizard/`` to the NAS, and its bookkeeping.

A verification writes a new ``checksums.sha256`` (and ``creation.json``)
locally; the job becomes VERIFIED with the push of that folder owed,
recorded durably on the job (``metadata_push_due_at``) in the same
transaction. This module sends it and records the outcome:

- :func:`send_pending`: send the push a job owes; success clears it, a
  failure keeps it due again after a backoff, a cancel leaves it pending for
  the next client;
- :func:`push_once`: one push whose failure is only noted;
- :func:`final_push`: the reaper's last push before the local
  ``.exlab-wizard/`` goes, with the proof that it arrived (:class:`FinalPush`);
- :func:`data_only` and :func:`cleaned_paths`: which paths are data, and
  which verified data files the reaper already deleted locally.

Every push first checks that the NAS run folder is the run's own
(:func:`check_nas_folder`: the transports' metadata-only push checks nothing),
then brings into the local ``creation.json`` what the NAS's one holds and the
local one lacks (:func:`keep_nas_record`; the client does the same before a
push into a folder that is the run's own): the engine writes a
new, nearly empty ``creation.json`` where the local one was lost (the minimal
file before a push, the reaper's ``local_cleaned`` record), and the push must
never send such a file over the run's full record on the NAS.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from exlab_wizard.cache import CacheError
from exlab_wizard.cache.atomic import read_regular_file
from exlab_wizard.cache.creation import CREATION_MAX_BYTES, CreationJson
from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.fileio import (
    BLOCK_SIZE,
    METADATA_DIR,
    hash_fd,
    hash_file,
    is_data_path,
    is_metadata_path,
    open_regular,
)
from exlab_wizard.sync.context import ClientContext
from exlab_wizard.sync.manifest_format import has_digest, manifest_path, read_manifest
from exlab_wizard.sync.policy.cleanup import name_paths
from exlab_wizard.sync.queue import TRANSITION_EVENT, JobQueue, SyncJobRow
from exlab_wizard.sync.reaper import FinalPush, local_data_deleted_at, planned_paths
from exlab_wizard.sync.reaper.passes import another_runs_folder
from exlab_wizard.sync.reaper.store import planned_run_folder
from exlab_wizard.sync.states import IllegalTransition, SyncJobState
from exlab_wizard.sync.transports import TransportError
from exlab_wizard.sync.transports.base import location_change, remote_run_path
from exlab_wizard.sync.transports.conflict import (
    NAS_MANIFEST,
    check_owner,
    claim_markers,
    claim_path,
    ownership_error,
)
from exlab_wizard.sync.transports.share_lanes import in_share_of
from exlab_wizard.sync.verifier import hash_tree

__all__ = [
    "check_nas_folder",
    "cleaned_paths",
    "data_only",
    "final_push",
    "keep_nas_record",
    "own_manifests",
    "push_failed",
    "push_once",
    "send_pending",
    "try_push",
]


def data_only(hashes: Mapping[str, str]) -> dict[str, str]:
    """The entries of ``hashes`` that are data files (not under ``.exlab-wizard/``)."""
    return {k: v for k, v in hashes.items() if is_data_path(k)}


async def send_pending(ctx: ClientContext, job: SyncJobRow, equipment: EquipmentConfig) -> bool:
    """The metadata push a verification left pending: send it, and record the outcome on the job.

    Success clears the pending push (event ``metadata_pushed``); a failure
    keeps it, due again after a backoff (event ``metadata_push_failed``,
    once per distinct reason). Cancelled (the process stops), it stays
    pending and due: the next client sends it. True when sent (or cleared).

    A push with nothing left to send is cleared without one (event
    ``metadata_push_cleared``): the cleanup deleted the run's local data and
    its ``checksums.sha256`` is gone (see :func:`_nothing_left_to_send`).
    """
    run = Path(job.run_path)
    deleted_at = await asyncio.to_thread(local_data_deleted_at, ctx.require_queue(), job.id)
    if deleted_at is not None and await asyncio.to_thread(_nothing_left_to_send, run):
        _push_done(ctx, job, "metadata_push_cleared", _NOTHING_LEFT)
        return True
    task = asyncio.current_task()
    if task is not None:
        ctx.pushing.add(task)
    try:
        error = await asyncio.to_thread(_local_manifest_problem, job)
        if error is None:
            cleaned: frozenset[str] = frozenset()
            if deleted_at is not None:
                cleaned = await asyncio.to_thread(cleaned_paths, ctx, job)
            _outcome, error = await try_push(ctx, job, equipment, cleaned=cleaned)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            ctx.log(equipment).warning(
                run, "metadata_push_interrupted", job=job.id, reason="cancelled; left pending for the next client"
            )
        raise
    finally:
        if task is not None:
            ctx.pushing.discard(task)
    if error is not None:
        push_failed(ctx, job, error)
        return False
    _push_done(
        ctx, job, "metadata_pushed", "refreshed .exlab-wizard/ (checksums.sha256, creation.json) sent to the NAS"
    )
    return True


_NOTHING_LEFT = (
    "pending metadata push cleared, nothing left to send: the cleanup deleted the local data and the run's "
    "checksums.sha256 is gone (with retain_cache: false it is removed only after the final push is verified "
    "on the NAS; any .exlab-wizard/ file left is pushed and proved before it goes)"
)


def _nothing_left_to_send(run: Path) -> bool:
    """Is there no evidence left for a pending push to send, the reaper having deleted the local data? Blocking I/O.

    True when the run's ``checksums.sha256`` is gone: from a run folder that is
    there (neither it nor its ``.exlab-wizard/`` a symlink), or with the run
    folder while its parent is there (a parent gone too is a disk away, not
    a removal). A cleanup with ``retain_cache: false`` removes them only after
    its final push is verified on the NAS; killed before CLEANED under a queue
    from before pending pushes (migration 2 marked the job as owing one), it
    left a push that could never be made, and the reaper waiting on it. What
    is left of ``.exlab-wizard/`` the resumed cleanup pushes and proves before
    removing it.
    """
    if os.path.islink(run):
        return False
    if not os.path.isdir(run):
        return os.path.isdir(run.parent) and not os.path.lexists(run)
    if os.path.islink(run / METADATA_DIR):
        return False
    return not os.path.lexists(manifest_path(run))


def _local_manifest_problem(job: SyncJobRow) -> str | None:
    """Why the local ``.exlab-wizard/`` must not go to the NAS as this job's evidence, or None."""
    if job.manifest_digest and _is_verified_manifest(Path(job.run_path), job.manifest_digest):
        return None  # byte for byte the verified manifest: not read whole nor parsed (~50 MB at 200,000 files)
    try:
        recorded = read_manifest(Path(job.run_path))
    except Exception as exc:
        return f"local checksums.sha256 unreadable: {exc}"
    if recorded is None:
        return "no local checksums.sha256"
    if job.manifest_digest and not has_digest(recorded, job.manifest_digest):  # its bytes were compared above
        return "local checksums.sha256 is not the verified manifest; not sent"
    return None


def _is_verified_manifest(run: Path, digest: str) -> bool:
    """Does the run's ``checksums.sha256`` hash (streamed, never through a symlink) to ``digest``?

    Its SHA-256 is the manifest digest of exactly the verified manifest's rendering.
    """
    try:
        fd, _info = open_regular(manifest_path(run))
    except OSError:
        return False
    try:
        return hash_fd(fd, memoryview(bytearray(BLOCK_SIZE))) == digest
    except OSError:
        return False
    finally:
        os.close(fd)


def _push_done(ctx: ClientContext, job: SyncJobRow, kind: str, detail: str) -> None:
    """Clear the job's pending push, with an event and a log line ``kind``."""
    queue = ctx.require_queue()
    for _ in range(5):
        fresh = queue.get(job.id)
        if fresh is None or not fresh.metadata_push_pending:
            return
        try:
            queue.update(
                fresh.id,
                fresh.state,
                now=ctx.clock(),
                event_kind=kind,
                detail=detail,
                metadata_push_due_at=None,
                metadata_push_failures=0,
                metadata_push_error=None,
            )
        except IllegalTransition:
            continue  # the state changed under us: read it again
        equipment = ctx.equipment(fresh)
        if equipment is not None:
            with contextlib.suppress(Exception):
                ctx.log(equipment).info(fresh.run_path, kind, job=fresh.id)
        return


def push_failed(ctx: ClientContext, job: SyncJobRow, reason: str) -> None:
    """Keep the push pending, due again after ``backoff_s`` (its last entry, once they are used up)."""
    queue = ctx.require_queue()
    backoff = list(ctx.config.sync.backoff_s) or [ctx.config.sync.scan_interval_s]
    for _ in range(5):
        fresh = queue.get(job.id)
        if fresh is None or not fresh.metadata_push_pending:
            return
        failures = fresh.metadata_push_failures + 1
        delay = float(backoff[min(failures, len(backoff)) - 1])
        now = ctx.clock()
        repeated = fresh.metadata_push_error == reason
        try:
            queue.update(
                fresh.id,
                fresh.state,
                now=now,
                event_kind=None if repeated else "metadata_push_failed",
                detail=f"metadata push failed: {reason}; the NAS copy still lacks this verification's "
                f".exlab-wizard/ (checksums.sha256, creation.json); tried again in {delay:g} s",
                metadata_push_due_at=now + dt.timedelta(seconds=delay),
                metadata_push_failures=failures,
                metadata_push_error=reason,
            )
        except IllegalTransition:
            continue
        equipment = ctx.equipment(fresh)
        if equipment is not None and not repeated:
            with contextlib.suppress(Exception):
                ctx.log(equipment).warning(
                    fresh.run_path, "metadata_push_failed", job=fresh.id, error=reason, retry_in_s=f"{delay:g}"
                )
        return


async def push_once(
    ctx: ClientContext, job: SyncJobRow, equipment: EquipmentConfig, *, cleaned: frozenset[str] = frozenset()
) -> bool:
    """Send the refreshed ``.exlab-wizard/`` alone; True when the transport reported success.

    A failure is recorded as a ``note`` event and a log line.
    """
    _outcome, error = await try_push(ctx, job, equipment, cleaned=cleaned)
    if error is None:
        return True
    ctx.require_queue().record_event(job.id, "note", f"metadata push failed: {error}", now=ctx.clock())
    ctx.log(equipment).warning(Path(job.run_path), "metadata_push_failed", job=job.id, error=error)
    return False


async def try_push(
    ctx: ClientContext, job: SyncJobRow, equipment: EquipmentConfig, *, cleaned: frozenset[str] = frozenset()
) -> tuple[Any, str | None]:
    """Send the refreshed ``.exlab-wizard/`` alone (see :meth:`RemoteAccess.push_metadata`).

    Returns ``(what the push returned, None)``, or ``(None, why it failed)``. Sent to a NAS
    place other than the one the job was verified at (the configuration moved the run since)
    only when the folder there holds the run's own verified manifest (a share copied whole to a
    new NAS): another folder there may be another run's, and its manifest would be written over.
    Otherwise it waits until the run is verified there (the audit's pass at the new place).
    Nothing is read from or written to a NAS folder that is not the run's (:func:`check_nas_folder`).
    """
    run = Path(job.run_path)
    try:
        moved = await in_share_of(
            equipment,
            f"where the NAS copy of {run} is",
            location_change,
            equipment,
            run,
            verified_location=job.verified_location,
            remote_path=job.remote_path,
        )
        if moved is not None:
            refused = await _not_ours_there(ctx, job, equipment, moved)
            if refused is not None:
                return None, refused
    except ValueError as exc:
        return None, f"no NAS place for the run: {exc}"
    except TransportError as exc:
        return None, f"{exc.kind.value}: {exc.message}"
    try:
        # One fetch for both questions (over ssh or rclone each fetch lists the NAS run folder).
        nas = await fetch_small(ctx, equipment, run, [claim_path(job.id), CREATION_REL])
        await check_nas_folder(ctx, job, equipment, nas)
        await keep_nas_record(ctx, run, equipment, nas)
        return await ctx.remotes.access(equipment).push_metadata(run, cleaned=cleaned), None
    except asyncio.CancelledError:
        raise
    except TransportError as exc:
        return None, f"{exc.kind.value}: {exc.message}"
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


async def fetch_small(
    ctx: ClientContext, equipment: EquipmentConfig, run: Path, paths: list[str]
) -> dict[str, bytes | None] | None:
    """The bytes of the named small NAS files of the run (``CREATION_MAX_BYTES`` at most), in one fetch.

    A path the NAS folder does not hold is left out; one held but unreadable
    here maps to None. None when the transport cannot read the NAS back (an
    embedder's). Raises ``TransportError`` as the fetch does (``NETWORK``:
    never taken for a NAS without the files).
    """
    remote = ctx.remotes.access(equipment)
    if not remote.can_fetch:
        return None
    found: dict[str, bytes | None] = {}
    with tempfile.TemporaryDirectory(prefix="exlab-nas-meta-") as into:
        for rel, path in (await remote.fetch(run, paths, Path(into))).items():
            try:
                found[rel] = await asyncio.to_thread(read_regular_file, path, CREATION_MAX_BYTES)
            except (CacheError, OSError):
                found[rel] = None
    return found


async def check_nas_folder(
    ctx: ClientContext, job: SyncJobRow, equipment: EquipmentConfig, nas: Mapping[str, bytes | None] | None
) -> None:
    """Raise ``REMOTE_CONFLICT`` unless the job's NAS run folder is its run's; before a metadata push reads or writes it.

    The transports' metadata-only push makes no ownership check of its own
    (the run was verified there), but the folder may have changed hands since:
    a verified copy whose manifest is not written yet (its metadata push
    waiting) looks abandoned, and may be deleted and filled by another PC's
    run of the same name. The folder is the run's when it holds this job's
    claim (its push wrote there, past the push's own checks); else when its
    verified manifest is one of the run's (:func:`check_owner`: the job's
    :func:`own_manifests`, or the local one); else when it holds no other
    job's claim (a push from before claims wrote none). The NAS unreachable,
    or listed and then unreadable, raises ``NETWORK`` (never taken for a
    folder without claims). ``nas``: :func:`fetch_small` of the job's claim
    (None: a transport that cannot read the NAS back, an embedder's, is not
    checked: as before).
    """
    if nas is None:
        return
    run = Path(job.run_path)
    where = remote_run_path(equipment, run)
    own_claim = claim_path(job.id)
    # The job's claim first (the usual case): a listing of a whole run holds every file's
    # name in memory (200,000 names: tens of MB).
    if own_claim in nas:
        return
    remote = ctx.remotes.access(equipment)
    listing = await ctx.remotes.listing(job)
    if own_claim in listing:
        return
    if NAS_MANIFEST in listing:
        own = await asyncio.to_thread(own_manifests, ctx.require_queue(), job)
        await check_owner(run, where, remote.fetch, own)
        return
    error = ownership_error(where, claimed=(), markers=claim_markers(listing), owner=job.id, fresh=False)
    if error is not None:
        raise error


#: The manifest digest a VERIFIED transition's detail names (its first 12 hex digits).
_VERIFIED_DETAIL = re.compile(r"\bmanifest ([0-9a-f]{12})\b")


def own_manifests(queue: JobQueue, job: SyncJobRow) -> tuple[str, ...]:
    """The manifests ``job`` was verified with: the last whole, the earlier ones by their events' 12 hex digits.

    Every VERIFIED sets ``manifest_digest`` and nothing clears it: a job without one was never
    verified, and its events are not read (a first push, the common case). Blocking (the queue).
    """
    if not job.manifest_digest:
        return ()
    own = [job.manifest_digest]
    for event in queue.events(job.id):
        if event.kind == TRANSITION_EVENT and event.to_state == SyncJobState.VERIFIED.value:
            found = _VERIFIED_DETAIL.search(event.detail or "")
            if found:
                own.append(found.group(1))
    return tuple(dict.fromkeys(own))


CREATION_REL = f"{METADATA_DIR}/creation.json"


async def keep_nas_record(
    ctx: ClientContext, run: Path, equipment: EquipmentConfig, nas: Mapping[str, bytes | None] | None = None
) -> None:
    """Bring what the NAS's ``creation.json`` holds and the local one lacks into the local one, before a push.

    The NAS folder is the run's own (the push goes nowhere else), so its
    ``creation.json`` is the run's record as an earlier push left it. Its
    top-level keys the local file lacks are added (the local file made anew
    when absent), and its ``validation_overrides`` entries missing locally
    are appended (entries are only ever added: a revocation is an entry of
    its own). Where both hold a key, the local value stands: it is the newer.
    A NAS file that is no creation.json (unreadable as one) holds no record
    to keep; a transport that cannot read NAS files back keeps the old way
    (the local file sent as it is). Raises ``TransportError`` when the NAS cannot be read (never
    taken for a NAS without the file) and ``CacheError`` when the local file
    cannot be written: the push then waits. ``nas``: the NAS file already
    fetched (:func:`fetch_small`), else it is fetched here.
    """
    if nas is None:
        nas = await fetch_small(ctx, equipment, run, [CREATION_REL])
        if nas is None:
            return  # a transport that cannot read the NAS back (an embedder's): as before
    if CREATION_REL not in nas:
        return  # not on the NAS (yet)
    data = nas[CREATION_REL]
    if data is None:
        return
    try:
        theirs = CreationJson.from_bytes(data, Path(CREATION_REL)).raw
    except CacheError:
        return
    local = await asyncio.to_thread(ctx.cache.read, run)
    if local is not None and not _missing_from(local.raw, theirs):
        return

    def mutate(raw: dict[str, Any]) -> None:
        for key, value in _missing_from(raw, theirs).items():
            if key == "validation_overrides" and isinstance(raw.get(key), list):
                raw[key] = raw[key] + value
            else:
                raw[key] = value

    await asyncio.to_thread(ctx.cache.update, run, mutate)


def _missing_from(local: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """What of ``theirs`` ``local`` lacks: its keys, and for ``validation_overrides`` the entries alone."""
    missing: dict[str, Any] = {key: value for key, value in theirs.items() if key not in local}
    mine, nas = local.get("validation_overrides"), theirs.get("validation_overrides")
    if isinstance(mine, list) and isinstance(nas, list):
        extra = [entry for entry in nas if entry not in mine]
        if extra:
            missing["validation_overrides"] = extra
    return missing


async def _not_ours_there(
    ctx: ClientContext, job: SyncJobRow, equipment: EquipmentConfig, moved: tuple[str, str]
) -> str | None:
    """None when the folder at the new place holds the job's own verified manifest; else why not."""
    waiting = f"the NAS place changed since the verification ({moved[0]} -> {moved[1]}); not sent there yet"
    if NAS_MANIFEST not in await ctx.remotes.listing(job):
        return waiting + " (no verified manifest of the run there)"
    own = (job.manifest_digest,) if job.manifest_digest else ()
    try:
        await check_owner(Path(job.run_path), job.remote_path, ctx.remotes.access(equipment).fetch, own)
    except TransportError as exc:
        return f"{waiting}: {exc.message}"
    return None


def _another_runs_folder(ctx: ClientContext, job: SyncJobRow) -> str | None:
    """Why the job's run folder is not the one its cleanup deleted the data of (:func:`another_runs_folder`)."""
    planned = planned_run_folder(ctx.require_queue(), job.id)
    return another_runs_folder(Path(job.run_path), planned, job.manifest_digest or "", ctx.cache)


async def final_push(ctx: ClientContext, job: SyncJobRow) -> FinalPush:
    """The final metadata push before the local ``.exlab-wizard/`` goes, and what proves it arrived.

    The proof, strongest available: the remote manifest lists
    ``.exlab-wizard/`` files, and every local one is there with its hash.
    When the manifest lists none at all (a hashsum or backend that shows
    data files only), the push's own report: it succeeded, and the hashes
    of what it sent (when it gives them) are those of the local files now.
    Anything less is not verified, and the reason says what is missing.
    """
    equipment = ctx.equipment(job)
    if equipment is None:
        return FinalPush(False, f"equipment {job.equipment_id} is no longer configured")
    run = Path(job.run_path)
    # The local data may be gone already: the NAS's checksums.sha256 is then the last full record
    # of the verified hashes, and a damaged or edited local one must never be sent over it. (One
    # that is gone sends nothing over it: a pass that removed the cache after a proved push and
    # was cut off before the end pushes the rest again.)
    # And the folder must still be the one the cleanup deleted the data of (the reaper looked just before):
    # a new run made under the name would send its creation.json over the run's record on the NAS.
    problem = await asyncio.to_thread(_another_runs_folder, ctx, job)
    if problem is None and await asyncio.to_thread(os.path.lexists, manifest_path(run)):
        problem = await asyncio.to_thread(_local_manifest_problem, job)
    if problem is not None:
        return FinalPush(False, f"final metadata push refused: {problem}")
    cleaned = await asyncio.to_thread(cleaned_paths, ctx, job)
    outcome, error = await try_push(ctx, job, equipment, cleaned=cleaned)
    if error is not None:
        return FinalPush(False, f"final metadata push failed: {error}")
    try:
        remote = await ctx.remotes.access(equipment).manifest(run)
    except Exception as exc:
        return FinalPush(False, f"final metadata push not verified: remote manifest unavailable: {exc}")
    everything = await asyncio.to_thread(hash_tree, run, include_metadata=True)
    meta_local = {k: v for k, v in everything.items() if is_metadata_path(k)}
    meta_remote = {k: v for k, v in remote.hashes.items() if is_metadata_path(k)}
    # A file the remote could not hash (over verify_max_stream_bytes, where the NAS is hashed by
    # downloading: a large checksums.sha256 on S3) is read back whole and hashed here.
    unhashed = [k for k in meta_local if k not in meta_remote and k in remote.unverifiable]
    if unhashed:
        try:
            meta_remote.update(await _read_back(ctx, equipment, run, unhashed))
        except Exception as exc:
            return FinalPush(False, f"final metadata push not verified: reading it back failed: {exc}")
    if meta_remote:
        bad = sorted(k for k, v in meta_local.items() if meta_remote.get(k) != v)
        if bad:
            return FinalPush(
                False, "final metadata push not verified: missing or different on the NAS: " + name_paths(bad)
            )
        return FinalPush(True, f"final metadata push verified: {len(meta_local)} files read back from the NAS")
    unlisted = f"final metadata push accepted: the remote manifest does not list {METADATA_DIR}/; "
    sent = getattr(outcome, "local_hashes", None)
    if sent is not None:
        differ = sorted(k for k, v in meta_local.items() if sent.get(k) != v)
        if differ:
            return FinalPush(
                False, "final metadata push not verified: sent bytes are not the local ones: " + name_paths(differ)
            )
        return FinalPush(True, unlisted + f"the push reported {len(meta_local)} files sent with their local hashes")
    return FinalPush(True, unlisted + "the transport reported success")


async def _read_back(ctx: ClientContext, equipment: EquipmentConfig, run: Path, paths: list[str]) -> dict[str, str]:
    """The SHA-256 of the NAS copies of ``paths``, fetched whole (those the NAS does not hold are left out)."""
    remote = ctx.remotes.access(equipment)
    if not remote.can_fetch:
        return {}
    with tempfile.TemporaryDirectory(prefix="exlab-read-back-") as into:
        fetched = await remote.fetch(run, paths, Path(into))
        return {rel: await asyncio.to_thread(hash_file, path) for rel, path in fetched.items()}


def cleaned_paths(ctx: ClientContext, job: SyncJobRow) -> frozenset[str]:
    """The verified data files whose local copies the reaper deleted: the plan's, and the manifest's."""
    paths = set(planned_paths(ctx.require_queue(), job.id))
    with contextlib.suppress(Exception):  # a manifest already removed: the plan suffices
        paths.update(data_only(read_manifest(Path(job.run_path)) or {}))
    return frozenset(paths)
