"""The engine's one failure vocabulary, and which errno means which failure.

:class:`FailureKind` names every reason a job can fail or be sent back: the
value is what the queue stores in ``jobs.error_kind``, what the API, the
dashboard and ``exlab-sync status`` show, and what the retry policy keys on.
The transports raise only the transport subset
(:class:`~exlab_wizard.sync.transports.TransportErrorKind`, same values).

The errno tables say what an ``OSError`` on the remote share or on the local
run means; the exit codes and stderr of ssh, rsync and rclone are read by
:mod:`exlab_wizard.sync.transports.classify`. Standard library only (layer 1).
"""

from __future__ import annotations

import errno
from enum import StrEnum

__all__ = [
    "GONE_ERRNOS",
    "REMOTE_NETWORK_ERRNOS",
    "REMOTE_REFUSED_ERRNOS",
    "TRANSPORT_KINDS",
    "UNREADABLE_ERRNOS",
    "UNVERIFIABLE_OVERSIZE",
    "UNVERIFIABLE_READ_ERROR",
    "FailureKind",
    "local_errno_kind",
    "remote_errno_kind",
    "unverifiable_kind",
]


class FailureKind(StrEnum):
    """Why a job failed or was sent back; stored as its value (``jobs.error_kind``)."""

    # -- raised by the transports (TransportErrorKind has exactly these) --
    NETWORK = "network"  # timeout, refused, reset, NAS unmounted: back off
    AUTH = "auth"  # key refused, host key, permission denied: FAILED
    HASH_MISMATCH = "hash_mismatch"  # the copy differs: transfer once more
    LOCAL_FILE_VANISHED = "local_file_vanished"
    REMOTE_WRITE_REFUSED = "remote_write_refused"  # read-only, disk full
    REMOTE_CONFLICT = "remote_conflict"  # the remote folder holds files not in this run
    LOCAL_DAMAGE = "local_damage"  # local bytes changed, mtime not moved on by an edit
    UNKNOWN = "unknown"  # back off, like network
    # -- decided by the engine --
    #: a NAS file too large to stream back for hashing (``verify_max_stream_bytes``)
    VERIFY_SKIPPED_OVERSIZE = "verify_skipped_oversize"
    #: a NAS file that could not be read to hash it (permission, a failed remote read)
    VERIFY_UNREADABLE = "verify_unreadable"
    #: the local run changed since verification (a file edited or added): re-synced
    LOCAL_CHANGED = "local_changed"
    #: a planned file changed while the reaper deleted; the deletion stopped
    LOCAL_CHANGED_DURING_CLEANUP = "local_changed_during_cleanup"
    #: the NAS copy lost planned files after part of the deletion, or the audit found it
    #: different meanwhile; the deletion stopped
    REMOTE_CHANGED_DURING_CLEANUP = "remote_changed_during_cleanup"
    #: the run folder of a verified job gone for a day while its parent folder is there (renamed
    #: or deleted, not a disk away); nothing deleted, ``retry`` re-arms it once the folder is back
    RUN_FOLDER_MISSING = "run_folder_missing"


#: The kinds a transport may raise (the values of ``TransportErrorKind``).
TRANSPORT_KINDS = frozenset(
    {
        FailureKind.NETWORK,
        FailureKind.AUTH,
        FailureKind.HASH_MISMATCH,
        FailureKind.LOCAL_FILE_VANISHED,
        FailureKind.REMOTE_WRITE_REFUSED,
        FailureKind.REMOTE_CONFLICT,
        FailureKind.LOCAL_DAMAGE,
        FailureKind.UNKNOWN,
    }
)

# --------------------------------------------------------------- unverifiable reasons

#: ``RemoteManifest.unverifiable`` reason: larger than ``verify_max_stream_bytes``, not read.
UNVERIFIABLE_OVERSIZE = "verify_skipped_oversize"
#: ``RemoteManifest.unverifiable`` reason: the remote side failed to read the file.
UNVERIFIABLE_READ_ERROR = "remote_read_error"


def unverifiable_kind(reason: str) -> FailureKind:
    """The job's failure kind for a NAS file that could not be hashed for ``reason``.

    Only a file skipped for its size is ``verify_skipped_oversize``; one that
    could not be read (``remote_read_error``, ``unreadable: ...``, anything
    else) is ``verify_unreadable``.
    """
    return FailureKind.VERIFY_SKIPPED_OVERSIZE if reason == UNVERIFIABLE_OVERSIZE else FailureKind.VERIFY_UNREADABLE


# --------------------------------------------------------------- errno

#: The path no longer names the regular file that was listed (EINVAL: not a
#: regular file any more, as ``fileio.open_regular`` reports it).
GONE_ERRNOS = frozenset({errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EINVAL})
#: The file is there but may not be read.
UNREADABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
#: The share refuses the write: full, over quota, read-only, not permitted, or a
#: name it cannot store.
REMOTE_REFUSED_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EINVAL,
        errno.EILSEQ,
        errno.ENAMETOOLONG,
        errno.EMLINK,
    }
)
#: The share is away: gone, disconnected, stale, or the network under it failed.
REMOTE_NETWORK_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTCONN,
        errno.EIO,
        errno.ESTALE,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ENETRESET,
        errno.ENODEV,
        errno.ENXIO,
        errno.EREMOTEIO,
        errno.ENOLINK,
        errno.ECOMM,
        errno.EPIPE,
    }
)


def remote_errno_kind(code: int | None) -> FailureKind:
    """What an ``OSError`` on the mounted share means: refused write, network, or unknown.

    Refusals are looked up first (EINVAL and EACCES are refusals there).
    """
    if code in REMOTE_REFUSED_ERRNOS:
        return FailureKind.REMOTE_WRITE_REFUSED
    if code in REMOTE_NETWORK_ERRNOS:
        return FailureKind.NETWORK
    return FailureKind.UNKNOWN


def local_errno_kind(code: int | None) -> FailureKind:
    """What an ``OSError`` opening a listed local file means: it vanished, or unknown."""
    return FailureKind.LOCAL_FILE_VANISHED if code in GONE_ERRNOS else FailureKind.UNKNOWN
