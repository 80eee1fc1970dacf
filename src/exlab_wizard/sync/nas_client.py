"""NAS sync client: the public surface of the sync engine.

Wires the durable queue, the Pre-Sync Gate, the transports, the SHA-256
verifier, the bandwidth schedule, the audit loop and the cleanup reaper.
Workers are asyncio tasks in the caller's process; the SQLite queue is the
durable record, so a restart loses no work.

Usage::

    client = NASSyncClient(config=cfg, queue_db=cfg.queue_db,
                           validator=Validator(cfg.validator),
                           cache_creation=CreationWriter())
    await client.init()
    handle = await client.enqueue(run_path)
    ...
    await client.close()

Contents of :class:`NASSyncClient`, and where the work is done:

- ``init`` / ``close``: the runner lease, recovery of in-flight jobs, the
  background tasks (the dispatcher, the audit loop, the reaper loop);
- ``enqueue``, ``status``, ``jobs``, ``job``, ``waiting_for``, ``wait_idle``:
  the queue; a job's life is in :mod:`exlab_wizard.sync.job_runner` (gate,
  damage check, push, verify, VERIFIED, retry decision, the dispatcher), its owed
  metadata push in :mod:`exlab_wizard.sync.metadata_push`;
- ``retry`` and ``restore``: :mod:`exlab_wizard.sync.recovery`;
- ``audit_once``: :mod:`exlab_wizard.sync.audit`;
- ``cleanup_once``: :mod:`exlab_wizard.sync.reaper`;
- ``force_verify``: :mod:`exlab_wizard.sync.verifier`;
- ``add_listener``: state and progress events.

The parts share one :class:`~exlab_wizard.sync.context.ClientContext`
(config, clock, queue, logs, listeners, progress, in-flight tasks) and reach
the NAS through :class:`~exlab_wizard.sync.remote.Remotes`, whether the
transport's own methods or injected callables answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exlab_wizard.cache import CreationWriter
from exlab_wizard.config.models import Config, EquipmentConfig, RunOutsideRoots
from exlab_wizard.sync import audit, job_runner, metadata_push, recovery
from exlab_wizard.sync import gate as gate_mod
from exlab_wizard.sync.context import ClientContext, TransferProgress
from exlab_wizard.sync.queue import JobQueue, QueueDamaged, RunnerLease, SyncJobRow
from exlab_wizard.sync.reaper import Reaper, cleanup_planned
from exlab_wizard.sync.recovery import (
    LocalDamageError,
    RestoreError,
    RestoreResult,
    RunFolderMissingError,
    RunIncompleteError,
)
from exlab_wizard.sync.remote import HashsumFactory, PushFactory, RemoteStat
from exlab_wizard.sync.state_dir import make_state_dir
from exlab_wizard.sync.states import IllegalTransition, SyncHandleState, SyncJobState
from exlab_wizard.sync.transports import Transport
from exlab_wizard.sync.verifier import Verifier, VerifyResult
from exlab_wizard.validator import Finding, Validator

__all__ = [
    "EnqueueError",
    "LocalDamageError",
    "RestoreError",
    "RestoreResult",
    "RunFolderMissingError",
    "RunIncompleteError",
    "client_from_config",
    "NASSyncClient",
    "SyncHandleState",
    "SyncJobHandle",
    "SyncJobRow",
    "SyncJobState",
    "TransferProgress",
]

logger = logging.getLogger(__name__)

S = SyncJobState


class EnqueueError(ValueError):
    """The path cannot be enqueued; ``kind``: ``"not_a_run"`` (not a folder), or a
    :class:`~exlab_wizard.config.models.RunOutsideRoots` kind (``"outside_roots"``, ``"linked_away"``)."""

    def __init__(self, message: str, kind: str = "not_a_run"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class SyncJobHandle:
    """What ``enqueue`` returns.

    ``job_id`` is empty when the gate blocked the run; ``blocking_findings`` is
    non-empty exactly when ``state == BLOCKED``. ``note``: why the existing
    job was left as it is though it may hold files not sent (the reaper's
    deletion of the run is planned or under way); empty otherwise.
    """

    job_id: str
    state: SyncHandleState
    run_path: Path
    blocking_findings: tuple[Finding, ...] = ()
    note: str = ""


def _shared(name: str, doc: str) -> Any:
    """An attribute of the client that lives in its context, so every part sees a replacement."""
    return property(lambda self: getattr(self._ctx, name), lambda self, value: setattr(self._ctx, name, value), doc=doc)


class NASSyncClient:
    """Durable, per-equipment NAS sync queue with the Pre-Sync Gate.

    Lifecycle: ``init()`` opens the queue, takes the runner lease when no other
    process holds it (then recovers in-flight jobs and starts the workers, the
    audit loop and the cleanup reaper); ``enqueue()`` gates a run and queues
    it; ``close()`` stops the tasks and closes the queue. Every method is a
    coroutine.

    ``config`` and ``clock`` may be replaced at any time (a reload, a test's
    clock): every part reads them at each use.
    """

    config: Config = _shared("config", "The configuration (replaceable: a reload).")
    clock: Callable[[], dt.datetime] = _shared("clock", "The clock: returns an aware datetime (tests replace it).")
    validator: Validator = _shared("validator", "The validator the Pre-Sync Gate runs.")
    cache: CreationWriter = _shared("cache", "The creation.json writer.")
    verifier: Verifier = _shared("verifier", "The local hashing and manifest writer.")

    def __init__(
        self,
        *,
        config: Config,
        queue_db: Path,
        validator: Validator,
        cache_creation: CreationWriter,
        verifier: Verifier | None = None,
        worker_poll_interval_s: float = 0.05,
        push_callable_factory: PushFactory | None = None,
        hashsum_callable_factory: HashsumFactory | None = None,
        remote_stat_callable: RemoteStat | None = None,
    ):
        self._ctx = ClientContext(
            config=config,
            validator=validator,
            cache=cache_creation,
            verifier=verifier or Verifier(),
            push_factory=push_callable_factory,
            hashsum_factory=hashsum_callable_factory,
            remote_stat=remote_stat_callable,
        )
        self.queue_db = Path(queue_db)
        self.worker_poll_interval_s = worker_poll_interval_s
        #: Live progress of the jobs in flight, by job id.
        self.progress: dict[str, TransferProgress] = self._ctx.progress
        self._lease: RunnerLease | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._reaper: Reaper | None = None
        self._closed = False
        #: How long close() waits for a metadata push in flight before cancelling it (it stays
        #: recorded as pending, and the next client sends it).
        self.close_push_timeout_s = 600.0

    # ------------------------------------------------------------------ lifecycle

    @property
    def queue_damage(self) -> QueueDamaged | None:
        """The damage SQLite reported on the queue database, once it has (the workers have stopped)."""
        queue = self._ctx.queue
        return None if queue is None else queue.damage

    @property
    def runs_workers(self) -> bool:
        """True when this client holds the runner lease and runs the workers."""
        return self._lease is not None and self._lease.held

    async def init(self, *, run_workers: bool = True) -> None:
        """Open the queue; with the lease, recover and start the background tasks.

        ``run_workers=False`` opens the queue for reading and writing rows only
        (the CLI beside a running ``serve``). With the lease, the queue's
        per-run tables are checked first (:meth:`JobQueue.check`): a damaged
        file raises :class:`QueueDamaged`, the lease given back, nothing started.
        """
        ctx = self._ctx
        make_state_dir(self.queue_db.parent)
        ctx.queue = JobQueue(self.queue_db)
        ctx.wake = asyncio.Event()
        if not run_workers:
            return
        lease = RunnerLease(self.queue_db.with_name(self.queue_db.name + ".lease"))
        if not lease.acquire():
            logger.info("another process runs the workers for %s", self.queue_db)
            return
        try:
            ctx.queue.check()
        except BaseException:
            lease.release()
            raise
        self._lease = lease
        for job in ctx.queue.recover(now=self.clock(), max_wait=job_runner.max_wait(ctx)):
            equipment = ctx.equipment(job)
            if equipment is None:
                # Renamed or removed in the config while it awaited its verification: FAILED as a
                # QUEUED job of it is (the reason names `retry`, the way back once it is configured).
                with contextlib.suppress(IllegalTransition):
                    job_runner.fail_unconfigured(ctx, job, S.AWAITING_VERIFY)
            elif job.equipment_id not in ctx.inflight:
                verify = job_runner.verify_job(ctx, job, equipment, local_hashes=None)
                job_runner.start(ctx, job, equipment, verify, "verify")
        self._reaper = self._make_reaper()
        self._reaper.make_lock_private()  # before anyone else can open an older version's 0644 lock
        if self.config.sync.enabled:
            dispatch = job_runner.dispatch_loop(ctx, poll_interval_s=self.worker_poll_interval_s)
            self._tasks.append(asyncio.create_task(dispatch, name="sync-dispatch"))
        self._tasks.append(asyncio.create_task(audit.audit_loop(ctx), name="sync-audit"))
        self._tasks.append(asyncio.create_task(self._reaper_loop(), name="sync-reaper"))

    async def close(self) -> None:
        """Stop every task and close the queue.

        A metadata push in flight is part of its job: it is left to end (up to
        ``close_push_timeout_s``). Anything else is interrupted and recovered
        at the next init (a cancelled metadata push stays pending and is sent
        by the next client).
        """
        if self._closed:
            return
        self._closed = True
        ctx = self._ctx
        loops = list(self._tasks)
        for task in loops:
            task.cancel()
        for task in loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        in_flight = list(ctx.inflight.values())
        pushing = [task for task in in_flight if task in ctx.pushing]
        for task in in_flight:
            if task not in pushing:
                task.cancel()
        if pushing:
            _done, late = await asyncio.wait(pushing, timeout=self.close_push_timeout_s)
            for task in late:
                logger.warning(
                    "metadata push still running after %g s at close: cancelled, left pending",
                    self.close_push_timeout_s,
                )
                task.cancel()
        for task in in_flight:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        ctx.inflight.clear()
        ctx.inflight_jobs.clear()
        if self._lease is not None:
            self._lease.release()
        if ctx.queue is not None:
            ctx.queue.close()

    async def __aenter__(self) -> NASSyncClient:
        await self.init()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ public API

    async def enqueue(self, run_path: Path) -> SyncJobHandle:
        """Run the Pre-Sync Gate; queue the run unless the gate blocks it.

        A run has one job for life: enqueuing again returns the same job id and
        re-arms the job only when it is FAILED. Raises :class:`EnqueueError`
        for a path that is not a run folder under a configured equipment, and
        :class:`LocalDamageError` for a job FAILED ``local_damage`` whose
        damage is still there (it is not re-armed: see :meth:`restore` and
        ``retry(job_id, accept_local=True)``), or a verified job whose run
        holds local damage now (a new run copied with its old mtimes into
        the place of a verified one, say): that job is FAILED
        ``local_damage`` first, nothing sent.
        """
        ctx = self._ctx
        queue = ctx.require_queue()
        run, equipment = self.run_folder(run_path)
        result = await asyncio.to_thread(gate_mod.check_run, run, validator=self.validator, writer=self.cache)
        if not result.eligible:
            rules = ",".join(sorted({f.rule for f in result.blocking}))
            ctx.log(equipment).warning(run, "gate_blocked", rules=rules)
            return SyncJobHandle("", SyncHandleState.BLOCKED, run, tuple(result.blocking))
        remote = self._transport(equipment).remote_run_path(run)
        await asyncio.to_thread(self._ensure_creation, run, remote)
        now = self.clock()
        note = ""
        job, created = queue.get_or_create(str(run), equipment.id, remote, now=now)
        if not created and job.state == S.FAILED:
            await recovery.refuse_local_damage(queue, job)
            job = queue.transition(
                job.id,
                S.FAILED,
                S.QUEUED,
                now=now,
                detail="re-armed by enqueue",
                attempts=0,
                mismatch_count=0,
                next_attempt_at=None,
                error_kind=None,
                last_error=None,
            )
        elif not created and job.state in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
            # Asked again for a verified run: files added or edited since are sent (the audit finds them
            # too); local damage fails the job and is answered as for a job FAILED local_damage.
            moved = await audit.send_back_if_changed(ctx, job, run, raise_damage=True)
            if moved is None and await asyncio.to_thread(cleanup_planned, queue, job.id):
                note = (
                    f"not sent: the reaper's deletion of its verified local data is planned or under way (job "
                    f"{job.state.value}); files written into the run now are not sent with it: once it is cleaned, "
                    f"the audit's late_data event names them, to be moved into a new run folder"
                )
            job = moved or job
        if created:
            ctx.log(equipment).info(run, "enqueued", job=job.id)
        ctx.notify({"type": "state", "job_id": job.id, "run_path": str(run), "state": job.state.value})
        ctx.kick()
        return SyncJobHandle(job.id, SyncHandleState.QUEUED, run, (), note)

    def run_folder(self, run_path: Path | str) -> tuple[Path, EquipmentConfig]:
        """The run (absolute) and its equipment; :class:`EnqueueError` when it cannot be one.

        The path must lie under a configured equipment's ``<local_root>/<id>``,
        as written and with its links resolved (:meth:`Config.equipment_holding`,
        the API's check too), and be a folder (not a symbolic link). Reads no queue; what
        :meth:`enqueue` checks before the gate runs.
        """
        try:
            run, equipment = self.config.equipment_holding(run_path)
        except RunOutsideRoots as exc:
            raise EnqueueError(str(exc), exc.kind) from None
        if not run.is_dir() or run.is_symlink():
            raise EnqueueError(f"{run} is not a run folder")
        return run, equipment

    async def status(self, run_path: Path) -> str:
        """``"none"`` when the run has no job, else its :class:`SyncJobState` value."""
        job = self._require_queue().by_run(str(Path(os.path.abspath(run_path))))
        return "none" if job is None else job.state.value

    async def force_verify(self, run_path: Path, *, progress: Callable[[int], None] | None = None) -> VerifyResult:
        """Re-hash the local run and check it against its recorded ``checksums.sha256``.

        Detects local bit rot or edits; changes no queue state.
        """
        return await self.verifier.verify_local_against_manifest(Path(run_path), progress=progress)

    async def retry(self, job_id: str, *, accept_local: bool = False) -> SyncJobRow:
        """Re-arm a FAILED job (``FAILED -> QUEUED``); raises ``IllegalTransition`` otherwise.

        A job FAILED ``local_damage`` whose damage is still there is not
        re-armed: :class:`LocalDamageError`; nor is a job FAILED
        ``run_folder_missing`` whose run folder is still not there:
        :class:`RunFolderMissingError`. A job whose cleanup stopped part way
        first gets the deleted files back from their verified NAS copies; one
        that cannot be put back: :class:`RunIncompleteError`. With ``accept_local`` the damaged
        local files become the new truth: they are recorded on the job as
        allowed to be sent once, and before the push the NAS moves each
        verified file they replace to ``.exlab-wizard/previous/<UTC
        timestamp>/`` in the remote run folder; the transfer then verifies
        and writes a new manifest.
        """
        return await recovery.rearm(self._ctx, job_id, accept_local=accept_local)

    async def restore(self, run_path: Path | str, *, progress: Callable[[int], None] | None = None) -> RestoreResult:
        """Copy the verified NAS bytes back over the run's locally damaged files, and back where files were lost.

        Each file is fetched from the NAS into a scratch folder in the run,
        checked against the verified manifest, given its recorded mtime,
        made durable and renamed over the damaged file; a NAS copy that
        does not match the manifest is not restored (``refused``). When no
        damage is left, a job FAILED ``local_damage`` goes back to VERIFIED
        with the same manifest (the local run matches it exactly and the job
        was verified) or to QUEUED (the run was edited as well, or the job
        was waiting for a re-transfer). Files of the manifest missing locally
        are put back too (unless a deletion is planned): a job FAILED for
        them (``local_file_vanished``, a cleanup stopped part way) goes to
        QUEUED once the run is whole. Every restore is an event.

        Raises :class:`RestoreError` (no job, no verified manifest, a transfer
        in flight, the NAS unreachable) and ``TransportError``.
        """
        return await recovery.restore(self._ctx, Path(os.path.abspath(run_path)), progress=progress)

    async def jobs(self, state: SyncJobState | str | None = None, equipment_id: str | None = None) -> list[SyncJobRow]:
        """Job rows, oldest first, optionally filtered."""
        return self._require_queue().list_jobs(
            state=SyncJobState(state) if state is not None else None, equipment_id=equipment_id
        )

    async def job(self, run_path: Path | str) -> SyncJobRow | None:
        """One job (by run path or job id) with its recent events, oldest first."""
        key = str(run_path)
        if os.sep in key:
            key = str(Path(os.path.abspath(key)))
        return self._require_queue().job_with_events(key)

    def add_listener(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Receive progress and state events (dicts with a ``type`` key)."""
        self._ctx.listeners.append(callback)

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until no job is in flight and no QUEUED job or pending metadata push is due (tests, demo)."""
        await asyncio.wait_for(job_runner.wait_idle(self._ctx), timeout)

    async def waiting_for(self, job_ids: Iterable[str]) -> dict[str, str]:
        """What each of these jobs still waits for, by job id; a settled job is left out.

        A job is settled when it is FAILED or CLEANED, or VERIFIED /
        CLEANUP_ELIGIBLE with its metadata push done, or tried and failed
        (then pending until a later try: ``metadata_push_error`` says why).
        Unknown ids are left out. For ``enqueue --wait``.
        """
        return job_runner.waiting_for(self._ctx, job_ids)

    async def audit_once(self) -> None:
        """Re-verify every VERIFIED or CLEANUP_ELIGIBLE job that is due (one audit pass)."""
        await audit.audit_pass(self._ctx, force=True)

    async def cleanup_once(self, *, dry_run: bool = False) -> list[Any]:
        """One reaper pass (or its plan with ``dry_run``)."""
        reaper = self._current_reaper()
        if dry_run:
            return await reaper.plan(dry_run=True)
        return await reaper.run_pass()

    # ------------------------------------------------------------------ wiring

    def _require_queue(self) -> JobQueue:
        return self._ctx.require_queue()

    @property
    def _transports(self) -> dict[str, Transport]:
        """The transports built so far, by equipment id (a test may put its own in first)."""
        return self._ctx.remotes.transports

    def _transport(self, equipment: EquipmentConfig) -> Transport:
        return self._ctx.remotes.transport(equipment)

    def _ensure_creation(self, run: Path, remote: str) -> None:
        creation = self.cache.ensure_minimal(run, local_path=str(run), nas_path=remote)
        if creation.sync_status == "blocked_by_validation":
            self.cache.set_sync_status(run, "pending")

    def _current_reaper(self) -> Reaper:
        """The reaper, judging by the configuration in force now (``config`` may have been replaced)."""
        if self._reaper is None:
            self._reaper = self._make_reaper()
        self._reaper.config = self.config
        return self._reaper

    def _make_reaper(self) -> Reaper:
        ctx = self._ctx
        return Reaper(
            ctx.require_queue(),
            self.config,
            writer=self.cache,
            remote_stat=ctx.remotes.reachable,
            log_for=ctx.log_for_id,
            push_metadata=lambda job: metadata_push.final_push(ctx, job),
            now=lambda: ctx.clock(),
            remote_listing=ctx.remotes.listing,
            job_locks=ctx.job_locks,
            settle_gone=lambda job: job_runner.settle_if_gone(ctx, job),
        )

    async def _reaper_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync.scan_interval_s)
            try:
                await self._current_reaper().run_pass()
            except asyncio.CancelledError:
                raise
            except QueueDamaged:  # logged once by the queue: no plan can be trusted, nothing is deleted
                logger.info("cleanup stopped: the queue database is damaged")
                return
            except Exception:
                logger.exception("cleanup pass failed")


def client_from_config(config: Config, **overrides: Any) -> NASSyncClient:
    """A client wired with the real validator, creation.json writer and verifier."""
    kwargs: dict[str, Any] = {
        "config": config,
        "queue_db": config.queue_db,
        "validator": Validator(config.validator),
        "cache_creation": CreationWriter(),
    }
    kwargs.update(overrides)
    return NASSyncClient(**kwargs)
