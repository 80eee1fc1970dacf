"""The transport contract: what every way of reaching the NAS must do.

A transport copies one run folder to its remote folder and can read back what
the remote holds. Algorithms that work over any transport (verification,
cleanup policy) live outside this package and ask a transport's
:class:`TransportCapabilities` instead of testing its class.

Remote paths: a run ``<local_root>/<id>/<rel>`` lands at
``<remote root>/<rel>`` (:func:`remote_relpath`). Manifest keys are paths
relative to the run root with ``/`` separators.
"""

from __future__ import annotations

import abc
import datetime as dt
import inspect
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.fileio import METADATA_DIR, mounted_filesystem
from exlab_wizard.sync.failures import FailureKind as F
from exlab_wizard.sync.policy.bandwidth import follow_time_zone
from exlab_wizard.sync.transports.rclone_conf import remote_digest

__all__ = [
    "METADATA_DIR",
    "NAS_TIME_ENDS_NS",
    "Clock",
    "PREVIOUS_DIR",
    "NasNotAnswering",
    "PreviousStampTaken",
    "ProgressCallback",
    "RemoteFile",
    "RemoteManifest",
    "Transport",
    "TransportCapabilities",
    "TransportError",
    "TransportErrorKind",
    "TransportResult",
    "check_previous_stamp",
    "check_relpath",
    "clamped_times",
    "local_now",
    "location_change",
    "previous_path",
    "previous_stamps",
    "remote_relpath",
    "remote_run_path",
    "report_total",
    "run_location",
]


#: Called with the number of bytes just sent (a delta, never a total).
ProgressCallback = Callable[[int], None]
#: The clock a transport reads to follow the bandwidth schedule: an aware datetime.
Clock = Callable[[], dt.datetime]


def local_now() -> dt.datetime:
    """The default :data:`Clock`: this workstation's local time, timezone-aware (in the zone set now)."""
    follow_time_zone()
    return dt.datetime.now().astimezone()


#: Where the remote run folder keeps the verified files that ``retry --accept-local``
#: replaced: ``<remote run>/.exlab-wizard/previous/<UTC timestamp>/<relative path>``.
PREVIOUS_DIR = f"{METADATA_DIR}/previous"
_STAMP_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")


class TransportErrorKind(StrEnum):
    """Why a transfer or a remote read failed; the retry policy keys on it.

    The transport subset of :class:`~exlab_wizard.sync.failures.FailureKind`
    (same names, same values): a transport cannot raise an engine-only kind.
    """

    NETWORK = F.NETWORK.value  # timeout, refused, reset, NAS unmounted: back off
    AUTH = F.AUTH.value  # key refused, host key, permission denied: FAILED
    HASH_MISMATCH = F.HASH_MISMATCH.value  # the copy differs: transfer once more
    LOCAL_FILE_VANISHED = F.LOCAL_FILE_VANISHED.value
    REMOTE_WRITE_REFUSED = F.REMOTE_WRITE_REFUSED.value  # read-only, disk full
    REMOTE_CONFLICT = F.REMOTE_CONFLICT.value  # the remote folder holds files not in this run
    LOCAL_DAMAGE = F.LOCAL_DAMAGE.value  # local bytes changed, mtime not moved on by an edit
    UNKNOWN = F.UNKNOWN.value  # back off, like network


class TransportError(Exception):
    """A typed failure: ``kind`` decides the retry, ``message`` is for people."""

    def __init__(self, kind: TransportErrorKind | str, message: str):
        self.kind = TransportErrorKind(kind)
        self.message = message
        super().__init__(f"{self.kind.value}: {message}")


class NasNotAnswering(TransportError):
    """The NAS gave no answer within a time limit (a hung FUSE daemon, a hard-mounted share whose server
    is silent, a half-open connection): ``NETWORK``, never an empty answer. What was asked of it may still
    be blocked; its late answer is thrown away."""

    def __init__(self, message: str):
        super().__init__(TransportErrorKind.NETWORK, message)


class PreviousStampTaken(TransportError):
    """A round's new ``previous/<stamp>/`` is already on the NAS: another round's kept copies, never written into.

    Raised before anything is moved or written; the caller keeps under a later
    stamp (a retry, ``UNKNOWN``, does too: the stamp is recorded as used).
    """

    def __init__(self, stamp: str, remote: str):
        self.stamp = stamp
        super().__init__(
            TransportErrorKind.UNKNOWN,
            f"{remote}/{PREVIOUS_DIR}/{stamp}/ already exists on the NAS (an earlier round's kept copies): "
            "this round keeps under a later stamp",
        )


@dataclass(frozen=True)
class TransportResult:
    """What a successful push reports.

    ``local_hashes``: for transports that hash the source in the same read pass
    as the copy, the SHA-256 of exactly the bytes sent, keyed like a manifest
    (data files and ``.exlab-wizard/`` files alike); ``None`` otherwise.
    """

    ok: bool
    error_kind: TransportErrorKind | str | None = None
    message: str = ""
    files_sent: int = 0
    bytes_sent: int = 0
    local_hashes: Mapping[str, str] | None = None


@dataclass(frozen=True)
class RemoteManifest:
    """What the remote holds for one run.

    ``hashes``: relative path -> lowercase SHA-256 hex.
    ``unverifiable``: relative path -> reason for files that exist remotely but
    could not be hashed (:data:`~exlab_wizard.sync.failures.UNVERIFIABLE_OVERSIZE`, not read for its size;
    :data:`~exlab_wizard.sync.failures.UNVERIFIABLE_READ_ERROR` or ``unreadable:
    ...``, a read that failed); such a file is never counted as verified.
    """

    hashes: Mapping[str, str]
    unverifiable: dict[str, str] = field(default_factory=dict)


class RemoteFile(NamedTuple):
    """One regular file of a remote run folder as :meth:`Transport.remote_stats` lists it.

    ``mtime_ns``: its modification time in nanoseconds since the epoch, to the
    precision the remote keeps or the listing shows (whole seconds for an
    rsync or sftp listing): compare it with
    :func:`~exlab_wizard.sync.transports.mount.same_mtime`.
    """

    size: int
    mtime_ns: int


@dataclass(frozen=True)
class TransportCapabilities:
    """What a transport can do, as data the engine reads.

    The client acts on ``hashes_while_sending`` (it then takes the local
    manifest from the push instead of hashing the run beside it), on
    ``reports_total`` (it then does not size the run for progress) and on
    ``metadata_push`` (without it, the metadata push after a cleanup is the
    whole-run push() told which files were ``cleaned``, since the default
    push_metadata() cannot pass them). Nothing else is declared here: every
    transport follows the bandwidth schedule (push() requires it), and whether
    the remote hashes SHA-256 itself is a fact a transport logs, not one the
    engine decides on (see docs/transports.md, "Capabilities").
    """

    #: push() returns ``local_hashes`` (one read pass for copy and hash).
    hashes_while_sending: bool = False
    #: push_metadata() sends ``.exlab-wizard/`` alone (not the default whole-run push()).
    metadata_push: bool = False
    #: push() tells its progress callback the bytes it will send (:func:`report_total`)
    #: once it has listed the run, so the client need not size the run itself.
    reports_total: bool = False


def report_total(progress: ProgressCallback | None, total: int) -> None:
    """Tell ``progress`` the bytes a push will send, when it takes that (a ``set_total`` method).

    A progress callback is any ``callable(delta)``; the client's also has
    ``set_total(bytes)``. Never raises for a callback without it.
    """
    set_total = getattr(progress, "set_total", None)
    if set_total is not None:
        set_total(total)


def remote_relpath(equipment: EquipmentConfig, run_path: Path) -> PurePosixPath:
    """The run's path relative to ``<local_root>/<id>``, as a POSIX path.

    Raises ``ValueError`` when the run is not under that equipment.
    """
    root = Path(os.path.abspath(equipment.equipment_root))
    run = Path(os.path.abspath(run_path))
    rel = run.relative_to(root)
    if not rel.parts:
        raise ValueError(f"{run_path} is the equipment root, not a run")
    return PurePosixPath(*rel.parts)


def remote_run_path(equipment: EquipmentConfig, run_path: Path) -> str:
    """Where the run lives remotely, in the transport's own notation (``ValueError`` as :func:`remote_relpath`)."""
    rel = remote_relpath(equipment, run_path)
    root = equipment.transport.remote_root.rstrip("/")
    sep = "" if root.endswith(":") else "/"
    return f"{root}{sep}{rel}"


def run_location(equipment: EquipmentConfig, run_path: Path) -> str:
    """Where the run's NAS copy is, as one string that also names the server.

    Two locations are equal only when every setting that picks the place is:
    the transport, its ssh target and port (rsync_ssh) or rclone config file
    and the remote's definition in it (rclone: see
    :mod:`~exlab_wizard.sync.transports.rclone_conf`), and the run's remote path. A verification counts for the place
    it read (the job's ``verified_location``); the reaper deletes nothing on
    the strength of passes read somewhere else. ``ValueError`` as
    :func:`remote_relpath`.

    Mount: no setting names the server, so the place is what is mounted at
    ``mount_path`` now (:func:`~exlab_wizard.fileio.mounted_filesystem`: its
    type, source and root), read from the mount table: another NAS mounted
    there (fstab pointed at a new server) is another place. Blocking I/O
    for mount (the mount path's real path is looked up): call it in a thread.
    """
    transport = equipment.transport
    if transport.type == "rsync_ssh":
        server = f"{transport.ssh_target}:{transport.ssh_port}"
    elif transport.type == "rclone":
        # The remote's definition too: a lab moves to a new NAS by editing the remote in rclone.conf.
        server = f"{transport.rclone_config or ''}#{remote_digest(transport.rclone_config, transport.rclone_remote)}"
    else:
        # What is mounted there: a lab moves to a new NAS by pointing fstab at it, the config unchanged.
        server = mounted_filesystem(transport.mount_path)
    return f"{transport.type}|{server}|{remote_run_path(equipment, run_path)}"


def _location_before_servers(equipment: EquipmentConfig, run_path: Path) -> str | None:
    """The run's location as recorded before it named the server (an rclone remote's definition, what is
    mounted at a mount path), by the settings alone; None for rsync_ssh, which always named it."""
    transport = equipment.transport
    if transport.type == "rclone":
        return f"rclone|{transport.rclone_config or ''}|{remote_run_path(equipment, run_path)}"
    if transport.type == "mount":
        return f"mount||{remote_run_path(equipment, run_path)}"
    return None


def location_change(
    equipment: EquipmentConfig,
    run_path: Path,
    *,
    verified_location: str | None,
    remote_path: str,
    here: str | None = None,
) -> tuple[str, str] | None:
    """``(where the copy was verified, where the configuration now names)`` when they differ, else None.

    ``here``: :func:`run_location` as the caller read it already (read here
    otherwise: blocking I/O for mount). A job verified before locations were
    recorded (``verified_location`` None) is judged by its ``remote_path``
    alone; one recorded before locations named the server (an older
    version's rclone or mount location) by the settings and path, as then.
    ``ValueError`` as :func:`remote_relpath`.
    """
    if verified_location is not None:
        if verified_location == _location_before_servers(equipment, run_path):
            return None  # recorded before servers were: judged by the settings and path, as then
        was, now = verified_location, run_location(equipment, run_path) if here is None else here
    else:
        was, now = remote_path, remote_run_path(equipment, run_path)
    return None if was == now else (was, now)


def check_relpath(rel: str) -> str:
    """``rel`` if it is a relative ``/``-separated path inside a run, else ``ValueError``.

    Refuses an empty or absolute path, ``.``/``..``/empty segments and NUL,
    so no remote operation named by a manifest path can leave the run folder.
    """
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\x00" in rel or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"not a relative path inside a run: {rel!r}")
    return rel


def check_previous_stamp(stamp: str) -> str:
    """``stamp`` if it is a UTC timestamp folder name (``20261205T073000Z``), else ``ValueError``."""
    if not _STAMP_RE.fullmatch(stamp):
        raise ValueError(f"not a UTC timestamp folder name (YYYYMMDDTHHMMSSZ): {stamp!r}")
    return stamp


#: The time ranges (whole seconds, UTC) of NAS filesystems narrower than the instruments': 32-bit signed
#: seconds (XFS without ``bigtime``, every RHEL 7/8 server; ext4 with 128-byte inodes), and FAT/exFAT
#: (1980-01-01 00:00:00 to 2107-12-31 23:59:58, exFAT's last second too).
_NAS_TIME_RANGES = ((-(2**31), 2**31 - 1), (315_532_800, 4_354_819_198), (315_532_800, 4_354_819_199))
#: Every time (ns) a clamp of :func:`clamped_times` gives: a listed time not among them is no clamp.
NAS_TIME_ENDS_NS = frozenset(end * 1_000_000_000 for ends in _NAS_TIME_RANGES for end in ends)


def clamped_times(mtime_ns: int) -> set[int]:
    """The times (ns) a NAS of a narrower range stores for a file set to ``mtime_ns`` outside it; empty inside all.

    The kernel clamps such a time to the range's end without an error (an
    instrument PC whose clock reads 2100 gives 2038-01-19 03:14:07 on XFS
    without ``bigtime``, a file stamped 1970 reads 1980-01-01 on FAT). A clamp
    is a function of the time sent, so a NAS copy at it is still the copy sent.
    """
    seconds = mtime_ns // 1_000_000_000
    ends = {low if seconds < low else high for low, high in _NAS_TIME_RANGES if not low <= seconds <= high}
    return {end * 1_000_000_000 for end in ends}


def previous_path(stamp: str, rel: str) -> str:
    """Where the replaced verified file ``rel`` is kept, relative to the remote run folder."""
    return f"{PREVIOUS_DIR}/{check_previous_stamp(stamp)}/{check_relpath(rel)}"


def previous_stamps(paths: Iterable[str]) -> set[str]:
    """The ``previous/<stamp>/`` folders a listing of a remote run folder shows (relative paths, any kind).

    A folder shows through what it holds: a stamp folder with nothing in it
    is left out (it keeps nothing a keep could overwrite).
    """
    prefix = PREVIOUS_DIR + "/"
    found: set[str] = set()
    for rel in paths:
        if rel.startswith(prefix):
            stamp, sep, _rest = rel[len(prefix) :].partition("/")
            if sep and _STAMP_RE.fullmatch(stamp):
                found.add(stamp)
    return found


class Transport(abc.ABC):
    """One way of reaching the NAS, bound to one equipment.

    Every method may raise :class:`TransportError`; none returns a failure
    value. All methods are safe to call again after any failure or crash.
    """

    capabilities: TransportCapabilities = TransportCapabilities()

    def __init__(self, equipment: EquipmentConfig):
        self.equipment = equipment

    def remote_run_path(self, run_path: Path) -> str:
        """Where the run lives remotely, in the transport's own notation."""
        return remote_run_path(self.equipment, run_path)

    @abc.abstractmethod
    async def push(
        self,
        run_path: Path,
        *,
        bwlimit_kibps: int | None,
        rewrite: frozenset[str] = frozenset(),
        progress: ProgressCallback | None = None,
        cleaned: frozenset[str] = frozenset(),
        own_manifests: Collection[str] | None = (),
        previous_stamp: str | None = None,
        fresh: bool = False,
        claim: Callable[[], None] | None = None,
        owner: str | None = None,
    ) -> TransportResult:
        """Copy the whole run folder (data and ``.exlab-wizard/``) to its remote folder.

        Idempotent: files already present and equal are not sent again, except
        the relative paths in ``rewrite``, which are always sent (used after a
        hash mismatch). Creates remote parents. Never follows symlinks (they are
        not copied). No temporary or partial file survives a completed push.
        ``bwlimit_kibps`` is the limit in force at the start; the transport
        follows the equipment's schedule while it runs.

        Raises ``TransportError(REMOTE_CONFLICT)`` without writing anything when
        the remote run folder already holds files that are not in this run.
        ``cleaned`` names data files of this run (relative paths) whose local
        copies the cleanup reaper deleted after they were verified on the
        remote: there they are this run's own files, not a conflict, and they
        are left as they are (the final metadata push after a cleanup).
        A remote run folder holding a verified manifest
        (``.exlab-wizard/checksums.sha256``) that is neither the local run's own
        nor one of ``own_manifests`` (SHA-256 hex digests, or their first 12
        digits, of the manifests this run was verified with) raises
        ``REMOTE_CONFLICT`` too: it is the verified copy of another run (see
        :mod:`~exlab_wizard.sync.transports.conflict`). ``own_manifests=None``
        skips that check (the metadata refresh right after a verification).
        ``previous_stamp`` (a run verified before): every file of the remote
        run folder the push replaces is first moved to
        ``.exlab-wizard/previous/<stamp>/<path>``, decided from what the push
        itself finds, never from a check made earlier; a file that cannot be
        kept so is not written over. A new stamp each push: a listing that
        shows ``previous/<stamp>/`` already (an earlier round's kept copies)
        raises :class:`PreviousStampTaken` before anything is written.
        ``fresh`` (no push of this job has written to the remote yet): a data
        file of the run's names already in the remote run folder is another's,
        and raises ``REMOTE_CONFLICT`` without writing anything, unless the
        folder's verified manifest is this run's own (see
        :func:`~exlab_wizard.sync.transports.conflict.unclaimed_files_error`).
        ``claim`` is called once, after every conflict check passed and before
        the push writes or moves any file of the remote run folder (an event
        for the job's history).
        ``owner`` (the job's id): right after ``claim``, before any file of the
        run, the push writes ``.exlab-wizard/claims/<owner>`` into the remote
        run folder unless it is there (durably where the transport can). A
        remote run folder with no verified manifest of this run that holds
        another job's claim raises ``REMOTE_CONFLICT``, and one holding this
        job's claim is this job's whatever ``fresh`` says (see
        :func:`~exlab_wizard.sync.transports.conflict.ownership_error`).
        """

    async def push_metadata(self, run_path: Path, *, bwlimit_kibps: int | None = None) -> TransportResult:
        """Copy only the run's ``.exlab-wizard/`` folder to ``<remote run folder>/.exlab-wizard/``.

        For refreshing the metadata (``checksums.sha256``, ``creation.json``)
        of a run whose remote folder already holds its verified copy: the data
        files are neither read nor compared nor written, locally or remotely.
        Every regular file of the local ``.exlab-wizard/`` is sent on each
        call, whatever the remote holds (they are few and small, and a
        rewritten ``checksums.sha256`` often keeps its size and may keep its
        mtime to the second); files inside the remote ``.exlab-wizard/`` are
        overwritten (they are this run's own). Nothing outside it is touched,
        except that the remote run folder and its parents are created when
        missing. Durable like
        push() (no temporary or partial file survives, a file is replaced
        whole or not at all where the remote allows it); never follows
        symlinks (they are not copied, and a ``.exlab-wizard`` that is a
        symlink is refused). Idempotent: safe to call again after any failure.
        ``bwlimit_kibps`` as for push(). ``local_hashes`` in the result, when
        given, covers the ``.exlab-wizard/`` files only.

        Raises :class:`TransportError` like push(): NETWORK when the remote is
        unreachable (for a share, when its mount marker is missing, in which
        case nothing is created), LOCAL_FILE_VANISHED when the run folder or
        its ``.exlab-wizard/`` folder is missing, other kinds as push() does.

        This default sends the whole run with push(), which skips the files
        already there; transports that can send the one folder override it
        and set ``capabilities.metadata_push``.
        """
        # After a verification: the remote manifest, if any, is this run's (an older one of its own).
        skip = {"own_manifests": None} if "own_manifests" in inspect.signature(self.push).parameters else {}
        return await self.push(run_path, bwlimit_kibps=bwlimit_kibps, **skip)

    @abc.abstractmethod
    async def remote_manifest(self, run_path: Path) -> RemoteManifest:
        """Hash every regular file of the run's remote folder (read-only).

        Must reflect what the remote stores, never a local cache of it.
        A missing remote folder yields an empty manifest only when the remote
        root itself is reachable; an unreachable root raises NETWORK.
        """

    async def remote_listing(self, run_path: Path) -> dict[str, int]:
        """Every regular file of the run's remote folder -> its size in bytes (read-only).

        Keys are relative to the remote run folder with ``/`` separators, like
        a manifest's (``.exlab-wizard/`` files included); symlinks, folders and
        special files are left out and never followed. One listing of what the
        remote stores now, never a local cache of it: the cleanup reaper takes
        it right before it deletes local data.

        A missing remote run folder, under a remote root that answers, is an
        empty listing. A remote root that does not answer (a share that is not
        mounted, a server that is down, a root folder that is gone) raises
        ``TransportError(NETWORK)``: an unreachable remote is never an empty
        one. Other failures raise their own kind.

        This default raises ``UNKNOWN``: a transport that cannot list its
        remote never lets the reaper delete anything.
        """
        raise TransportError(
            TransportErrorKind.UNKNOWN, f"the {type(self).__name__} transport cannot list the remote run folder"
        )

    async def remote_stats(self, run_path: Path) -> dict[str, RemoteFile]:
        """Every regular file of the run's remote folder -> its size and mtime (read-only).

        Listed like :meth:`remote_listing` (same keys, same errors: an
        unreachable remote raises ``NETWORK``, a missing run folder is empty).
        The client asks it before the first transfer of a run whose queue has
        no verified manifest (docs/recovery.md): every transport keeps a
        file's mtime when it sends it, so a local file with its verified
        copy's size and mtime but other bytes is local damage. This default
        raises ``UNKNOWN``.
        """
        raise TransportError(
            TransportErrorKind.UNKNOWN, f"the {type(self).__name__} transport cannot list the remote files' mtimes"
        )

    async def fetch(self, run_path: Path, paths: Collection[str], into: Path) -> dict[str, Path]:
        """Copy the named files of the run's remote folder into the local folder ``into``.

        Read-only on the remote. ``paths`` are relative to the run root
        (``/``-separated); each lands at ``into/<path>`` (parent folders
        created), holding the bytes the remote stores (for a share, read past
        this machine's page cache). Returns ``{path: local file}`` for the
        files fetched; a path the remote run folder does not hold as a regular
        file is left out (never followed through a symlink). ``into`` is the
        caller's scratch folder: the caller checks the bytes (against the
        manifest) before using them, and removes the folder. Safe to call
        again after any failure.

        Raises ``TransportError(NETWORK)`` when the remote is unreachable (an
        unreachable remote is never one that lacks the files),
        ``ValueError`` for a path that leaves the run, other kinds as
        remote_manifest() does. This default raises ``UNKNOWN``: a transport
        that cannot read a file back.
        """
        raise TransportError(TransportErrorKind.UNKNOWN, f"{type(self).__name__} cannot fetch remote files")

    async def keep_previous(
        self, run_path: Path, paths: Collection[str], stamp: str, *, new: bool = False
    ) -> list[str]:
        """Move the named remote files to ``<remote run>/.exlab-wizard/previous/<stamp>/<path>``.

        Server-side (a rename or the remote's own move; nothing is sent
        again), before a push replaces those files with other bytes, so the
        NAS keeps every verified version it held. Durable before it returns.
        Idempotent: a file already moved (source gone, destination present)
        counts as kept; an existing destination is never overwritten (the
        source then stays where it is). A path the remote does not hold as a
        regular file is skipped. Returns the paths now kept under
        ``previous/<stamp>/``, sorted.

        ``new``: the round's first keep under ``stamp``: a ``previous/<stamp>/``
        already on the NAS is an earlier round's (a clock set back, a job that
        lost its queue) and raises :class:`PreviousStampTaken`, nothing moved.
        Without it the folder may be this round's own, from a call cut off.

        Raises ``TransportError(NETWORK)`` when the remote is unreachable,
        ``REMOTE_WRITE_REFUSED`` when it refuses the move, ``ValueError`` for
        a path that leaves the run or a malformed ``stamp``
        (:func:`check_previous_stamp`). This default raises ``UNKNOWN``.
        """
        raise TransportError(TransportErrorKind.UNKNOWN, f"{type(self).__name__} cannot keep previous versions")

    @abc.abstractmethod
    async def reachable(self, run_path: Path) -> bool:
        """Is the remote root reachable right now (and, for mount, mounted)?

        Never raises for an unreachable remote: returns False.
        """
