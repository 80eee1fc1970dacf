"""The reaper pass: orders the local check, the plan store and the deletion for each job.

Owns :class:`Reaper` and what one pass does, in order (the whole sequence is
described in :mod:`exlab_wizard.sync.reaper`): resume an interrupted plan
after the interlocks are checked again (interlock 1 alone once its data are
deleted), promote VERIFIED jobs, decide each
CLEANUP_ELIGIBLE job (facts gathered by :class:`~.interlocks.InterlockFacts`,
decided by the pure cleanup policy), write the plan durably
(:class:`~.store.CleanupStore`), carry it out (:mod:`.deletion`), record the
result and move the job to CLEANED. Also the dry run (:meth:`Reaper.plan`),
the outcomes (:class:`ReaperOutcome`) and the final metadata push's answer
(:class:`FinalPush`).

One piece, longer than most modules here: it is the single ordered sequence of one
job's cleanup under the pass lock, and each refusal or stop beside the step
that meets it (with its :class:`~exlab_wizard.sync.policy.cleanup.CleanupCode`)
is what a reviewer must read in one place to trust a deletion.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import logging
import os
import shlex
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from exlab_wizard.cache.creation import creation_path
from exlab_wizard.fileio import METADATA_DIR
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.failures import FailureKind
from exlab_wizard.sync.manifest_format import manifest_path
from exlab_wizard.sync.policy import cleanup as policy
from exlab_wizard.sync.policy.cleanup import CleanupCode, CleanupDecision
from exlab_wizard.sync.queue import TRANSITION_EVENT, JobQueue, QueueDamaged, SyncJobRow
from exlab_wizard.sync.reaper import deletion
from exlab_wizard.sync.reaper.contract import (
    FinalPush,
    JobLocks,
    PlanProgress,
    PushMetadata,
    ReaperOutcome,
    RemoteListing,
    RemoteStat,
)
from exlab_wizard.sync.reaper.interlocks import InterlockFacts
from exlab_wizard.sync.reaper.nofollow import RunFolderError
from exlab_wizard.sync.reaper.store import (
    ABORTED_EVENT,
    FINAL_PUSH_SKIPPED_EVENT,
    NOTE_EVENT,
    PLANNED_EVENT,
    REFUSED_EVENT,
    CleanupStore,
    PlannedFile,
    Progress,
    cleanup_planned,
    fail_part_deleted,
    folder_identity,
)
from exlab_wizard.sync.remote import NasLooks
from exlab_wizard.sync.state_dir import PrivateLock, lock_holder
from exlab_wizard.sync.states import IllegalTransition, SyncJobState
from exlab_wizard.sync.transports.base import NasNotAnswering
from exlab_wizard.sync.verifier import scan_run as list_run

__all__ = ["Reaper", "another_runs_folder", "plan_progress"]

logger = logging.getLogger(__name__)
C = CleanupCode

S = SyncJobState

_DELETE_BATCH = 256
#: Passes in a row that find the reaper lock held before that is said (central log, job events).
BUSY_PASSES_SAID = 10


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc_text(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class _ProcessLock:
    """A non-blocking exclusive lock file: one reaper pass at a time per queue database.

    A :class:`~exlab_wizard.sync.state_dir.PrivateLock`, as the runner lease:
    0600, made anew when others could open it (an older version's 0644, or
    root's), so no other local user can hold it and stop every pass.
    """

    def __init__(self, path: Path):
        self.path = path
        self._file = PrivateLock(path, "the reaper lock")

    def acquire(self) -> bool:
        if os.name == "nt":  # pragma: no cover - Windows: the asyncio lock and the runner lease suffice
            return True
        return self._file.acquire()

    def release(self) -> None:
        self._file.release()

    def holder(self) -> str:
        """Who holds the lock, for a log line: ``pid N, uid U (name), command`` or ``a process not named``."""
        found = lock_holder(self.path)
        return "a process the system does not name" if found is None else found.describe()


class Reaper(InterlockFacts):
    """Carries out cleanup for the jobs of one queue database.

    ``queue``: the :class:`JobQueue`. ``config``: the ``Config`` (its
    ``nas_cleanup`` is read on every pass). ``writer``: a ``CreationWriter``
    (reads overrides, records ``local_cleaned``). ``remote_stat(job)``: is
    the job's remote run root reachable now (bool or awaitable; raising
    counts as unreachable). ``remote_listing(job)``: every regular file of
    the job's remote run folder -> its size and mtime, one fresh listing (the
    transport's ``remote_stats``); taken right before a plan is written and
    before a resumed plan deletes more, it must show every planned file with
    its size and the mtime the push gave it. Raising (``TransportError(NETWORK)`` for an unreachable remote)
    makes the job wait; without it nothing is ever deleted. ``log_for(equipment_id)``: the job's
    :class:`EquipmentLog` (raising refuses the deletion: nothing is deleted
    unlogged); a line it cannot write (the full instrument disk a cleanup is
    there to free) stops nothing, the queue's events being the durable
    record. ``push_metadata(job)``: the final push of ``.exlab-wizard/``,
    a :class:`FinalPush` (or True only when verified on the NAS); needed
    only with ``retain_cache: false``. ``now()``: the clock (timezone-aware).
    ``job_locks``: the per-job locks shared with the audit (:class:`JobLocks`;
    the client's, so an audit finding and a batch of unlinks never interleave).
    ``settle_gone(job)``: for a job whose verified files are gone locally, the
    client's look at the run's verified NAS copy (reads only): True when it
    settled the job (CLEANED: the run was cleaned while the queue did not know
    it; or FAILED naming ``restore``), False to fail it here; raising makes it
    wait (the NAS not read).

    One pass at a time per database: passes in one process are serialised,
    and a lock file ``<queue db>.reaper.lock`` keeps a second process (the
    CLI beside ``serve``) out while a pass runs.
    """

    def __init__(
        self,
        queue: JobQueue,
        config: Any,
        *,
        writer: Any,
        remote_stat: RemoteStat,
        log_for: Callable[[str], EquipmentLog],
        push_metadata: PushMetadata | None = None,
        now: Callable[[], dt.datetime] = _utcnow,
        remote_listing: RemoteListing | None = None,
        job_locks: JobLocks | None = None,
        settle_gone: Callable[[SyncJobRow], Awaitable[bool]] | None = None,
    ):
        self.queue = queue
        self.config = config
        self.writer = writer
        self.remote_stat = remote_stat
        self.remote_listing = remote_listing
        self.log_for = log_for
        self.push_metadata = push_metadata
        self.now = now
        self.job_locks = job_locks if job_locks is not None else JobLocks()
        self.settle_gone = settle_gone
        self._lock = asyncio.Lock()
        self._file_lock = _ProcessLock(Path(str(queue.db_path) + ".reaper.lock"))
        self._busy_passes = 0
        #: each look at a NAS bounded; one that times out holds up its own equipment only
        self.looks = NasLooks()

    @property
    def _store(self) -> CleanupStore:
        return CleanupStore(self.queue)

    # ------------------------------------------------------------ public

    async def run_pass(self) -> list[ReaperOutcome]:
        """One pass: resume interrupted deletions, promote, then check and clean eligible jobs.

        Returns one outcome per job looked at. Never raises for one job's
        trouble: an unexpected error becomes an ``error`` outcome and a
        refusal event, and the job is tried again next pass.
        """
        async with self._lock:
            if not self._file_lock.acquire():
                return [self._busy()]
            if self._busy_passes >= BUSY_PASSES_SAID:
                logger.warning(
                    "cleanup passes run again, after %d passes that found the reaper lock held", self._busy_passes
                )
            self._busy_passes = 0
            try:
                return await self._pass()
            finally:
                self._file_lock.release()

    def make_lock_private(self) -> None:
        """Take and let go of the reaper lock once (``serve`` at start): a lock file others could open is made anew.

        Else another local user could open an older version's 0644 lock before
        the first pass and hold it. A lock held now (``exlab-sync cleanup``)
        is left to the next pass.
        """
        try:
            if self._file_lock.acquire():
                self._file_lock.release()
        except OSError as exc:
            logger.warning("cannot take the reaper lock %s: %s", self._file_lock.path, exc.strerror or exc)

    def _busy(self) -> ReaperOutcome:
        """This pass found the lock held; the :data:`BUSY_PASSES_SAID`-th in a row says so, once, naming the holder."""
        self._busy_passes += 1
        reason = "another cleanup pass is running on this queue"
        if self._busy_passes == BUSY_PASSES_SAID:
            reason = (
                f"no cleanup pass for {BUSY_PASSES_SAID} passes in a row: the reaper lock {self._file_lock.path} "
                f"is held by {self._file_lock.holder()}"
            )
            logger.warning("%s", reason)
            with contextlib.suppress(Exception):  # each job that waits for cleanup says why (once per reason)
                if self.config.nas_cleanup.enabled:
                    for state in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
                        for job in self.queue.iter_jobs(state):
                            self._refuse_event(job.id, reason, C.BUSY)
        return ReaperOutcome("", "", "busy", reason, code=C.BUSY)

    async def plan(self, dry_run: bool = True) -> list[ReaperOutcome]:
        """What a pass would do, changing nothing (``exlab-sync cleanup --dry-run``).

        For each VERIFIED or CLEANUP_ELIGIBLE job: ``would_delete`` with the
        files and bytes it would free, or why it waits (``waiting``), or
        ``would_requeue`` / ``would_fail`` with the local paths, or
        ``in_progress`` for a deletion already planned. The remote is
        probed and the local run checked (read only); no event is recorded.
        With ``dry_run=False`` this is :meth:`run_pass`.
        """
        if not dry_run:
            return await self.run_pass()
        outcomes: list[ReaperOutcome] = []
        progress = self._store.progress_rows()
        self.looks.new_pass()
        for state in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
            for job in self.queue.list_jobs(state=state):
                try:
                    outcomes.append(await self._dry_run_job(job, progress.get(job.id)))
                except NasNotAnswering as exc:
                    outcomes.append(
                        ReaperOutcome(job.id, job.run_path, "waiting", exc.message, code=C.REMOTE_UNREACHABLE)
                    )
                except Exception as exc:  # a dry run reports, it never stops
                    outcomes.append(
                        ReaperOutcome(job.id, job.run_path, "error", f"{type(exc).__name__}: {exc}", code=C.ERROR)
                    )
        return outcomes

    # ------------------------------------------------------------ the pass

    async def _pass(self) -> list[ReaperOutcome]:
        outcomes: list[ReaperOutcome] = []
        progress = self._store.progress_rows()
        self.looks.new_pass()  # a NAS that did not answer in this pass is skipped for the rest of it
        for row in sorted(progress.values(), key=lambda p: p.planned_at):
            outcomes.append(await self._guarded(row.job_id, row.run_path, self._resume(row)))
        # Page by page: a pass over 100,000 verified jobs must not hold them all at once.
        for job in self.queue.iter_jobs(S.VERIFIED):
            outcomes.append(await self._guarded(job.id, job.run_path, self._promote(job)))
        for job in self.queue.iter_jobs(S.CLEANUP_ELIGIBLE):
            if job.id in progress:
                continue
            outcomes.append(await self._guarded(job.id, job.run_path, self._consider(job)))
        return [o for o in outcomes if o is not None]

    async def _guarded(self, job_id: str, run_path: str, work: Awaitable[ReaperOutcome | None]) -> ReaperOutcome | None:
        try:
            return await work
        except (asyncio.CancelledError, QueueDamaged):  # a damaged queue ends the pass: no plan is trusted
            raise
        except NasNotAnswering as exc:  # a refusal (nothing deleted); the equipment's other jobs wait too
            with contextlib.suppress(Exception):
                self._refuse_event(job_id, exc.message, C.REMOTE_UNREACHABLE)
            return ReaperOutcome(job_id, run_path, "waiting", exc.message, code=C.REMOTE_UNREACHABLE)
        except Exception as exc:
            logger.exception("cleanup of job %s failed", job_id)
            reason = f"cleanup error: {type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                self._refuse_event(job_id, reason, C.ERROR)
            return ReaperOutcome(job_id, run_path, "error", reason, code=C.ERROR)

    async def _promote(self, job: SyncJobRow) -> ReaperOutcome | None:
        unconfigured = self._unconfigured(job)
        if unconfigured is not None:
            return unconfigured  # CLEANUP_ELIGIBLE means "about to be deleted": not for it
        now = self.now()
        refusal = policy.promotion_refusal(job, self.config, now)
        if refusal is not None:
            self._refuse_event(job.id, refusal.reason, refusal.code)
            return ReaperOutcome(job.id, job.run_path, "waiting", refusal.reason, code=refusal.code)
        _ok, reason = policy.eligible_to_promote(job, self.config, now)
        try:
            self.queue.transition(job.id, S.VERIFIED, S.CLEANUP_ELIGIBLE, now=self.now(), detail=reason)
        except IllegalTransition:
            return None  # moved on meanwhile (an audit failed): nothing to do
        return ReaperOutcome(job.id, job.run_path, "promoted", reason, code=C.PROMOTED)

    # ------------------------------------------------------------ events

    def _refuse_event(self, job_id: str, reason: str, code: CleanupCode) -> bool:
        """Record a refusal unless the last one since the job's last transition or plan has its code.

        Recognised by code, never by text: a job waiting out its age, or an
        unreachable NAS whose error message changes, is one refusal. A plan
        starts afresh, so a deletion paused for a reason refused before the
        plan is recorded again.
        """
        for event in reversed(self.queue.events(job_id, limit=100)):
            if event.kind in (TRANSITION_EVENT, PLANNED_EVENT):
                break
            if event.kind == REFUSED_EVENT:
                if event.code == code:
                    return False
                break
        self.queue.record_event(job_id, REFUSED_EVENT, reason, now=self.now(), code=code)
        return True

    def _log(self, job: SyncJobRow) -> EquipmentLog:
        return self.log_for(job.equipment_id)

    def _log_or_wait(self, job: SyncJobRow) -> tuple[EquipmentLog | None, ReaperOutcome | None]:
        """The job's equipment log, or the wait when its equipment is not configured or its log cannot be had."""
        unconfigured = self._unconfigured(job)
        if unconfigured is not None:
            return None, unconfigured
        try:
            return self._log(job), None
        except Exception as exc:
            reason = f"equipment log unavailable: {exc}"
            self._refuse_event(job.id, reason, C.EQUIPMENT_LOG_UNAVAILABLE)
            return None, ReaperOutcome(job.id, job.run_path, "waiting", reason, code=C.EQUIPMENT_LOG_UNAVAILABLE)

    def _unconfigured(self, job: SyncJobRow) -> ReaperOutcome | None:
        """A wait when the job's equipment id is no longer in the config (renamed or removed); None when it is.

        Its NAS place cannot be named, nor its log opened: nothing is deleted or
        finished for it until the equipment is configured again.
        """
        try:
            self.config.equipment_by_id(job.equipment_id)
        except KeyError:
            reason = (
                f"equipment {job.equipment_id} is no longer configured: nothing is deleted for its runs "
                f"until it is configured again"
            )
            self._refuse_event(job.id, reason, C.EQUIPMENT_UNCONFIGURED)
            return ReaperOutcome(job.id, job.run_path, "waiting", reason, code=C.EQUIPMENT_UNCONFIGURED)
        return None

    # ------------------------------------------------------------ one eligible job

    async def _consider(self, job: SyncJobRow) -> ReaperOutcome:
        log, waiting = self._log_or_wait(job)
        if waiting is not None:
            return waiting
        assert log is not None
        decision, scan = await self._decide(job, local=True)
        if decision.action == "wait":
            if self._refuse_event(job.id, decision.reason, decision.code) and decision.interlock >= 4:
                log.info(job.run_path, "cleanup_refused", job=job.id, reason=decision.reason, code=decision.code)
            return ReaperOutcome(job.id, job.run_path, "waiting", decision.reason, code=decision.code)
        if decision.action == "requeue":
            return self._requeue(job, decision, log)
        if decision.action == "fail":
            if decision.code == C.LOCAL_MISSING and self.settle_gone is not None:
                settled = await self._settle_gone(job, decision)
                if settled is not None:
                    return settled
            return self._fail(job, decision, log)
        assert decision.action == "delete" and scan is not None
        progress = self._write_plan(job, scan.files, len(scan.rehashed), log)
        if progress is None:
            return _job_changed(job)
        return await self._execute(job, progress, log, resumed=False)

    def _requeue(self, job: SyncJobRow, decision: CleanupDecision, log: EquipmentLog) -> ReaperOutcome:
        """Back to QUEUED, nothing deleted: the local run changed (through the gate for a new transfer).

        Or, for interlock 4, the NAS copy lost files (or holds them with another
        size): those are sent again. The local check ran first and found the
        verified bytes, so they may be sent; counted as the first mismatch of
        the retry policy (as an audit mismatch is): a second one is FAILED.
        """
        incomplete = decision.interlock == 4
        what = "these files are sent to the NAS again" if incomplete else "back through the gate for a new transfer"
        try:
            self.queue.transition(
                job.id,
                S.CLEANUP_ELIGIBLE,
                S.QUEUED,
                now=self.now(),
                detail=f"{decision.reason}; nothing deleted, {what}",
                error_kind=decision.error_kind,
                last_error=decision.reason,
                attempts=0,
                mismatch_count=1 if incomplete else 0,
                next_attempt_at=None,
                verify_passes=0,
                verified_at=None,
                pass_times=(),
                **({"rewrite_paths": decision.paths} if incomplete else {}),
            )
        except IllegalTransition:
            return _job_changed(job)
        log.warning(job.run_path, "cleanup_requeued", job=job.id, reason=decision.reason, paths=len(decision.paths))
        return ReaperOutcome(
            job.id, job.run_path, "requeued", decision.reason, paths=decision.paths, code=decision.code
        )

    async def _settle_gone(self, job: SyncJobRow, decision: CleanupDecision) -> ReaperOutcome | None:
        """Verified files gone locally: the client looks at the run's NAS copy (``settle_gone``); None: fail here."""
        assert self.settle_gone is not None
        try:
            settle_gone = self.settle_gone
            settled = await self.looks.look(
                job.equipment_id, "the look at the run's NAS copy", lambda: settle_gone(job)
            )
        except Exception as exc:  # the NAS not read: nothing is decided on a guess
            reason = f"{decision.reason}; its NAS copy could not be checked now: {exc}"
            self._refuse_event(job.id, reason, C.REMOTE_UNREACHABLE)
            return ReaperOutcome(job.id, job.run_path, "waiting", reason, code=C.REMOTE_UNREACHABLE)
        if not settled:
            return None
        fresh = self.queue.get(job.id)
        last = self.queue.events(job.id, limit=1)
        reason = last[-1].detail if last else decision.reason
        if fresh is not None and fresh.state == S.CLEANED:  # nothing deleted by this pass: files and bytes 0
            return ReaperOutcome(job.id, job.run_path, "deleted", reason, code=C.CLEANED)
        return ReaperOutcome(job.id, job.run_path, "failed", reason, paths=decision.paths, code=decision.code)

    def _fail(self, job: SyncJobRow, decision: CleanupDecision, log: EquipmentLog) -> ReaperOutcome:
        reason = f"{decision.reason}; nothing deleted, the NAS copy is left as verified"
        if decision.error_kind == FailureKind.LOCAL_DAMAGE:
            from exlab_wizard.sync.recovery import damage_ways_out  # recovery builds on the reaper

            reason += ". " + damage_ways_out(job.id, job.run_path)
        elif decision.error_kind == FailureKind.LOCAL_FILE_VANISHED:
            reason += (
                f". `exlab-sync restore {shlex.quote(job.run_path)}` brings them back from the NAS and re-arms job "
                f"{job.id}"
            )
        try:
            self.queue.transition(
                job.id,
                S.CLEANUP_ELIGIBLE,
                S.FAILED,
                now=self.now(),
                detail=reason,
                error_kind=decision.error_kind,
                last_error=reason,
                next_attempt_at=None,
            )
        except IllegalTransition:
            return _job_changed(job)
        log.error(
            job.run_path,
            "cleanup_failed",
            job=job.id,
            kind=decision.error_kind,
            reason=decision.reason,
            paths=len(decision.paths),
        )
        return ReaperOutcome(job.id, job.run_path, "failed", reason, paths=decision.paths, code=decision.code)

    # ------------------------------------------------------------ the durable plan

    def _write_plan(
        self, job: SyncJobRow, files: tuple[PlannedFile, ...], rehashed: int, log: EquipmentLog
    ) -> Progress | None:
        """(a) The plan, the progress row and the ``cleanup_planned`` event in one transaction, then logged."""
        now = self.now()
        digest = job.manifest_digest or ""
        total = sum(f.size for f in files)
        retain = self.config.nas_cleanup.retain_cache
        detail = (
            f"cleanup planned: {len(files)} files, {total} bytes, manifest {digest}, "
            f"verify passes {job.verify_passes}, retain_cache {'true' if retain else 'false'}"
        )
        # The folder checked: once its data are deleted, a folder at the path that is not this one is
        # another run's, and step 5 sends nothing from it (see _another_runs_folder).
        progress = self._store.write_plan(job, files, now, detail, run_folder=folder_identity(job.run_path))
        if progress is not None:
            log.info(
                job.run_path,
                "cleanup_planned",
                job=job.id,
                files=len(files),
                bytes=total,
                verify_passes=job.verify_passes,
                manifest_digest=digest,
                rehashed=rehashed,
            )
        return progress

    async def _resume(self, progress: Progress) -> ReaperOutcome | None:
        """A plan found at the start of a pass: carry it on, or drop it if its job moved on.

        Files a killed pass set aside get their names back first (never
        deleted, they are the lab's files again whatever is decided next).
        None when the plan is gone since the pass began (an audit stopped the
        deletion and said so itself).
        """
        async with self.job_locks(progress.job_id):  # the audit puts back and counts under it too
            if not cleanup_planned(self.queue, progress.job_id):
                return None
            blocked: list[str] = []
            if progress.data_deleted_at is None:
                blocked = await asyncio.to_thread(
                    deletion.put_back_set_aside, Path(progress.run_path), self._store.plan_files(progress.job_id)
                )
            job = self.queue.get(progress.job_id)
            if job is None or job.state != S.CLEANUP_ELIGIBLE or job.manifest_digest != progress.manifest_digest:
                why = "job left cleanup_eligible" if job else "job missing"
                if blocked:
                    why += f"; kept as set aside, a file has its name again: {', '.join(blocked)}"
                return self._abandon(progress, job, why)
            log, waiting = self._log_or_wait(job)
            if waiting is not None:
                return waiting
            assert log is not None
            if blocked:
                done = progress.files - self._count_present(progress)
                why = (
                    f"local file saved again after an interrupted deletion set the planned one aside: "
                    f"the planned file is kept as {', '.join(blocked)}"
                )
                reason = f"cleanup stopped: {why}; {done} of {progress.files} planned files were deleted, nothing else"
                self._fail_part_deleted(job, progress, log, reason, FailureKind.LOCAL_CHANGED_DURING_CLEANUP, why, done)
                return ReaperOutcome(
                    job.id, job.run_path, "aborted", reason, code=C.LOCAL_CHANGED_DURING_CLEANUP, paths=tuple(blocked)
                )
        if progress.data_deleted_at is not None:
            # Nothing local is left for interlocks 2, 3, 5 and 6 to protect, and the audit counts no
            # passes now: only interlock 1, then the final push's own proof (policy.finishing_refusal).
            refusal = policy.finishing_refusal(self.config)
            if refusal is not None:
                reason = f"deletion paused: {refusal.reason}"
                self._refuse_event(job.id, reason, refusal.code)
                return ReaperOutcome(job.id, job.run_path, "waiting", reason, code=refusal.code)
            return await self._execute(job, progress, log, resumed=True)
        # Interlocks 1-5 again, with a new listing of the remote run folder against the plan;
        # 6 is the per-file check of the plan itself.
        decision, _ = await self._decide(job, local=False, planned=self._store.plan_files(job.id))
        if decision.action == "requeue" and decision.interlock == 4:
            return await self._resume_incomplete(job, progress, log, decision)
        if decision.action != "delete":
            reason = f"deletion paused: {decision.reason}"
            self._refuse_event(job.id, reason, decision.code)
            return ReaperOutcome(job.id, job.run_path, "waiting", reason, code=decision.code)
        return await self._execute(job, progress, log, resumed=True)

    async def _resume_incomplete(
        self, job: SyncJobRow, progress: Progress, log: EquipmentLog, decision: CleanupDecision
    ) -> ReaperOutcome:
        """A resumed plan whose NAS copy lost planned files: delete nothing more.

        Nothing deleted yet: the job is decided afresh, as one never planned
        (the local copy is checked, then the NAS listed again), and the plan
        dropped once it leaves CLEANUP_ELIGIBLE. Some files deleted already: a
        re-transfer cannot send them, so FAILED for a person to look at.
        """
        run = Path(job.run_path)
        if os.path.islink(run) or not os.path.isdir(run):
            # Its disk is away: a missing run is not a deleted one; decide when it is back.
            code = C.RUN_SYMLINK if os.path.islink(run) else C.RUN_MISSING
            reason = f"deletion paused: run folder {'is a symlink' if code is C.RUN_SYMLINK else 'missing'}"
            self._refuse_event(job.id, reason, code)
            return ReaperOutcome(job.id, job.run_path, "waiting", reason, code=code)
        async with self.job_locks(job.id):
            present = await asyncio.to_thread(self._count_present, progress)
            if present < progress.files:
                return self._stop_incomplete(job, progress, log, decision, progress.files - present)
        fresh, _scan = await self._decide(job, local=True)
        if fresh.action == "delete":
            return await self._execute(job, progress, log, resumed=True)  # the NAS copy is whole again
        if fresh.action in ("wait", "check"):
            reason = f"deletion paused: {fresh.reason}"
            self._refuse_event(job.id, reason, fresh.code)
            return ReaperOutcome(job.id, job.run_path, "waiting", reason, code=fresh.code)
        if fresh.action == "requeue":
            outcome = self._requeue(job, fresh, log)
        else:
            outcome = self._fail(job, fresh, log)
        current = self.queue.get(job.id)
        if current is None or current.state != S.CLEANUP_ELIGIBLE:
            self._store.drop_plan(job.id)
        return outcome

    def _stop_incomplete(
        self, job: SyncJobRow, progress: Progress, log: EquipmentLog, decision: CleanupDecision, done: int
    ) -> ReaperOutcome:
        """Part of the plan deleted, and the NAS copy lost planned files since: FAILED, plan dropped."""
        reason = (
            f"cleanup stopped: {decision.reason}; {done} of {progress.files} planned files were already "
            f"deleted (the NAS held them when the deletion was planned), nothing else"
        )
        self._fail_part_deleted(
            job, progress, log, reason, FailureKind.REMOTE_CHANGED_DURING_CLEANUP, decision.reason, done
        )
        return ReaperOutcome(
            job.id, job.run_path, "aborted", reason, paths=decision.paths, code=C.REMOTE_CHANGED_DURING_CLEANUP
        )

    def _fail_part_deleted(
        self,
        job: SyncJobRow,
        progress: Progress,
        log: EquipmentLog,
        reason: str,
        kind: FailureKind,
        why: str | None,
        done: int,
    ) -> None:
        """A deletion stopped part way: FAILED with ``kind``, the plan dropped (one transaction), logged.

        Nothing when the job left CLEANUP_ELIGIBLE first (the audit stopped the deletion: its failure stands).
        """
        if fail_part_deleted(self.queue, job.id, S.CLEANUP_ELIGIBLE, now=self.now(), reason=reason, kind=kind) is None:
            return
        log.error(
            job.run_path,
            "cleanup_stopped",
            job=job.id,
            reason=why,
            files_deleted=done,
            files_planned=progress.files,
            manifest_digest=progress.manifest_digest,
        )

    def _abandon(
        self, progress: Progress, job: SyncJobRow | None, why: str, files: list[PlannedFile] | None = None
    ) -> ReaperOutcome:
        """Drop a plan whose job is no longer CLEANUP_ELIGIBLE with the planned manifest: delete nothing more.

        ``files``: the planned files, when the caller holds them (the audit that
        stopped the deletion may have dropped the plan from the queue already).
        """
        present = self._count_present(progress, files)
        detail = (
            f"cleanup plan dropped ({why}): {progress.files - present} of {progress.files} planned files "
            f"were already deleted; nothing more will be"
        )
        with self.queue.transaction():
            self._store.drop_plan(progress.job_id)
            if job is not None:
                self.queue.record_event(job.id, ABORTED_EVENT, detail, now=self.now())
        if job is not None:
            with contextlib.suppress(Exception):
                self._log(job).warning(
                    job.run_path,
                    "cleanup_aborted",
                    job=job.id,
                    reason=why,
                    files_deleted=progress.files - present,
                    files_planned=progress.files,
                )
        return ReaperOutcome(progress.job_id, progress.run_path, "aborted", detail, code=C.PLAN_DROPPED)

    def _count_present(self, progress: Progress, files: list[PlannedFile] | None = None) -> int:
        run = Path(progress.run_path)
        planned = self._store.plan_files(progress.job_id) if files is None else files
        return sum(1 for f in planned if os.path.lexists(run / f.path))

    async def _execute(self, job: SyncJobRow, progress: Progress, log: EquipmentLog, *, resumed: bool) -> ReaperOutcome:
        """(b)-(e): delete the planned files, tidy, log, record, then CLEANED.

        Each batch of unlinks, the record that the data are deleted, and the
        steps after it each run under the job's lock, after the job is read
        again (:class:`~.contract.JobLocks`).
        """
        run = Path(job.run_path)
        files = self._store.plan_files(job.id)
        deleted_before = progress.data_deleted_at is not None
        kept_note = ""
        if not deleted_before:
            if resumed:
                log.info(
                    job.run_path,
                    "cleanup_resumed",
                    job=job.id,
                    files=progress.files,
                    manifest_digest=progress.manifest_digest,
                )
            deleted = gone = 0
            during = "job left cleanup_eligible during the deletion"
            for start in range(0, len(files), _DELETE_BATCH):
                # The state check and the batch under the job's lock: an audit that found the NAS copy
                # bad meanwhile either stopped the job before this batch or counts its files as deleted.
                async with self.job_locks(job.id):
                    current = self.queue.get(job.id)
                    if not _still_planned(current, progress):
                        return self._abandon(progress, current, during, files)
                    batch = files[start : start + _DELETE_BATCH]
                    result = await asyncio.to_thread(deletion.delete_batch, run, batch)
                    deleted += result.deleted
                    gone += result.gone
                    if result.stop is not None:
                        return self._stopped(job, progress, log, result, deleted)
            async with self.job_locks(job.id):
                current = self.queue.get(job.id)
                if not _still_planned(current, progress):
                    return self._abandon(progress, current, during, files)
                if not resumed and gone:
                    # Files vanished between the check and the unlink; their verified copies are on the NAS.
                    log.warning(job.run_path, "cleanup_files_already_gone", job=job.id, files=gone)
                kept: list[str] = []  # emptied btrfs subvolumes rmdir refused: left, said, never a failure
                removed = await asyncio.to_thread(deletion.remove_left_empty, run, [f.path for f in files], kept=kept)
                kept_note = f"; empty btrfs subvolume kept: {', '.join(kept)}" if kept else ""
                fields: dict[str, object] = {
                    "job": job.id,
                    "files": progress.files,
                    "bytes": progress.bytes,
                    "verify_passes": job.verify_passes,
                    "pass_times": ",".join(_utc_text(t) for t in job.pass_times) or "-",
                    "manifest_digest": progress.manifest_digest,
                    "folders_removed": len(removed),
                }
                if kept:
                    fields["subvolumes_kept"] = ", ".join(kept)
                if resumed:
                    fields["resumed"] = True
                logged = log.info(job.run_path, "cleanup_deleted", **fields)
                data_deleted_at = self.now()
                self._store.mark_data_deleted(
                    job.id,
                    data_deleted_at,
                    f"local data deleted: {progress.files} files, {progress.bytes} bytes, "
                    f"manifest {progress.manifest_digest}, verify passes {job.verify_passes}{kept_note}"
                    + (
                        ""
                        if logged
                        else f"; equipment log {log.path} unwritable ({log.last_error}): this is the record"
                    ),
                )
            progress = dataclasses.replace(progress, data_deleted_at=data_deleted_at)
        # The last steps under the job's lock too: an audit that found the NAS copy bad as the last files
        # went has FAILED the job (no record, no final push, no CLEANED), or meets it CLEANED and says so.
        async with self.job_locks(job.id):
            return await self._finish(job, progress, log, files, deleted_before, kept_note)

    async def _finish(
        self,
        job: SyncJobRow,
        progress: Progress,
        log: EquipmentLog,
        files: list[PlannedFile],
        deleted_before: bool,
        kept_note: str = "",
    ) -> ReaperOutcome:
        """(d)-(e) once the data are deleted: record, the final push (``retain_cache: false``), then CLEANED.

        ``kept_note``: said in the outcome after the rest (the emptied btrfs subvolumes ``rmdir`` left).
        """
        retain = self.config.nas_cleanup.retain_cache
        current = self.queue.get(job.id)
        if not _still_planned(current, progress):
            return self._abandon(progress, current, "job left cleanup_eligible once its data were deleted", files)
        # Deleted by an earlier pass: the folder now at the run's path may be another run's.
        replaced = await asyncio.to_thread(self._another_runs_folder, progress) if deleted_before else None
        skipped = ""
        folder_note = ""
        if replaced is not None:
            skipped, folder_note = self._skip_final_push(job, log, replaced, retain)
        else:
            await asyncio.to_thread(self._record_cleaned, job, progress, log)
        if not retain and replaced is None:
            waiting, folder_note = await self._remove_cache(job, log)
            if waiting is not None:
                code, reason = waiting
                if self._refuse_event(job.id, reason, code):
                    log.warning(job.run_path, "cleanup_waiting", job=job.id, reason=reason, code=code)
                return ReaperOutcome(
                    job.id, job.run_path, "waiting", reason, files=progress.files, bytes=progress.bytes, code=code
                )
        detail = (
            f"cleaned: {progress.files} files, {progress.bytes} bytes freed, "
            f"manifest {progress.manifest_digest}{folder_note}{kept_note}"
        )
        try:
            with self.queue.transaction():
                if skipped:
                    self.queue.record_event(
                        job.id, FINAL_PUSH_SKIPPED_EVENT, skipped, now=self.now(), code=C.RUN_FOLDER_REPLACED
                    )
                self.queue.transition(job.id, S.CLEANUP_ELIGIBLE, S.CLEANED, now=self.now(), detail=detail)
                self._store.drop_plan(job.id)
                self._store.forget_verified(job.id)
        except IllegalTransition:
            current = self.queue.get(job.id)
            return self._abandon(progress, current, "job left cleanup_eligible before it was marked cleaned", files)
        return ReaperOutcome(
            job.id, job.run_path, "deleted", detail, files=progress.files, bytes=progress.bytes, code=C.CLEANED
        )

    def _stopped(
        self, job: SyncJobRow, progress: Progress, log: EquipmentLog, result: deletion.DeleteResult, deleted_now: int
    ) -> ReaperOutcome:
        """A planned file no longer matches, or cannot be deleted: stop and record."""
        present = self._count_present(progress)
        done = progress.files - present
        if not result.stop_fatal:
            # The run folder is away or a file cannot be unlinked: keep the plan, try again next pass.
            reason = f"deletion paused: {result.stop}"
            if self._refuse_event(job.id, reason, C.DELETION_PAUSED):
                log.warning(
                    job.run_path,
                    "cleanup_paused",
                    job=job.id,
                    reason=result.stop,
                    files_deleted=done,
                    files_planned=progress.files,
                )
            return ReaperOutcome(job.id, job.run_path, "waiting", reason, files=deleted_now, code=C.DELETION_PAUSED)
        reason = (
            f"cleanup stopped: {result.stop}; {done} of {progress.files} planned files were deleted "
            f"(their verified copies are on the NAS), nothing else"
        )
        self._fail_part_deleted(job, progress, log, reason, FailureKind.LOCAL_CHANGED_DURING_CLEANUP, result.stop, done)
        return ReaperOutcome(
            job.id,
            job.run_path,
            "aborted",
            reason,
            files=deleted_now,
            code=C.LOCAL_CHANGED_DURING_CLEANUP,
            paths=(result.stop_path,) if result.stop_path else (),
        )

    def _another_runs_folder(self, progress: Progress) -> str | None:
        """After the data were deleted: why the folder at the run's path is another run's, or None.

        See :func:`another_runs_folder`. A missing folder or a symlink is not
        judged here (step 5 waits for it, or finds it removed). Blocking I/O.
        """
        run = Path(progress.run_path)
        if os.path.islink(run) or not os.path.isdir(run):
            return None
        return another_runs_folder(run, progress.run_folder, progress.manifest_digest, self.writer)

    def _skip_final_push(self, job: SyncJobRow, log: EquipmentLog, why: str, retain: bool) -> tuple[str, str]:
        """Another run's folder is at the path: nothing is recorded, pushed or deleted there.

        Returns (the ``final_push_skipped`` event's detail, the note for the
        CLEANED transition). The NAS holds the run's verified
        ``checksums.sha256`` and ``creation.json`` since the push after its
        verification (interlock 4 refused to plan before it was done); only
        ``local_cleaned`` never reaches it.
        """
        if retain:
            detail = (
                f"local_cleaned not recorded in creation.json: {why}; another run's folder is at the run's path, "
                f"nothing was written in it"
            )
            log.warning(job.run_path, "cleanup_record_skipped", job=job.id, reason=why)
            return detail, "; local_cleaned not recorded: another run's folder is at the run's path"
        detail = (
            f"final metadata push skipped: {why}; another run's folder is at the run's path, nothing was sent "
            f"from it nor deleted in it. The NAS keeps this run's verified checksums.sha256 and creation.json "
            f"from the push after its verification, without local_cleaned (the cleanup_deleted event and the "
            f"equipment log record the deletion)"
        )
        log.warning(job.run_path, "cleanup_final_push_skipped", job=job.id, reason=why)
        return detail, "; final metadata push skipped: another run's folder is at the run's path"

    def _record_cleaned(self, job: SyncJobRow, progress: Progress, log: EquipmentLog) -> None:
        run = Path(job.run_path)
        if os.path.islink(run) or not os.path.isdir(run / METADATA_DIR) or os.path.islink(run / METADATA_DIR):
            return
        value = {
            "at": _utc_text(progress.data_deleted_at or self.now()),
            "files": progress.files,
            "bytes": progress.bytes,
            "manifest_digest": progress.manifest_digest,
        }
        try:
            self.writer.record(run, "local_cleaned", value)
        except Exception as exc:
            # The equipment log and the queue already hold the record; the deletion stands.
            log.warning(job.run_path, "cleanup_record_failed", job=job.id, error=str(exc))
            self.queue.record_event(job.id, NOTE_EVENT, f"creation.json not updated: {exc}", now=self.now())

    async def _remove_cache(self, job: SyncJobRow, log: EquipmentLog) -> tuple[tuple[CleanupCode, str] | None, str]:
        """``retain_cache: false``: push the metadata, then remove it and the run folder.

        Returns ((code, reason) when waiting, a note on what was removed).
        """
        run = Path(job.run_path)
        if os.path.islink(run):
            return (C.RUN_SYMLINK, "waiting: run folder is a symlink"), ""
        if not os.path.isdir(run):
            if not os.path.isdir(run.parent):
                return (C.RUN_MISSING, "waiting: run folder missing"), ""  # its disk is away, not removed by us
            return None, "; run folder removed"  # by an earlier, interrupted pass
        try:
            files, folders = await asyncio.to_thread(deletion.metadata_snapshot, run)
        except (OSError, RunFolderError) as exc:
            return (C.LOCAL_UNREADABLE, f"waiting: cannot read {METADATA_DIR}/: {exc}"), ""
        if files:
            if self.push_metadata is None:
                why = "waiting: no final metadata push available (retain_cache is false)"
                return (C.FINAL_PUSH_PENDING, why), ""
            try:
                pushed = await self.push_metadata(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.info("final metadata push for job %s failed: %s", job.id, exc)
                pushed = FinalPush(False, f"final metadata push failed: {type(exc).__name__}: {exc}")
            if not isinstance(pushed, FinalPush):
                pushed = FinalPush(bool(pushed), "final metadata push verified" if pushed else "")
            if not pushed.verified:
                why = f"waiting: {pushed.reason or 'final metadata push not verified'}"
                return (C.FINAL_PUSH_PENDING, why), ""
            proof = pushed.reason
        else:
            proof = f"no {METADATA_DIR}/ files left to push"
        stop = await asyncio.to_thread(deletion.remove_metadata, run, files, folders)
        if stop is not None:
            why = f"waiting: {METADATA_DIR}/ changed during the final push: {stop}"
            return (C.FINAL_PUSH_PENDING, why), ""
        kept = await asyncio.to_thread(deletion.remove_run_folder, run)
        if kept is None:
            log.info(job.run_path, "cleanup_run_folder_removed", job=job.id, metadata_files=len(files), proof=proof)
            return None, f"; .exlab-wizard/ and run folder removed ({proof})"
        log.warning(job.run_path, "cleanup_run_folder_kept", job=job.id, reason=kept, proof=proof)
        return None, f"; .exlab-wizard/ removed ({proof}), {kept}"


def plan_progress(queue: JobQueue, job_id: str, run: Path) -> PlanProgress | None:
    """How far the job's deletion plan got; None without a plan. Blocking I/O.

    For a caller outside the pass (the audit) about to stop the deletion: it
    must hold the job's lock (:class:`~.contract.JobLocks`), so no batch of
    unlinks is under way. Files a killed pass set aside get their names back
    first, as a resumed plan does (a plan dropped next must not leave them
    hidden), so a file counts as deleted only when it is gone. A run folder
    that is not there (its disk away) counts nothing as deleted.
    """
    store = CleanupStore(queue)
    if not cleanup_planned(queue, job_id):
        return None
    files = store.plan_files(job_id)
    data_deleted = store.data_deleted_at(job_id) is not None
    blocked: list[str] = []
    if not data_deleted:
        blocked = deletion.put_back_set_aside(run, files)
    planned = tuple(f.path for f in files)
    if os.path.islink(run) or not os.path.isdir(run):
        return PlanProgress(planned, (), data_deleted, tuple(blocked))
    deleted = tuple(p for p in planned if not os.path.lexists(run / p))
    return PlanProgress(planned, deleted, data_deleted, tuple(blocked))


def another_runs_folder(run: Path, planned: str | None, manifest_digest: str, writer: Any) -> str | None:
    """Why the folder at ``run``, whose data the cleanup of ``manifest_digest`` deleted, is another run's; or None.

    Another run's when it is not the folder the plan was written in
    (``planned``, its :func:`~.store.folder_identity`; None when not known: a
    plan from before queue migration 12): on the same device, the inode of the
    folder, or of its ``.exlab-wizard/`` while there, differs (a new device
    number alone proves nothing: a re-plugged disk gets one). A freed inode is given
    again at once on ext4, so a folder deleted and made anew can carry the
    planned numbers: what it holds decides too. The cleanup's own folder holds
    ``checksums.sha256`` until the final push is proved (the push then compares
    it with the verified manifest byte for byte), and its ``creation.json``
    records ``local_cleaned`` with the cleanup's manifest digest. Without
    ``checksums.sha256``, a ``creation.json`` without that record (or
    unreadable) is another run's, and so is a folder with neither file and data
    files in it. (A kill while ``.exlab-wizard/`` was removed after a failed
    ``local_cleaned`` record reads as another's: nothing is sent or deleted
    then, the safe side.) ``writer`` reads ``creation.json`` (a
    ``CreationWriter``). Blocking I/O.
    """
    now = folder_identity(run)
    if planned is not None and now is not None and _device(now) == _device(planned):
        # Another device number says nothing: a disk re-plugged (sdb -> sdc), LVM after a reboot,
        # NFS or btrfs mounted again give the same folder a new one. What it holds decides then.
        planned_run, _, planned_meta = planned.partition(" ")
        now_run, _, now_meta = now.partition(" ")
        if now_run != planned_run:
            return "the run folder is not the one the cleanup was planned in (another device and inode)"
        if now_meta not in ("-", planned_meta):
            return f"its {METADATA_DIR}/ is not the one the cleanup was planned with (another device and inode)"
    if os.path.lexists(manifest_path(run)):
        return None
    if os.path.lexists(creation_path(run)):
        try:
            record = writer.read(run)
        except Exception as exc:
            return f"no checksums.sha256, and its creation.json is unreadable ({exc})"
        cleaned = record.get("local_cleaned") if record is not None else None
        if isinstance(cleaned, dict) and cleaned.get("manifest_digest") == manifest_digest:
            return None
        return "no checksums.sha256, and its creation.json has no local_cleaned record of this cleanup"
    try:
        data = sorted(itertools.islice((e.rel for e in list_run(run) if not e.is_dir), 3))
    except OSError:
        return None  # unreadable: step 5 reads .exlab-wizard/ next and waits on the same error
    if data:
        return f"no checksums.sha256 nor creation.json, and data files: {', '.join(data)}"
    return None


def _device(identity: str) -> str:
    """The run folder's device number in a :func:`~.store.folder_identity`."""
    return identity.partition(":")[0]


def _still_planned(job: SyncJobRow | None, progress: Progress) -> bool:
    """Is ``job`` still CLEANUP_ELIGIBLE with the manifest ``progress`` planned the deletion of?"""
    return job is not None and job.state == S.CLEANUP_ELIGIBLE and job.manifest_digest == progress.manifest_digest


def _job_changed(job: SyncJobRow) -> ReaperOutcome:
    return ReaperOutcome(job.id, job.run_path, "waiting", "job changed while it was checked", code=C.JOB_CHANGED)
