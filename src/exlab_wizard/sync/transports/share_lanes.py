"""Threads for I/O into a mounted share, apart from the event loop's default pool.

A share whose server goes silent (a hard NFS mount, SMB or sshfs over a
half-open connection, a FUSE daemon stopped) blocks every syscall on it, for
ever: a thread that enters it does not come back, and an ``asyncio.wait_for``
around ``asyncio.to_thread`` only stops waiting. On the loop's default pool
(``min(32, cpus + 4)`` threads, shared by every ``to_thread`` of the process)
each such call takes a thread for good, until the API, the other NAS's
pushes and every other ``to_thread`` wait behind them.

So each mount path has its own lanes (:func:`lane`): at most ``workers``
calls in a share at once, each on a daemon thread of its own named after the
share; a call beyond that waits, without a thread, for one to end. A silent
share holds at most its lanes' threads. :func:`stuck` lists the calls still
in a share (``serve`` names them when it stops without them).

Usage::

    listing = await lane(mount_path).run("listing", self._remote_listing, run)
    here = await in_share_of(equipment, "where the NAS copy is", run_location, equipment, run)
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from exlab_wizard.config.models import EquipmentConfig

__all__ = ["IO_WORKERS", "PROBE_WORKERS", "ShareCall", "ShareLane", "in_share_of", "lane", "stuck"]

T = TypeVar("T")

#: Share calls at once per mount path: pushes, manifests, listings, fetches (one job per equipment at a time).
IO_WORKERS = 8
#: Reachability probes at once per mount path (the service's background probe keeps one outstanding).
PROBE_WORKERS = 2


@dataclass(frozen=True)
class ShareCall:
    """A call in a share: the mount path, what it does, since when (Unix time)."""

    path: str
    what: str
    since: float


class ShareLane:
    """At most ``workers`` calls into the share at ``path`` at once, each on its own daemon thread."""

    def __init__(self, path: str, workers: int):
        self.path = path
        self.workers = workers
        self._lock = threading.Lock()
        self._used = 0
        self._waiting: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()
        self._calls: dict[int, ShareCall] = {}
        self._ids = itertools.count()

    def calls(self) -> list[ShareCall]:
        with self._lock:
            return list(self._calls.values())

    async def run(self, what: str, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``func(*args, **kwargs)`` on a thread of this lane. Cancelling stops the wait, not the thread."""
        await self._slot()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        context = contextvars.copy_context()
        key = next(self._ids)

        def work() -> None:
            try:
                outcome: tuple[Any, BaseException | None] = (context.run(func, *args, **kwargs), None)
            except BaseException as exc:  # handed to the awaiting coroutine
                outcome = (None, exc)
            self._release(key)
            try:
                loop.call_soon_threadsafe(_settle, done, outcome)
            except RuntimeError:  # the loop closed while the share held the call
                pass

        with self._lock:
            self._calls[key] = ShareCall(self.path, what, time.time())
        try:
            threading.Thread(target=work, name=f"exlab-share {self.path}: {what}", daemon=True).start()
        except BaseException:
            self._release(key)
            raise
        return await done

    async def _slot(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._used < self.workers and not self._waiting:
                self._used += 1
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiting.append((loop, waiter))
        try:
            await waiter  # resolved: a slot was handed over
        except asyncio.CancelledError:
            with self._lock:
                if (loop, waiter) in self._waiting:
                    self._waiting.remove((loop, waiter))
                    raise
            if waiter.done() and not waiter.cancelled():
                self._release(None)  # handed over, then cancelled: give it on
            raise  # else the hand-over sees the cancelled waiter and gives it on

    def _release(self, key: int | None) -> None:
        with self._lock:
            if key is not None:
                self._calls.pop(key, None)
            while self._waiting:
                loop, waiter = self._waiting.popleft()
                try:
                    loop.call_soon_threadsafe(self._hand_over, waiter)
                    return
                except RuntimeError:  # that loop is closed: the next waiter
                    continue
            self._used -= 1

    def _hand_over(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled():
            self._release(None)
        else:
            waiter.set_result(None)


def _settle(done: asyncio.Future[Any], outcome: tuple[Any, BaseException | None]) -> None:
    if done.cancelled():
        return
    value, error = outcome
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(value)


_lanes: dict[tuple[str, str], ShareLane] = {}
_lanes_lock = threading.Lock()


def lane(path: str, kind: str = "io") -> ShareLane:
    """The lane of ``kind`` (``io`` or ``probe``) for the share mounted at ``path``, one per process."""
    with _lanes_lock:
        found = _lanes.get((path, kind))
        if found is None:
            found = _lanes[(path, kind)] = ShareLane(path, PROBE_WORKERS if kind == "probe" else IO_WORKERS)
        return found


async def in_share_of(
    equipment: EquipmentConfig | None, what: str, func: Callable[..., T], /, *args: Any, **kwargs: Any
) -> T:
    """``func`` on the lane of ``equipment``'s share when its transport is ``mount`` (``func`` may look into
    the share: the real path of ``mount_path``, say), else in a thread of the default pool."""
    if equipment is not None and equipment.transport.type == "mount":
        return await lane(os.fspath(equipment.transport.mount_path)).run(what, func, *args, **kwargs)
    return await asyncio.to_thread(func, *args, **kwargs)


def stuck() -> list[ShareCall]:
    """Every call still in a share (oldest first)."""
    with _lanes_lock:
        lanes = list(_lanes.values())
    return sorted((call for each in lanes for call in each.calls()), key=lambda call: call.since)
