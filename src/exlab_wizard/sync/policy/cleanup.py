"""The cleanup interlocks as pure functions: facts in, a decision with its reason out.

The local data of a verified run may be deleted only when all six hold, in
this order (the cheap ones first, so the reaper never probes the NAS or reads
the disk for a job that is waiting anyway):

1. cleanup is enabled (``nas_cleanup.enabled``);
2. ``verify_passes >= min_verify_passes``;
3. at least ``min_age_hours`` since ``verified_at``, the first verification
   of the current NAS copy (later passes do not restart the clock; a
   ``verified_at`` after ``now``, stamped by a clock since set back, counts
   from the first later pass that is not: :func:`age_start`);
4. the NAS copy holds the ``.exlab-wizard/`` of the current verification
   (no metadata push pending), the remote run root is reachable now, and one
   listing of the remote run folder shows every manifest file with its
   manifest size and the mtime the push gave it;
5. no override the gate relied on for this run was revoked or has expired;
6. every local file still matches the verified manifest.

:func:`decide` evaluates them in order and returns the first refusal, or
``delete``. Interlock 4 has two facts: reachability is checked in its place;
the listing (:class:`RemoteCheck`, built by :func:`check_remote`) is looked at
last, right before deleting, because what an incomplete NAS copy leads to
depends on the local check: a re-transfer only from a local copy that still
holds the verified bytes. The facts that cost I/O (4, 5 and 6) may be left ``None``
("not checked yet"); when every earlier interlock holds and the next one
needs such a fact, the decision is ``check`` with ``needs`` naming the fact,
so a caller gathers facts only as far as they matter::

    facts = CleanupFacts(enabled=True, verify_passes=2, min_verify_passes=2,
                         verified_at=t0, min_age_hours=24, now=t0 + 25 * HOUR)
    decision = decide(facts)                     # check, needs="remote_reachable"
    facts = replace(facts, remote_reachable=True)
    ...

Actions:

- ``delete``: all six hold.
- ``wait``: a condition fails; nothing changes, the job is tried again later.
- ``requeue``: the local run changed since verification (a file added, or
  edited with a new mtime): it goes back through the gate and is re-synced.
  Also when the NAS copy lost a manifest file or holds one with another size
  or another mtime than the push gave it (interlock 4, error kind
  ``hash_mismatch``): those files are sent again.
- ``fail``: the local copy is in a state a person must look at: content that
  changed while size and mtime did not (``local_damage``), or a verified file
  that disappeared (``local_file_vanished``). Nothing is deleted and nothing
  is sent over the good NAS copy.
- ``check``: a fact is needed before deciding (``needs``).

Every decision carries a stable :class:`CleanupCode` (``decision.code``): the
API, the dashboard and the reaper's "same refusal again" test read the code;
the reason is for people. Reasons are short sentences for the audit trail, e.g. ``"cleanup disabled"``,
``"waiting: 1 of 2 verify passes"``, ``"waiting: 20 h of 24 h"``, ``"remote
unreachable"``, ``"override revoked since verification: <id>"``, ``"local
file changed: <path>"``, ``"local file added: <path>"``, ``"local damage:
<path>"``, ``"NAS copy incomplete: missing on the NAS: <path>"``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from exlab_wizard.sync.failures import FailureKind

__all__ = [
    "Action",
    "CleanupCode",
    "CleanupDecision",
    "CleanupFacts",
    "LocalCheck",
    "MAX_PATHS_IN_REASON",
    "METADATA_PENDING_REASON",
    "PASS_TIMES_KEPT",
    "RemoteCheck",
    "add_pass_time",
    "age_start",
    "check_remote",
    "decide",
    "eligible_to_promote",
    "finishing_refusal",
    "format_hours",
    "name_paths",
    "promotion_refusal",
]

Action = Literal["delete", "wait", "requeue", "fail", "check"]

#: How many paths a reason names before it says "(+N more)".
MAX_PATHS_IN_REASON = 10


class CleanupCode(StrEnum):
    """What a cleanup decision or a reaper outcome is, as a stable code (the reason is its sentence).

    Two refusals of one job with the same code are the same refusal: the
    reaper records it once (``events.code``), however the sentence's numbers
    or the error message moved.
    """

    # -- interlocks 1-3 --
    DISABLED = "disabled"
    NOT_VERIFIED = "not_verified"
    WAITING_PASSES = "waiting_passes"
    WAITING_AGE = "waiting_age"
    # -- interlock 4 --
    METADATA_PUSH_PENDING = "metadata_push_pending"
    REMOTE_UNREACHABLE = "remote_unreachable"
    REMOTE_LISTING_FAILED = "remote_listing_failed"
    NAS_COPY_INCOMPLETE = "nas_copy_incomplete"
    NAS_COPY_CHANGED = "nas_copy_changed"  # files at their sizes with another mtime than the push gave them
    NAS_LOCATION_CHANGED = "nas_location_changed"
    NAS_FOLDER_CLAIMED = "nas_folder_claimed"
    NAS_IS_LOCAL = "nas_is_local"  # the NAS run folder is the local run folder (or shares its files)
    # -- interlock 5 --
    OVERRIDE_UNKNOWN = "override_unknown"
    OVERRIDE_REVOKED = "override_revoked"
    # -- interlock 6: the local run could not be checked --
    RUN_MISSING = "run_missing"
    RUN_SYMLINK = "run_symlink"
    RUN_LINKED_AWAY = "run_linked_away"  # a symbolic link on the run's path leads out of its equipment's folder
    RUN_HOLDS_MOUNT = "run_holds_mount"  # a folder mounted inside the run: its files are someone else's
    RUN_UNOPENABLE = "run_unopenable"
    LOCAL_UNREADABLE = "local_unreadable"
    MANIFEST_MISSING = "manifest_missing"
    MANIFEST_UNREADABLE = "manifest_unreadable"
    MANIFEST_CHANGED = "manifest_changed"
    MANIFEST_EMPTY = "manifest_empty"  # no longer given: a run verified with no data files is cleaned
    LOCAL_UNCHECKED = "local_unchecked"  # a refusal the check gave no code for
    # -- interlock 6: what the local check found --
    LOCAL_DAMAGE = "local_damage"
    LOCAL_MISSING = "local_missing"
    LOCAL_CHANGED = "local_changed"
    LOCAL_ADDED = "local_added"
    # -- a fact still to gather --
    CHECK_PENDING = "check_pending"
    # -- all six hold --
    DELETE = "delete"
    # -- the reaper's own outcomes --
    PROMOTED = "promoted"
    CLEANED = "cleaned"
    BUSY = "busy"
    ERROR = "error"
    EQUIPMENT_LOG_UNAVAILABLE = "equipment_log_unavailable"
    EQUIPMENT_UNCONFIGURED = "equipment_unconfigured"  # the job's equipment id is gone from the config
    JOB_CHANGED = "job_changed"
    DELETION_PAUSED = "deletion_paused"  # the run folder is away or a file cannot be unlinked
    FINAL_PUSH_PENDING = "final_push_pending"  # retain_cache false: .exlab-wizard/ not proved on the NAS
    RUN_FOLDER_REPLACED = "run_folder_replaced"  # data deleted, then another run's folder at the run's path
    LOCAL_CHANGED_DURING_CLEANUP = "local_changed_during_cleanup"
    REMOTE_CHANGED_DURING_CLEANUP = "remote_changed_during_cleanup"
    PLAN_DROPPED = "plan_dropped"


@dataclass(frozen=True)
class LocalCheck:
    """What a comparison of the local run with its verified manifest found.

    ``refusal``: the run could not be checked at all (``"run folder is a
    symlink"``, ``"run folder missing"``, ``"manifest changed since
    verification"``, ...): nothing may be deleted and nothing is concluded.
    ``added``: regular files outside ``.exlab-wizard/`` that the manifest
    does not list. ``changed``: listed files edited since verification (new
    mtime and new content), or no longer regular files (a symlink, a folder).
    ``damaged``: listed files whose content differs while their mtime did not
    change. ``missing``: listed files that are gone. Paths are relative to
    the run root, ``/``-separated.
    """

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    damaged: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    refusal: str | None = None
    #: what ``refusal`` is, as a code (``LOCAL_UNCHECKED`` when left None)
    refusal_code: CleanupCode | None = None

    @property
    def clean(self) -> bool:
        """True when the local run matches the manifest exactly."""
        return self.refusal is None and not (self.added or self.changed or self.damaged or self.missing)


@dataclass(frozen=True)
class RemoteCheck:
    """What one listing of the remote run folder showed, against the files to delete.

    ``missing``: files the NAS copy does not hold (as regular files).
    ``wrong_size``: files it holds with a size other than the manifest's.
    ``other_mtime``: files it holds at their size with an mtime that is none
    the push gave them (a restore from an older snapshot, another's bytes).
    ``refusal``: the listing could not be taken (``"remote unreachable:
    ..."``): nothing may be deleted and nothing is concluded. Paths are
    relative to the run root, ``/``-separated.
    """

    missing: tuple[str, ...] = ()
    wrong_size: tuple[str, ...] = ()
    refusal: str | None = None
    #: what ``refusal`` is: ``REMOTE_UNREACHABLE`` or (when left None) ``REMOTE_LISTING_FAILED``
    refusal_code: CleanupCode | None = None
    other_mtime: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """True when the listing holds every file with its size (and, where compared, its mtime)."""
        return self.refusal is None and not (self.missing or self.wrong_size or self.other_mtime)


def check_remote(
    expected: Mapping[str, int],
    listing: Mapping[str, int],
    *,
    sent_times: Mapping[str, Collection[int]] | None = None,
    listed_times: Mapping[str, int] | None = None,
    slack_ns: int = 0,
) -> RemoteCheck:
    """Compare the sizes the NAS must hold (``expected``: path -> manifest size) with a listing.

    Files in the listing that are not expected (metadata, someone else's) do
    not matter here. With ``sent_times`` (path -> the mtimes in ns the push
    may have given the file) and ``listed_times`` (path -> the listing's
    mtime), a file held at its size whose mtime is within ``slack_ns`` of none
    of its own is ``other_mtime``; a path without sent times is not compared.
    Results are sorted by the paths' bytes.
    """
    missing = [path for path in expected if path not in listing]
    wrong = [path for path in expected if path in listing and listing[path] != expected[path]]
    other = []
    if sent_times is not None and listed_times is not None:
        for path in expected:
            sent = sent_times.get(path)
            if path not in listing or path in wrong or not sent or path not in listed_times:
                continue
            if all(abs(listed_times[path] - t) > slack_ns for t in sent):
                other.append(path)
    key = _path_bytes
    return RemoteCheck(
        missing=tuple(sorted(missing, key=key)),
        wrong_size=tuple(sorted(wrong, key=key)),
        other_mtime=tuple(sorted(other, key=key)),
    )


def _path_bytes(path: str) -> bytes:
    return path.encode("utf-8", errors="surrogateescape")


@dataclass(frozen=True)
class CleanupFacts:
    """Everything the interlocks look at, gathered by the caller.

    Times are timezone-aware. ``remote_reachable``, ``overrides_no_longer_active``,
    ``local`` and ``remote`` (the listing of the remote run folder) are
    ``None`` while not checked. ``overrides_no_longer_active``
    holds the ids of the overrides the gate relied on that are not active any
    more (revoked, expired, or gone from creation.json);
    ``override_check_error`` says why they could not be read at all (the
    interlock then fails: an override that cannot be read is not active).
    ``pass_times``: the verify passes of the current NAS copy (for a
    ``verified_at`` after ``now``, see :func:`age_start`).
    ``metadata_push_pending``: the NAS copy has not yet received the
    ``.exlab-wizard/`` of the current verification (its ``checksums.sha256``):
    the local copy is the only one that says which bytes are right, so it
    waits.
    """

    enabled: bool
    verify_passes: int
    min_verify_passes: int
    verified_at: dt.datetime | None
    min_age_hours: float
    now: dt.datetime
    remote_reachable: bool | None = None
    overrides_no_longer_active: tuple[str, ...] | None = None
    override_check_error: str | None = None
    local: LocalCheck | None = None
    remote: RemoteCheck | None = None
    metadata_push_pending: bool = False
    pass_times: tuple[dt.datetime, ...] = ()


#: The refusal while the metadata push of the current verification has not reached the NAS.
METADATA_PENDING_REASON = "waiting: metadata push to the NAS pending (checksums.sha256 not there yet)"


@dataclass(frozen=True)
class CleanupDecision:
    """The outcome of the interlocks.

    ``code`` says what the decision is (stable, for programs); ``reason`` is
    the sentence recorded in the job's events. ``error_kind``
    is set for ``fail`` (``local_damage`` or ``local_file_vanished``) and for
    ``requeue`` (``local_changed``). ``paths`` are the local paths the
    decision is about (all of them, also when the reason names only the
    first few; for an incomplete NAS copy, the files to send again). ``needs``
    names the missing fact for ``check`` (``"remote_reachable"``,
    ``"overrides"``, ``"local"`` or ``"remote_listing"``). ``interlock``
    is the number (1-6) of the interlock that refused, 0 for ``delete``.
    """

    action: Action
    reason: str
    error_kind: FailureKind | None = None
    paths: tuple[str, ...] = ()
    needs: str | None = None
    interlock: int = 0
    code: CleanupCode = CleanupCode.CHECK_PENDING


def format_hours(hours: float) -> str:
    """Hours for a reason: rounded down to 0.1 h and written without a trailing ``.0``."""
    value = math.floor(max(hours, 0.0) * 10 + 1e-9) / 10
    return f"{value:g}"


def name_paths(paths: Sequence[str], limit: int = MAX_PATHS_IN_REASON) -> str:
    """``a, b, c`` for a reason; beyond ``limit`` paths, ``... (+N more)``."""
    shown = ", ".join(paths[:limit])
    if len(paths) > limit:
        shown += f" (+{len(paths) - limit} more)"
    return shown


def _check_aware(name: str, value: dt.datetime | None) -> None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValueError(f"{name} must be timezone-aware, not {value!r}")


def age_start(
    verified_at: dt.datetime | None, pass_times: Sequence[dt.datetime], now: dt.datetime
) -> dt.datetime | None:
    """When interlock 3's age counts from: the earliest verification of the current NAS copy not after ``now``.

    That is ``verified_at`` (its later passes are later), unless the clock
    ran ahead when it was stamped and has been set back since: then it is
    the first pass made after the correction (an audit pass is due at once,
    see ``audit.py``), so the age never counts from a time before a real
    verification. None while there is no such time (no pass since).
    """
    if verified_at is None:
        return None
    return min((t for t in (verified_at, *pass_times) if t <= now), default=None)


#: The verify pass times a job keeps: the earliest of all and the latest ``PASS_TIMES_KEPT - 1``.
PASS_TIMES_KEPT = 16


def add_pass_time(
    pass_times: Sequence[dt.datetime], at: dt.datetime, keep: int = PASS_TIMES_KEPT
) -> tuple[dt.datetime, ...]:
    """``pass_times`` with the pass at ``at`` appended, at most ``keep`` (2 or more) of them.

    Kept: the earliest time of all, then the latest ``keep - 1`` in order. The
    earliest is all :func:`age_start` reads of them (the earliest time not after
    ``now`` is the earliest of all, or there is none), so interlock 3 decides
    as with every pass kept, a clock set back included; how many passes there
    were is ``verify_passes``. A daily audit would otherwise grow the row by a
    time a day for as long as the run stays on disk.
    """
    times = (*pass_times, at)
    if len(times) <= keep:
        return times
    cut = len(times) - keep + 1
    return (min(times[:cut]), *times[cut:])


def _passes_and_age(
    verify_passes: int,
    min_verify_passes: int,
    verified_at: dt.datetime | None,
    min_age_hours: float,
    now: dt.datetime,
    pass_times: Sequence[dt.datetime] = (),
) -> CleanupDecision | None:
    """Interlocks 2 and 3; None when both hold."""
    _check_aware("now", now)
    _check_aware("verified_at", verified_at)
    for at in pass_times:
        _check_aware("pass_times", at)
    if verified_at is None:
        return CleanupDecision("wait", "waiting: not verified", interlock=2, code=CleanupCode.NOT_VERIFIED)
    if verify_passes < min_verify_passes:
        return CleanupDecision(
            "wait",
            f"waiting: {verify_passes} of {min_verify_passes} verify passes",
            interlock=2,
            code=CleanupCode.WAITING_PASSES,
        )
    start = age_start(verified_at, pass_times, now)
    if start is None:
        return CleanupDecision(
            "wait",
            f"waiting: 0 h of {min_age_hours:g} h; verified at {verified_at.isoformat(timespec='seconds')},"
            " after the clock's now (set back since): the age counts from the next verify pass",
            interlock=3,
            code=CleanupCode.WAITING_AGE,
        )
    age_hours = (now - start).total_seconds() / 3600.0
    if age_hours < min_age_hours:
        return CleanupDecision(
            "wait",
            f"waiting: {format_hours(age_hours)} h of {min_age_hours:g} h",
            interlock=3,
            code=CleanupCode.WAITING_AGE,
        )
    return None


def eligible_to_promote(job: Any, config: Any, now: dt.datetime) -> tuple[bool, str]:
    """May a VERIFIED job move to CLEANUP_ELIGIBLE (interlocks 1, 2 and 3)?

    ``job`` needs ``verify_passes`` and ``verified_at``; ``config`` is a
    ``Config`` or its ``CleanupConfig`` (``nas_cleanup``). Returns ``(True,
    "verified K times, first H h ago")`` or ``(False, <waiting reason>)``.
    With cleanup disabled a job stays VERIFIED (``"cleanup disabled"``):
    CLEANUP_ELIGIBLE means "about to be deleted". Interlock 1 is checked
    again right before deleting.
    """
    refusal = promotion_refusal(job, config, now)
    if refusal is not None:
        return False, refusal.reason
    start = age_start(job.verified_at, getattr(job, "pass_times", ()), now) or now
    hours = (now - start).total_seconds() / 3600.0
    return True, f"verified {job.verify_passes} times, first {format_hours(hours)} h ago"


def promotion_refusal(job: Any, config: Any, now: dt.datetime) -> CleanupDecision | None:
    """Why :func:`eligible_to_promote` says no, as a ``wait`` decision with its code; None when it says yes."""
    cleanup = getattr(config, "nas_cleanup", config)
    if not cleanup.enabled:
        return CleanupDecision("wait", "cleanup disabled", interlock=1, code=CleanupCode.DISABLED)
    return _passes_and_age(
        job.verify_passes,
        cleanup.min_verify_passes,
        job.verified_at,
        cleanup.min_age_hours,
        now,
        getattr(job, "pass_times", ()),
    )


def finishing_refusal(config: Any) -> CleanupDecision | None:
    """Why a plan whose data are deleted (``data_deleted_at`` set) may not finish now; None when it may.

    Interlock 1 alone. Nothing local is left for interlocks 2, 3, 5 and 6 to
    protect, and the audit counts no passes for such a job: a pause on one of
    them (``min_verify_passes`` raised, an override expired, ``creation.json``
    removed by a killed pass) could never end. What is left, the final
    metadata push, is gated by its own proof, read back from the NAS (an
    unreachable NAS fails it: a wait, never a skip). ``config``: a ``Config``
    or its ``nas_cleanup``.
    """
    cleanup = getattr(config, "nas_cleanup", config)
    if not cleanup.enabled:
        return CleanupDecision("wait", "cleanup disabled", interlock=1, code=CleanupCode.DISABLED)
    return None


def _local_decision(local: LocalCheck) -> CleanupDecision | None:
    """Interlock 6; None when the local run matches the manifest."""
    if local.refusal is not None:
        return CleanupDecision(
            "wait", local.refusal, interlock=6, code=local.refusal_code or CleanupCode.LOCAL_UNCHECKED
        )
    if local.damaged:
        # Worst first: damaged bytes must never reach the NAS, so no re-sync.
        return CleanupDecision(
            "fail",
            f"local damage: {name_paths(local.damaged)}",
            FailureKind.LOCAL_DAMAGE,
            tuple(local.damaged),
            interlock=6,
            code=CleanupCode.LOCAL_DAMAGE,
        )
    if local.missing:
        return CleanupDecision(
            "fail",
            f"local file missing: {name_paths(local.missing)}",
            FailureKind.LOCAL_FILE_VANISHED,
            tuple(local.missing),
            interlock=6,
            code=CleanupCode.LOCAL_MISSING,
        )
    if local.changed:
        return CleanupDecision(
            "requeue",
            f"local file changed: {name_paths(local.changed)}",
            FailureKind.LOCAL_CHANGED,
            tuple(local.changed) + tuple(local.added),
            interlock=6,
            code=CleanupCode.LOCAL_CHANGED,
        )
    if local.added:
        return CleanupDecision(
            "requeue",
            f"local file added: {name_paths(local.added)}",
            FailureKind.LOCAL_CHANGED,
            tuple(local.added),
            interlock=6,
            code=CleanupCode.LOCAL_ADDED,
        )
    return None


def decide(facts: CleanupFacts) -> CleanupDecision:
    """Evaluate the six interlocks in order; the first that fails decides.

    Raises ``ValueError`` for a naive datetime. See the module docstring for
    the actions and reasons.
    """
    C = CleanupCode
    if not facts.enabled:
        return CleanupDecision("wait", "cleanup disabled", interlock=1, code=C.DISABLED)
    refusal = _passes_and_age(
        facts.verify_passes,
        facts.min_verify_passes,
        facts.verified_at,
        facts.min_age_hours,
        facts.now,
        facts.pass_times,
    )
    if refusal is not None:
        return refusal
    if facts.metadata_push_pending:
        return CleanupDecision("wait", METADATA_PENDING_REASON, interlock=4, code=C.METADATA_PUSH_PENDING)
    if facts.remote_reachable is None:
        return CleanupDecision("check", "remote not checked yet", needs="remote_reachable", interlock=4)
    if not facts.remote_reachable:
        return CleanupDecision("wait", "remote unreachable", interlock=4, code=C.REMOTE_UNREACHABLE)
    if facts.override_check_error is not None:
        return CleanupDecision(
            "wait", f"override status unknown: {facts.override_check_error}", interlock=5, code=C.OVERRIDE_UNKNOWN
        )
    if facts.overrides_no_longer_active is None:
        return CleanupDecision("check", "overrides not checked yet", needs="overrides", interlock=5)
    if facts.overrides_no_longer_active:
        return CleanupDecision(
            "wait",
            f"override revoked since verification: {name_paths(list(facts.overrides_no_longer_active))}",
            interlock=5,
            code=C.OVERRIDE_REVOKED,
        )
    if facts.local is None:
        return CleanupDecision("check", "local run not checked yet", needs="local", interlock=6)
    refusal = _local_decision(facts.local)
    if refusal is not None:
        return refusal
    if facts.remote is None:
        return CleanupDecision("check", "remote run not listed yet", needs="remote_listing", interlock=4)
    refusal = _remote_decision(facts.remote)
    if refusal is not None:
        return refusal
    return CleanupDecision("delete", "all six interlocks hold", code=C.DELETE)


def _remote_decision(remote: RemoteCheck) -> CleanupDecision | None:
    """Interlock 4's listing; None when the NAS copy holds every file with its size and mtime."""
    if remote.refusal is not None:
        return CleanupDecision(
            "wait", remote.refusal, interlock=4, code=remote.refusal_code or CleanupCode.REMOTE_LISTING_FAILED
        )
    if remote.complete:
        return None
    parts = []
    if remote.missing:
        parts.append(f"missing on the NAS: {name_paths(remote.missing)}")
    if remote.wrong_size:
        parts.append(f"other size on the NAS: {name_paths(remote.wrong_size)}")
    if remote.other_mtime:
        parts.append(f"other mtime on the NAS than the push gave: {name_paths(remote.other_mtime)}")
    incomplete = bool(remote.missing or remote.wrong_size)
    return CleanupDecision(
        "requeue",
        ("NAS copy incomplete: " if incomplete else "NAS copy changed since it was sent: ") + "; ".join(parts),
        FailureKind.HASH_MISMATCH,
        tuple(remote.missing) + tuple(remote.wrong_size) + tuple(remote.other_mtime),
        interlock=4,
        code=CleanupCode.NAS_COPY_INCOMPLETE if incomplete else CleanupCode.NAS_COPY_CHANGED,
    )
