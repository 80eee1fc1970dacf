"""The audit: re-verifying NAS copies that were verified before.

Every VERIFIED or CLEANUP_ELIGIBLE job is re-checked once per
``audit_interval_s`` (never while a schedule window of its equipment's
bandwidth limit is open, unless forced; an ``upload_mbps`` with no schedule
has no window and does not stop it): the remote manifest against the
recorded, verified ``checksums.sha256``. While a window is open only the
local check runs (files added or edited since verification are sent). A
match adds a verify pass (the cleanup counts them); a mismatch goes
through the retry policy as the first mismatch (back to QUEUED for a
re-transfer of the mismatched files), unless the local copies
of those files are damaged or gone, which fails the job (nothing is sent),
or the reaper's deletion of the run is under way with files deleted: it is
stopped and the job FAILED ``remote_changed_during_cleanup``, saying what was
deleted, what the NAS holds wrong and what is kept. The finding's transition
is made under the job's lock (``ClientContext.job_locks``), which the reaper
holds through each batch of unlinks: the two never interleave.
Local damage found by the local check (other bytes under an mtime not moved
on by an edit: a new run copied with its old times into the place of a
verified one, say) fails the job ``local_damage`` before any pass is
counted, cleanup on or off. What cannot be checked now (the NAS away, the
local run away, the reaper finishing, the equipment no longer configured) is
skipped with an event, recorded once while it lasts; a run folder gone while
its parent folder is there (a rename or a deletion, not a disk away) fails the
job ``run_folder_missing`` after :data:`RUN_FOLDER_GRACE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from exlab_wizard.config.models import EquipmentConfig, RunOutsideRoots
from exlab_wizard.fileio import METADATA_DIR
from exlab_wizard.sync.context import ClientContext
from exlab_wizard.sync.failures import FailureKind, unverifiable_kind
from exlab_wizard.sync.job_runner import fail, settle_if_gone
from exlab_wizard.sync.manifest_format import read_manifest
from exlab_wizard.sync.metadata_push import data_only
from exlab_wizard.sync.policy import bandwidth as bw_policy
from exlab_wizard.sync.policy import retry as retry_policy
from exlab_wizard.sync.policy.cleanup import LocalCheck, add_pass_time, name_paths
from exlab_wizard.sync.queue import TRANSITION_EVENT, JobQueue, QueueDamaged, SyncJobRow
from exlab_wizard.sync.reaper import (
    PlanProgress,
    cleanup_planned,
    fail_part_deleted,
    load_verified_stats,
    local_data_deleted_at,
    plan_progress,
    scan_run,
)
from exlab_wizard.sync.reaper.store import REFUSED_EVENT
from exlab_wizard.sync.recovery import LocalDamageError, check_local, damage_message, verified_manifest
from exlab_wizard.sync.states import IllegalTransition, SyncJobState
from exlab_wizard.sync.transports import NasNotAnswering, TransportError, TransportErrorKind
from exlab_wizard.sync.transports.base import location_change, remote_run_path, run_location
from exlab_wizard.sync.transports.share_lanes import in_share_of
from exlab_wizard.sync.verifier import compare
from exlab_wizard.sync.verifier import scan_run as list_run

__all__ = ["RUN_FOLDER_GRACE", "audit_job", "audit_loop", "audit_pass", "local_check", "send_back_if_changed"]

logger = logging.getLogger(__name__)

S = SyncJobState

#: How long a verified job's run folder may be gone, its parent folder there, before the job is
#: FAILED ``run_folder_missing``: a folder moved away for a while (copied elsewhere and back) is
#: waited for; one renamed or deleted for good no longer counts as verified for ever.
RUN_FOLDER_GRACE = dt.timedelta(days=1)
#: The audit event (``audit_skipped``) whose code marks the start of such an absence.
_MISSING = FailureKind.RUN_FOLDER_MISSING.value
#: Events read back for the start of an absence; one further back counts as not seen (later: waits longer).
_MISSING_LOOKBACK = 200
_MISSING_NOTE = "local run folder missing: no recorded manifest to check against"


async def audit_loop(ctx: ClientContext) -> None:
    """Run :func:`audit_pass` every ``min(audit_interval_s, scan_interval_s)``; a failed pass is logged.

    Returns once the queue is damaged (:class:`QueueDamaged`).
    """
    interval = ctx.config.sync.audit_interval_s
    while True:
        await asyncio.sleep(min(interval, max(ctx.config.sync.scan_interval_s, 0.05)))
        try:
            await audit_pass(ctx, force=False)
        except asyncio.CancelledError:
            raise
        except QueueDamaged:  # logged once by the queue; no pass can mend it
            logger.info("audit stopped: the queue database is damaged")
            return
        except Exception:
            logger.exception("audit pass failed")


async def audit_pass(ctx: ClientContext, *, force: bool) -> None:
    """Audit every VERIFIED or CLEANUP_ELIGIBLE job that is due (all of them with ``force``), not in flight."""
    queue = ctx.require_queue()
    interval = dt.timedelta(seconds=ctx.config.sync.audit_interval_s)
    ctx.nas_looks.new_pass()
    silent: dict[str, str] = {}  # equipment id -> why its NAS is skipped for the rest of this pass
    for state in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
        for job in queue.iter_jobs(state):  # page by page, whatever the size of the queue
            equipment = ctx.equipment(job)
            if equipment is None:
                # Renamed or removed in the config: its NAS place cannot be named (the reaper waits too).
                _note(ctx, job, "audit_skipped", _unconfigured_note(job))
                continue
            if job.equipment_id in ctx.inflight:
                continue
            if job.equipment_id in silent:
                _note(ctx, job, "audit_skipped", silent[job.equipment_id])
                continue
            now = ctx.clock()
            if not force and _recent(job.last_verify_at, now, interval):
                continue
            window = not force and _window_limits(equipment, ctx.local_now())
            if window:
                # Never read the NAS while a schedule window limits this equipment; the local check
                # reads nothing from it, so a file written since verification is still sent (under
                # the window's limit), once an audit interval.
                checked = ctx.window_checked_at.get(job.id)
                if _recent(checked, now, interval):
                    continue
                ctx.window_checked_at[job.id] = now
            else:
                ctx.window_checked_at.pop(job.id, None)
            try:
                if window:
                    await local_check(ctx, job, equipment)
                else:
                    await audit_job(ctx, job, equipment)
            except IllegalTransition as exc:  # another process moved the job: its move stands
                logger.warning("audit of job %s: %s", job.id, exc)
            except NasNotAnswering as exc:  # no pass, no finding; the equipment's other jobs wait for the next pass
                silent[job.equipment_id] = exc.message
                _note(ctx, job, "audit_skipped", exc.message)
            except (asyncio.CancelledError, QueueDamaged):  # a damaged queue ends the pass (and the loop)
                raise
            except Exception as exc:  # one job's trouble never keeps the others from their passes
                logger.exception("audit of job %s failed", job.id)
                with contextlib.suppress(Exception):
                    _note(ctx, job, "audit_skipped", f"audit error: {type(exc).__name__}: {exc}"[:2000])
    now = ctx.clock()
    # A check older than an interval holds nothing back (the job is checked anew): forgotten, so
    # jobs that left VERIFIED and CLEANUP_ELIGIBLE leave no entry behind.
    ctx.window_checked_at = {j: at for j, at in ctx.window_checked_at.items() if _recent(at, now, interval)}
    if not force and _recent(ctx.late_data_checked_at, now, interval):
        return
    ctx.late_data_checked_at = now
    for job in queue.iter_jobs(S.CLEANED):
        late = await asyncio.to_thread(_data_after_cleanup, Path(job.run_path))
        if late:
            _note(
                ctx,
                job,
                "late_data",
                f"{len(late)} data file(s) written into the run folder after its cleanup are not on the NAS: "
                f"{name_paths(late)}; a cleaned run is not sent again: move them into a new run folder",
            )


def _recent(last: dt.datetime | None, now: dt.datetime, interval: dt.timedelta) -> bool:
    """Was ``last`` less than ``interval`` before ``now``? A time after ``now`` was not: it was taken
    while the clock ran ahead and it has been set back since, and the check is due (waiting for the
    clock to catch up would skip the audit for the whole error of that clock)."""
    return last is not None and dt.timedelta(0) <= now - last < interval


def _window_limits(equipment: EquipmentConfig, now: dt.datetime) -> bool:
    """Does a schedule window limit ``equipment`` at ``now``, a window that closes? A limit with no
    schedule has no window, and neither has a schedule whose windows cover every hour (the same limit
    at all times, the window never closing): False, or the audit would wait for ever."""
    bandwidth = equipment.transport.bandwidth
    return (
        bandwidth.upload_mbps is not None
        and bw_policy.active_window(bandwidth, now) is not None
        and bw_policy.next_change(bandwidth, now) is not None
    )


async def local_check(ctx: ClientContext, job: SyncJobRow, equipment: EquipmentConfig) -> None:
    """The audit's local half alone, for a window that keeps it off the NAS: files added or edited since
    verification send the job back to QUEUED (:func:`send_back_if_changed`); no pass, nothing read from the NAS."""
    job = ctx.require_queue().get(job.id) or job
    if job.state not in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
        return
    run = Path(job.run_path)
    try:
        remote_run_path(equipment, run)
    except ValueError:
        return  # no longer under its local root: its NAS place cannot be named, nothing to send it to
    try:
        await asyncio.to_thread(ctx.config.equipment_holding, run)
    except RunOutsideRoots:
        return  # a link on the way leads into another equipment's folder: those files are not this run's
    if await asyncio.to_thread(cleanup_planned, ctx.require_queue(), job.id):
        return  # the reaper has planned (or done) the deletion: the run is its to finish
    if not await asyncio.to_thread(os.path.isdir, run):
        await _run_folder_missing(ctx, job, run)
        return
    await send_back_if_changed(ctx, job, run)


def _data_after_cleanup(run: Path) -> list[str]:
    """Data files (outside ``.exlab-wizard/``) in a cleaned run's folder, sorted; [] when it has none or is gone."""
    if not run.is_dir() or run.is_symlink():
        return []
    try:
        return sorted(entry.rel for entry in list_run(run) if not entry.is_dir)
    except OSError:
        return []


def _unconfigured_note(job: SyncJobRow) -> str:
    return (
        f"equipment {job.equipment_id} is no longer configured: its NAS copy cannot be named, so it is not "
        f"audited (nor cleaned) until the equipment is configured again"
    )


#: Events read back for the audit's last one: the reaper's refusals between two audits are passed over.
_NOTE_LOOKBACK = 20


def _note(ctx: ClientContext, job: SyncJobRow, kind: str, detail: str) -> None:
    """Record an audit event unless the job's last event already says the same (no spam while the NAS is away).

    The reaper's refusals (``cleanup_refused``, themselves recorded once while
    they last) are passed over: a skip and a refusal of one cause alternating
    on each pass would otherwise both be recorded every time.
    """
    queue = ctx.require_queue()
    last = [e for e in queue.events(job.id, limit=_NOTE_LOOKBACK) if e.kind != REFUSED_EVENT][-1:]
    if last and last[-1].kind == kind and last[-1].detail == detail:
        return
    queue.record_event(job.id, kind, detail, now=ctx.clock())


async def audit_job(ctx: ClientContext, job: SyncJobRow, equipment: EquipmentConfig) -> None:
    """Re-verify the NAS copy against the recorded manifest; add a pass or send it back."""
    queue = ctx.require_queue()
    job = queue.get(job.id) or job  # the row as the audit begins: its pass counts for this verification only
    if job.state not in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
        return
    run = Path(job.run_path)
    log = ctx.log(equipment)
    try:
        remote_run_path(equipment, run)
    except ValueError:
        # local_root changed in the config (the data moved to another disk): the NAS place of
        # this run cannot be named any more, so nothing is read or counted for it.
        _note(ctx, job, "audit_skipped", f"the run is no longer under equipment {equipment.id}'s local root")
        return
    try:
        await asyncio.to_thread(ctx.config.equipment_holding, run)
    except RunOutsideRoots as exc:
        # The files reached through the link are another equipment's: never hashed, sent or counted as this run's.
        _note(ctx, job, "audit_skipped", str(exc))
        return
    deleted_at = await asyncio.to_thread(local_data_deleted_at, queue, job.id)
    if deleted_at is not None:
        # The reaper has deleted the local data and is finishing (the final metadata push):
        # a re-transfer is impossible, and a missing local cache is not a mismatch.
        _note(ctx, job, "audit_skipped", "local data already deleted: the cleanup is finishing")
        return
    if not await asyncio.to_thread(os.path.isdir, run):
        # An external disk away, say: the recorded manifest cannot be read, which says nothing about the NAS.
        await _run_folder_missing(ctx, job, run)
        return
    if not await ctx.nas_looks.look(job.equipment_id, "the reachability check", lambda: ctx.remotes.reachable(job)):
        _note(ctx, job, "audit_skipped", "remote unreachable")
        return
    record = await asyncio.to_thread(_verified_record, queue, job, run)
    if record is None:
        # Never count a pass against a manifest that is not the verified one (the reaper refuses it too).
        _note(ctx, job, "audit_skipped", "recorded manifest changed since verification")
        return
    # ``known`` tells the verified manifest of a run with no data files (``{}``, an acquisition that
    # wrote nothing: a pass when the NAS copy holds none either) from no recorded manifest at all.
    verified, known = record
    recorded = data_only(verified)
    # The place read, named before it is read (a share swapped meanwhile: recorded as the one before).
    here = await in_share_of(equipment, f"where the NAS copy of {run} is", run_location, equipment, run)
    try:
        remote = await ctx.remotes.access(equipment).manifest(run)
    except NasNotAnswering:  # the transport's own stall limit: never a mismatch
        raise
    except TransportError as exc:
        if exc.kind in (TransportErrorKind.NETWORK, TransportErrorKind.UNKNOWN):
            _note(ctx, job, "audit_skipped", f"remote unreachable: {exc.message}")
            return
        _audit_failed(ctx, job, exc.kind, f"audit: {exc.message}")
        return
    outcome = compare(recorded, remote)
    now = ctx.clock()
    if outcome.ok and known:
        # The local check before the pass: local damage fails the job and counts no pass (the NAS copy
        # is good, but the run beside it is not the verified one: its passes would vouch for nothing).
        check = await _checked_locally(ctx, job, recorded)
        if check is not None and check.damaged:
            await _act_on_local_check(ctx, job, run, check)
            return
        fresh = queue.get(job.id)
        if fresh is None or fresh.state not in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
            return  # moved on meanwhile (re-queued, or cleaned): this pass counts for nothing
        if not _same_verification(fresh, job):
            return  # verified again meanwhile (a new copy): this pass read the one before
        moved = location_change(
            equipment, run, verified_location=fresh.verified_location, remote_path=fresh.remote_path, here=here
        )
        if moved is not None:
            # The configuration names another NAS than the one the passes were read at: this
            # pass, every file hashed there, is the first at the new place (the reaper waits for it).
            passes, times, detail = 1, (now,), f"audit pass at a new NAS location ({here}), the first there"
        else:
            passes, times = fresh.verify_passes + 1, add_pass_time(fresh.pass_times, now)
            detail = f"audit pass {passes}: {outcome.checked} files match"
        try:
            queue.update(
                job.id,
                fresh.state,
                now=now,
                # Checked in the same statement: a re-verification since the read above gets no pass.
                unchanged={"verified_at": job.verified_at, "manifest_digest": job.manifest_digest},
                event_kind="verify_pass",
                detail=detail,
                verify_passes=passes,
                last_verify_at=now,
                pass_times=times,
                verified_location=here,
            )
        except IllegalTransition:
            return  # moved on or verified again between the read and the write: no pass
        log.info(run, "audit_pass", job=job.id, verify_passes=passes)
        if check is not None:
            await _act_on_local_check(ctx, job, run, check)
        return
    # A NAS file its share could not read (a read error: btrfs refusing a damaged block) is sent again
    # like a different one, its NAS copy kept under previous/; one too large to stream back is not.
    unreadable = tuple(
        rel
        for rel in outcome.unverifiable
        if unverifiable_kind(remote.unverifiable.get(rel, "")) is FailureKind.VERIFY_UNREADABLE
    )
    bad = tuple(outcome.different) + tuple(outcome.missing) + unreadable
    reason = (
        "audit: no recorded manifest"
        if not known
        else f"audit mismatch: {len(outcome.different)} different, {len(outcome.missing)} missing, "
        f"{len(outcome.extra)} extra, {len(outcome.unverifiable)} unverifiable" + (f"; first: {bad[0]}" if bad else "")
    )
    log.error(run, "audit_failed", job=job.id, reason=reason)
    # Under the job's lock, shared with the reaper: no batch of its unlinks runs until the job has moved.
    async with ctx.job_locks(job.id):
        fresh = queue.get(job.id)
        if fresh is not None and fresh.state == S.CLEANED and _same_verification(fresh, job):
            # The reaper finished while the NAS was read: nothing is left to stop or send, only to say.
            queue.record_event(
                job.id,
                "audit_failed",
                f"{reason}; found as the cleanup finished: the local data are deleted, so the verified bytes of "
                f"{name_paths(list(bad)) or 'the run'} may now exist only in an older copy (a NAS snapshot, a "
                f"backup) or nowhere",
                now=ctx.clock(),
            )
            return
        plan = await asyncio.to_thread(plan_progress, queue, job.id, run)
        if plan is not None and (plan.deleted or plan.data_deleted or plan.blocked):
            # Part of the run is deleted: a re-transfer of the rest would not verify (nor send those).
            found = (tuple(outcome.different), tuple(outcome.missing), unreadable)
            _stop_cleanup(ctx, job, run, reason, found, plan)
            return
        try:
            # The run's verified files gone locally, its NAS folder holding the run's verified copy (the run
            # cleaned while the queue did not know it: put back from an older backup, say): never sent.
            if await settle_if_gone(ctx, queue.get(job.id) or job):
                return
        except TransportError as exc:
            _note(ctx, job, "audit_skipped", f"{reason}; the NAS copy could not be checked now: {exc.message}")
            return
        refusal = await asyncio.to_thread(_local_copies_unusable, ctx, job, run, recorded, bad)
        if refusal is not None:
            kind, why = refusal
            _audit_failed(ctx, job, kind, f"{reason}; {why}", final=True)
            return
        _audit_failed(ctx, job, TransportErrorKind.HASH_MISMATCH, reason, rewrite=bad)


def _stop_cleanup(
    ctx: ClientContext,
    job: SyncJobRow,
    run: Path,
    reason: str,
    found: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]],
    plan: PlanProgress,
) -> None:
    """A mismatch while the reaper's deletion of the run is under way: stop it, FAILED, plan dropped.

    As the reaper fails a cleanup stopped part way (``remote_changed_during_cleanup``):
    which files were deleted (their NAS copies verified before), which NAS
    files are found different, missing or unreadable now, the rest kept locally. The
    mismatched files are recorded to be sent again (``rewrite_paths``) once
    ``retry`` has put the deleted files back from the NAS; one whose local
    copy this cleanup deleted is said plainly to be lost but for an older
    copy. The caller holds the job's lock: no unlink is under way.
    """
    queue = ctx.require_queue()
    fresh = queue.get(job.id)
    if fresh is None or fresh.state not in (S.VERIFIED, S.CLEANUP_ELIGIBLE) or not _same_verification(fresh, job):
        return  # moved on meanwhile: the reaper's next batch check finds that
    different, missing, unreadable = found
    bad = (*different, *missing, *unreadable)
    deleted = set(plan.deleted)
    lost = [p for p in bad if p in deleted]
    kept = [p for p in bad if p not in deleted]
    left = len(plan.planned) - len(plan.deleted)
    parts = [
        f"{reason}; the cleanup was stopped: {len(plan.deleted)} of {len(plan.planned)} planned files were "
        f"already deleted locally"
        + (f" ({name_paths(list(plan.deleted))})" if plan.deleted else "")
        + f", their NAS copies verified before the deletion; the other {left} are kept locally"
    ]
    found_text = "; ".join(
        f"{what} on the NAS: {name_paths(list(paths))}"
        for what, paths in (("different", different), ("missing", missing), ("unreadable", unreadable))
        if paths
    )
    if found_text:
        parts.append(f"now {found_text}")
    if plan.blocked:
        parts.append(
            f"kept as set aside by an interrupted deletion (a file has the name again): {', '.join(plan.blocked)}"
        )
    if lost:
        parts.append(
            f"{name_paths(lost)}: deleted locally by this cleanup, and the NAS copy is not the verified bytes: they "
            f"may now exist only in an older copy (a NAS snapshot, a backup) or nowhere; put them back into the run, "
            f"then `exlab-sync retry {job.id}`"
        )
    if kept:
        parts.append(
            f"the local copies of {name_paths(kept)} are kept: `exlab-sync retry {job.id}` puts the deleted files "
            f"back from their NAS copies and sends these again (the NAS keeps the copies found different under "
            f"{METADATA_DIR}/previous/)"
        )
    message = "; ".join(parts)
    now = ctx.clock()
    moved = fail_part_deleted(
        queue,
        job.id,
        fresh.state,
        now=now,
        reason=message,
        kind=FailureKind.REMOTE_CHANGED_DURING_CLEANUP,
        # The NAS copy was found bad: nothing may bring the job back to VERIFIED without a transfer.
        verify_passes=0,
        verified_at=None,
        pass_times=(),
        rewrite_paths=bad,
    )
    if moved is None:
        return  # another actor moved it first
    with contextlib.suppress(Exception):
        if run.is_dir():
            ctx.cache.set_sync_status(run, "failed")
    equipment = ctx.equipment(job)
    if equipment is not None:
        ctx.log(equipment).error(
            run,
            "cleanup_stopped",
            job=job.id,
            reason=reason,
            files_deleted=len(plan.deleted),
            files_planned=len(plan.planned),
            manifest_digest=job.manifest_digest,
        )
    ctx.notify_state(moved)


def _local_copies_unusable(
    ctx: ClientContext, job: SyncJobRow, run: Path, recorded: Mapping[str, str], bad: tuple[str, ...]
) -> tuple[str, str] | None:
    """Before the NAS copies of ``bad`` are rewritten from local: are the local copies still the verified bytes?

    Local damage (content changed, mtime not) must never be sent over the
    NAS, and a local copy that is gone cannot be sent at all: both are
    ``(error kind, reason)`` for FAILED. None when a re-transfer may go
    ahead (the local copies are intact, or edited: an edit is re-synced).
    """
    subset = {p: recorded[p] for p in bad if p in recorded}
    if not subset:
        return None
    scan = scan_run(run, subset, load_verified_stats(ctx.require_queue(), job.id), verified_at=job.verified_at)
    if scan.check.refusal is not None:
        return None  # the run folder is away: the transfer itself will say so
    if scan.check.damaged:
        return FailureKind.LOCAL_DAMAGE, (
            f"the local copy is damaged too (content changed, mtime not): {name_paths(list(scan.check.damaged))}; "
            "nothing sent"
        )
    if scan.check.missing:
        return TransportErrorKind.LOCAL_FILE_VANISHED.value, (
            f"no local copy to send again: {name_paths(list(scan.check.missing))}"
        )
    return None


def _verified_record(queue: JobQueue, job: SyncJobRow, run: Path) -> tuple[dict[str, str], bool] | None:
    """What the NAS copy is checked against: (the manifest, is it the recorded one).

    The run's ``checksums.sha256`` when it has the job's digest, else the
    per-file hashes the queue recorded at verification (a lost or edited
    local file does not make a verified NAS copy look unverified): known,
    and ``{}`` for a run verified with no data files. ``({}, False)`` when the
    run has no ``checksums.sha256`` and the queue no stand-in (or the job no
    digest and the run no manifest listing files): no recorded manifest. None
    when the local file is not the job's digest (edited, or emptied) and the
    queue has no stand-in: nothing is concluded then.
    """
    if not job.manifest_digest:
        local = read_manifest(run)
        return local or {}, bool(local)  # never verified: a local manifest that lists files, as before
    verified = verified_manifest(job, queue)
    if verified is not None:
        return verified, True
    return ({}, False) if read_manifest(run) is None else None


async def send_back_if_changed(
    ctx: ClientContext,
    job: SyncJobRow,
    run: Path,
    manifest: Mapping[str, str] | None = None,
    *,
    raise_damage: bool = False,
) -> SyncJobRow | None:
    """Files added to the run or edited since its verification send the job back to QUEUED (cleanup on or off).

    Otherwise data an instrument writes after VERIFIED would only ever be
    found by the reaper, which never looks while cleanup is off. The NAS
    copies of edited files are kept under ``previous/`` by the transfer.
    Local damage (other bytes, the mtime not moved on by an edit) is never
    sent: the job goes to FAILED ``local_damage`` instead, as the reaper's
    interlock 6 does. ``manifest``: the verified manifest, when the caller
    has read it. The job as sent back or failed, or None when it was left
    as it is. ``raise_damage`` (``enqueue``'s answer): raise
    :class:`~exlab_wizard.sync.recovery.LocalDamageError` once the job is
    FAILED for local damage.
    """
    check = await _checked_locally(ctx, job, manifest)
    if check is None:
        return None
    moved = await _act_on_local_check(ctx, job, run, check)
    if raise_damage and check.damaged and moved is not None and moved.state == S.FAILED:
        raise LocalDamageError(job.id, job.run_path, check.damaged)
    return moved


async def _checked_locally(
    ctx: ClientContext, job: SyncJobRow, manifest: Mapping[str, str] | None = None
) -> LocalCheck | None:
    """The local check of a verified run, or None: no verified manifest, the run unreadable, or a
    deletion plan for it (the run is then the reaper's to finish, not to send again or fail)."""
    queue = ctx.require_queue()
    if await asyncio.to_thread(cleanup_planned, queue, job.id):
        return None
    check = await asyncio.to_thread(check_local, queue, job, manifest)
    return None if check is None or check.refusal is not None else check


async def _act_on_local_check(ctx: ClientContext, job: SyncJobRow, run: Path, check: LocalCheck) -> SyncJobRow | None:
    """Damage: FAILED ``local_damage``; else files added or edited: back to QUEUED; else nothing (None).

    Nothing once the reaper has planned a deletion since the check: asked
    again here, and in the move's own UPDATE (``unless_planned``), which
    orders it with a reaper in another process (an ``exlab-sync enqueue``
    beside ``serve``, a window-time check beside ``exlab-sync cleanup``): the
    job locks are one process's.
    """
    async with ctx.job_locks(job.id):  # the reaper's batches wait: a send-back never lands mid-deletion
        return await _act_unlocked(ctx, job, run, check)


async def _act_unlocked(ctx: ClientContext, job: SyncJobRow, run: Path, check: LocalCheck) -> SyncJobRow | None:
    queue = ctx.require_queue()
    if await asyncio.to_thread(cleanup_planned, queue, job.id):
        return None
    if check.damaged:
        return _fail_local_damage(ctx, job, check.damaged)
    if not (check.added or check.changed):
        return None
    paths = sorted({*check.added, *check.changed})
    reason = f"the run changed since verification: {len(paths)} file(s) added or edited ({name_paths(paths)})"
    fresh = queue.get(job.id)
    if fresh is None or fresh.state not in (S.VERIFIED, S.CLEANUP_ELIGIBLE) or not _same_verification(fresh, job):
        return None
    try:
        fresh = queue.transition(
            job.id,
            fresh.state,
            S.QUEUED,
            now=ctx.clock(),
            detail=f"{reason}; sent again",
            attempts=0,
            mismatch_count=0,
            next_attempt_at=None,
            error_kind=None,
            last_error=None,
            verify_passes=0,
            verified_at=None,
            pass_times=(),
            unless_planned=True,
        )
    except IllegalTransition:
        return None  # another actor moved it first, or the reaper planned its deletion: its to finish
    equipment = ctx.equipment(job)
    if equipment is not None:
        ctx.log(equipment).warning(run, "run_changed", job=job.id, files=len(paths))
    ctx.notify_state(fresh)
    ctx.kick()
    return fresh


def _fail_local_damage(ctx: ClientContext, job: SyncJobRow, damaged: tuple[str, ...]) -> SyncJobRow | None:
    """FAILED ``local_damage`` with the reaper's message and ways out; nothing sent, the NAS copy left as
    verified (its passes kept: a ``restore`` brings the job back to VERIFIED). None when it moved on."""
    queue = ctx.require_queue()
    fresh = queue.get(job.id)
    if fresh is None or fresh.state not in (S.VERIFIED, S.CLEANUP_ELIGIBLE) or not _same_verification(fresh, job):
        return None
    try:
        fail(
            ctx,
            fresh,
            fresh.state,
            FailureKind.LOCAL_DAMAGE,
            damage_message(job.id, job.run_path, damaged),
            unless_planned=True,  # a deletion under way is the reaper's: its interlocks judge the files
        )
    except IllegalTransition:
        return None  # another actor moved it first, or the reaper planned its deletion
    return queue.get(job.id)


async def _run_folder_missing(ctx: ClientContext, job: SyncJobRow, run: Path) -> None:
    """A verified job's run folder is not there: wait for it, or after :data:`RUN_FOLDER_GRACE` fail the job.

    Only a folder gone while its parent folder is there (renamed, or
    deleted) fails, and only with no deletion planned for the run (with
    ``retain_cache: false`` a cleaned run's folder is removed on purpose). A
    missing parent is a disk or share away, which says nothing of the run:
    it is waited for as long as it lasts. The absence is timed from the
    first audit that saw it (an ``audit_skipped`` event with code
    ``run_folder_missing``); any other audit finding since starts it anew,
    and so does a first sighting stamped after now (by a clock that ran
    ahead and has been set back since): a new marker is written at now.
    """
    queue = ctx.require_queue()
    gone = not await asyncio.to_thread(os.path.lexists, run) and await asyncio.to_thread(os.path.isdir, run.parent)
    if not gone or await asyncio.to_thread(cleanup_planned, queue, job.id):
        _note(ctx, job, "audit_skipped", _MISSING_NOTE)
        return
    now = ctx.clock()
    since = _missing_since(queue, job.id)
    # A first sighting stamped after now was stamped while the clock ran ahead, set back since:
    # the grace counts anew from now (waiting it out would hold the job for the clock's whole error).
    if since is None or since > now:
        queue.record_event(
            job.id,
            "audit_skipped",
            f"local run folder missing while its parent folder is there (renamed or deleted?): the job fails "
            f"`{_MISSING}` if it is still missing in {_hours(RUN_FOLDER_GRACE)}",
            now=now,
            code=_MISSING,
        )
        return
    if now - since < RUN_FOLDER_GRACE:
        return
    fresh = queue.get(job.id)
    if fresh is None or fresh.state not in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
        return
    reason = (
        f"the run folder is gone (renamed or deleted?) since {_utc_text(since)}; nothing was deleted by the "
        f"engine; if it comes back, `exlab-sync retry {job.id}` re-arms it"
    )
    try:
        # Not once a deletion is planned (with retain_cache: false the reaper removes the folder itself).
        fail(ctx, fresh, fresh.state, FailureKind.RUN_FOLDER_MISSING, reason, unless_planned=True)
    except IllegalTransition:
        return  # another actor moved it first, or the reaper planned its deletion


def _missing_since(queue: JobQueue, job_id: str) -> dt.datetime | None:
    """When the audit first saw the run folder gone in the absence still going on; None when not seen yet.

    Read back from the job's events: the last ``run_folder_missing``
    markers not followed by a transition, a pass or another audit finding
    (the reaper's refusals and other notes say nothing of the folder). A
    marker stamped after a later one was stamped while the clock ran ahead:
    the absence is timed from the later one, written after the correction.
    """
    since = None
    for event in reversed(queue.events(job_id, limit=_MISSING_LOOKBACK)):
        if event.kind == "audit_skipped" and event.code == _MISSING:
            if since is not None and event.at > since:
                break
            since = event.at
        elif event.kind in (TRANSITION_EVENT, "verify_pass", "audit_skipped"):
            break
    return since


def _hours(span: dt.timedelta) -> str:
    hours = span.total_seconds() / 3600
    return f"{hours:g} h"


def _utc_text(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _same_verification(fresh: SyncJobRow, job: SyncJobRow) -> bool:
    """Is ``fresh`` still the verification ``job`` was when the audit began (same time, same manifest)?"""
    return fresh.verified_at == job.verified_at and fresh.manifest_digest == job.manifest_digest


def _audit_failed(
    ctx: ClientContext,
    job: SyncJobRow,
    kind: TransportErrorKind | str,
    reason: str,
    *,
    rewrite: tuple[str, ...] = (),
    final: bool = False,
) -> None:
    """A failed re-verification, decided by the retry policy.

    The audit's mismatch counts as the first mismatch: the job goes back
    to QUEUED for a re-transfer of the mismatched files (the verify clock
    starts again), and a second mismatch after it is FAILED. Other kinds
    (auth, remote refused) are FAILED at once. ``final`` fails the job
    whatever the kind. The job's current state is re-read, so a promotion
    to CLEANUP_ELIGIBLE made meanwhile does not swallow the failure (and
    the pending deletion is cancelled with it).
    """
    queue = ctx.require_queue()
    kind_value = str(getattr(kind, "value", kind))
    for _ in range(5):
        fresh = queue.get(job.id)
        if fresh is None or fresh.state not in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
            return  # re-queued or cleaned meanwhile: nothing left to send back
        if not _same_verification(fresh, job):
            return  # verified again meanwhile: what this audit read was the copy before
        now = ctx.clock()
        if final:
            decision = None
        else:
            decision = retry_policy.decide(
                kind_value,
                attempts=1,
                mismatch_count=1,
                backoff_s=ctx.config.sync.backoff_s,
                now=now,
                message=reason,
            )
        try:
            if decision is None or decision.action != "retry":
                failed_kind = kind_value if decision is None else decision.error_kind
                why = reason if decision is None else decision.reason
                bad = final or failed_kind == TransportErrorKind.HASH_MISMATCH.value
                fail(ctx, fresh, fresh.state, failed_kind, why, nas_copy_bad=bad)
                return
            queue.transition(
                job.id,
                fresh.state,
                S.QUEUED,
                now=now,
                detail=decision.reason,
                attempts=0,
                mismatch_count=1,
                next_attempt_at=decision.next_attempt_at,
                error_kind=decision.error_kind,
                last_error=decision.reason,
                rewrite_paths=rewrite if decision.rewrite else (),
                verify_passes=0,
                verified_at=None,
                pass_times=(),
            )
        except IllegalTransition:
            continue  # the state changed under us: read it again
        equipment = ctx.equipment(job)
        if equipment is not None:
            ctx.log(equipment).warning(
                job.run_path, "retry_scheduled", job=job.id, kind=kind_value, reason=decision.reason
            )
        ctx.notify({"type": "state", "job_id": job.id, "run_path": job.run_path, "state": S.QUEUED.value})
        ctx.kick()
        return
    raise IllegalTransition(f"job {job.id} kept changing state during its audit")
