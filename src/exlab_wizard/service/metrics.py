"""``GET /metrics``: the service in Prometheus text format, per equipment.

Read at scrape time (a GROUP BY over a covering index and one index seek per
equipment: cheap with 100,000 jobs): ``exlab_jobs{equipment,state}``,
``exlab_oldest_queued_job_age_seconds``, ``exlab_last_verified_sync_timestamp_seconds``.
Read from :class:`NasFacts`, refreshed in the background and never during a
scrape (a probe may take seconds when a NAS is away): ``exlab_nas_reachable``,
``exlab_nas_probe_timestamp_seconds``, ``exlab_nas_silent_since_timestamp_seconds``,
``exlab_reclaimable_bytes``.
Counted as things happen (since this process started):
``exlab_transferred_bytes_total``, ``exlab_verifications_total{outcome}``
(``pass``: a first verification or an audit pass; ``fail``: a verification
that did not pass, or a verified copy sent back for a re-transfer or failed),
``exlab_transfer_duration_seconds`` (a histogram: from RUNNING to the end of
the transfer).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exlab_wizard.config.models import Config
from exlab_wizard.sync.queue_damage import QueueDamaged
from exlab_wizard.sync.queue_stats import QueueStats, StoredEvent
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import make_transport

__all__ = ["NasFacts", "ServiceMetrics"]

logger = logging.getLogger(__name__)

S = SyncJobState
_DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400)
_VERIFYING = {S.AWAITING_VERIFY.value}
_AUDITED = {S.VERIFIED.value, S.CLEANUP_ELIGIBLE.value}


def _epoch(text: str) -> float | None:
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


class NasFacts:
    """Per equipment: is the NAS reachable, and how many local bytes could cleanup free.

    :meth:`run` refreshes both every ``interval_s`` (each probe awaited at
    most ``probe_timeout_s``); readers get the last answer and its time, never
    wait. A probe that does not answer in time is left to end on its own and
    no other is started while it is out (a silent share holds a thread
    in it for as long as it is silent): the NAS is "not answering since"
    the probe started (:attr:`silent_since`), until that probe returns.
    """

    def __init__(self, config: Config, stats: QueueStats, *, interval_s: float = 30.0, probe_timeout_s: float = 20.0):
        self.config = config
        self.stats = stats
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s
        self.reachable: dict[str, bool] = {}
        self.probed_at: dict[str, float] = {}
        #: Unix time the probe still out started, for each equipment whose NAS did not answer it in time.
        self.silent_since: dict[str, float] = {}
        self.reclaimable: dict[str, int] = {}
        self._transports = {eq.id: make_transport(eq) for eq in config.equipment}
        self._out: dict[str, tuple[float, asyncio.Future[bool]]] = {}

    async def _ask(self, equipment_id: str) -> bool:
        equipment = self.config.equipment_by_id(equipment_id)
        try:
            return bool(await self._transports[equipment_id].reachable(Path(equipment.equipment_root)))
        except Exception:  # a probe that fails means "not reachable"
            return False

    async def _probe(self, equipment_id: str) -> None:
        out = self._out.get(equipment_id)
        if out is None:
            out = self._out[equipment_id] = (time.time(), asyncio.ensure_future(self._ask(equipment_id)))
            await asyncio.wait({out[1]}, timeout=self.probe_timeout_s)
        started, probe = out
        if probe.done():
            del self._out[equipment_id]
            self.reachable[equipment_id] = probe.result()
            self.silent_since.pop(equipment_id, None)
        else:  # still in the share: no other probe is started
            self.reachable[equipment_id] = False
            self.silent_since[equipment_id] = started
        self.probed_at[equipment_id] = time.time()

    async def refresh(self) -> None:
        await asyncio.gather(*(self._probe(eq) for eq in self._transports))
        try:
            self.reclaimable = await asyncio.to_thread(self.stats.reclaimable_bytes)
        except QueueDamaged:  # logged once by the queue, reported by /healthz
            pass
        except Exception:
            logger.exception("reading reclaimable bytes failed")

    async def run(self) -> None:
        try:
            while True:
                await self.refresh()
                await asyncio.sleep(self.interval_s)
        finally:
            for _started, probe in self._out.values():
                probe.cancel()


class _QueueCollector(Collector):
    def __init__(self, config: Config, stats: QueueStats, facts: NasFacts, clock: Callable[[], float]):
        self.config = config
        self.stats = stats
        self.facts = facts
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ids = [eq.id for eq in self.config.equipment]
        jobs = GaugeMetricFamily("exlab_jobs", "Jobs by equipment and state.", labels=["equipment", "state"])
        oldest = GaugeMetricFamily(
            "exlab_oldest_queued_job_age_seconds",
            "Age of the oldest QUEUED job (0: none queued).",
            labels=["equipment"],
        )
        verified = GaugeMetricFamily(
            "exlab_last_verified_sync_timestamp_seconds",
            "Unix time of the latest verification of a current NAS copy (0: never).",
            labels=["equipment"],
        )
        counts = {(row.equipment_id, row.state): row.jobs for row in self.stats.by_equipment_state()}
        known = ids + sorted({eq for eq, _ in counts} - set(ids))  # jobs of equipment no longer configured too
        oldest_at = self.stats.oldest_queued(known)
        last_at = self.stats.last_verified(known)
        now = self.clock()
        for eq in known:
            for state in S:
                jobs.add_metric([eq, state.value], counts.get((eq, state.value), 0))
            oldest.add_metric([eq], max(0.0, now - oldest_at[eq].timestamp()) if eq in oldest_at else 0.0)
            verified.add_metric([eq], last_at[eq].timestamp() if eq in last_at else 0.0)
        yield jobs
        yield oldest
        yield verified
        reachable = GaugeMetricFamily(
            "exlab_nas_reachable", "1 when the last background probe reached the NAS.", labels=["equipment"]
        )
        probed = GaugeMetricFamily(
            "exlab_nas_probe_timestamp_seconds", "Unix time of the last NAS probe (0: none yet).", labels=["equipment"]
        )
        reclaim = GaugeMetricFamily(
            "exlab_reclaimable_bytes",
            "Verified local bytes that cleanup could free (VERIFIED and CLEANUP_ELIGIBLE jobs).",
            labels=["equipment"],
        )
        silent = GaugeMetricFamily(
            "exlab_nas_silent_since_timestamp_seconds",
            "Unix time since which a NAS probe has not returned (0: the last probe answered).",
            labels=["equipment"],
        )
        for eq in ids:
            reachable.add_metric([eq], 1.0 if self.facts.reachable.get(eq) else 0.0)
            probed.add_metric([eq], self.facts.probed_at.get(eq, 0.0))
            silent.add_metric([eq], self.facts.silent_since.get(eq, 0.0))
            reclaim.add_metric([eq], float(self.facts.reclaimable.get(eq, 0)))
        yield reachable
        yield probed
        yield silent
        yield reclaim


class ServiceMetrics:
    """The service's registry: the scrape-time collector plus counters fed by the event hub."""

    def __init__(self, config: Config, stats: QueueStats, facts: NasFacts, *, clock: Callable[[], float] = time.time):
        self.config = config
        self.registry = CollectorRegistry()
        self.registry.register(_QueueCollector(config, stats, facts, clock))
        self.transferred = Counter(
            "exlab_transferred_bytes", "Bytes sent to the NAS by transfers.", ["equipment"], registry=self.registry
        )
        self.verifications = Counter(
            "exlab_verifications",
            "Verification outcomes (pass, fail).",
            ["equipment", "outcome"],
            registry=self.registry,
        )
        self.durations = Histogram(
            "exlab_transfer_duration_seconds",
            "Time from RUNNING to the end of the transfer.",
            ["equipment"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self._running_since: dict[str, float] = {}
        for eq in config.equipment:  # every series present from the start, at 0
            self.transferred.labels(eq.id)
            for outcome in ("pass", "fail"):
                self.verifications.labels(eq.id, outcome)
            self.durations.labels(eq.id)

    def on_progress(self, event: dict[str, Any]) -> None:
        if event.get("phase") != "transfer":
            return
        delta = int(event.get("delta") or 0)
        equipment = self.config.equipment_for_run(Path(str(event.get("run_path"))))
        if delta > 0 and equipment is not None:
            self.transferred.labels(equipment.id).inc(delta)

    def on_stored(self, event: StoredEvent) -> None:
        eq = event.equipment_id
        if event.kind == "verify_pass":
            self.verifications.labels(eq, "pass").inc()
            return
        if event.kind != "transition":
            return
        if event.to_state == S.RUNNING.value:
            at = _epoch(event.at)
            if at is not None:
                self._running_since[event.job_id] = at
        elif event.from_state == S.RUNNING.value:
            started = self._running_since.pop(event.job_id, None)
            ended = _epoch(event.at)
            if started is not None and ended is not None and event.to_state == S.AWAITING_VERIFY.value:
                self.durations.labels(eq).observe(max(0.0, ended - started))
        if event.from_state in _VERIFYING:
            self.verifications.labels(eq, "pass" if event.to_state == S.VERIFIED.value else "fail").inc()
        elif event.from_state in _AUDITED and event.to_state in (S.QUEUED.value, S.FAILED.value):
            self.verifications.labels(eq, "fail").inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
