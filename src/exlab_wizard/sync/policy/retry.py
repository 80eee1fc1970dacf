"""The retry decision: what to do after a failed transfer or verification.

A pure function of the failure kind, the counters kept on the job, the
configured back-off and the clock. It returns the decision with a reason a
person can read; it never touches the queue or the clock itself.

| kind                                   | action                                   |
|----------------------------------------|------------------------------------------|
| network, unknown (and unknown strings) | retry after ``backoff_s[attempts-1]``    |
|                                        | while ``attempts <= len(backoff_s)``,    |
|                                        | i.e. ``len(backoff_s) + 1`` attempts in  |
|                                        | all, then fail                           |
| auth (key refused, host key, denied)   | fail at once                             |
| hash_mismatch                          | first mismatch: retry now and rewrite    |
|                                        | the mismatched files; second: fail       |
| local_file_vanished, local_damage,     | fail at once                             |
| remote_write_refused, remote_conflict  |                                          |

Example::

    >>> now = dt.datetime(2024, 5, 6, 12, 0, tzinfo=dt.UTC)
    >>> d = decide("network", attempts=2, mismatch_count=0,
    ...            backoff_s=[30, 120, 480, 1800, 7200], now=now,
    ...            message="connection refused")
    >>> d.action, d.reason
    ('retry', 'network: connection refused; attempt 2 of 6, next try in 120 s')
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from exlab_wizard.sync.failures import TRANSPORT_KINDS, FailureKind

__all__ = ["RetryDecision", "decide", "RETRY", "FAIL"]

RETRY: Literal["retry"] = "retry"
FAIL: Literal["fail"] = "fail"

K = FailureKind

_BACKOFF_KINDS = frozenset({K.NETWORK, K.UNKNOWN})

#: Why each fail-at-once kind is not retried, in the lab's words.
_FATAL_REASONS: dict[FailureKind, str] = {
    K.AUTH: "authentication failed; not retried, an operator must fix the key or host key",
    K.LOCAL_FILE_VANISHED: "a local file vanished between transfer and verify; not retried",
    K.REMOTE_WRITE_REFUSED: "the NAS refused the write (full, read-only, or a name it cannot take); not retried",
    K.REMOTE_CONFLICT: (
        "the remote run folder holds files that are not this run's; not retried, never overwriting someone else's data"
    ),
    K.LOCAL_DAMAGE: (
        "local file content differs from the verified copy or cannot be read, its mtime not moved on by an edit; "
        "not retried"
    ),
}


@dataclass(frozen=True)
class RetryDecision:
    """What to do with a job after a failure.

    ``action`` is ``"retry"`` (back to QUEUED, due at ``next_attempt_at``) or
    ``"fail"`` (to FAILED, ``next_attempt_at`` is None). ``error_kind`` is the
    normalised :class:`~exlab_wizard.sync.failures.FailureKind` value (of the
    transport subset) to store on the job;
    ``reason`` is the human-readable text for ``last_error``. ``rewrite`` is
    True only for the re-transfer after a first hash mismatch: the mismatched
    files must be sent again whatever their size and mtime.
    """

    action: Literal["retry", "fail"]
    next_attempt_at: dt.datetime | None
    error_kind: str
    reason: str
    rewrite: bool = False

    @property
    def retry(self) -> bool:
        """True when the job should go back to QUEUED."""
        return self.action == RETRY


def _normalise(kind: FailureKind | str) -> FailureKind:
    try:
        known = FailureKind(kind)
    except ValueError:
        return K.UNKNOWN
    return known if known in TRANSPORT_KINDS else K.UNKNOWN


def _seconds(value: float) -> str:
    return f"{value:g}"


def decide(
    kind: FailureKind | str,
    *,
    attempts: int,
    mismatch_count: int,
    backoff_s: Sequence[float],
    now: dt.datetime,
    message: str = "",
) -> RetryDecision:
    """Decide whether a failed job is retried, and when.

    ``attempts``: failed transfer attempts so far, this one included (>= 1
    for network and unknown failures). ``mismatch_count``: hash mismatches
    since the last good verification, this one included (>= 1 for a hash
    mismatch). ``backoff_s``: the configured delays in seconds. ``now``: the
    clock. ``message``: what the transport said, carried into ``reason``.
    A kind outside the transport subset of :class:`FailureKind` is treated
    as ``unknown`` (and named in the reason).

    Raises ``ValueError`` when a counter the kind relies on is below 1.
    """
    known = _normalise(kind)
    raw = str(kind)
    label = known.value if raw == known.value else f"{known.value} ({raw})"
    head = f"{label}: {message}" if message else label

    if known in _BACKOFF_KINDS:
        if attempts < 1:
            raise ValueError(f"attempts must count this failure (>= 1), got {attempts}")
        total = len(backoff_s) + 1
        if attempts <= len(backoff_s):
            delay = float(backoff_s[attempts - 1])
            return RetryDecision(
                action=RETRY,
                next_attempt_at=now + dt.timedelta(seconds=delay),
                error_kind=known.value,
                reason=f"{head}; attempt {attempts} of {total}, next try in {_seconds(delay)} s",
            )
        return RetryDecision(
            action=FAIL,
            next_attempt_at=None,
            error_kind=known.value,
            reason=f"{head}; attempt {attempts} of {total}, no retries left",
        )

    if known is K.HASH_MISMATCH:
        if mismatch_count < 1:
            raise ValueError(f"mismatch_count must count this mismatch (>= 1), got {mismatch_count}")
        if mismatch_count == 1:
            return RetryDecision(
                action=RETRY,
                next_attempt_at=now,
                error_kind=known.value,
                reason=f"{head}; first mismatch, transferring the mismatched files again now",
                rewrite=True,
            )
        return RetryDecision(
            action=FAIL,
            next_attempt_at=None,
            error_kind=known.value,
            reason=f"{head}; mismatch {mismatch_count} after a re-transfer, not retried",
        )

    return RetryDecision(
        action=FAIL,
        next_attempt_at=None,
        error_kind=known.value,
        reason=f"{head}; {_FATAL_REASONS.get(known, 'not retried')}",
    )
