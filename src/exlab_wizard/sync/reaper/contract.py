"""The reaper's contract with its caller: the callables it is given and the outcomes it returns.

Owns :class:`ReaperOutcome` (what a pass did, or a dry run would do, with
one job), :class:`FinalPush` (what the final metadata push proved), the
types of the callables a :class:`~.passes.Reaper` is built with, and
:class:`JobLocks` (the per-job lock it shares with the audit). Values
only; no I/O.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.queue import SyncJobRow
from exlab_wizard.sync.transports.base import RemoteFile

__all__ = ["FinalPush", "JobLocks", "PlanProgress", "PushMetadata", "ReaperOutcome", "RemoteListing", "RemoteStat"]


@dataclass(frozen=True)
class ReaperOutcome:
    """What a pass did (or, for a dry run, would do) with one job.

    ``action``: ``promoted`` (VERIFIED -> CLEANUP_ELIGIBLE), ``deleted``
    (CLEANED), ``waiting`` (a refusal; ``reason`` says which), ``requeued``,
    ``failed``, ``aborted`` (a deletion stopped part way), ``busy`` (another
    reaper holds the lock), ``error``; for a dry run ``would_delete``,
    ``would_requeue``, ``would_fail``, ``in_progress``. ``files``/``bytes``:
    deleted, or that would be freed. ``paths``: the local paths the outcome
    is about. ``code``: what the outcome is, as a stable
    :class:`~exlab_wizard.sync.policy.cleanup.CleanupCode` (which refusal a
    ``waiting`` is, ...); ``reason`` is its sentence.
    """

    job_id: str
    run_path: str
    action: str
    reason: str
    files: int = 0
    bytes: int = 0
    paths: tuple[str, ...] = ()
    code: CleanupCode | None = None


@dataclass(frozen=True)
class FinalPush:
    """What the final metadata push (``retain_cache: false``) proved.

    ``verified``: the NAS holds the run's ``.exlab-wizard/``, so the local
    one may go. ``reason``: how that was proved, or what is missing; it is
    recorded with the job (the wait's reason, or the cleaned event).
    """

    verified: bool
    reason: str = ""


@dataclass(frozen=True)
class PlanProgress:
    """How far a job's deletion plan got, as :func:`~.passes.plan_progress` found it under the job's lock.

    ``planned``: the planned data files (relative paths); ``deleted``: those
    gone from the run (deleted by the plan: each had a verified NAS copy when
    it was planned); ``data_deleted``: the reaper recorded the whole deletion
    done; ``blocked``: files a killed pass set aside that could not get their
    names back (a file has the name again: both kept).
    """

    planned: tuple[str, ...]
    deleted: tuple[str, ...]
    data_deleted: bool
    blocked: tuple[str, ...] = ()


#: Is the job's remote run root reachable now (bool or awaitable; raising counts as unreachable).
RemoteStat = Callable[[SyncJobRow], "bool | Awaitable[bool]"]
#: Every regular file of the job's remote run folder -> its size and mtime, from one fresh listing
#: (the transport's ``remote_stats``).
RemoteListing = Callable[[SyncJobRow], Awaitable[Mapping[str, RemoteFile]]]
#: The final push of ``.exlab-wizard/`` (``retain_cache: false``).
PushMetadata = Callable[[SyncJobRow], "Awaitable[bool | FinalPush]"]


class JobLocks:
    """One :class:`asyncio.Lock` per job id: ``locks(job_id)``, made on first use, forgotten once unused.

    The reaper holds a job's lock from its state check through each batch of
    unlinks (and through the record that the data are deleted); the audit
    holds it from its re-read of the job and its plan through its
    transition. So an audit finding never lands while a batch of that job's
    files is being deleted: the batch ran first (and the audit finds its files
    deleted), or the audit's transition did (and the reaper deletes nothing
    more). Within one process: a reaper in another one (``exlab-sync cleanup``
    beside ``serve``) still meets the transition only at its next batch.
    """

    def __init__(self) -> None:
        # A lock lives while a holder or a waiter refers to it: a job done with leaves nothing behind.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def __call__(self, job_id: str) -> asyncio.Lock:
        lock = self._locks.get(job_id)
        if lock is None:
            lock = self._locks[job_id] = asyncio.Lock()
        return lock
