"""One failure vocabulary (sync.failures): the transport kinds are a subset, errno tables in one place."""

from __future__ import annotations

import errno

import pytest

from exlab_wizard.sync.failures import (
    TRANSPORT_KINDS,
    UNVERIFIABLE_OVERSIZE,
    UNVERIFIABLE_READ_ERROR,
    FailureKind,
    local_errno_kind,
    remote_errno_kind,
    unverifiable_kind,
)
from exlab_wizard.sync.policy import retry
from exlab_wizard.sync.transports import TransportError, TransportErrorKind


def test_transport_kinds_are_exactly_the_transport_subset_of_failure_kinds() -> None:
    assert {k.value for k in TransportErrorKind} == {k.value for k in TRANSPORT_KINDS}
    assert {k.name for k in TransportErrorKind} == {k.name for k in TRANSPORT_KINDS}
    for kind in TransportErrorKind:
        assert FailureKind(kind.value) == kind


def test_a_transport_error_cannot_carry_an_engine_only_kind() -> None:
    assert TransportError(FailureKind.NETWORK, "x").kind is TransportErrorKind.NETWORK
    with pytest.raises(ValueError):
        TransportError(FailureKind.VERIFY_SKIPPED_OVERSIZE, "x")


def test_the_stored_values_did_not_change() -> None:
    # error_kind strings already in SQLite keep their meaning: no data migration.
    assert {k.value for k in FailureKind} >= {
        "network",
        "auth",
        "hash_mismatch",
        "local_file_vanished",
        "remote_write_refused",
        "remote_conflict",
        "local_damage",
        "unknown",
        "verify_skipped_oversize",
        "local_changed",
        "local_changed_during_cleanup",
        "remote_changed_during_cleanup",
    }


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        (UNVERIFIABLE_OVERSIZE, FailureKind.VERIFY_SKIPPED_OVERSIZE),
        (UNVERIFIABLE_READ_ERROR, FailureKind.VERIFY_UNREADABLE),
        ("unreadable: Permission denied", FailureKind.VERIFY_UNREADABLE),
    ],
)
def test_only_a_file_skipped_for_its_size_is_oversize(reason: str, kind: FailureKind) -> None:
    assert unverifiable_kind(reason) is kind


@pytest.mark.parametrize(
    ("kind", "action"),
    [(FailureKind.VERIFY_SKIPPED_OVERSIZE, "retry"), (FailureKind.LOCAL_CHANGED, "retry"), ("bogus", "retry")],
)
def test_engine_only_kinds_are_unknown_to_the_retry_policy_as_before(kind: str, action: str) -> None:
    import datetime as dt

    now = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    decision = retry.decide(kind, attempts=1, mismatch_count=0, backoff_s=[30], now=now)
    assert decision.action == action and decision.error_kind == "unknown"


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENOSPC, FailureKind.REMOTE_WRITE_REFUSED),
        (errno.EROFS, FailureKind.REMOTE_WRITE_REFUSED),
        (errno.EACCES, FailureKind.REMOTE_WRITE_REFUSED),
        (errno.EINVAL, FailureKind.REMOTE_WRITE_REFUSED),  # a name the share refuses
        (errno.ENOENT, FailureKind.NETWORK),
        (errno.ESTALE, FailureKind.NETWORK),
        (errno.EIO, FailureKind.NETWORK),
        (errno.ENOTCONN, FailureKind.NETWORK),
        (errno.EBUSY, FailureKind.UNKNOWN),
        (None, FailureKind.UNKNOWN),
    ],
)
def test_remote_errno(code: int | None, kind: FailureKind) -> None:
    assert remote_errno_kind(code) is kind


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENOENT, FailureKind.LOCAL_FILE_VANISHED),
        (errno.ELOOP, FailureKind.LOCAL_FILE_VANISHED),  # replaced by a symlink
        (errno.ENOTDIR, FailureKind.LOCAL_FILE_VANISHED),
        (errno.EINVAL, FailureKind.LOCAL_FILE_VANISHED),  # no longer a regular file
        (errno.EACCES, FailureKind.UNKNOWN),
        (errno.EIO, FailureKind.UNKNOWN),
    ],
)
def test_local_errno(code: int, kind: FailureKind) -> None:
    assert local_errno_kind(code) is kind


@pytest.mark.parametrize("kind", list(FailureKind))
def test_the_dashboard_has_plain_words_for_every_failure_kind(kind: FailureKind) -> None:
    from exlab_wizard.service.dashboard import failure_sentence

    assert failure_sentence(kind.value) != f"The job failed ({kind.value})."
