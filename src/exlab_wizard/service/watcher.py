"""The completion watcher: enqueue each finished run once, by itself.

Interface (what ``exlab-sync serve`` and the HTTP API use)::

    client = client_from_config(config)
    await client.init()
    watcher = CompletionWatcher(config, client)        # clock=... for tests
    watcher.add_listener(on_event)                     # dicts, see below
    task = asyncio.create_task(watcher.run())          # a pass every sync.scan_interval_s
    ...
    watcher.blocked()      # [BlockedRun]: gate-blocked runs and their blocking findings
    watcher.incomplete()   # [IncompleteRun]: runs waiting for their completeness signal, with the reason
    report = await watcher.scan_once()                 # one pass now -> ScanReport
    task.cancel(); watcher.close()                     # before client.close()

A pass looks at every equipment whose ``completeness_signal`` is not
``none``: it lists ``<local_root>/<id>/<PROJECT>/{Runs,TestRuns}/<run>``
(:func:`~exlab_wizard.service.run_signals.list_runs`; symbolic links are
never followed) and for each run:

1. already handed to the queue (remembered in ``watched_runs``): skipped,
   nothing under the run is looked at;
2. has a job made some other way (``client.status``): remembered as handed
   over, never enqueued by the watcher (so a FAILED job is not re-armed);
3. completeness signal does not hold (sentinel missing, a manifest file
   missing or still growing, a malformed manifest): waiting, with the reason;
4. blocked earlier and unchanged (same fingerprint: names, sizes, times of
   its files, its overrides, the validator settings): still blocked, the
   gate is not asked again;
5. otherwise ``client.enqueue(run)``: a job (handed over) or BLOCKED (the
   findings and the fingerprint are remembered).

Runs that disappeared are forgotten (not when their folder could not be
listed: an unreadable or unmounted disk is not an empty one). Every change is
in the queue database before the next pass; a new watcher on the same state
carries on where the last one stopped, and a crash between an enqueue and
its record is caught by rule 2.

Listeners receive ``{"type": "watcher", "action": "enqueued" | "blocked" |
"waiting" | "adopted" | "forgotten" | "error", "run_path", "equipment_id",
"at"}`` plus ``job_id`` (enqueued, adopted), ``findings`` (blocked: a list of
``Finding.to_dict()``) or ``reason`` (waiting, error). ``waiting`` is sent when
a run starts waiting or its reason changes, not at every pass. ``enqueued``
and ``blocked`` are also written to the equipment log (``watcher_enqueued``,
``watcher_blocked``). The client's own ``state`` events follow an enqueue.

The watcher needs an initialised client and runs on the client's event loop;
file-system work happens in worker threads. One pass at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exlab_wizard.config import Config
from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.service.run_signals import (
    Completeness,
    RunListing,
    completeness,
    fingerprint,
    list_runs,
)
from exlab_wizard.service.watch_store import (
    BLOCKED,
    HANDED_OVER,
    WatchedRun,
    WatchStore,
)
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.queue_damage import QueueDamaged
from exlab_wizard.sync.states import SyncHandleState
from exlab_wizard.validator import Finding

if TYPE_CHECKING:
    from exlab_wizard.sync.nas_client import NASSyncClient

__all__ = ["BlockedRun", "CompletionWatcher", "IncompleteRun", "ScanReport"]

logger = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat()


@dataclass(frozen=True)
class BlockedRun:
    """A finished run the gate blocked; it is gated again only when it changes."""

    run_path: str
    equipment_id: str
    findings: tuple[Finding, ...]
    since: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_path": self.run_path,
            "equipment_id": self.equipment_id,
            "findings": [finding.to_dict() for finding in self.findings],
            "since": _iso(self.since),
        }


@dataclass(frozen=True)
class IncompleteRun:
    """A run whose completeness signal does not hold yet; ``reason`` in words."""

    run_path: str
    equipment_id: str
    signal: str
    reason: str
    since: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_path": self.run_path,
            "equipment_id": self.equipment_id,
            "signal": self.signal,
            "reason": self.reason,
            "since": _iso(self.since),
        }


@dataclass
class ScanReport:
    """What one pass saw and did.

    ``enqueued``, ``blocked``, ``adopted`` and ``forgotten`` list the run paths
    acted on in this pass (``blocked``: newly blocked or blocked again after a
    change). ``already_queued``: runs skipped as handed over; ``still_blocked``:
    blocked runs unchanged; ``waiting``: runs whose signal does not hold;
    ``examined``: runs whose files were looked at; ``skipped_equipment``:
    equipment ids not scanned (signal ``none``, or the root is missing);
    ``errors``: ``"<run or equipment>: <message>"``.
    """

    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    runs_seen: int = 0
    enqueued: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    already_queued: int = 0
    still_blocked: int = 0
    waiting: int = 0
    examined: int = 0
    skipped_equipment: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["started_at"] = _iso(self.started_at)
        out["finished_at"] = _iso(self.finished_at) if self.finished_at else None
        return out


class CompletionWatcher:
    """Enqueue every run of the configured equipment once its completeness signal holds.

    ``config``: the loaded :class:`Config` (equipment, ``sync.scan_interval_s``,
    ``validator``; the store lives in ``config.queue_db``). ``client``: an
    initialised :class:`NASSyncClient`; only its public ``status``, ``job``
    and ``enqueue`` are used. ``clock``: returns an aware UTC datetime. See
    the module docstring for a pass, the events and the guarantees.
    """

    def __init__(
        self,
        config: Config,
        client: NASSyncClient,
        *,
        clock: Callable[[], dt.datetime] | None = None,
    ):
        self.config = config
        self.client = client
        self.clock = clock or _utcnow
        self._store: WatchStore | None = None
        self._known: dict[str, WatchedRun] = {}
        self._handed: dict[str, WatchedRun] = {}  # per equipment: the one record of its handed-over runs
        self._waiting: dict[str, IncompleteRun] = {}
        self._listeners: list[Listener] = []
        self._logs: dict[str, EquipmentLog] = {}
        self._missing: dict[str, str] = {}  # equipment id -> its folder, while the last pass found it missing
        self._pass_lock = asyncio.Lock()
        # Part of every fingerprint: other validator settings may unblock a run.
        self._gate_settings = {"validator": config.validator.model_dump(mode="json")}

    # ------------------------------------------------------------------ public

    def add_listener(self, callback: Listener) -> None:
        """Receive the watcher's events (see the module docstring)."""
        self._listeners.append(callback)

    def blocked(self) -> list[BlockedRun]:
        """Runs the gate blocked whose signal still holds, sorted by path, with their blocking findings.

        Known from the store before the first pass (after a restart); only
        runs of equipment in the config that the watcher scans.
        """
        self._open()
        watched = {e.id for e in self.config.equipment if e.completeness_signal != "none"}
        return [
            BlockedRun(row.run_path, row.equipment_id, row.findings, row.updated_at)
            for path, row in sorted(self._known.items())
            if row.status == BLOCKED and path not in self._waiting and row.equipment_id in watched
        ]

    def missing_roots(self) -> dict[str, str]:
        """Equipment whose ``<local_root>/<id>`` the last pass found absent or not a folder: id -> that folder.

        Their runs are not scanned (an unmounted disk is not an empty one) until the folder is back.
        """
        return dict(self._missing)

    def incomplete(self) -> list[IncompleteRun]:
        """Runs waiting for their completeness signal (as of the last pass), sorted by path."""
        return [self._waiting[path] for path in sorted(self._waiting)]

    async def scan_once(self) -> ScanReport:
        """One pass over every equipment; see the module docstring. Never raises for a run's trouble."""
        async with self._pass_lock:
            self._open()
            report = ScanReport(started_at=self.clock())
            for equipment in self.config.equipment:
                try:
                    await self._scan_equipment(equipment, report)
                except (asyncio.CancelledError, QueueDamaged):  # a damaged queue ends the pass
                    raise
                except Exception as exc:  # one equipment's trouble must not stop the others
                    logger.exception("completion watcher: %s", equipment.id)
                    report.errors.append(f"{equipment.id}: {exc}")
            report.finished_at = self.clock()
            return report

    async def run(self) -> None:
        """Scan now, then every ``sync.scan_interval_s``, until cancelled or the queue is found damaged."""
        while True:
            try:
                await self.scan_once()
            except asyncio.CancelledError:
                raise
            except QueueDamaged:  # logged once by the queue: nothing can be queued any more
                logger.info("completion watcher stopped: the queue database is damaged")
                return
            except Exception:
                logger.exception("completion watcher pass failed; trying again next interval")
            await asyncio.sleep(self.config.sync.scan_interval_s)

    def close(self) -> None:
        """Close the store's database connection. Idempotent."""
        if self._store is not None:
            self._store.close()
            self._store = None

    # ------------------------------------------------------------------ a pass

    def _open(self) -> WatchStore:
        if self._store is None:
            self._store = WatchStore(self.config.queue_db)
            self._known = {path: self._slim(row) for path, row in self._store.all().items()}
        return self._store

    async def _scan_equipment(self, equipment: EquipmentConfig, report: ScanReport) -> None:
        if equipment.completeness_signal == "none":
            report.skipped_equipment.append(equipment.id)
            for path in [p for p, w in self._waiting.items() if w.equipment_id == equipment.id]:
                del self._waiting[path]  # the signal was changed to none since the last pass
            return
        listing = await asyncio.to_thread(list_runs, equipment.equipment_root)
        if listing.root_missing:
            report.skipped_equipment.append(equipment.id)
            if equipment.id not in self._missing:  # said once, not at every pass
                logger.warning(
                    "completion watcher: %s's folder %s is missing or not a folder (a disk not mounted?): "
                    "its runs are not scanned until it is back",
                    equipment.id,
                    equipment.equipment_root,
                )
                self._missing[equipment.id] = str(equipment.equipment_root)
            return
        if self._missing.pop(equipment.id, None) is not None:
            logger.info("completion watcher: %s's folder %s is back", equipment.id, equipment.equipment_root)
        self._forget_gone(equipment, listing, report)
        report.runs_seen += len(listing.runs)
        adopted: list[WatchedRun] = []
        try:
            for run in listing.runs:
                row = self._known.get(run)
                if row is not None and row.status == HANDED_OVER:
                    report.already_queued += 1
                    continue
                try:
                    await self._consider(equipment, run, row, report, adopted)
                except (asyncio.CancelledError, QueueDamaged):
                    raise
                except Exception as exc:  # one run's trouble must not stop the pass
                    logger.exception("completion watcher: %s", run)
                    report.errors.append(f"{run}: {exc}")
                    self._emit("error", equipment, run, reason=str(exc))
        finally:
            # One transaction for all: adopting the jobs of a large queue at the
            # first start is one commit, not thousands. A row lost in a crash is
            # adopted again at the next pass.
            self._open().save(adopted)
            self._known.update((row.run_path, self._slim(row)) for row in adopted)

    def _forget_gone(self, equipment: EquipmentConfig, listing: RunListing, report: ScanReport) -> None:
        present = set(listing.runs)
        gone = [
            path
            for path, row in self._known.items()
            if row.equipment_id == equipment.id and path not in present and not listing.may_hold(path)
        ]
        if gone:
            self._open().forget(gone)
        for path in gone:
            del self._known[path]
            report.forgotten.append(path)
            self._emit("forgotten", equipment, path)
        for path, waiting in list(self._waiting.items()):
            if waiting.equipment_id == equipment.id and path not in present and not listing.may_hold(path):
                del self._waiting[path]

    async def _consider(
        self,
        equipment: EquipmentConfig,
        run: str,
        row: WatchedRun | None,
        report: ScanReport,
        adopted: list[WatchedRun],
    ) -> None:
        if await self.client.status(Path(run)) != "none":
            adopted.append(await self._adopt(equipment, run, row, report))
            return
        report.examined += 1
        check = await asyncio.to_thread(completeness, equipment, run)
        if not check.complete:
            self._wait(equipment, run, check, report)
            return
        self._waiting.pop(run, None)
        # Taken before the gate runs: a change made while the gate looks is
        # then seen as a change at the next pass, never lost.
        seen = await asyncio.to_thread(fingerprint, run, self._gate_settings)
        if row is not None and row.status == BLOCKED and row.fingerprint == seen:
            report.still_blocked += 1
            return
        await self._enqueue(equipment, run, row, seen, report)

    async def _enqueue(
        self,
        equipment: EquipmentConfig,
        run: str,
        row: WatchedRun | None,
        seen: str,
        report: ScanReport,
    ) -> None:
        """Hand a finished run to the client; remember the job, or the block and ``seen``."""
        handle = await self.client.enqueue(Path(run))
        now = self.clock()
        first_seen = row.first_seen_at if row is not None else now
        if handle.state == SyncHandleState.BLOCKED:
            findings = tuple(handle.blocking_findings)
            self._remember(WatchedRun(run, equipment.id, BLOCKED, None, seen, findings, first_seen, now))
            report.blocked.append(run)
            self._emit(
                "blocked",
                equipment,
                run,
                findings=[finding.to_dict() for finding in findings],
            )
            self._log(
                equipment,
                "warning",
                run,
                "watcher_blocked",
                rules=",".join(sorted({finding.rule for finding in findings})),
                findings=len(findings),
            )
            return
        self._remember(WatchedRun(run, equipment.id, HANDED_OVER, handle.job_id, None, (), first_seen, now))
        report.enqueued.append(run)
        self._emit("enqueued", equipment, run, job_id=handle.job_id)
        self._log(
            equipment,
            "info",
            run,
            "watcher_enqueued",
            signal=equipment.completeness_signal,
            job=handle.job_id,
        )

    async def _adopt(
        self,
        equipment: EquipmentConfig,
        run: str,
        row: WatchedRun | None,
        report: ScanReport,
    ) -> WatchedRun:
        """A run with a job the watcher did not make: handed over, never enqueued by us."""
        job = await self.client.job(run)
        job_id = job.id if job is not None else None
        now = self.clock()
        first_seen = row.first_seen_at if row is not None else now
        self._waiting.pop(run, None)
        report.adopted.append(run)
        self._emit("adopted", equipment, run, job_id=job_id)
        return WatchedRun(run, equipment.id, HANDED_OVER, job_id, None, (), first_seen, now)

    def _wait(
        self,
        equipment: EquipmentConfig,
        run: str,
        check: Completeness,
        report: ScanReport,
    ) -> None:
        report.waiting += 1
        before = self._waiting.get(run)
        if before is not None and before.reason == check.reason:
            return
        since = before.since if before is not None else self.clock()
        self._waiting[run] = IncompleteRun(run, equipment.id, equipment.completeness_signal, check.reason, since)
        self._emit("waiting", equipment, run, reason=check.reason)

    def _remember(self, row: WatchedRun) -> None:
        self._open().save([row])  # durable before the next run is looked at
        self._known[row.run_path] = self._slim(row)

    def _slim(self, row: WatchedRun) -> WatchedRun:
        """What memory keeps of a row. A handed-over run is never looked at again: only its
        equipment matters (to forget it when it goes), so all of an equipment's share one
        record and a run costs its path alone, not a record with its times and job id."""
        if row.status != HANDED_OVER:
            return row
        shared = self._handed.get(row.equipment_id)
        if shared is None:
            shared = WatchedRun("", row.equipment_id, HANDED_OVER, None, None, (), _EPOCH, _EPOCH)
            self._handed[row.equipment_id] = shared
        return shared

    # ------------------------------------------------------------------ reporting

    def _emit(self, action: str, equipment: EquipmentConfig, run: str, **extra: Any) -> None:
        event = {
            "type": "watcher",
            "action": action,
            "run_path": run,
            "equipment_id": equipment.id,
            "at": _iso(self.clock()),
            **extra,
        }
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not stop the watcher
                logger.exception("completion watcher listener failed")

    def _log(
        self,
        equipment: EquipmentConfig,
        level: str,
        run: str,
        event: str,
        **fields: object,
    ) -> None:
        log = self._logs.get(equipment.id)
        if log is None:
            log = self._logs[equipment.id] = EquipmentLog(equipment)
        with contextlib.suppress(OSError):  # a full or read-only disk must not stop the watcher
            log.write(level, run, event, **fields)
