"""The live feed behind ``GET /api/events``: job transitions and transfer progress.

Two sources, one stream:

- **transitions and decisions**, read from the queue's events table every
  ``poll_s`` (a primary-key range: cheap). Reading the durable record rather
  than in-process callbacks means every transition is seen, also those made
  by another process (``exlab-sync enqueue`` or ``retry`` beside ``serve``),
  and a reconnecting browser resumes from its ``Last-Event-ID``.
- **progress** of the transfer or verification in flight, from the client's
  listener, throttled to one message per job every ``throttle_s`` (plus the
  last one), with the rate over the interval since the previous message.

Each subscriber has a bounded queue; a subscriber that does not read loses
its oldest messages, never slows a transfer. Listeners (the metrics) see
every stored event and every progress delta, unthrottled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exlab_wizard.sync.queue_damage import QueueDamaged
from exlab_wizard.sync.queue_stats import QueueStats, StoredEvent

__all__ = ["EventHub", "FeedMessage"]

logger = logging.getLogger(__name__)

_IN_FLIGHT = ("running", "awaiting_verify")

#: Messages a subscriber may fall behind before its oldest are dropped.
SUBSCRIBER_BACKLOG = 1000


@dataclass(frozen=True)
class FeedMessage:
    """One server-sent event: ``event`` is ``transition``, ``event`` (a decision) or ``progress``."""

    event: str
    data: dict[str, Any]
    id: str | None = None


@dataclass
class _Rate:
    at: float
    bytes: int
    sent_at: float = 0.0
    bps: float | None = None  # the job's last measured rate: a new phase shows it until it has its own
    phase: Any = None


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Subscriber:
    queue: asyncio.Queue[FeedMessage] = field(default_factory=lambda: asyncio.Queue(SUBSCRIBER_BACKLOG))


class EventHub:
    """Fan-out of the queue's events and the client's progress to SSE subscribers.

    Call :meth:`on_client_event` from the client's listener (on the event
    loop), :meth:`start` once the loop runs, :meth:`stop` at shutdown.
    """

    def __init__(self, stats: QueueStats, *, poll_s: float = 0.25, throttle_s: float = 0.25):
        self.stats = stats
        self.poll_s = poll_s
        self.throttle_s = throttle_s
        self._subscribers: set[_Subscriber] = set()
        self._rates: dict[str, _Rate] = {}
        self._last_id = 0
        self._task: asyncio.Task[None] | None = None
        #: Called with every stored event (:class:`StoredEvent`) and progress dict, unthrottled.
        self.stored_listeners: list[Callable[[StoredEvent], None]] = []
        self.progress_listeners: list[Callable[[dict[str, Any]], None]] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._last_id = self.stats.last_event_id()
        self._task = asyncio.create_task(self._tail(), name="sse-tail")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sub in list(self._subscribers):  # wake every stream so it ends
            self._offer(sub, FeedMessage("shutdown", {}))

    @property
    def last_id(self) -> int:
        return self._last_id

    # ------------------------------------------------------------------ subscribers

    def subscribe(self) -> _Subscriber:
        sub = _Subscriber()
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        self._subscribers.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def rate(self, job_id: str) -> float | None:
        """The job's last rate sent on the feed (bytes/s), None before it has one: a page drawn again shows it too."""
        rate = self._rates.get(job_id)
        return rate.bps if rate is not None else None

    @staticmethod
    def _offer(sub: _Subscriber, message: FeedMessage) -> None:
        while True:
            try:
                sub.queue.put_nowait(message)
                return
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    sub.queue.get_nowait()

    def publish(self, message: FeedMessage) -> None:
        for sub in list(self._subscribers):
            self._offer(sub, message)

    def backlog(self, after_id: int, limit: int = 500) -> list[FeedMessage]:
        """Stored events after ``after_id`` up to what the tail has published (for ``Last-Event-ID``)."""
        return [self._stored_message(e) for e in self.stats.events_after(after_id, limit) if e.id <= self._last_id]

    # ------------------------------------------------------------------ sources

    @staticmethod
    def _stored_message(event: StoredEvent) -> FeedMessage:
        kind = "transition" if event.kind == "transition" else "event"
        return FeedMessage(kind, event.to_dict(), str(event.id))

    async def _tail(self) -> None:
        while True:
            try:
                events = await asyncio.to_thread(self.stats.events_after, self._last_id)
            except asyncio.CancelledError:
                raise
            except QueueDamaged:  # logged once by the queue: no event can be read any more
                logger.info("event feed stopped: the queue database is damaged")
                return
            except Exception:
                logger.exception("reading the queue's events failed")
                events = []
            for event in events:
                self._last_id = event.id
                if event.from_state in _IN_FLIGHT:  # a transfer or check that ended, however: forget its rate
                    self._rates.pop(event.job_id, None)
                for listener in self.stored_listeners:
                    with contextlib.suppress(Exception):
                        listener(event)
                self.publish(self._stored_message(event))
            if len(events) < 500:
                await asyncio.sleep(self.poll_s)

    def on_client_event(self, event: dict[str, Any]) -> None:
        """The client's listener: progress messages, throttled per job; other kinds come from the table."""
        if event.get("type") != "progress":
            return
        for listener in self.progress_listeners:
            with contextlib.suppress(Exception):
                listener(event)
        job_id = str(event.get("job_id"))
        now = asyncio.get_running_loop().time()
        done, total = int(event.get("bytes") or 0), int(event.get("total") or 0)
        rate, phase = self._rates.get(job_id), event.get("phase")
        if rate is None or rate.bytes > done or rate.phase != phase:  # a new phase
            last = rate.bps if rate is not None else None
            rate = self._rates[job_id] = _Rate(now, done, sent_at=-self.throttle_s, bps=last, phase=phase)
        finished = total > 0 and done >= total
        if now - rate.sent_at < self.throttle_s and not finished:
            return
        elapsed = now - rate.at
        if elapsed > 0:  # else the phase's first message: the job's last rate stands
            rate.bps = (done - rate.bytes) / elapsed
        bps = rate.bps
        rate.at, rate.bytes, rate.sent_at = now, done, now
        # Forgotten when the job leaves RUNNING or AWAITING_VERIFY (the table's transition, above).
        self.publish(
            FeedMessage(
                "progress",
                {
                    "job_id": job_id,
                    "run_path": event.get("run_path"),
                    "phase": event.get("phase"),
                    "bytes_done": done,
                    "bytes_total": total,
                    "rate_bps": bps,
                },
            )
        )
