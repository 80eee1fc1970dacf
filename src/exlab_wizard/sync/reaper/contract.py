"""The reaper's contract with its caller: the callables it is given and the outcomes it returns.

Owns :class:`ReaperOutcome` (what a pass did, or a dry run would do, with
one job), :class:`FinalPush` (what the final metadata push proved) and the
types of the callables a :class:`~.passes.Reaper` is built with. Values
only; no I/O.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.queue import SyncJobRow
from exlab_wizard.sync.transports.base import RemoteFile

__all__ = ["FinalPush", "PushMetadata", "ReaperOutcome", "RemoteListing", "RemoteStat"]


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


#: Is the job's remote run root reachable now (bool or awaitable; raising counts as unreachable).
RemoteStat = Callable[[SyncJobRow], "bool | Awaitable[bool]"]
#: Every regular file of the job's remote run folder -> its size and mtime, from one fresh listing
#: (the transport's ``remote_stats``).
RemoteListing = Callable[[SyncJobRow], Awaitable[Mapping[str, RemoteFile]]]
#: The final push of ``.exlab-wizard/`` (``retain_cache: false``).
PushMetadata = Callable[[SyncJobRow], "Awaitable[bool | FinalPush]"]
