"""The state the client shares with its parts: one small object, passed explicitly.

:class:`ClientContext` holds what the job steps, the dispatcher, the audit
and the metadata push all read or change: the config and the clock (both
replaceable at any time; every part reads them at each use), the queue, the
creation.json writer, the verifier, the remote access, the equipment logs,
the listeners and live progress, the map of in-flight tasks, and the per-job
locks the audit shares with the reaper. It owns no
behaviour beyond small lookups over that state (an equipment by job, its
log, a notification to the listeners, a wake-up of the dispatcher).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exlab_wizard.cache import CreationWriter
from exlab_wizard.config.models import Config, EquipmentConfig
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.policy.bandwidth import follow_time_zone
from exlab_wizard.sync.queue import JobQueue, SyncJobRow
from exlab_wizard.sync.reaper.contract import JobLocks
from exlab_wizard.sync.remote import HashsumFactory, NasLooks, PushFactory, Remotes, RemoteStat
from exlab_wizard.sync.verifier import Verifier
from exlab_wizard.validator import Validator

__all__ = ["PROGRESS_INTERVAL_S", "ClientContext", "ProgressSink", "TransferProgress", "elapsed_s", "utcnow"]

logger = logging.getLogger(__name__)

#: Live progress goes to the listeners at most this often per job.
PROGRESS_INTERVAL_S = 0.25


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def elapsed_s() -> float:
    """Seconds on a clock that is never stepped and counts a suspend (CLOCK_BOOTTIME where there is one).

    For "how long ago did this begin" measured against the wall clock: ``time.monotonic()``
    stops while the PC sleeps on Linux, and would date a start hours too late after a suspend.
    """
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.monotonic() if boottime is None else time.clock_gettime(boottime)


@dataclass
class TransferProgress:
    """Live progress of one job, for progress bars and the dashboard."""

    job_id: str
    run_path: str
    phase: str  # "transfer" | "verify"
    bytes_done: int = 0
    bytes_total: int = 0
    started_at: float = field(default_factory=lambda: asyncio.get_running_loop().time())


class ClientContext:
    """What the client's parts share. Built by the client; ``queue`` is set by its ``init()``."""

    def __init__(
        self,
        *,
        config: Config,
        validator: Validator,
        cache: CreationWriter,
        verifier: Verifier,
        push_factory: PushFactory | None = None,
        hashsum_factory: HashsumFactory | None = None,
        remote_stat: RemoteStat | None = None,
    ):
        self.config = config
        #: The clock: a callable returning an aware datetime (tests replace it).
        self.clock: Callable[[], dt.datetime] = utcnow
        self.validator = validator
        self.cache = cache
        self.verifier = verifier
        self.queue: JobQueue | None = None
        self.remotes = Remotes(
            lambda: self.config,
            log_for=self.log,
            now=self.local_now,
            push_factory=push_factory,
            hashsum_factory=hashsum_factory,
            remote_stat=remote_stat,
        )
        self.logs: dict[str, EquipmentLog] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.progress: dict[str, TransferProgress] = {}
        self.inflight: dict[str, asyncio.Task[Any]] = {}  # equipment id -> task
        self.inflight_jobs: dict[str, str] = {}  # equipment id -> the id of the job its task works on
        #: jobs whose in-flight task ended: the dispatcher checks that each one's outcome reached the queue
        self.ended: set[str] = set()
        self.pushing: set[asyncio.Task[Any]] = set()  # tasks inside a metadata push: close() lets them end
        self.wake: asyncio.Event | None = None
        #: when the audit last looked for data written into CLEANED run folders (once an audit interval)
        self.late_data_checked_at: dt.datetime | None = None
        #: job id -> when the audit last ran its local check alone on it, a schedule window keeping it
        #: off the NAS (once an audit interval; dropped once the job is audited or leaves VERIFIED)
        self.window_checked_at: dict[str, dt.datetime] = {}
        #: one lock per job, held by the reaper through each batch of unlinks and by the audit through
        #: its finding's transition: the two never interleave on a job
        self.job_locks = JobLocks()
        #: the audit's looks at each NAS, bounded: one silent NAS holds up the audit of its equipment only
        self.nas_looks = NasLooks()

    def local_now(self) -> dt.datetime:
        """:attr:`clock` in this workstation's local time: what the bandwidth schedule reads.

        The one clock of the client, also handed to every transport it builds,
        so a test's clock is the time the whole push sees. In the zone set
        now, not the one the service started in (:func:`follow_time_zone`).
        """
        follow_time_zone()
        return self.clock().astimezone()

    def require_queue(self) -> JobQueue:
        if self.queue is None:
            raise RuntimeError("NASSyncClient.init() has not been awaited")
        return self.queue

    def equipment(self, job: SyncJobRow) -> EquipmentConfig | None:
        """The job's equipment as configured now, or None when it is no longer configured."""
        try:
            return self.config.equipment_by_id(job.equipment_id)
        except KeyError:
            return None

    def log(self, equipment: EquipmentConfig) -> EquipmentLog:
        log = self.logs.get(equipment.id)
        if log is None:
            log = self.logs[equipment.id] = EquipmentLog(equipment)
        return log

    def log_for_id(self, equipment_id: str) -> EquipmentLog:
        return self.log(self.config.equipment_by_id(equipment_id))

    def notify(self, event: dict[str, Any]) -> None:
        for callback in list(self.listeners):
            try:
                callback(event)
            except Exception:  # a broken listener never stops a transfer
                logger.exception("progress listener failed")

    def notify_state(self, job: SyncJobRow) -> None:
        """Tell the listeners the job's state (as ``job`` holds it)."""
        self.notify({"type": "state", "job_id": job.id, "run_path": job.run_path, "state": job.state.value})

    def kick(self) -> None:
        """Wake the dispatcher."""
        if self.wake is not None:
            self.wake.set()

    def progress_cb(self, job: SyncJobRow, phase: str, total: int) -> ProgressSink:
        """Start the job's live progress for ``phase``; the sink adds bytes (from any thread)."""
        state = TransferProgress(job.id, job.run_path, phase, 0, total)
        self.progress[job.id] = state
        return ProgressSink(self, state)


class ProgressSink:
    """The byte counter of one job's phase: threads add to it, the event loop reports it.

    ``sink(delta)`` adds bytes from any thread (a lock and an addition: a copy
    thread never waits on the event loop). The listeners get one ``progress``
    event per :data:`PROGRESS_INTERVAL_S` at most while bytes come in
    (``delta`` = the bytes since the previous event, ``bytes`` = the sum),
    and the rest when the step calls :meth:`flush` on the loop. ``set_total``
    records the bytes the phase will go through (a transport that lists the
    run before sending tells it, so nothing else has to size the run).
    """

    def __init__(self, ctx: ClientContext, state: TransferProgress):
        self._ctx = ctx
        self._state = state
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._armed = False
        self._reported = 0
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, delta: int) -> None:
        with self._lock:
            self._state.bytes_done += delta
            if self._armed:
                return
            self._armed = True
        try:
            self._loop.call_soon_threadsafe(self._arm)
        except RuntimeError:  # loop closed during shutdown
            pass

    def set_total(self, total: int) -> None:
        self._state.bytes_total = total

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(PROGRESS_INTERVAL_S, self.flush)

    def flush(self) -> None:
        """Report the bytes added since the last event (call on the event loop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._lock:
            self._armed = False
            done = self._state.bytes_done
        delta, self._reported = done - self._reported, done
        if not delta:
            return
        state = self._state
        self._ctx.notify(
            {
                "type": "progress",
                "job_id": state.job_id,
                "run_path": state.run_path,
                "phase": state.phase,
                "bytes": done,
                "total": state.bytes_total,
                "delta": delta,
            }
        )
