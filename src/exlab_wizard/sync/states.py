"""Job states and the transitions the queue allows."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "SyncJobState",
    "SyncHandleState",
    "TRANSITIONS",
    "TERMINAL_STATES",
    "IllegalTransition",
    "DeletionPlanned",
    "check_transition",
]


class SyncJobState(StrEnum):
    """State machine for a sync job."""

    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_VERIFY = "awaiting_verify"
    VERIFIED = "verified"
    CLEANUP_ELIGIBLE = "cleanup_eligible"
    CLEANED = "cleaned"
    FAILED = "failed"


class SyncHandleState(StrEnum):
    """What ``enqueue`` did: the gate blocked the run, or a job exists."""

    BLOCKED = "blocked"
    QUEUED = "queued"


S = SyncJobState

#: from-state -> the states a job may move to from it.
TRANSITIONS: dict[SyncJobState, frozenset[SyncJobState]] = {
    # QUEUED -> CLEANED: a cleaned run re-enqueued after its queue was lost (creation.json's
    # local_cleaned names the manifest its NAS folder holds): nothing left to send.
    S.QUEUED: frozenset({S.RUNNING, S.FAILED, S.CLEANED}),
    S.RUNNING: frozenset({S.AWAITING_VERIFY, S.QUEUED, S.FAILED}),
    S.AWAITING_VERIFY: frozenset({S.VERIFIED, S.QUEUED, S.FAILED}),
    S.VERIFIED: frozenset({S.CLEANUP_ELIGIBLE, S.QUEUED, S.FAILED}),
    S.CLEANUP_ELIGIBLE: frozenset({S.CLEANED, S.QUEUED, S.FAILED}),
    S.CLEANED: frozenset(),
    # FAILED -> VERIFIED: local damage restored from the verified NAS copy (restore).
    S.FAILED: frozenset({S.QUEUED, S.VERIFIED}),
}

TERMINAL_STATES = frozenset({S.CLEANED})


class IllegalTransition(RuntimeError):
    """A state change the lifecycle does not allow, or a stale update."""


class DeletionPlanned(IllegalTransition):
    """A move refused because the reaper has a deletion plan for the job (planned, under way or done).

    Raised by ``JobQueue.transition(..., unless_planned=True)``: the plan and
    the move are checked in one statement, so a reaper in another process
    cannot write its plan between the two.
    """


def check_transition(from_state: SyncJobState | str, to_state: SyncJobState | str) -> None:
    """Raise :class:`IllegalTransition` unless ``from_state -> to_state`` is allowed."""
    src, dst = SyncJobState(from_state), SyncJobState(to_state)
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(f"{src.value} -> {dst.value} is not an allowed transition")
