"""A token bucket that follows a bandwidth limit which may change while it runs.

The copy threads of a transport call :meth:`TokenBucket.consume` before
sending each block. The limit (KiB/s, or None for unlimited) comes from a
callable, re-read at least every ``refresh_s`` seconds, so a schedule window
that opens or closes mid-transfer takes effect at once (within
``refresh_s``), including while a thread is waiting.

Example::

    bucket = TokenBucket(lambda: limit_kibps(bandwidth, now()))
    for block in blocks:
        bucket.consume(len(block))   # blocks until the limit allows it
        send(block)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Blocking rate limiter shared by the copy threads of one transfer.

    ``limit_fn()`` returns the limit in KiB/s (1 KiB = 1024 bytes) or None
    for unlimited; a limit below 1 counts as 1. Up to ``burst_s`` seconds'
    worth of bytes may go out at once after an idle spell. ``consume(n)``
    takes ``n`` bytes' worth of tokens and, when the bucket is in debt,
    sleeps until the debt is repaid at the current rate, in naps of at most
    ``refresh_s`` so a changed limit is seen at once. With an unlimited
    limit it never sleeps and no credit builds up. Over any long stretch the
    bytes passed equal the limit times the time (plus one burst).

    ``clock`` (monotonic seconds) and ``sleep`` are injectable for tests;
    an exception raised by ``sleep`` (e.g. to cancel the transfer)
    propagates out of ``consume``. Thread-safe.
    """

    def __init__(
        self,
        limit_fn: Callable[[], int | None],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        burst_s: float = 0.25,
        refresh_s: float = 0.5,
    ):
        self._limit_fn = limit_fn
        self._clock = clock
        self._sleep = sleep
        self._burst_s = burst_s
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._limit: int | None = None
        self._read_at: float | None = None
        self._tokens = 0.0
        self._last = 0.0
        self.bytes_passed = 0
        self.slept_s = 0.0

    @property
    def limit_kibps(self) -> int | None:
        """The limit last read from ``limit_fn`` (None before the first read)."""
        return self._limit

    def _refresh(self, now: float, force: bool = False) -> None:
        if force or self._read_at is None or now - self._read_at >= self._refresh_s:
            limit = self._limit_fn()
            if limit is not None:
                limit = max(1, int(limit))
            if limit != self._limit:
                self._settle(now)  # tokens earned so far count at the old rate
                if self._limit is None:
                    self._tokens = 0.0  # no credit carried over from an unlimited spell
            self._limit = limit
            self._read_at = now

    def _settle(self, now: float) -> None:
        if self._limit is not None:
            rate = self._limit * 1024.0
            self._tokens = min(self._tokens + (now - self._last) * rate, rate * self._burst_s)
        self._last = now

    def consume(self, nbytes: int) -> None:
        """Block until ``nbytes`` may be sent under the limit in force."""
        with self._lock:
            now = self._clock()
            self._refresh(now)
            self.bytes_passed += nbytes
            if self._limit is None:
                self._last = now
                return
            self._settle(now)
            self._tokens -= nbytes
            while self._tokens < -0.5:  # half a byte: float rounding never makes a debt
                rate = self._limit * 1024.0
                nap = min(-self._tokens / rate, self._refresh_s)
                self._sleep(nap)
                self.slept_s += nap
                now = self._clock()
                self._refresh(now, force=True)
                if self._limit is None:
                    self._tokens = 0.0
                    self._last = now
                    return
                self._settle(now)
