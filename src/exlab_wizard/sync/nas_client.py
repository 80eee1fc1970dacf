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
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exlab_wizard.cache import CreationWriter
from exlab_wizard.config.models import Config, EquipmentConfig
from exlab_wizard.sync import gate as gate_mod
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.manifest_format import manifest_digest, read_manifest
from exlab_wizard.sync.policy import bandwidth as bw_policy
from exlab_wizard.sync.policy import retry as retry_policy
from exlab_wizard.sync.policy.cleanup import LocalCheck, name_paths
from exlab_wizard.sync.queue import JobQueue, RunnerLease, SyncJobRow
from exlab_wizard.sync.reaper import (
    FinalPush,
    Reaper,
    load_verified_stats,
    local_data_deleted_at,
    planned_paths,
    record_verified_stat,
    scan_run,
)
from exlab_wizard.sync.recovery import (
    LOCAL_DAMAGE,
    LocalDamageError,
    RestoreError,
    RestoreResult,
    check_local,
    damage_message,
    find_damage,
    previous_stamp,
    restore_damaged,
    restore_detail,
    verified_manifest,
)
from exlab_wizard.sync.states import IllegalTransition, SyncHandleState, SyncJobState
from exlab_wizard.sync.transports import (
    RemoteManifest,
    Transport,
    TransportError,
    TransportErrorKind,
    TransportResult,
    make_transport,
)
from exlab_wizard.sync.transports.base import METADATA_DIR
from exlab_wizard.sync.verifier import Verifier, VerifyResult, compare, hash_tree
from exlab_wizard.sync.verifier import scan_run as scan_entries
from exlab_wizard.validator import Finding, Validator

__all__ = [
    "EnqueueError",
    "LocalDamageError",
    "RestoreError",
    "RestoreResult",
    "client_from_config",
    "NASSyncClient",
    "SyncHandleState",
    "SyncJobHandle",
    "SyncJobRow",
    "SyncJobState",
]

logger = logging.getLogger(__name__)

S = SyncJobState
PushCallable = Callable[..., Awaitable[TransportResult]]
HashsumCallable = Callable[[Path], Awaitable[Mapping[str, str]]]


class EnqueueError(ValueError):
    """The path cannot be enqueued (not a folder, not under any equipment)."""


@dataclass(frozen=True)
class SyncJobHandle:
    """What ``enqueue`` returns.

    ``job_id`` is empty when the gate blocked the run; ``blocking_findings`` is
    non-empty exactly when ``state == BLOCKED``.
    """

    job_id: str
    state: SyncHandleState
    run_path: Path
    blocking_findings: tuple[Finding, ...] = ()


@dataclass
class TransferProgress:
    """Live progress of one job, for progress bars and the dashboard."""

    job_id: str
    run_path: str
    phase: str  # "transfer" | "verify"
    bytes_done: int = 0
    bytes_total: int = 0
    started_at: float = field(default_factory=lambda: asyncio.get_running_loop().time())


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _run_size(run_path: Path) -> int:
    """Bytes in the run's regular files (symlinks are never sent); 0 when it cannot be listed."""
    try:
        return sum(entry.stat.st_size for entry in scan_entries(run_path, include_metadata=True, with_stat=True)
                   if not entry.is_dir)  # fmt: skip
    except OSError:
        return 0


def _vanished(run: Path, paths: Iterable[str]) -> list[str]:
    """The paths no longer present under ``run``, sorted."""
    return [p for p in sorted(paths) if not os.path.lexists(run / p)]


def _optional_kwargs(func: Callable[..., Any], **candidates: Any) -> dict[str, Any]:
    """The keyword arguments beyond ``bwlimit_kibps`` that an injected push accepts."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return candidates
    return {k: v for k, v in candidates.items() if k in params}


def _data_only(hashes: Mapping[str, str]) -> dict[str, str]:
    prefix = METADATA_DIR + "/"
    return {k: v for k, v in hashes.items() if not k.startswith(prefix) and k != METADATA_DIR}


class NASSyncClient:
    """Durable, per-equipment NAS sync queue with the Pre-Sync Gate.

    Lifecycle: ``init()`` opens the queue, takes the runner lease when no other
    process holds it (then recovers in-flight jobs and starts the workers, the
    audit loop and the cleanup reaper); ``enqueue()`` gates a run and queues
    it; ``close()`` stops the tasks and closes the queue. Every method is a
    coroutine.
    """

    def __init__(
        self,
        *,
        config: Config,
        queue_db: Path,
        validator: Validator,
        cache_creation: CreationWriter,
        verifier: Verifier | None = None,
        worker_poll_interval_s: float = 0.05,
        push_callable_factory: Callable[[EquipmentConfig], Callable[..., Any]] | None = None,
        hashsum_callable_factory: Callable[[EquipmentConfig], Callable[[Path], Awaitable[dict[str, str]]]] | None = None,
        remote_stat_callable: Callable[[SyncJobRow], bool] | None = None,
    ):
        self.config = config
        self.queue_db = Path(queue_db)
        self.validator = validator
        self.cache = cache_creation
        self.verifier = verifier or Verifier()
        self.worker_poll_interval_s = worker_poll_interval_s
        self._push_factory = push_callable_factory
        self._hashsum_factory = hashsum_callable_factory
        self._remote_stat = remote_stat_callable
        #: The clock; tests may replace it with a callable returning an aware datetime.
        self.clock: Callable[[], dt.datetime] = _utcnow
        self._queue: JobQueue | None = None
        self._lease: RunnerLease | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._inflight: dict[str, asyncio.Task[Any]] = {}  # equipment id -> task
        self._inflight_jobs: dict[str, str] = {}  # equipment id -> the id of the job its task works on
        self._pushing: set[asyncio.Task[Any]] = set()  # tasks inside a metadata push: close() lets them end
        self._wake: asyncio.Event | None = None
        self._transports: dict[str, Transport] = {}
        self._pushes: dict[str, Callable[..., Any]] = {}
        self._hashsums: dict[str, Callable[[Path], Awaitable[Any]]] = {}
        self._logs: dict[str, EquipmentLog] = {}
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self.progress: dict[str, TransferProgress] = {}
        self._reaper: Reaper | None = None
        self._closed = False
        #: How long close() waits for a metadata push in flight before cancelling it (it stays
        #: recorded as pending, and the next client sends it).
        self.close_push_timeout_s = 600.0

    # ------------------------------------------------------------------ lifecycle

    @property
    def runs_workers(self) -> bool:
        """True when this client holds the runner lease and runs the workers."""
        return self._lease is not None and self._lease.held

    async def init(self, *, run_workers: bool = True) -> None:
        """Open the queue; with the lease, recover and start the background tasks.

        ``run_workers=False`` opens the queue for reading and writing rows only
        (the CLI beside a running ``serve``).
        """
        self.queue_db.parent.mkdir(parents=True, exist_ok=True)
        self._queue = JobQueue(self.queue_db)
        self._wake = asyncio.Event()
        if not run_workers:
            return
        lease = RunnerLease(self.queue_db.with_name(self.queue_db.name + ".lease"))
        if not lease.acquire():
            logger.info("another process runs the workers for %s", self.queue_db)
            return
        self._lease = lease
        now = self.clock()
        to_verify = self._queue.recover(now=now)
        for job in to_verify:
            equipment = self._equipment(job)
            if equipment is not None and job.equipment_id not in self._inflight:
                self._start(job, equipment, self._verify_job(job, equipment, local_hashes=None), "verify")
        self._reaper = self._make_reaper()
        if self.config.sync.enabled:
            self._tasks.append(asyncio.create_task(self._dispatch_loop(), name="sync-dispatch"))
        self._tasks.append(asyncio.create_task(self._audit_loop(), name="sync-audit"))
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
        loops = list(self._tasks)
        for task in loops:
            task.cancel()
        for task in loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        jobs = list(self._inflight.values())
        pushing = [task for task in jobs if task in self._pushing]
        for task in jobs:
            if task not in pushing:
                task.cancel()
        if pushing:
            _done, late = await asyncio.wait(pushing, timeout=self.close_push_timeout_s)
            for task in late:
                logger.warning("metadata push still running after %g s at close: cancelled, left pending",
                               self.close_push_timeout_s)
                task.cancel()
        for task in jobs:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._inflight.clear()
        self._inflight_jobs.clear()
        if self._lease is not None:
            self._lease.release()
        if self._queue is not None:
            self._queue.close()

    async def __aenter__(self) -> "NASSyncClient":
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
        ``retry(job_id, accept_local=True)``).
        """
        queue = self._require_queue()
        run = Path(os.path.abspath(run_path))
        equipment = self.config.equipment_for_run(run)
        if equipment is None:
            raise EnqueueError(f"{run} is not under any configured equipment's <local_root>/<id>")
        if not run.is_dir() or run.is_symlink():
            raise EnqueueError(f"{run} is not a run folder")
        result = await asyncio.to_thread(gate_mod.check_run, run, validator=self.validator, writer=self.cache)
        if not result.eligible:
            self._log(equipment).warning(
                run, "gate_blocked", rules=",".join(sorted({f.rule for f in result.blocking}))
            )
            return SyncJobHandle("", SyncHandleState.BLOCKED, run, tuple(result.blocking))
        transport = self._transport(equipment)
        remote = transport.remote_run_path(run)
        await asyncio.to_thread(self._ensure_creation, run, remote)
        now = self.clock()
        job, created = queue.get_or_create(str(run), equipment.id, remote, now=now)
        if not created and job.state == S.FAILED:
            await self._refuse_local_damage(job)
            job = queue.transition(
                job.id, S.FAILED, S.QUEUED, now=now, detail="re-armed by enqueue",
                attempts=0, mismatch_count=0, next_attempt_at=None, error_kind=None, last_error=None,
            )
        if created:
            self._log(equipment).info(run, "enqueued", job=job.id)
        self._notify({"type": "state", "job_id": job.id, "run_path": str(run), "state": job.state.value})
        self._kick()
        return SyncJobHandle(job.id, SyncHandleState.QUEUED, run, ())

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
        re-armed: :class:`LocalDamageError`. With ``accept_local`` the damaged
        local files become the new truth: they are recorded on the job as
        allowed to be sent once, and before the push the NAS moves each
        verified file they replace to ``.exlab-wizard/previous/<UTC
        timestamp>/`` in the remote run folder; the transfer then verifies
        and writes a new manifest.
        """
        queue = self._require_queue()
        job = queue.get(job_id)
        if job is None:
            raise KeyError(f"no job {job_id}")
        damaged: tuple[str, ...] = ()
        if job.state == S.FAILED and (accept_local or job.error_kind == LOCAL_DAMAGE):
            damaged = await asyncio.to_thread(find_damage, queue, job)
        already = set(damaged) <= set(job.accept_local_paths)  # accepted earlier, and that retry failed otherwise
        if damaged and not accept_local and not already:
            raise LocalDamageError(job.id, job.run_path, damaged)
        now = self.clock()
        fields: dict[str, Any] = {}
        detail = "retry requested"
        if damaged and accept_local and not already:
            stamp = previous_stamp(now)
            fields = {"accept_local_paths": damaged, "previous_stamp": stamp, "previous_kept_at": None}
            detail = (
                f"retry --accept-local: the local bytes of {len(damaged)} damaged file(s) are the new truth: "
                f"{name_paths(list(damaged))}; the NAS keeps the verified ones under "
                f"{METADATA_DIR}/previous/{stamp}/"
            )
        elif accept_local:
            detail = "retry requested (--accept-local: " + ("accepted already)" if damaged else "no local damage found)")
        job = queue.transition(
            job.id, S.FAILED, S.QUEUED, now=now, detail=detail,
            attempts=0, mismatch_count=0, next_attempt_at=None, error_kind=None, last_error=None, **fields,
        )
        equipment = self._equipment(job)
        if fields and equipment is not None:
            self._log(equipment).warning(job.run_path, "accept_local", job=job.id, files=len(damaged),
                                         previous=fields["previous_stamp"])  # fmt: skip
        self._kick()
        return job

    async def restore(self, run_path: Path | str, *, progress: Callable[[int], None] | None = None) -> RestoreResult:
        """Copy the verified NAS bytes back over the run's locally damaged files.

        Each file is fetched from the NAS into a scratch folder in the run,
        checked against the verified manifest, made durable, given its
        recorded mtime and renamed over the damaged file; a NAS copy that
        does not match the manifest is not restored (``refused``). When no
        damage is left, a job FAILED ``local_damage`` goes back to VERIFIED
        with the same manifest (the local run matches it exactly and the job
        was verified) or to QUEUED (the run was edited as well, or the job
        was waiting for a re-transfer). Every restore is an event.

        Raises :class:`RestoreError` (no job, no verified manifest, a transfer
        in flight, the NAS unreachable) and ``TransportError``.
        """
        queue = self._require_queue()
        run = Path(os.path.abspath(run_path))
        job = queue.by_run(str(run))
        if job is None:
            raise RestoreError("no_job", f"{run} has no sync job")
        if job.state in (S.RUNNING, S.AWAITING_VERIFY, S.CLEANED):
            raise RestoreError("busy", f"job {job.id} is {job.state.value}: nothing can be restored now")
        if await asyncio.to_thread(verified_manifest, job, queue) is None:
            raise RestoreError("no_verified_manifest", f"{run} has no verified checksums.sha256 to restore against")
        equipment = self._equipment(job)
        if equipment is None:
            raise RestoreError("no_job", f"equipment {job.equipment_id} is no longer configured")
        damaged = await asyncio.to_thread(find_damage, queue, job)
        restored: tuple[str, ...] = ()
        refused: dict[str, str] = {}
        if damaged:
            if not await self._reachable(job):
                raise RestoreError("unreachable", f"the NAS for {job.equipment_id} is not reachable now; nothing restored")
            restored, refused = await restore_damaged(
                queue, job, self._transport(equipment), damaged, progress=progress
            )
        detail = restore_detail(restored, refused, job.manifest_digest or "")
        log = self._log(equipment)
        (log.warning if refused else log.info)(run, "restore", job=job.id, restored=len(restored), refused=len(refused))
        check = None if refused else await asyncio.to_thread(check_local, queue, job)
        job = self._after_restore(job, detail, bool(refused), check)
        return RestoreResult(job.id, job.run_path, restored, refused, job.state)

    def _after_restore(self, job: SyncJobRow, detail: str, refused: bool, check: LocalCheck | None) -> SyncJobRow:
        """Record the restore; a ``local_damage`` job whose damage is gone (``check``) leaves FAILED."""
        queue = self._require_queue()
        now = self.clock()
        fresh = queue.get(job.id) or job
        if refused or fresh.state != S.FAILED or fresh.error_kind != LOCAL_DAMAGE:
            queue.record_event(job.id, "restore", detail, now=now)
            return fresh
        if check is not None and check.damaged:
            queue.record_event(job.id, "restore", detail + f"; still damaged: {name_paths(list(check.damaged))}", now=now)
            return fresh
        cleared: dict[str, Any] = {
            "attempts": 0, "mismatch_count": 0, "next_attempt_at": None, "error_kind": None, "last_error": None,
            "accept_local_paths": (), "previous_stamp": None, "previous_kept_at": None,
        }
        if check is not None and check.clean and fresh.verified_at is not None:
            fresh = queue.transition(job.id, S.FAILED, S.VERIFIED, now=now,
                                     detail=f"{detail}; the local run matches the verified manifest again", **cleared)  # fmt: skip
            with contextlib.suppress(Exception):
                self.cache.set_sync_status(Path(job.run_path), "synced")
        else:
            fresh = queue.transition(job.id, S.FAILED, S.QUEUED, now=now,
                                     detail=f"{detail}; the run changed since verification: transfer again", **cleared)  # fmt: skip
            self._kick()
        self._notify({"type": "state", "job_id": job.id, "run_path": job.run_path, "state": fresh.state.value})
        return fresh

    async def _refuse_local_damage(self, job: SyncJobRow) -> None:
        """Raise :class:`LocalDamageError` when a job FAILED ``local_damage`` still has damaged files."""
        if job.error_kind != LOCAL_DAMAGE:
            return
        damaged = await asyncio.to_thread(find_damage, self._require_queue(), job)
        if damaged:
            raise LocalDamageError(job.id, job.run_path, damaged)

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
        self._listeners.append(callback)

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until no job is in flight and no QUEUED job or pending metadata push is due (tests, demo)."""

        async def _idle() -> None:
            while True:
                queue = self._require_queue()
                now = self.clock()
                due = queue.next_due(now) or queue.next_metadata_push(now)
                if not self._inflight and due is None:
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(_idle(), timeout)

    async def waiting_for(self, job_ids: Iterable[str]) -> dict[str, str]:
        """What each of these jobs still waits for, by job id; a settled job is left out.

        A job is settled when it is FAILED or CLEANED, or VERIFIED /
        CLEANUP_ELIGIBLE with its metadata push done, or tried and failed
        (then pending until a later try: ``metadata_push_error`` says why).
        Unknown ids are left out. For ``enqueue --wait``.
        """
        queue = self._require_queue()
        busy = {job_id for eq, job_id in self._inflight_jobs.items()
                if eq in self._inflight and not self._inflight[eq].done()}  # fmt: skip
        now = self.clock()
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
            if job.state == S.QUEUED and job.next_attempt_at is not None and job.next_attempt_at > now:
                what += f", next attempt at {job.next_attempt_at.astimezone().strftime('%Y-%m-%d %H:%M:%S')}"
            if job.last_error:
                what += f"; last error: {job.last_error}"
            waiting[job.id] = what
        return waiting

    async def audit_once(self) -> None:
        """Re-verify every VERIFIED or CLEANUP_ELIGIBLE job that is due (one audit pass)."""
        await self._audit_pass(force=True)

    async def cleanup_once(self, *, dry_run: bool = False) -> list[Any]:
        """One reaper pass (or its plan with ``dry_run``)."""
        reaper = self._reaper or self._make_reaper()
        if dry_run:
            return await reaper.plan(dry_run=True)
        return await reaper.run_pass()

    # ------------------------------------------------------------------ plumbing

    def _require_queue(self) -> JobQueue:
        if self._queue is None:
            raise RuntimeError("NASSyncClient.init() has not been awaited")
        return self._queue

    def _equipment(self, job: SyncJobRow) -> EquipmentConfig | None:
        try:
            return self.config.equipment_by_id(job.equipment_id)
        except KeyError:
            return None

    def _log(self, equipment: EquipmentConfig) -> EquipmentLog:
        log = self._logs.get(equipment.id)
        if log is None:
            log = self._logs[equipment.id] = EquipmentLog(equipment)
        return log

    def _log_for_id(self, equipment_id: str) -> EquipmentLog:
        return self._log(self.config.equipment_by_id(equipment_id))

    def _transport(self, equipment: EquipmentConfig) -> Transport:
        transport = self._transports.get(equipment.id)
        if transport is None:
            transport = self._transports[equipment.id] = make_transport(
                equipment, log=self._log(equipment),
                verify_max_stream_bytes=self.config.sync.verify_max_stream_bytes,
            )
        return transport

    def _push(self, equipment: EquipmentConfig) -> Callable[..., Any] | None:
        if self._push_factory is None:
            return None
        if equipment.id not in self._pushes:
            self._pushes[equipment.id] = self._push_factory(equipment)
        return self._pushes[equipment.id]

    def _hashsum(self, equipment: EquipmentConfig) -> Callable[[Path], Awaitable[Any]]:
        if equipment.id not in self._hashsums:
            if self._hashsum_factory is not None:
                self._hashsums[equipment.id] = self._hashsum_factory(equipment)
            else:
                self._hashsums[equipment.id] = self._transport(equipment).remote_manifest
        return self._hashsums[equipment.id]

    async def _reachable(self, job: SyncJobRow) -> bool:
        try:
            if self._remote_stat is not None:
                answer = self._remote_stat(job)
                if inspect.isawaitable(answer):
                    answer = await answer
                return bool(answer)
            equipment = self._equipment(job)
            if equipment is None:
                return False
            return bool(await self._transport(equipment).reachable(Path(job.run_path)))
        except Exception as exc:  # a probe that fails means "not reachable"
            logger.warning("remote stat failed for %s: %s", job.run_path, exc)
            return False

    def _ensure_creation(self, run: Path, remote: str) -> None:
        creation = self.cache.ensure_minimal(run, local_path=str(run), nas_path=remote)
        if creation.sync_status == "blocked_by_validation":
            self.cache.set_sync_status(run, "pending")

    def _notify(self, event: dict[str, Any]) -> None:
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception:  # a broken listener never stops a transfer
                logger.exception("progress listener failed")

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _progress_cb(self, job: SyncJobRow, phase: str, total: int) -> Callable[[int], None]:
        loop = asyncio.get_running_loop()
        state = TransferProgress(job.id, job.run_path, phase, 0, total)
        self.progress[job.id] = state

        def on_bytes(delta: int) -> None:
            state.bytes_done += delta
            event = {
                "type": "progress", "job_id": job.id, "run_path": job.run_path, "phase": phase,
                "bytes": state.bytes_done, "total": state.bytes_total, "delta": delta,
            }
            try:
                loop.call_soon_threadsafe(self._notify, event)
            except RuntimeError:  # loop closed during shutdown
                pass

        return on_bytes

    # ------------------------------------------------------------------ workers

    def _start(self, job: SyncJobRow, equipment: EquipmentConfig, work: Awaitable[None], what: str) -> None:
        """Run one step of a job as the equipment's in-flight task."""
        task = asyncio.create_task(self._guarded(job, work), name=f"{what}-{job.id}")
        task.add_done_callback(lambda _t: self._kick())
        self._inflight[equipment.id] = task
        self._inflight_jobs[equipment.id] = job.id

    async def _dispatch_loop(self) -> None:
        """Start due jobs: one per equipment, ``max_parallel_jobs`` overall."""
        assert self._wake is not None
        queue = self._require_queue()
        limit = self.config.sync.max_parallel_jobs
        while True:
            self._wake.clear()
            for equipment_id, task in list(self._inflight.items()):
                if task.done():
                    del self._inflight[equipment_id]
            while len(self._inflight) < limit:
                job = queue.next_due(self.clock(), busy_equipment=set(self._inflight))
                if job is None:
                    break
                equipment = self._equipment(job)
                if equipment is None:
                    queue.transition(
                        job.id, S.QUEUED, S.FAILED, now=self.clock(),
                        detail=f"equipment {job.equipment_id} is no longer configured",
                        error_kind="unknown", last_error=f"equipment {job.equipment_id} is no longer configured",
                    )
                    continue
                self._start(job, equipment, self._run_job(job, equipment), "job")
            self._start_metadata_pushes(limit)
            timeout = self.worker_poll_interval_s
            now = self.clock()
            wakeups = [t for t in (queue.next_wakeup(now), queue.next_metadata_wakeup(now)) if t is not None]
            if wakeups:
                timeout = max(0.0, min(timeout, (min(wakeups) - self.clock()).total_seconds()))
            # asyncio.wait, not wait_for: 3.11's wait_for can swallow a cancel
            # that races its timeout, and close() would then wait forever.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=max(timeout, 0.001))
            finally:
                waiter.cancel()

    def _start_metadata_pushes(self, limit: int) -> None:
        """Start the pending metadata pushes that are due (a push interrupted or failed earlier)."""
        queue = self._require_queue()
        while len(self._inflight) < limit:
            job = queue.next_metadata_push(self.clock(), busy_equipment=set(self._inflight))
            if job is None:
                return
            equipment = self._equipment(job)
            if equipment is None:
                self._metadata_push_failed(job, f"equipment {job.equipment_id} is no longer configured")
                continue
            self._start(job, equipment, self._send_pending_metadata(job, equipment), "metadata")

    async def _guarded(self, job: SyncJobRow, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except IllegalTransition as exc:  # another process moved the job: its move stands
            logger.warning("job %s: %s", job.id, exc)
        except Exception as exc:
            logger.exception("job %s crashed", job.id)
            self._crashed(job, exc)
        finally:
            self.progress.pop(job.id, None)

    def _crashed(self, job: SyncJobRow, exc: Exception) -> None:
        """An unexpected exception in a job's steps: the retry policy decides, as ``unknown``.

        A job caught in QUEUED (the gate), RUNNING or AWAITING_VERIFY is sent
        back with backoff (FAILED once the backoff list is used up), with the
        message in ``last_error`` and an event; a VERIFIED job whose metadata
        push is pending gets the push tried again later.
        """
        message = f"{type(exc).__name__}: {exc}"[:2000]
        queue = self._require_queue()
        try:
            fresh = queue.get(job.id)
            if fresh is None:
                return
            equipment = self._equipment(fresh)
            if equipment is not None:
                with contextlib.suppress(Exception):  # the log disk may be what failed
                    self._log(equipment).error(fresh.run_path, "job_error", job=fresh.id, state=fresh.state.value,
                                               error=message)  # fmt: skip
            if fresh.state in (S.QUEUED, S.RUNNING, S.AWAITING_VERIFY):
                self._retry_or_fail(fresh, fresh.state, TransportErrorKind.UNKNOWN, message)
            elif fresh.metadata_push_pending and fresh.state in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
                self._metadata_push_failed(fresh, message)
            else:
                queue.record_event(fresh.id, "note", f"error: {message}", now=self.clock())
        except Exception:
            logger.exception("job %s: its error could not be recorded", job.id)

    async def _run_job(self, job: SyncJobRow, equipment: EquipmentConfig) -> None:
        queue = self._require_queue()
        run = Path(job.run_path)
        log = self._log(equipment)
        if not run.is_dir() or run.is_symlink():
            self._fail(job, S.QUEUED, TransportErrorKind.LOCAL_FILE_VANISHED, f"run folder {run} is gone")
            return
        result = await asyncio.to_thread(gate_mod.check_run, run, validator=self.validator, writer=self.cache)
        if not result.eligible:
            rules = ",".join(sorted({f.rule for f in result.blocking}))
            detail = f"held by the gate: {rules}"
            last = queue.events(job.id, limit=1)
            if not last or last[-1].detail != detail:
                queue.record_event(job.id, "gate_hold", detail, now=self.clock())
                log.warning(run, "gate_hold", rules=rules)
            queue.update(
                job.id, S.QUEUED, now=self.clock(),
                next_attempt_at=self.clock() + dt.timedelta(seconds=self.config.sync.scan_interval_s),
            )
            return
        # No damaged local byte is ever sent over a verified NAS copy, whatever brought the job here.
        damaged = await asyncio.to_thread(find_damage, queue, job)
        accepted = tuple(p for p in damaged if p in set(job.accept_local_paths))
        if len(accepted) < len(damaged):
            self._fail(job, S.QUEUED, LOCAL_DAMAGE,
                       damage_message(job.id, job.run_path, [p for p in damaged if p not in accepted]))
            return
        now = self.clock()
        job = queue.transition(
            job.id, S.QUEUED, S.RUNNING, now=now, detail=f"transfer attempt {job.attempts + 1}",
            overrides_relied_on=tuple(result.overrides_relied_on),
        )
        self._notify({"type": "state", "job_id": job.id, "run_path": job.run_path, "state": job.state.value})
        if accepted and job.previous_kept_at is None:
            try:
                job = await self._keep_previous(job, equipment, accepted)
            except TransportError as exc:
                self._retry_or_fail(job, S.RUNNING, exc.kind, f"keeping the verified NAS files: {exc.message}")
                return
        await asyncio.to_thread(self._mark_pending, run, job.remote_path)
        limit = bw_policy.limit_kibps(equipment.transport.bandwidth, dt.datetime.now().astimezone())
        log.info(run, "transfer_start", job=job.id, attempt=job.attempts + 1, bwlimit_kibps=limit or 0)
        push = self._push(equipment)
        transport = self._transport(equipment)
        hashes_in_pass = push is None and transport.capabilities.hashes_while_sending
        on_bytes = self._progress_cb(job, "transfer", 0)
        # The run's size, for progress, is counted while the transfer starts.
        sizing = asyncio.create_task(self._count_total(self.progress[job.id], run))
        local_task: asyncio.Task[dict[str, str]] | None = None
        if not hashes_in_pass:
            # Hash the local run while the transfer runs: one overlapped read pass.
            local_task = asyncio.create_task(self.verifier.hash_local(run))
        try:
            rewrite = frozenset(job.rewrite_paths) | frozenset(accepted)
            if push is not None:
                outcome = push(run, bwlimit_kibps=limit, **_optional_kwargs(
                    push, rewrite=rewrite, progress=on_bytes))
                if inspect.isawaitable(outcome):
                    outcome = await outcome
            else:
                outcome = await transport.push(run, bwlimit_kibps=limit, rewrite=rewrite, progress=on_bytes)
            if not isinstance(outcome, TransportResult):
                raise TransportError(TransportErrorKind.UNKNOWN, f"push returned {type(outcome).__name__}, not a TransportResult")
            if not outcome.ok:
                raise TransportError(outcome.error_kind or TransportErrorKind.UNKNOWN, outcome.message or "push failed")
            local_hashes = dict(outcome.local_hashes) if hashes_in_pass and outcome.local_hashes is not None else None
            if local_hashes is None:
                if local_task is None:
                    local_task = asyncio.create_task(self.verifier.hash_local(run))
                local_hashes = await local_task
        except TransportError as exc:
            await self._cancel(local_task)
            self._retry_or_fail(job, S.RUNNING, exc.kind, exc.message)
            return
        except asyncio.CancelledError:
            await self._cancel(local_task)
            raise
        except Exception as exc:
            await self._cancel(local_task)
            self._retry_or_fail(job, S.RUNNING, TransportErrorKind.UNKNOWN, f"{type(exc).__name__}: {exc}")
            return
        finally:
            await self._cancel(sizing)
        log.info(run, "transfer_done", job=job.id, files=outcome.files_sent, bytes=outcome.bytes_sent)
        job = queue.transition(
            job.id, S.RUNNING, S.AWAITING_VERIFY, now=self.clock(),
            detail=f"sent {outcome.files_sent} files, {outcome.bytes_sent} bytes",
        )
        self._notify({"type": "state", "job_id": job.id, "run_path": job.run_path, "state": job.state.value})
        await self._verify_job(job, equipment, local_hashes=_data_only(local_hashes))

    async def _keep_previous(self, job: SyncJobRow, equipment: EquipmentConfig, accepted: tuple[str, ...]) -> SyncJobRow:
        """Move the verified NAS copies of the accepted files under ``previous/<stamp>/``; recorded once done."""
        stamp = job.previous_stamp or previous_stamp(self.clock())
        kept = await self._transport(equipment).keep_previous(Path(job.run_path), accepted, stamp)
        job = self._require_queue().update(
            job.id, S.RUNNING, now=self.clock(), event_kind="previous_kept",
            detail=f"the NAS keeps {len(kept)} verified file(s) under {METADATA_DIR}/previous/{stamp}/"
            + (f": {name_paths(list(kept))}" if kept else ""),
            previous_stamp=stamp, previous_kept_at=self.clock(),
        )
        return job

    @staticmethod
    async def _count_total(state: TransferProgress, run: Path) -> None:
        state.bytes_total = await asyncio.to_thread(_run_size, run)

    @staticmethod
    async def _cancel(task: asyncio.Future[Any] | None) -> None:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _mark_pending(self, run: Path, remote: str) -> None:
        creation = self.cache.ensure_minimal(run, local_path=str(run), nas_path=remote)
        if creation.sync_status != "pending":
            self.cache.set_sync_status(run, "pending")

    async def _remote_manifest(self, equipment: EquipmentConfig, run: Path) -> RemoteManifest:
        answer = await self._hashsum(equipment)(run)
        if isinstance(answer, RemoteManifest):
            return answer
        if not isinstance(answer, Mapping):
            raise TransportError(TransportErrorKind.UNKNOWN, f"hashsum returned {type(answer).__name__}, not a mapping")
        return RemoteManifest(hashes={str(k): str(v).lower() for k, v in answer.items()})

    async def _verify_job(
        self, job: SyncJobRow, equipment: EquipmentConfig, *, local_hashes: dict[str, str] | None
    ) -> None:
        """AWAITING_VERIFY -> VERIFIED, or back through the retry policy."""
        queue = self._require_queue()
        run = Path(job.run_path)
        log = self._log(equipment)
        manifest_task: asyncio.Future[RemoteManifest] | None = None
        try:
            if local_hashes is None:
                local_hashes = _data_only(await self.verifier.hash_local(run))
            self._progress_cb(job, "verify", 0)
            # The remote manifest is asked for while the local files are checked for;
            # a vanished local file fails the job whatever the remote answers.
            manifest_task = asyncio.ensure_future(self._remote_manifest(equipment, run))
            vanished = await asyncio.to_thread(_vanished, run, local_hashes)
            if vanished:
                await self._cancel(manifest_task)
                self._fail(job, S.AWAITING_VERIFY, TransportErrorKind.LOCAL_FILE_VANISHED,
                           f"local file vanished between transfer and verify: {vanished[0]}"
                           + (f" (+{len(vanished) - 1} more)" if len(vanished) > 1 else ""))
                return
            remote = await manifest_task
        except TransportError as exc:
            self._retry_or_fail(job, S.AWAITING_VERIFY, exc.kind, f"verify: {exc.message}")
            return
        except asyncio.CancelledError:
            await self._cancel(manifest_task)
            raise
        except Exception as exc:
            self._retry_or_fail(job, S.AWAITING_VERIFY, TransportErrorKind.UNKNOWN, f"verify: {type(exc).__name__}: {exc}")
            return
        outcome = compare(local_hashes, remote)
        if outcome.unverifiable and not (outcome.missing or outcome.extra or outcome.different):
            first = outcome.unverifiable[0]
            reason = remote.unverifiable.get(first, "")
            why = "larger than verify_max_stream_bytes" if reason in ("", "verify_skipped_oversize") else reason
            self._fail(job, S.AWAITING_VERIFY, "verify_skipped_oversize",
                       f"{len(outcome.unverifiable)} file(s) could not be hashed remotely: {first} ({why})")
            return
        if outcome.extra and not (outcome.different or outcome.missing):
            # The push checked that the remote folder held nothing foreign, so a
            # file there that is not local any more was ours and vanished since.
            self._fail(job, S.AWAITING_VERIFY, TransportErrorKind.LOCAL_FILE_VANISHED,
                       f"local file vanished between transfer and verify: {outcome.extra[0]}"
                       + (f" (+{len(outcome.extra) - 1} more)" if len(outcome.extra) > 1 else ""))
            return
        if not outcome.ok:
            bad = list(outcome.different) + list(outcome.missing)
            summary = (
                f"hash mismatch: {len(outcome.different)} different, {len(outcome.missing)} missing, "
                f"{len(outcome.extra)} extra" + (f"; first: {(bad or list(outcome.extra))[0]}" if (bad or outcome.extra) else "")
            )
            log.error(run, "verify_mismatch", job=job.id, different=len(outcome.different),
                      missing=len(outcome.missing), extra=len(outcome.extra))
            self._retry_or_fail(job, S.AWAITING_VERIFY, TransportErrorKind.HASH_MISMATCH, summary, rewrite=tuple(bad))
            return
        digest = await asyncio.to_thread(self.verifier.write_manifest, run, local_hashes)
        await asyncio.to_thread(self._mark_synced, run, job.remote_path)
        now = self.clock()
        job = queue.transition(
            job.id, S.AWAITING_VERIFY, S.VERIFIED, now=now,
            detail=f"verified {outcome.checked} files, manifest {digest[:12]}",
            verify_passes=1, verified_at=now, last_verify_at=now, pass_times=(now,),
            manifest_digest=digest, attempts=0, mismatch_count=0, rewrite_paths=(),
            error_kind=None, last_error=None, next_attempt_at=None,
            # The push of the refreshed .exlab-wizard/ is owed from this moment, durably.
            metadata_push_due_at=now, metadata_push_failures=0, metadata_push_error=None,
            accept_local_paths=(), previous_stamp=None, previous_kept_at=None,
        )
        log.info(run, "verified", job=job.id, files=outcome.checked, manifest_digest=digest)
        self._notify({"type": "state", "job_id": job.id, "run_path": job.run_path, "state": job.state.value})
        # What the reaper will check the local files against, before it deletes any. Lost
        # in a crash (or an error) right here, the reaper re-hashes every file instead: safe, only slower.
        try:
            await asyncio.to_thread(self._record_verified_stat, job, run, local_hashes, now)
        except Exception as exc:
            logger.exception("job %s: verified stats not recorded", job.id)
            queue.record_event(job.id, "note", f"verified file stats not recorded ({type(exc).__name__}: {exc}); "
                               "the reaper re-hashes before deleting", now=self.clock())  # fmt: skip
        await self._send_pending_metadata(job, equipment)

    def _record_verified_stat(self, job: SyncJobRow, run: Path, hashes: Mapping[str, str], now: dt.datetime) -> None:
        record_verified_stat(self._require_queue(), job.id, run, hashes, now)

    def _mark_synced(self, run: Path, remote: str) -> None:
        def mutate(raw: dict[str, Any]) -> None:
            raw["sync_status"] = "synced"
            paths = raw.setdefault("paths", {})
            if isinstance(paths, dict):
                paths["nas"] = remote

        self.cache.update(run, mutate)

    async def _send_pending_metadata(self, job: SyncJobRow, equipment: EquipmentConfig) -> bool:
        """The metadata push a verification left pending: send it, and record the outcome on the job.

        Success clears the pending push (event ``metadata_pushed``); a failure
        keeps it, due again after a backoff (event ``metadata_push_failed``,
        once per distinct reason). Cancelled (the process stops), it stays
        pending and due: the next client sends it. True when sent.
        """
        run = Path(job.run_path)
        task = asyncio.current_task()
        if task is not None:
            self._pushing.add(task)
        try:
            error = await asyncio.to_thread(self._local_manifest_problem, job)
            if error is None:
                cleaned: frozenset[str] = frozenset()
                if await asyncio.to_thread(self._local_data_deleted_at, job) is not None:
                    cleaned = await asyncio.to_thread(self._cleaned_paths, job)
                _outcome, error = await self._try_metadata_push(job, equipment, cleaned=cleaned)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self._log(equipment).warning(run, "metadata_push_interrupted", job=job.id,
                                             reason="cancelled; left pending for the next client")  # fmt: skip
            raise
        finally:
            if task is not None:
                self._pushing.discard(task)
        if error is not None:
            self._metadata_push_failed(job, error)
            return False
        self._metadata_push_done(job)
        return True

    def _local_manifest_problem(self, job: SyncJobRow) -> str | None:
        """Why the local ``.exlab-wizard/`` must not go to the NAS as this job's evidence, or None."""
        try:
            recorded = read_manifest(Path(job.run_path))
        except Exception as exc:
            return f"local checksums.sha256 unreadable: {exc}"
        if recorded is None:
            return "no local checksums.sha256"
        if job.manifest_digest and manifest_digest(recorded) != job.manifest_digest:
            return "local checksums.sha256 is not the verified manifest; not sent"
        return None

    def _metadata_push_done(self, job: SyncJobRow) -> None:
        queue = self._require_queue()
        for _ in range(5):
            fresh = queue.get(job.id)
            if fresh is None or not fresh.metadata_push_pending:
                return
            try:
                queue.update(
                    fresh.id, fresh.state, now=self.clock(), event_kind="metadata_pushed",
                    detail="refreshed .exlab-wizard/ (checksums.sha256, creation.json) sent to the NAS",
                    metadata_push_due_at=None, metadata_push_failures=0, metadata_push_error=None,
                )
            except IllegalTransition:
                continue  # the state changed under us: read it again
            equipment = self._equipment(fresh)
            if equipment is not None:
                with contextlib.suppress(Exception):
                    self._log(equipment).info(fresh.run_path, "metadata_pushed", job=fresh.id)
            return

    def _metadata_push_failed(self, job: SyncJobRow, reason: str) -> None:
        """Keep the push pending, due again after ``backoff_s`` (its last entry, once they are used up)."""
        queue = self._require_queue()
        backoff = list(self.config.sync.backoff_s) or [self.config.sync.scan_interval_s]
        for _ in range(5):
            fresh = queue.get(job.id)
            if fresh is None or not fresh.metadata_push_pending:
                return
            failures = fresh.metadata_push_failures + 1
            delay = float(backoff[min(failures, len(backoff)) - 1])
            now = self.clock()
            repeated = fresh.metadata_push_error == reason
            try:
                queue.update(
                    fresh.id, fresh.state, now=now, event_kind=None if repeated else "metadata_push_failed",
                    detail=f"metadata push failed: {reason}; the NAS copy still lacks this verification's "
                           f".exlab-wizard/ (checksums.sha256, creation.json); tried again in {delay:g} s",
                    metadata_push_due_at=now + dt.timedelta(seconds=delay), metadata_push_failures=failures,
                    metadata_push_error=reason,
                )
            except IllegalTransition:
                continue
            equipment = self._equipment(fresh)
            if equipment is not None and not repeated:
                with contextlib.suppress(Exception):
                    self._log(equipment).warning(fresh.run_path, "metadata_push_failed", job=fresh.id, error=reason,
                                                 retry_in_s=f"{delay:g}")  # fmt: skip
            return

    async def _push_metadata(
        self, job: SyncJobRow, equipment: EquipmentConfig, *, cleaned: frozenset[str] = frozenset()
    ) -> bool:
        """Send the refreshed ``.exlab-wizard/`` alone; True when the transport reported success.

        A failure is recorded as a ``note`` event and a log line.
        """
        _outcome, error = await self._try_metadata_push(job, equipment, cleaned=cleaned)
        if error is None:
            return True
        self._require_queue().record_event(job.id, "note", f"metadata push failed: {error}", now=self.clock())
        self._log(equipment).warning(Path(job.run_path), "metadata_push_failed", job=job.id, error=error)
        return False

    async def _try_metadata_push(
        self, job: SyncJobRow, equipment: EquipmentConfig, *, cleaned: frozenset[str] = frozenset()
    ) -> tuple[Any, str | None]:
        """Send the refreshed ``.exlab-wizard/`` alone (the transport's ``push_metadata``).

        Returns ``(what the push returned, None)``, or ``(None, why it failed)``.

        ``cleaned``: verified data files whose local copies the reaper deleted
        (the final push after a cleanup): given to an injected push callable,
        and to a transport without a metadata-only push, which sends the whole
        run and must not take their remote copies for someone else's files.
        """
        run = Path(job.run_path)
        try:
            push = self._push(equipment)
            if push is not None:
                extra = _optional_kwargs(push, cleaned=cleaned) if cleaned else {}
                outcome = push(run, bwlimit_kibps=None, **extra)
                if inspect.isawaitable(outcome):
                    outcome = await outcome
            else:
                limit = bw_policy.limit_kibps(equipment.transport.bandwidth, dt.datetime.now().astimezone())
                transport = self._transport(equipment)
                if cleaned and not transport.capabilities.metadata_push:
                    outcome = await transport.push(run, bwlimit_kibps=limit, cleaned=cleaned)
                else:
                    outcome = await transport.push_metadata(run, bwlimit_kibps=limit)
            if not getattr(outcome, "ok", False):
                message = getattr(outcome, "message", "") or "metadata push failed"
                raise TransportError(TransportErrorKind.UNKNOWN, message)
            return outcome, None
        except asyncio.CancelledError:
            raise
        except TransportError as exc:
            return None, f"{exc.kind.value}: {exc.message}"
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"

    def _retry_or_fail(
        self, job: SyncJobRow, from_state: SyncJobState, kind: TransportErrorKind | str, message: str,
        *, rewrite: tuple[str, ...] = (),
    ) -> None:
        queue = self._require_queue()
        kind_value = str(getattr(kind, "value", kind))
        mismatch = job.mismatch_count + (1 if kind_value == TransportErrorKind.HASH_MISMATCH else 0)
        attempts = job.attempts + 1
        now = self.clock()
        decision = retry_policy.decide(
            kind_value, attempts=attempts, mismatch_count=mismatch,
            backoff_s=self.config.sync.backoff_s, now=now, message=message,
        )
        equipment = self._equipment(job)
        if decision.action == "retry":
            fields: dict[str, Any] = {
                "attempts": attempts, "mismatch_count": mismatch, "next_attempt_at": decision.next_attempt_at,
                "error_kind": decision.error_kind, "last_error": decision.reason,
                "rewrite_paths": rewrite if decision.rewrite else job.rewrite_paths,
            }
            if from_state == S.QUEUED:  # failed before its transfer began (the gate): no state change
                job = queue.update(job.id, S.QUEUED, now=now, event_kind="retry_scheduled", detail=decision.reason,
                                   **fields)  # fmt: skip
            else:
                job = queue.transition(job.id, from_state, S.QUEUED, now=now, detail=decision.reason, **fields)
            if equipment is not None:
                self._log(equipment).warning(job.run_path, "retry_scheduled", job=job.id, kind=kind_value, reason=decision.reason)
        else:
            self._fail(job, from_state, decision.error_kind, decision.reason, attempts=attempts, mismatch=mismatch)
            return
        self._notify({"type": "state", "job_id": job.id, "run_path": job.run_path, "state": job.state.value})

    def _fail(
        self, job: SyncJobRow, from_state: SyncJobState, kind: TransportErrorKind | str, message: str,
        *, attempts: int | None = None, mismatch: int | None = None,
    ) -> None:
        queue = self._require_queue()
        kind_value = str(getattr(kind, "value", kind))
        fields: dict[str, Any] = {"error_kind": kind_value, "last_error": message, "next_attempt_at": None}
        if attempts is not None:
            fields["attempts"] = attempts
        if mismatch is not None:
            fields["mismatch_count"] = mismatch
        job = queue.transition(job.id, from_state, S.FAILED, now=self.clock(), detail=message, **fields)
        run = Path(job.run_path)
        with contextlib.suppress(Exception):
            if run.is_dir():
                self.cache.set_sync_status(run, "failed")
        equipment = self._equipment(job)
        if equipment is not None:
            self._log(equipment).error(run, "failed", job=job.id, kind=kind_value, reason=message)
        self._notify({"type": "state", "job_id": job.id, "run_path": job.run_path, "state": job.state.value})

    # ------------------------------------------------------------------ audit loop

    async def _audit_loop(self) -> None:
        interval = self.config.sync.audit_interval_s
        while True:
            await asyncio.sleep(min(interval, max(self.config.sync.scan_interval_s, 0.05)))
            try:
                await self._audit_pass(force=False)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("audit pass failed")

    async def _audit_pass(self, *, force: bool) -> None:
        queue = self._require_queue()
        interval = dt.timedelta(seconds=self.config.sync.audit_interval_s)
        for state in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
            for job in queue.list_jobs(state=state):
                equipment = self._equipment(job)
                if equipment is None or job.equipment_id in self._inflight:
                    continue
                now = self.clock()
                if not force and job.last_verify_at is not None and now - job.last_verify_at < interval:
                    continue
                if bw_policy.limit_kibps(equipment.transport.bandwidth, now) is not None and not force:
                    continue  # never audit while a bandwidth window limits this equipment
                try:
                    await self._audit_job(job, equipment)
                except IllegalTransition as exc:  # another process moved the job: its move stands
                    logger.warning("audit of job %s: %s", job.id, exc)

    def _audit_note(self, job: SyncJobRow, kind: str, detail: str) -> None:
        """Record an audit event unless the job's last event already says the same (no spam while the NAS is away)."""
        queue = self._require_queue()
        last = queue.events(job.id, limit=1)
        if last and last[-1].kind == kind and last[-1].detail == detail:
            return
        queue.record_event(job.id, kind, detail, now=self.clock())

    async def _audit_job(self, job: SyncJobRow, equipment: EquipmentConfig) -> None:
        """Re-verify the NAS copy against the recorded manifest; add a pass or send it back."""
        queue = self._require_queue()
        run = Path(job.run_path)
        log = self._log(equipment)
        deleted_at = await asyncio.to_thread(self._local_data_deleted_at, job)
        if deleted_at is not None:
            # The reaper has deleted the local data and is finishing (the final metadata push):
            # a re-transfer is impossible, and a missing local cache is not a mismatch.
            self._audit_note(job, "audit_skipped", "local data already deleted: the cleanup is finishing")
            return
        if not await asyncio.to_thread(os.path.isdir, run):
            # An external disk away, say: the recorded manifest cannot be read, which says nothing about the NAS.
            self._audit_note(job, "audit_skipped", "local run folder missing: no recorded manifest to check against")
            return
        if not await self._reachable(job):
            self._audit_note(job, "audit_skipped", "remote unreachable")
            return
        recorded = await asyncio.to_thread(read_manifest, run)
        if recorded is None:
            recorded = {}
        if recorded and job.manifest_digest and manifest_digest(recorded) != job.manifest_digest:
            # Never count a pass against a manifest that is not the verified one (the reaper refuses it too).
            self._audit_note(job, "audit_skipped", "recorded manifest changed since verification")
            return
        try:
            remote = await self._remote_manifest(equipment, run)
        except TransportError as exc:
            if exc.kind in (TransportErrorKind.NETWORK, TransportErrorKind.UNKNOWN):
                self._audit_note(job, "audit_skipped", f"remote unreachable: {exc.message}")
                return
            self._audit_failed(job, exc.kind, f"audit: {exc.message}")
            return
        outcome = compare(_data_only(recorded), remote)
        now = self.clock()
        if outcome.ok and recorded:
            fresh = queue.get(job.id)
            if fresh is None or fresh.state not in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
                return  # moved on meanwhile (re-queued, or cleaned): this pass counts for nothing
            queue.update(
                job.id, fresh.state, now=now, event_kind="verify_pass",
                detail=f"audit pass {fresh.verify_passes + 1}: {outcome.checked} files match",
                verify_passes=fresh.verify_passes + 1, last_verify_at=now,
                pass_times=tuple(fresh.pass_times) + (now,),
            )
            log.info(run, "audit_pass", job=job.id, verify_passes=fresh.verify_passes + 1)
            return
        bad = tuple(outcome.different) + tuple(outcome.missing)
        reason = (
            "audit: no recorded manifest" if not recorded else
            f"audit mismatch: {len(outcome.different)} different, {len(outcome.missing)} missing, "
            f"{len(outcome.extra)} extra, {len(outcome.unverifiable)} unverifiable"
            + (f"; first: {bad[0]}" if bad else "")
        )
        log.error(run, "audit_failed", job=job.id, reason=reason)
        refusal = await asyncio.to_thread(self._local_copies_unusable, job, run, recorded, bad)
        if refusal is not None:
            kind, why = refusal
            self._audit_failed(job, kind, f"{reason}; {why}", final=True)
            return
        self._audit_failed(job, TransportErrorKind.HASH_MISMATCH, reason, rewrite=bad)

    def _local_data_deleted_at(self, job: SyncJobRow) -> dt.datetime | None:
        return local_data_deleted_at(self._require_queue(), job.id)

    def _local_copies_unusable(
        self, job: SyncJobRow, run: Path, recorded: Mapping[str, str], bad: tuple[str, ...]
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
        scan = scan_run(run, subset, load_verified_stats(self._require_queue(), job.id), verified_at=job.verified_at)
        if scan.check.refusal is not None:
            return None  # the run folder is away: the transfer itself will say so
        if scan.check.damaged:
            return "local_damage", (
                f"the local copy is damaged too (content changed, mtime not): {name_paths(list(scan.check.damaged))}; "
                "nothing sent"
            )
        if scan.check.missing:
            return TransportErrorKind.LOCAL_FILE_VANISHED.value, (
                f"no local copy to send again: {name_paths(list(scan.check.missing))}"
            )
        return None

    def _audit_failed(
        self, job: SyncJobRow, kind: TransportErrorKind | str, reason: str,
        *, rewrite: tuple[str, ...] = (), final: bool = False,
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
        queue = self._require_queue()
        kind_value = str(getattr(kind, "value", kind))
        for _ in range(5):
            fresh = queue.get(job.id)
            if fresh is None or fresh.state not in (S.VERIFIED, S.CLEANUP_ELIGIBLE):
                return  # re-queued or cleaned meanwhile: nothing left to send back
            now = self.clock()
            if final:
                decision = None
            else:
                decision = retry_policy.decide(
                    kind_value, attempts=1, mismatch_count=1,
                    backoff_s=self.config.sync.backoff_s, now=now, message=reason,
                )
            try:
                if decision is None or decision.action != "retry":
                    self._fail(fresh, fresh.state, kind_value if decision is None else decision.error_kind,
                               reason if decision is None else decision.reason)
                    return
                queue.transition(
                    job.id, fresh.state, S.QUEUED, now=now, detail=decision.reason,
                    attempts=0, mismatch_count=1, next_attempt_at=decision.next_attempt_at,
                    error_kind=decision.error_kind, last_error=decision.reason,
                    rewrite_paths=rewrite if decision.rewrite else (),
                    verify_passes=0, verified_at=None, pass_times=(),
                )
            except IllegalTransition:
                continue  # the state changed under us: read it again
            equipment = self._equipment(job)
            if equipment is not None:
                self._log(equipment).warning(job.run_path, "retry_scheduled", job=job.id, kind=kind_value,
                                             reason=decision.reason)
            self._notify({"type": "state", "job_id": job.id, "run_path": job.run_path, "state": S.QUEUED.value})
            self._kick()
            return
        raise IllegalTransition(f"job {job.id} kept changing state during its audit")

    # ------------------------------------------------------------------ cleanup reaper

    def _make_reaper(self) -> Reaper:
        return Reaper(
            self._require_queue(), self.config, writer=self.cache,
            remote_stat=self._reachable, log_for=self._log_for_id,
            push_metadata=self._reaper_push_metadata, now=lambda: self.clock(),
            remote_listing=self._reaper_remote_listing,
        )

    async def _reaper_remote_listing(self, job: SyncJobRow) -> dict[str, int]:
        """The listing interlock 4 checks: always the equipment's own transport.

        Never an injected callable: ``remote_stat_callable`` answers only
        whether the remote is reachable, and an injected hashsum is not asked,
        so neither can make a deletion easier than the real NAS allows.
        """
        equipment = self._equipment(job)
        if equipment is None:
            raise TransportError(TransportErrorKind.UNKNOWN, f"equipment {job.equipment_id} is no longer configured")
        return await self._transport(equipment).remote_listing(Path(job.run_path))

    async def _reaper_push_metadata(self, job: SyncJobRow) -> FinalPush:
        """The final metadata push before the local ``.exlab-wizard/`` goes, and what proves it arrived.

        The proof, strongest available: the remote manifest lists
        ``.exlab-wizard/`` files, and every local one is there with its hash.
        When the manifest lists none at all (a hashsum or backend that shows
        data files only), the push's own report: it succeeded, and the hashes
        of what it sent (when it gives them) are those of the local files now.
        Anything less is not verified, and the reason says what is missing.
        """
        equipment = self._equipment(job)
        if equipment is None:
            return FinalPush(False, f"equipment {job.equipment_id} is no longer configured")
        run = Path(job.run_path)
        cleaned = await asyncio.to_thread(self._cleaned_paths, job)
        outcome, error = await self._try_metadata_push(job, equipment, cleaned=cleaned)
        if error is not None:
            return FinalPush(False, f"final metadata push failed: {error}")
        try:
            remote = await self._remote_manifest(equipment, run)
        except Exception as exc:
            return FinalPush(False, f"final metadata push not verified: remote manifest unavailable: {exc}")
        everything = await asyncio.to_thread(hash_tree, run, include_metadata=True)
        prefix = METADATA_DIR + "/"
        meta_local = {k: v for k, v in everything.items() if k.startswith(prefix)}
        meta_remote = {k: v for k, v in remote.hashes.items() if k.startswith(prefix)}
        if meta_remote:
            bad = sorted(k for k, v in meta_local.items() if meta_remote.get(k) != v)
            if bad:
                return FinalPush(False, "final metadata push not verified: missing or different on the NAS: "
                                        + name_paths(bad))  # fmt: skip
            return FinalPush(True, f"final metadata push verified: {len(meta_local)} files read back from the NAS")
        unlisted = f"final metadata push accepted: the remote manifest does not list {METADATA_DIR}/; "
        sent = getattr(outcome, "local_hashes", None)
        if sent is not None:
            differ = sorted(k for k, v in meta_local.items() if sent.get(k) != v)
            if differ:
                return FinalPush(False, "final metadata push not verified: sent bytes are not the local ones: "
                                        + name_paths(differ))  # fmt: skip
            return FinalPush(True, unlisted + f"the push reported {len(meta_local)} files sent with their local hashes")
        return FinalPush(True, unlisted + "the transport reported success")

    def _cleaned_paths(self, job: SyncJobRow) -> frozenset[str]:
        """The verified data files whose local copies the reaper deleted: the plan's, and the manifest's."""
        paths = set(planned_paths(self._require_queue(), job.id))
        with contextlib.suppress(Exception):  # a manifest already removed: the plan suffices
            paths.update(_data_only(read_manifest(Path(job.run_path)) or {}))
        return frozenset(paths)

    async def _reaper_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync.scan_interval_s)
            try:
                await self._reaper.run_pass()
            except asyncio.CancelledError:
                raise
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
