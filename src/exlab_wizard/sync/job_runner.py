"""The life of one job, and the dispatcher that starts jobs.

One job's steps, each a durable transition of its queue row:

- :func:`run_job`: the Pre-Sync Gate (a hold keeps the job QUEUED), the
  local-damage check (damaged bytes are never sent), ``QUEUED -> RUNNING``,
  the NAS copies kept for an accepted local change, the push with the local
  hashing overlapped, ``RUNNING -> AWAITING_VERIFY``;
- :func:`verify_job`: the remote manifest against the local hashes,
  ``AWAITING_VERIFY -> VERIFIED`` with the new manifest, the verified file
  stats for the reaper, and the metadata push the promotion owes;
- :func:`retry_or_fail` and :func:`fail`: the retry policy's decision, recorded;
- :func:`guarded`: an unexpected exception in a step is handed to the retry
  policy as ``unknown`` (:func:`crashed`), never left as a job stuck RUNNING.

The dispatcher (:func:`dispatch_loop`) starts due jobs and due metadata
pushes, one per equipment and ``max_parallel_jobs`` overall; it sleeps until
the next due time or a wake-up (:meth:`ClientContext.kick`), at most
``poll_interval_s``. :func:`wait_idle` and :func:`waiting_for` answer what
is still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from exlab_wizard.config.models import EquipmentConfig, RunOutsideRoots
from exlab_wizard.fileio import METADATA_DIR, is_data_path
from exlab_wizard.sync import gate as gate_mod
from exlab_wizard.sync import metadata_push
from exlab_wizard.sync.context import ClientContext, TransferProgress, elapsed_s
from exlab_wizard.sync.failures import UNVERIFIABLE_OVERSIZE, FailureKind, unverifiable_kind
from exlab_wizard.sync.policy import bandwidth as bw_policy
from exlab_wizard.sync.policy import retry as retry_policy
from exlab_wizard.sync.policy.cleanup import LocalCheck, name_paths
from exlab_wizard.sync.queue import NAS_CLAIMED_EVENT, JobQueue, QueueDamaged, SyncJobRow, attempt_due
from exlab_wizard.sync.reaper import cleanup_planned, record_verified_stat
from exlab_wizard.sync.recovery import (
    LOCAL_DAMAGE,
    PREVIOUS_KEPT_EVENT,
    PREVIOUS_RESERVED_EVENT,
    NasCopyCheck,
    adopt_nas_copy,
    check_local,
    check_nas_copy,
    cleaned_here,
    damage_message,
    missing_message,
    nas_copy_place,
    new_previous_stamp,
    used_previous_stamps,
    verified_manifest,
)
from exlab_wizard.sync.remote import RemoteAccess
from exlab_wizard.sync.spill import SpillMap, keys_by_bytes
from exlab_wizard.sync.states import IllegalTransition, SyncJobState
from exlab_wizard.sync.transports import RemoteManifest, TransportError, TransportErrorKind
from exlab_wizard.sync.transports.base import (
    PreviousStampTaken,
    location_change,
    previous_stamps,
    remote_run_path,
    run_location,
)
from exlab_wizard.sync.transports.conflict import NAS_MANIFEST, check_owner, claim_markers, ownership_error
from exlab_wizard.sync.transports.share_lanes import in_share_of
from exlab_wizard.sync.verifier import compare
from exlab_wizard.sync.verifier import scan_run as scan_entries

#: The event of a run held by the gate; its ``code`` is the sorted blocking rules, comma-separated.
GATE_HOLD_EVENT = "gate_hold"

__all__ = [
    "crashed",
    "dispatch_loop",
    "fail",
    "guarded",
    "max_wait",
    "retry_or_fail",
    "run_job",
    "start",
    "verify_job",
    "wait_idle",
    "waiting_for",
]

logger = logging.getLogger(__name__)

S = SyncJobState


# ---------------------------------------------------------------------- the dispatcher


def max_wait(ctx: ClientContext) -> dt.timedelta:
    """The longest wait this engine sets on a QUEUED job: its longest backoff, or a scan interval.

    A ``next_attempt_at`` further ahead was set while the clock ran ahead and
    has since been set back: it is due (:func:`~exlab_wizard.sync.queue.attempt_due`).
    """
    sync = ctx.config.sync
    return dt.timedelta(seconds=max((*sync.backoff_s, sync.scan_interval_s)))


def start(ctx: ClientContext, job: SyncJobRow, equipment: EquipmentConfig, work: Awaitable[None], what: str) -> None:
    """Run one step of a job as the equipment's in-flight task."""
    task = asyncio.create_task(guarded(ctx, job, work), name=f"{what}-{job.id}")
    task.add_done_callback(lambda _t: ctx.kick())
    ctx.inflight[equipment.id] = task
    ctx.inflight_jobs[equipment.id] = job.id


async def dispatch_loop(ctx: ClientContext, *, poll_interval_s: float) -> None:
    """Start due jobs: one per equipment, ``max_parallel_jobs`` overall.

    Returns once the queue is damaged (:class:`QueueDamaged`, logged once by
    the queue): no job is started again by this process.
    """
    assert ctx.wake is not None
    while True:
        ctx.wake.clear()
        try:
            timeout = _dispatch_once(ctx, poll_interval_s)
        except QueueDamaged:
            # No poll can mend the file: polling on would log a traceback per poll and sync nothing.
            logger.info("dispatcher stopped: the queue database is damaged")
            return
        except Exception:
            # The queue could not be read or written (locked by another program past its busy
            # timeout, its disk full): nothing is started, and the loop goes on.
            logger.exception("dispatching jobs failed; tried again in %g s", poll_interval_s)
            timeout = poll_interval_s
        await _sleep_until_woken(ctx, timeout)


def _dispatch_once(ctx: ClientContext, poll_interval_s: float) -> float:
    """Start what is due; the time to sleep before the next look."""
    queue = ctx.require_queue()
    limit = ctx.config.sync.max_parallel_jobs
    for equipment_id, task in list(ctx.inflight.items()):
        if task.done():
            del ctx.inflight[equipment_id]
            ctx.ended.add(ctx.inflight_jobs.pop(equipment_id))
    _settle_ended(ctx)
    if not _can_start(ctx, limit):
        # Every slot or every equipment is busy: nothing could start, so the queue is not
        # read (a step that ends wakes the loop at once).
        return poll_interval_s

    def unconfigured(job: SyncJobRow, _why: str) -> None:
        fail_unconfigured(ctx, job, S.QUEUED)

    wait = max_wait(ctx)
    _start_due(ctx, limit, functools.partial(queue.next_due, max_wait=wait), unconfigured, run_job, "job")
    # The pending metadata pushes that are due (a push interrupted or failed earlier).
    _start_due(
        ctx,
        limit,
        functools.partial(queue.next_metadata_push, max_wait=wait),
        lambda job, why: metadata_push.push_failed(ctx, job, why),
        metadata_push.send_pending,
        "metadata",
    )
    timeout = poll_interval_s
    wakeup = queue.next_dispatch_wakeup(ctx.clock(), max_wait=wait)
    if wakeup is not None:
        timeout = max(0.0, min(timeout, (wakeup - ctx.clock()).total_seconds()))
    return timeout


def fail_unconfigured(ctx: ClientContext, job: SyncJobRow, from_state: SyncJobState) -> None:
    """FAILED ``unknown``: the job's equipment id is no longer in the config (renamed or removed).

    For a QUEUED job (nothing can be sent) and an AWAITING_VERIFY one (nothing
    can be verified); the reason says the way back. Raises ``IllegalTransition``
    when another actor moved the job first.
    """
    why = (
        f"equipment {job.equipment_id} is no longer configured; once it is configured again, "
        f"`exlab-sync retry {job.id}` re-arms the job"
    )
    ctx.require_queue().transition(
        job.id, from_state, S.FAILED, now=ctx.clock(), detail=why, error_kind=FailureKind.UNKNOWN, last_error=why
    )


def _settle_ended(ctx: ClientContext) -> None:
    """Jobs whose step ended without its outcome in the queue go on, as after a restart.

    A step's last transition, and :func:`crashed` after it, fail while the
    queue cannot be written (another program holding its write lock past the
    busy timeout, its disk full); the row is left RUNNING or AWAITING_VERIFY,
    which no step picks up. Such a RUNNING job goes through the retry policy
    (what its push left on the NAS is its own: its claim says so); an
    AWAITING_VERIFY one is verified again. A job is forgotten here only once
    the queue has answered for it (an error here is the dispatcher's: it tries
    again at its next look).
    """
    queue = ctx.require_queue()
    for job_id in list(ctx.ended):
        if job_id in ctx.inflight_jobs.values():
            ctx.ended.discard(job_id)  # started again already
            continue
        job = queue.get(job_id)
        if job is not None and job.state == S.RUNNING:
            logger.warning("job %s: its step ended with the job still running in the queue; sent again", job.id)
            with contextlib.suppress(IllegalTransition):  # another process moved it: its move stands
                retry_or_fail(ctx, job, S.RUNNING, TransportErrorKind.UNKNOWN, _UNRECORDED)
        elif job is not None and job.state == S.AWAITING_VERIFY:
            equipment = ctx.equipment(job)
            if equipment is not None and job.equipment_id in ctx.inflight:
                continue  # its equipment is busy: next time
            if equipment is not None:
                logger.warning("job %s: its step ended before its verification was recorded; verified again", job.id)
                start(ctx, job, equipment, verify_job(ctx, job, equipment, local_hashes=None), "verify")
            else:
                with contextlib.suppress(IllegalTransition):  # another process moved it: its move stands
                    fail_unconfigured(ctx, job, S.AWAITING_VERIFY)
        ctx.ended.discard(job_id)


_UNRECORDED = "the step's outcome could not be written to the job queue (locked by another program, or its disk full)"


def _can_start(ctx: ClientContext, limit: int) -> bool:
    """Is a slot free, and a configured equipment with nothing in flight?

    (A job whose equipment is no longer configured is failed when the queue is next read.)
    """
    if len(ctx.inflight) >= limit:
        return False
    configured = {equipment.id for equipment in ctx.config.equipment}
    return not configured or not configured <= set(ctx.inflight)


async def _sleep_until_woken(ctx: ClientContext, timeout: float) -> None:
    assert ctx.wake is not None
    # asyncio.wait, not wait_for: 3.11's wait_for can swallow a cancel
    # that races its timeout, and close() would then wait forever.
    waiter = asyncio.ensure_future(ctx.wake.wait())
    try:
        await asyncio.wait({waiter}, timeout=max(timeout, 0.001))
    finally:
        waiter.cancel()


def _start_due(
    ctx: ClientContext,
    limit: int,
    next_job: Callable[..., SyncJobRow | None],
    unconfigured: Callable[[SyncJobRow, str], None],
    work: Callable[[ClientContext, SyncJobRow, EquipmentConfig], Awaitable[Any]],
    what: str,
) -> None:
    """Start ``work`` for each job ``next_job`` finds due, while a slot is free, one per equipment.

    A job whose equipment is no longer configured goes to ``unconfigured`` with the reason.
    """
    while len(ctx.inflight) < limit:
        job = next_job(ctx.clock(), busy_equipment=set(ctx.inflight))
        if job is None:
            return
        equipment = ctx.equipment(job)
        if equipment is None:
            unconfigured(job, f"equipment {job.equipment_id} is no longer configured")
            continue
        start(ctx, job, equipment, work(ctx, job, equipment), what)


async def wait_idle(ctx: ClientContext) -> None:
    """Return once no job is in flight or ended unsettled, and no QUEUED job or pending metadata push is due."""
    while True:
        queue = ctx.require_queue()
        now = ctx.clock()
        wait = max_wait(ctx)
        due = queue.next_due(now, max_wait=wait) or queue.next_metadata_push(now, max_wait=wait)
        if not ctx.inflight and not ctx.ended and due is None:
            return
        await asyncio.sleep(0.02)


def waiting_for(ctx: ClientContext, job_ids: Iterable[str]) -> dict[str, str]:
    """What each of these jobs still waits for, by job id (see ``NASSyncClient.waiting_for``)."""
    queue = ctx.require_queue()
    busy = {job_id for eq, job_id in ctx.inflight_jobs.items() if eq in ctx.inflight and not ctx.inflight[eq].done()}
    now = ctx.clock()
    waiting: dict[str, str] = {}
    for job_id in job_ids:
        job = queue.get(job_id)
        if job is None or job.state in (S.FAILED, S.CLEANED):
            continue
        if job.state in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
            if job.metadata_push_pending and (job.id in busy or job.metadata_push_failures == 0):
                waiting[job.id] = f"{job.state.value}: metadata push to the NAS (checksums.sha256, creation.json)"
            continue
        what = job.state.value + (" (in flight)" if job.id in busy else "")
        at = job.next_attempt_at
        if job.state == S.QUEUED and at is not None and not attempt_due(at, now, max_wait(ctx)):
            what += f", next attempt at {at.astimezone().strftime('%Y-%m-%d %H:%M:%S')}"
        if job.last_error:
            what += f"; last error: {job.last_error}"
        waiting[job.id] = what
    return waiting


# ---------------------------------------------------------------------- errors in a step


async def guarded(ctx: ClientContext, job: SyncJobRow, work: Awaitable[None]) -> None:
    """Run a job's step; an unexpected exception goes to :func:`crashed`, a stale move is logged."""
    try:
        await work
    except asyncio.CancelledError:
        raise
    except IllegalTransition as exc:  # another process moved the job: its move stands
        logger.warning("job %s: %s", job.id, exc)
    except QueueDamaged:  # logged once by the queue; no outcome can be recorded: recovered after a repair
        logger.info("job %s stopped: the queue database is damaged", job.id)
    except Exception as exc:
        logger.exception("job %s crashed", job.id)
        crashed(ctx, job, exc)
    finally:
        ctx.progress.pop(job.id, None)


def crashed(ctx: ClientContext, job: SyncJobRow, exc: Exception) -> None:
    """An unexpected exception in a job's steps: the retry policy decides, as ``unknown``.

    A job caught in QUEUED (the gate), RUNNING or AWAITING_VERIFY is sent
    back with backoff (FAILED once the backoff list is used up), with the
    message in ``last_error`` and an event; a VERIFIED job whose metadata
    push is pending gets the push tried again later.
    """
    message = f"{type(exc).__name__}: {exc}"[:2000]
    queue = ctx.require_queue()
    try:
        fresh = queue.get(job.id)
        if fresh is None:
            return
        equipment = ctx.equipment(fresh)
        if equipment is not None:
            with contextlib.suppress(Exception):  # the log disk may be what failed
                ctx.log(equipment).error(
                    fresh.run_path, "job_error", job=fresh.id, state=fresh.state.value, error=message
                )
        if fresh.state in (S.QUEUED, S.RUNNING, S.AWAITING_VERIFY):
            retry_or_fail(ctx, fresh, fresh.state, TransportErrorKind.UNKNOWN, message)
        elif fresh.metadata_push_pending and fresh.state in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
            metadata_push.push_failed(ctx, fresh, message)
        else:
            queue.record_event(fresh.id, "note", f"error: {message}", now=ctx.clock())
    except Exception:
        logger.exception("job %s: its error could not be recorded", job.id)


def retry_or_fail(
    ctx: ClientContext,
    job: SyncJobRow,
    from_state: SyncJobState,
    kind: TransportErrorKind | str,
    message: str,
    *,
    rewrite: tuple[str, ...] = (),
) -> None:
    """Record the retry policy's decision for a failed attempt: back to QUEUED with backoff, or FAILED."""
    queue = ctx.require_queue()
    kind_value = str(getattr(kind, "value", kind))
    mismatch = job.mismatch_count + (1 if kind_value == TransportErrorKind.HASH_MISMATCH else 0)
    attempts = job.attempts + 1
    now = ctx.clock()
    decision = retry_policy.decide(
        kind_value,
        attempts=attempts,
        mismatch_count=mismatch,
        backoff_s=ctx.config.sync.backoff_s,
        now=now,
        message=message,
    )
    equipment = ctx.equipment(job)
    if decision.action != "retry":
        fail(ctx, job, from_state, decision.error_kind, decision.reason, attempts=attempts, mismatch=mismatch)
        return
    fields: dict[str, Any] = {
        "attempts": attempts,
        "mismatch_count": mismatch,
        "next_attempt_at": decision.next_attempt_at,
        "error_kind": decision.error_kind,
        "last_error": decision.reason,
        "rewrite_paths": rewrite if decision.rewrite else job.rewrite_paths,
    }
    if from_state == S.QUEUED:  # failed before its transfer began (the gate): no state change
        job = queue.update(job.id, S.QUEUED, now=now, event_kind="retry_scheduled", detail=decision.reason, **fields)
    else:
        job = queue.transition(job.id, from_state, S.QUEUED, now=now, detail=decision.reason, **fields)
    if equipment is not None:
        ctx.log(equipment).warning(job.run_path, "retry_scheduled", job=job.id, kind=kind_value, reason=decision.reason)
    ctx.notify_state(job)


def fail(
    ctx: ClientContext,
    job: SyncJobRow,
    from_state: SyncJobState,
    kind: TransportErrorKind | str,
    message: str,
    *,
    attempts: int | None = None,
    mismatch: int | None = None,
    nas_copy_bad: bool = False,
    unless_planned: bool = False,
) -> None:
    """Move the job to FAILED with ``kind`` and ``message``; mark the run's creation.json ``failed``.

    ``nas_copy_bad``: the failure found the NAS copy wrong (an audit), so its
    verification and passes are cleared: nothing (a restore, say) may bring
    the job back to VERIFIED without a new transfer and verification.
    ``unless_planned``: not while the reaper has a deletion plan for the job
    (see ``JobQueue.transition``; raises ``DeletionPlanned``).
    """
    queue = ctx.require_queue()
    kind_value = str(getattr(kind, "value", kind))
    fields: dict[str, Any] = {"error_kind": kind_value, "last_error": message, "next_attempt_at": None}
    if nas_copy_bad:
        fields.update(verify_passes=0, verified_at=None, pass_times=())
    if attempts is not None:
        fields["attempts"] = attempts
    if mismatch is not None:
        fields["mismatch_count"] = mismatch
    job = queue.transition(
        job.id, from_state, S.FAILED, now=ctx.clock(), detail=message, unless_planned=unless_planned, **fields
    )
    run = Path(job.run_path)
    with contextlib.suppress(Exception):
        if run.is_dir():
            ctx.cache.set_sync_status(run, "failed")
    equipment = ctx.equipment(job)
    if equipment is not None:
        ctx.log(equipment).error(run, "failed", job=job.id, kind=kind_value, reason=message)
    ctx.notify_state(job)


# ---------------------------------------------------------------------- transfer


def _settle_cleaned(ctx: ClientContext, job: SyncJobRow, nas_copy: NasCopyCheck, from_state: SyncJobState) -> None:
    """-> CLEANED: a cleaned run whose queue did not know it (lost, or put back from before; see :func:`cleaned_here`).

    From VERIFIED through QUEUED (the run changed since verification: its
    files are gone), the lifecycle's only ways to CLEANED being from QUEUED
    and CLEANUP_ELIGIBLE.
    """
    queue = ctx.require_queue()
    place = nas_copy_place(ctx.equipment(job), job.remote_path)
    detail = (
        f"the run was cleaned while its queue did not know it (lost, or put back from an older backup): its "
        f"creation.json records local_cleaned of manifest {nas_copy.digest[:12]}, which its NAS folder holds with "
        f"all {len(nas_copy.manifest)} file(s) at {place}; nothing sent"
    )
    if from_state == S.VERIFIED:
        queue.transition(job.id, S.VERIFIED, S.QUEUED, now=ctx.clock(), detail="the verified files are gone locally")
        from_state = S.QUEUED
    job = queue.transition(job.id, from_state, S.CLEANED, now=ctx.clock(), detail=detail)
    equipment = ctx.equipment(job)
    if equipment is not None:
        ctx.log(equipment).info(job.run_path, "cleaned_settled", job=job.id, files=len(nas_copy.manifest))
    ctx.notify_state(job)


async def settle_gone(ctx: ClientContext, job: SyncJobRow, from_state: SyncJobState, nas_copy: NasCopyCheck) -> None:
    """A run lacking files of its verified NAS copy (``nas_copy.missing``): never pushed, which would take
    their NAS copies for another run's. CLEANED when the run was cleaned (:func:`cleaned_here`), else FAILED
    ``local_file_vanished`` naming ``restore``. Deletes nothing, writes nothing on the NAS."""
    if nas_copy.digest != job.manifest_digest:
        # The queue's manifest is lost or older (a backup): the run's own, which the NAS holds, is the job's now,
        # so retry, enqueue and restore know it.
        job = adopt_nas_copy(ctx.require_queue(), job, nas_copy, ctx.clock())
    if await asyncio.to_thread(cleaned_here, Path(job.run_path), nas_copy, ctx.cache):
        _settle_cleaned(ctx, job, nas_copy, from_state)
    else:
        message = missing_message(job.id, job.run_path, nas_copy.missing)
        fail(
            ctx, job, from_state, TransportErrorKind.LOCAL_FILE_VANISHED, message, unless_planned=from_state != S.QUEUED
        )


async def gone_nas_copy(ctx: ClientContext, job: SyncJobRow, check: LocalCheck | None) -> NasCopyCheck | None:
    """The run's verified NAS copy when the run lacks files of it, else None. Raises ``TransportError``.

    ``check``: the local check against the queue's verified manifest (None
    without one): looked at only when it finds files missing, or when the
    queue holds no verified manifest (the lost-queue case).
    """
    if check is not None and (check.refusal is not None or not check.missing):
        return None
    equipment = ctx.equipment(job)
    if equipment is None:
        return None
    run = Path(job.run_path)
    queue = ctx.require_queue()
    manifest = None if check is None else await asyncio.to_thread(verified_manifest, job, queue)
    verified = (job.manifest_digest, manifest) if job.manifest_digest and manifest else None
    return await check_nas_copy(run, ctx.remotes.access(equipment), verified)


async def settle_if_gone(ctx: ClientContext, job: SyncJobRow) -> bool:
    """For a VERIFIED or CLEANUP_ELIGIBLE job with no deletion plan (the audit's and the reaper's): its verified
    files gone locally, its NAS copy the verified one, :func:`settle_gone`; True when it did. Raises
    ``TransportError`` (the NAS not read: nothing decided)."""
    queue = ctx.require_queue()
    if job.state not in (S.VERIFIED, S.CLEANUP_ELIGIBLE) or await asyncio.to_thread(cleanup_planned, queue, job.id):
        return False
    check = await asyncio.to_thread(check_local, queue, job)
    if check is None or check.refusal is not None or not check.missing:
        return False
    nas_copy = await gone_nas_copy(ctx, job, check)
    if nas_copy is None or not nas_copy.missing:
        return False
    try:
        await settle_gone(ctx, job, job.state, nas_copy)
    except IllegalTransition:
        return False  # moved on meanwhile (or the reaper planned its deletion): the mover decides
    return True


async def run_job(ctx: ClientContext, job: SyncJobRow, equipment: EquipmentConfig) -> None:
    """QUEUED -> RUNNING -> AWAITING_VERIFY, then :func:`verify_job`; or held, or back through the retry policy."""
    queue = ctx.require_queue()
    run = Path(job.run_path)
    log = ctx.log(equipment)
    if not run.is_dir() or run.is_symlink():
        fail(ctx, job, S.QUEUED, TransportErrorKind.LOCAL_FILE_VANISHED, f"run folder {run} is gone")
        return
    try:
        remote_run_path(equipment, run)
    except ValueError:
        # local_root changed in the config (the data moved to another disk): its NAS place cannot be named.
        message = (
            f"the run is no longer under equipment {equipment.id}'s local root; nothing sent. Enqueue the run "
            f"where it lies now, or put the old local_root back and `exlab-sync retry {job.id}`"
        )
        fail(ctx, job, S.QUEUED, TransportErrorKind.UNKNOWN, message)
        return
    try:
        await asyncio.to_thread(ctx.config.equipment_holding, run)
    except RunOutsideRoots as exc:
        # A link on the way now leads into another equipment's folder (or out of all): its files are not this run's.
        fail(ctx, job, S.QUEUED, TransportErrorKind.UNKNOWN, f"{exc}; nothing sent")
        return
    result = await asyncio.to_thread(gate_mod.check_run, run, validator=ctx.validator, writer=ctx.cache)
    if not result.eligible:
        # The hold's code is its sorted blocking rules: the same hold again is not recorded again.
        rules = ",".join(sorted({f.rule for f in result.blocking}))
        last = queue.events(job.id, limit=1)
        if not last or last[-1].kind != GATE_HOLD_EVENT or last[-1].code != rules:
            queue.record_event(job.id, GATE_HOLD_EVENT, f"held by the gate: {rules}", now=ctx.clock(), code=rules)
            log.warning(run, "gate_hold", rules=rules)
        queue.update(
            job.id,
            S.QUEUED,
            now=ctx.clock(),
            next_attempt_at=ctx.clock() + dt.timedelta(seconds=ctx.config.sync.scan_interval_s),
        )
        return
    # No damaged local byte is ever sent over a verified NAS copy, whatever brought the job here.
    check = await asyncio.to_thread(check_local, queue, job)
    remote = ctx.remotes.access(equipment)
    nas_copy: NasCopyCheck | None = None
    if check is None or check.missing:
        # No verified manifest in the queue (lost with it, or restored from before the verification):
        # the run's own checksums.sha256, when its NAS folder holds the same, stands for it, and the
        # NAS copies' sizes and mtimes for the stats recorded at verification. Files of the verified
        # manifest gone locally (a cleanup the queue does not know of: lost, or put back from a backup
        # taken before it): the run's verified NAS copy is looked for too, never pushed over.
        try:
            nas_copy = await gone_nas_copy(ctx, job, check)
        except TransportError as exc:
            retry_or_fail(ctx, job, S.QUEUED, exc.kind, f"checking the NAS copy: {exc.message}")
            return
        if check is None and nas_copy is not None and nas_copy.damaged:
            job = adopt_nas_copy(queue, job, nas_copy, ctx.clock())  # so retry, enqueue and restore know it
            fail(ctx, job, S.QUEUED, LOCAL_DAMAGE, damage_message(job.id, job.run_path, nas_copy.damaged))
            return
        if nas_copy is not None and nas_copy.missing:
            # The run lacks files of its verified copy (a cleanup, whole or stopped part way, whose queue
            # is lost or older): nothing is pushed, which would take their NAS copies for another's files.
            await settle_gone(ctx, job, S.QUEUED, nas_copy)
            return
        if check is not None:
            nas_copy = None  # the queue's verified manifest stands: the push as before
    damaged = () if check is None else tuple(check.damaged)
    accepted = tuple(p for p in damaged if p in set(job.accept_local_paths))
    if len(accepted) < len(damaged):
        fail(
            ctx,
            job,
            S.QUEUED,
            LOCAL_DAMAGE,
            damage_message(job.id, job.run_path, [p for p in damaged if p not in accepted]),
        )
        return
    job = queue.transition(
        job.id,
        S.QUEUED,
        S.RUNNING,
        now=ctx.clock(),
        detail=f"transfer attempt {job.attempts + 1}",
        overrides_relied_on=tuple(result.overrides_relied_on),
    )
    # By a clock never stepped that counts a suspend: a wall clock stepped back since would date the
    # hashing too late, and so would time.monotonic() after the PC slept (see _promote).
    hashing = _HashingStart.now(run)
    ctx.notify_state(job)
    # What this transfer sends over a NAS copy on purpose is kept first (moved under previous/<stamp>/,
    # never overwritten): the accepted local changes, once, and every file sent again after a hash
    # mismatch. Such a mismatch on a file the push skipped (the same size and mtime on both sides)
    # means one side changed its bytes under its stat, and which one no check can tell: a NAS copy
    # that rotted, or the only copy of an edit that reached the NAS before the local one rotted.
    # And every file changed since the verification: an edit, or a new run under a reused name,
    # which no check can tell apart; the verified NAS copy is never replaced without being kept.
    # Verified before with no verified manifest left to say what changed (the local checksums.sha256
    # gone and the queue's record lost): every data file the NAS holds is kept.
    again = dict.fromkeys((*job.rewrite_paths, *(() if check is None else check.changed)))
    keep = (accepted if job.previous_kept_at is None else ()) + tuple(p for p in again if p not in accepted)
    everything = check is None and bool(job.manifest_digest)
    # The manifests this run may have left on the NAS: a NAS folder holding another one is another
    # run's verified copy (two runs reaching one folder), never written to, nor moved aside.
    own = await asyncio.to_thread(metadata_push.own_manifests, queue, job)
    if nas_copy is not None:
        own = (*own, nas_copy.digest)  # the run's verified copy is there: the push keeps what it replaces
    # A job that never wrote into the folder at this NAS place: data files of its names there are
    # another's (another run's verified copy whose manifest its metadata push has not written yet),
    # and none is its to keep. What says it wrote is its claim file on the NAS, which a push writes
    # (durably) before its first file; the queue knows only of jobs from before claim files.
    here = await in_share_of(equipment, f"where the NAS copy of {run} is", run_location, equipment, run)
    fresh = not await in_share_of(equipment, f"where {run} was claimed", _claimed_before, queue, job, equipment, run)
    if not fresh or nas_copy is not None:
        # The folder is the run's own: the push sends .exlab-wizard/ too, and never a creation.json
        # poorer than the NAS's (one written anew where the local one was lost).
        try:
            await metadata_push.keep_nas_record(ctx, run, equipment)
        except TransportError as exc:
            retry_or_fail(ctx, job, S.RUNNING, exc.kind, f"reading the NAS's creation.json: {exc.message}")
            return
    if keep or everything:
        try:
            job = await _keep_on_nas(ctx, job, remote, keep, everything=everything, own=own, fresh=fresh)
        except TransportError as exc:
            retry_or_fail(ctx, job, S.RUNNING, exc.kind, f"keeping the NAS files: {exc.message}")
            return
    # Verified before: the push itself keeps whatever NAS file it replaces, whatever changed locally
    # since the check above, in a folder of its own for each attempt (rsync's --backup-dir would
    # replace a file kept there by an earlier attempt). Reserved durably, with the event a later
    # round's stamp is chosen past, before anything could be moved there. A stamp the NAS already
    # holds (an earlier round's, which this job's events may not name) is refused by the push.
    push_stamp = _reserve_push_stamp(ctx, job) if own else None
    await asyncio.to_thread(_mark_pending, ctx, run, job.remote_path)
    limit = bw_policy.limit_kibps(equipment.transport.bandwidth, ctx.local_now())
    log.info(run, "transfer_start", job=job.id, attempt=job.attempts + 1, bwlimit_kibps=limit or 0)
    hashes_in_pass = remote.hashes_while_sending
    on_bytes = ctx.progress_cb(job, "transfer", 0)
    sizing: asyncio.Task[None] | None = None
    if not remote.reports_total:
        # The run's size, for progress, is counted while the transfer starts.
        sizing = asyncio.create_task(_count_total(ctx.progress[job.id], run))
    local_task: asyncio.Task[SpillMap[str]] | None = None
    if not hashes_in_pass:
        # Hash the local run while the transfer runs: one overlapped read pass.
        local_task = asyncio.create_task(ctx.verifier.hash_local(run))
    try:
        rewrite = frozenset(job.rewrite_paths) | frozenset(accepted)
        push = functools.partial(
            remote.push_run,
            run,
            bwlimit_kibps=limit,
            rewrite=rewrite,
            progress=on_bytes,
            own_manifests=own,
            fresh=fresh,
            claim=functools.partial(_claim, ctx, job, here) if fresh else None,
            owner=job.id,
        )
        try:
            outcome = await push(previous_stamp=push_stamp)
        except PreviousStampTaken as taken:
            # Refused before anything was written: once more, past every stamp the NAS holds
            # (a listing that fails raises: an unreachable NAS is never one without previous/).
            log.warning(run, "previous_stamp_taken", job=job.id, stamp=taken.stamp)
            push_stamp = _reserve_push_stamp(ctx, job, await ctx.remotes.listing(job))
            outcome = await push(previous_stamp=push_stamp)
        local_hashes = _data_hashes(outcome.local_hashes) if hashes_in_pass else None
        # The push's own hashes are not kept beside the data-only ones through the verification.
        outcome = dataclasses.replace(outcome, local_hashes=None)
        if local_hashes is None:
            if local_task is None:
                local_task = asyncio.create_task(ctx.verifier.hash_local(run))
            local_hashes = await local_task
    except TransportError as exc:
        await _cancel(local_task)
        retry_or_fail(ctx, job, S.RUNNING, exc.kind, exc.message)
        return
    except asyncio.CancelledError:
        await _cancel(local_task)
        raise
    except Exception as exc:
        await _cancel(local_task)
        retry_or_fail(ctx, job, S.RUNNING, TransportErrorKind.UNKNOWN, f"{type(exc).__name__}: {exc}")
        return
    finally:
        await _cancel(sizing)
        on_bytes.flush()
    log.info(run, "transfer_done", job=job.id, files=outcome.files_sent, bytes=outcome.bytes_sent)
    job = queue.transition(
        job.id,
        S.RUNNING,
        S.AWAITING_VERIFY,
        now=ctx.clock(),
        detail=f"sent {outcome.files_sent} files, {outcome.bytes_sent} bytes",
    )
    ctx.notify_state(job)
    await verify_job(ctx, job, equipment, local_hashes=_data_hashes(local_hashes), hashing=hashing)


def _data_hashes(hashes: Mapping[str, str] | None) -> MutableMapping[str, str] | None:
    """The data files' entries of ``hashes``: in place when it is a dict or a SpillMap (ours once a push returned it).

    At 200,000 files a second dict beside the push's costs about 10 MB.
    """
    if hashes is None or not isinstance(hashes, (dict, SpillMap)):
        return None if hashes is None else metadata_push.data_only(hashes)
    for rel in [rel for rel in hashes if not is_data_path(rel)]:
        del hashes[rel]
    return hashes


async def _keep_on_nas(
    ctx: ClientContext,
    job: SyncJobRow,
    remote: RemoteAccess,
    paths: tuple[str, ...],
    *,
    everything: bool,
    own: tuple[str, ...],
    fresh: bool,
) -> SyncJobRow:
    """Keep, of ``paths`` (or ``everything``: every data file there), the files the NAS holds now.

    A file the NAS does not hold cannot be overwritten: it is not asked for,
    so a host that refuses commands still takes a file an operator moved
    aside by hand (docs/recovery.md), and nothing is asked when nothing is there.
    A NAS folder whose verified manifest is not one of ``own`` (nor the local
    one) is another run's: ``REMOTE_CONFLICT``, nothing moved; so is one with no such manifest that
    is not the job's (another job's claim there, or, ``fresh``, no claim of its own: see
    :func:`~exlab_wizard.sync.transports.conflict.ownership_error`).
    """
    on_nas = await ctx.remotes.listing(job)
    if NAS_MANIFEST in on_nas:
        await check_owner(Path(job.run_path), job.remote_path, remote.fetch, own)
    else:
        error = ownership_error(
            job.remote_path,
            claimed=[rel for rel in on_nas if is_data_path(rel)],
            markers=claim_markers(on_nas),
            owner=job.id,
            fresh=fresh,
        )
        if error is not None:
            raise error
    wanted = sorted(rel for rel in on_nas if is_data_path(rel)) if everything else paths
    held = tuple(rel for rel in wanted if rel in on_nas)
    return await _keep_previous(ctx, job, remote, held, on_nas) if held else job


#: How many new stamps a keep tries when the NAS turns out to hold each one already.
_STAMP_TRIES = 3


async def _keep_previous(
    ctx: ClientContext,
    job: SyncJobRow,
    remote: RemoteAccess,
    accepted: tuple[str, ...],
    on_nas: Collection[str],
) -> SyncJobRow:
    """Move the NAS copies of ``accepted`` (files about to be sent over) under ``previous/<stamp>/``; recorded once done.

    One stamp for the job until it is verified again: a second call keeps what
    the first did not, and never overwrites a kept copy. A stamp is the job's
    own once its events name it (reserved, durably, before the first move):
    its folder on the NAS is then this round's, from a keep cut off. Any other
    (a new one, or the one ``retry --accept-local`` proposed) is chosen past
    every stamp ``on_nas`` (the NAS run folder's listing) shows, and the
    transport refuses it still if the folder is there (:class:`PreviousStampTaken`).
    """
    queue = ctx.require_queue()
    run = Path(job.run_path)
    stamp = job.previous_stamp
    if stamp is not None and (job.previous_kept_at is not None or stamp in used_previous_stamps(queue, job)):
        kept = await remote.keep_previous(run, accepted, stamp)  # its own folder: a keep cut off resumes there
    else:
        if stamp is None or stamp in previous_stamps(on_nas):
            stamp = new_previous_stamp(queue, job, ctx.clock(), on_nas)
        tries = 1
        while True:
            job = queue.update(
                job.id,
                S.RUNNING,
                now=ctx.clock(),
                event_kind=PREVIOUS_RESERVED_EVENT,
                detail=f"the NAS keeps the files sent over under {METADATA_DIR}/previous/{stamp}/",
                previous_stamp=stamp,
            )
            try:
                kept = await remote.keep_previous(run, accepted, stamp, new=True)
                break
            except PreviousStampTaken:
                if tries == _STAMP_TRIES:
                    raise
                tries += 1
                stamp = new_previous_stamp(queue, job, ctx.clock(), on_nas)  # past the one just reserved
    return queue.update(
        job.id,
        S.RUNNING,
        now=ctx.clock(),
        event_kind=PREVIOUS_KEPT_EVENT,
        detail=f"the NAS keeps {len(kept)} file(s) under {METADATA_DIR}/previous/{stamp}/"
        + (f": {name_paths(list(kept))}" if kept else ""),
        previous_stamp=stamp,
        previous_kept_at=ctx.clock(),
    )


@dataclasses.dataclass(frozen=True)
class _HashingStart:
    """When the local hashing of a run began (:func:`elapsed_s`), and its folder then (device, inode)."""

    at: float
    folder: tuple[int, int] | None

    @classmethod
    def now(cls, run: Path) -> _HashingStart:
        try:
            info = os.lstat(run)
            folder = (info.st_dev, info.st_ino)
        except OSError:
            folder = None
        return cls(elapsed_s(), folder)


def _reserve_push_stamp(ctx: ClientContext, job: SyncJobRow, on_nas: Collection[str] = ()) -> str:
    """A new ``previous/<stamp>/`` for the NAS files this attempt's push replaces, recorded as an event.

    Past every stamp the job's events name, and every one ``on_nas`` (a listing of the NAS run folder) shows.
    """
    queue = ctx.require_queue()
    stamp = new_previous_stamp(queue, job, ctx.clock(), on_nas)
    queue.record_event(
        job.id,
        PREVIOUS_RESERVED_EVENT,
        f"the push keeps every NAS file it replaces under {METADATA_DIR}/previous/{stamp}/",
        now=ctx.clock(),
    )
    return stamp


def _claimed_before(queue: JobQueue, job: SyncJobRow, equipment: EquipmentConfig, run: Path) -> bool:
    """May a push of ``job`` have written into its NAS folder at the place the configuration names now,
    before pushes named their job there (``.exlab-wizard/claims/<job id>``, which the push itself reads)?

    A job verified there did, and one that ran under a version before claims (its claim, carried
    over by the queue's migration, names no place: it counts unless the configuration has moved
    the run since). A claim recorded since says only that a push got past its checks: whether it
    wrote is for the NAS to say, by the job's claim file there.
    """
    moved = location_change(equipment, run, verified_location=job.verified_location, remote_path=job.remote_path)
    if moved is not None:
        return False
    if job.manifest_digest:
        return True
    return any(e.kind == NAS_CLAIMED_EVENT and e.code is None for e in queue.events(job.id))


def _claim(ctx: ClientContext, job: SyncJobRow, here: str) -> None:
    """Record, before the push's first write, that it writes into the NAS folder at ``here`` (see _claimed_before)."""
    ctx.require_queue().record_event(
        job.id, NAS_CLAIMED_EVENT, f"the push writes into the NAS folder at {here}", now=ctx.clock(), code=here
    )


def _run_size(run_path: Path) -> int:
    """Bytes in the run's regular files (symlinks are never sent); 0 when it cannot be listed."""
    try:
        entries = scan_entries(run_path, include_metadata=True, with_stat=True)
        return sum(entry.stat.st_size for entry in entries if not entry.is_dir)
    except OSError:
        return 0


async def _count_total(state: TransferProgress, run: Path) -> None:
    state.bytes_total = await asyncio.to_thread(_run_size, run)


async def _cancel(task: asyncio.Future[Any] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _mark_pending(ctx: ClientContext, run: Path, remote: str) -> None:
    creation = ctx.cache.ensure_minimal(run, local_path=str(run), nas_path=remote)
    if creation.sync_status != "pending":
        ctx.cache.set_sync_status(run, "pending")


# ---------------------------------------------------------------------- verification


def _vanished(run: Path, paths: Iterable[str]) -> list[str]:
    """The paths no longer present under ``run`` (of any type: nothing followed), sorted.

    One listing per folder (mostly) instead of one ``lstat`` per file.
    """
    listed: dict[str, set[str]] = {}  # folder -> names, a few folders at a time (not a copy of the run)
    names = 0
    gone: list[str] = []
    for rel in keys_by_bytes(paths):  # folder by folder (mostly); a spilled map's from its file
        folder, _sep, name = rel.rpartition("/")
        present = listed.get(folder)
        if present is None:
            if names > _VANISHED_NAMES:
                listed.clear()  # sorted: a folder's paths are together, it is rarely listed twice
                names = 0
            try:
                with os.scandir(run / folder if folder else run) as listing:
                    present = {entry.name for entry in listing}
            except OSError:  # gone, or no longer a folder: as lexists() would say of each file
                present = set()
            listed[folder] = present
            names += len(present)
        if name not in present:
            gone.append(rel)
    return sorted(gone)


#: :func:`_vanished` forgets its folder listings once they hold this many names.
_VANISHED_NAMES = 20_000


def _vanished_message(paths: list[str]) -> str:
    return f"local file vanished between transfer and verify: {paths[0]}" + (
        f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""
    )


async def verify_job(
    ctx: ClientContext,
    job: SyncJobRow,
    equipment: EquipmentConfig,
    *,
    local_hashes: Mapping[str, str] | None,
    hashing: _HashingStart | None = None,
) -> None:
    """AWAITING_VERIFY -> VERIFIED, or back through the retry policy.

    ``hashing``: when, and in which run folder, the hashing of ``local_hashes`` began.
    """
    run = Path(job.run_path)
    manifest_task: asyncio.Future[RemoteManifest] | None = None
    try:
        if local_hashes is None or hashing is None:
            hashing = _HashingStart.now(run)
            local_hashes = await ctx.verifier.hash_local(run)  # data files only: no copy to filter
        ctx.progress_cb(job, "verify", 0)
        # The place read, named before it is read: a share swapped meanwhile is recorded as the one
        # before, which the reaper then finds is not the one mounted (and the audit verifies that one).
        place = await in_share_of(equipment, f"where the NAS copy of {run} is", run_location, equipment, run)
        # The remote manifest is asked for while the local files are checked for;
        # a vanished local file fails the job whatever the remote answers.
        manifest_task = asyncio.ensure_future(ctx.remotes.access(equipment).manifest(run))
        vanished = await asyncio.to_thread(_vanished, run, local_hashes)
        if vanished:
            await _cancel(manifest_task)
            fail(ctx, job, S.AWAITING_VERIFY, TransportErrorKind.LOCAL_FILE_VANISHED, _vanished_message(vanished))
            return
        remote = await manifest_task
    except TransportError as exc:
        retry_or_fail(ctx, job, S.AWAITING_VERIFY, exc.kind, f"verify: {exc.message}")
        return
    except asyncio.CancelledError:
        await _cancel(manifest_task)
        raise
    except Exception as exc:
        retry_or_fail(ctx, job, S.AWAITING_VERIFY, TransportErrorKind.UNKNOWN, f"verify: {type(exc).__name__}: {exc}")
        return
    checked = _judge(ctx, job, equipment, local_hashes, remote)
    if checked is not None:
        await _promote(ctx, job, equipment, local_hashes, checked=checked, hashing=hashing, place=place)


def _judge(
    ctx: ClientContext,
    job: SyncJobRow,
    equipment: EquipmentConfig,
    local_hashes: Mapping[str, str],
    remote: RemoteManifest,
) -> int | None:
    """Compare: the number of files checked when every one matches; else the outcome recorded (FAILED or a retry), None."""
    outcome = compare(local_hashes, remote, digest=False)  # the digest comes with the manifest written
    if outcome.unverifiable and not (outcome.missing or outcome.extra or outcome.different):
        # One the NAS failed to read is named first (it is its own kind): never reported as "oversize".
        reasons = {rel: remote.unverifiable.get(rel) or UNVERIFIABLE_OVERSIZE for rel in outcome.unverifiable}
        kinds = {rel: unverifiable_kind(reason) for rel, reason in reasons.items()}
        first = next((rel for rel in kinds if kinds[rel] is FailureKind.VERIFY_UNREADABLE), outcome.unverifiable[0])
        reason = reasons[first]
        why = "larger than verify_max_stream_bytes" if reason == UNVERIFIABLE_OVERSIZE else reason
        message = f"{len(outcome.unverifiable)} file(s) could not be hashed remotely: {first} ({why})"
        fail(ctx, job, S.AWAITING_VERIFY, kinds[first], message)
        return None
    if outcome.extra and not (outcome.different or outcome.missing):
        # The push checked that the remote folder held nothing foreign, so a
        # file there that is not local any more was ours and vanished since.
        fail(
            ctx, job, S.AWAITING_VERIFY, TransportErrorKind.LOCAL_FILE_VANISHED, _vanished_message(list(outcome.extra))
        )
        return None
    if not outcome.ok:
        bad = list(outcome.different) + list(outcome.missing)
        summary = (
            f"hash mismatch: {len(outcome.different)} different, {len(outcome.missing)} missing, "
            f"{len(outcome.extra)} extra"
            + (f"; first: {(bad or list(outcome.extra))[0]}" if (bad or outcome.extra) else "")
        )
        ctx.log(equipment).error(
            Path(job.run_path),
            "verify_mismatch",
            job=job.id,
            different=len(outcome.different),
            missing=len(outcome.missing),
            extra=len(outcome.extra),
        )
        retry_or_fail(ctx, job, S.AWAITING_VERIFY, TransportErrorKind.HASH_MISMATCH, summary, rewrite=tuple(bad))
        return None
    return outcome.checked


async def _promote(
    ctx: ClientContext,
    job: SyncJobRow,
    equipment: EquipmentConfig,
    local_hashes: Mapping[str, str],
    *,
    checked: int,
    hashing: _HashingStart,
    place: str,
) -> None:
    """AWAITING_VERIFY -> VERIFIED with the new manifest; then the verified stats and the metadata push it owes.

    ``place``: :func:`run_location` as it was when the NAS copy was read.
    """
    queue = ctx.require_queue()
    run = Path(job.run_path)
    digest = await asyncio.to_thread(ctx.verifier.write_manifest, run, local_hashes)
    await asyncio.to_thread(_mark_synced, ctx, run, job.remote_path)
    now = ctx.clock()
    job = queue.transition(
        job.id,
        S.AWAITING_VERIFY,
        S.VERIFIED,
        now=now,
        detail=f"verified {checked} files, manifest {digest[:12]}",
        verify_passes=1,
        verified_at=now,
        last_verify_at=now,
        pass_times=(now,),
        manifest_digest=digest,
        attempts=0,
        mismatch_count=0,
        rewrite_paths=(),
        error_kind=None,
        last_error=None,
        next_attempt_at=None,
        # The push of the refreshed .exlab-wizard/ is owed from this moment, durably.
        metadata_push_due_at=now,
        metadata_push_failures=0,
        metadata_push_error=None,
        accept_local_paths=(),
        previous_stamp=None,
        previous_kept_at=None,
        # Where the manifest just compared was read: the passes count for this place only.
        verified_location=place,
    )
    ctx.log(equipment).info(run, "verified", job=job.id, files=checked, manifest_digest=digest)
    ctx.notify_state(job)
    # What the reaper will check the local files against, before it deletes any. Lost
    # in a crash (or an error) right here, the reaper re-hashes every file instead: safe, only slower.
    try:
        # How long ago the hashing began, by a clock never stepped that counts a suspend (not
        # time.monotonic(), which stops while the PC sleeps): a file changed since then may not
        # hold the hashed bytes, whatever a stepped wall clock would make of its times. And the
        # run folder it began in: another folder moved in under the run's path (the run's own, or
        # one above it, renamed) holds files that were never hashed.
        await asyncio.to_thread(
            record_verified_stat,
            queue,
            job.id,
            run,
            local_hashes,
            now,
            hashing_for_s=elapsed_s() - hashing.at,
            run_folder=hashing.folder,
        )
    except Exception as exc:
        logger.exception("job %s: verified stats not recorded", job.id)
        queue.record_event(
            job.id,
            "note",
            f"verified file stats not recorded ({type(exc).__name__}: {exc}); the reaper re-hashes before deleting",
            now=ctx.clock(),
        )
    await metadata_push.send_pending(ctx, job, equipment)


def _mark_synced(ctx: ClientContext, run: Path, remote: str) -> None:
    def mutate(raw: dict[str, Any]) -> None:
        raw["sync_status"] = "synced"
        paths = raw.setdefault("paths", {})
        if isinstance(paths, dict):
            paths["nas"] = remote

    ctx.cache.update(run, mutate)
