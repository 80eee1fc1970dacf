"""The retry decision, row by row, with its boundaries."""

from __future__ import annotations

import datetime as dt

import pytest

from exlab_wizard.sync.policy.retry import FAIL, RETRY, RetryDecision, decide
from exlab_wizard.sync.transports.base import TransportErrorKind as K

NOW = dt.datetime(2024, 5, 6, 12, 0, tzinfo=dt.UTC)
BACKOFF = (30, 120, 480, 1800, 7200)


def at(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


# (kind, attempts, mismatch_count, backoff_s, action, next_attempt_at, error_kind, rewrite)
CASES = [
    # network: backoff_s[attempts-1] while attempts <= len(backoff_s), then fail
    (K.NETWORK, 1, 0, BACKOFF, RETRY, at(30), "network", False),
    (K.NETWORK, 2, 0, BACKOFF, RETRY, at(120), "network", False),
    (K.NETWORK, 3, 0, BACKOFF, RETRY, at(480), "network", False),
    (K.NETWORK, 4, 0, BACKOFF, RETRY, at(1800), "network", False),
    (K.NETWORK, 5, 0, BACKOFF, RETRY, at(7200), "network", False),
    (K.NETWORK, 6, 0, BACKOFF, FAIL, None, "network", False),
    (K.NETWORK, 7, 0, BACKOFF, FAIL, None, "network", False),
    (K.NETWORK, 1, 0, (), FAIL, None, "network", False),
    (K.NETWORK, 1, 0, [0.5], RETRY, at(0.5), "network", False),
    (K.NETWORK, 2, 0, [0.5], FAIL, None, "network", False),
    ("network", 1, 0, BACKOFF, RETRY, at(30), "network", False),
    # unknown: backoff like network
    (K.UNKNOWN, 1, 0, BACKOFF, RETRY, at(30), "unknown", False),
    (K.UNKNOWN, 5, 0, BACKOFF, RETRY, at(7200), "unknown", False),
    (K.UNKNOWN, 6, 0, BACKOFF, FAIL, None, "unknown", False),
    (K.UNKNOWN, 1, 0, (), FAIL, None, "unknown", False),
    ("no_such_kind", 2, 0, BACKOFF, RETRY, at(120), "unknown", False),
    ("no_such_kind", 6, 0, BACKOFF, FAIL, None, "unknown", False),
    # auth (host key included): fail at once, whatever the attempt
    (K.AUTH, 1, 0, BACKOFF, FAIL, None, "auth", False),
    ("auth", 3, 0, BACKOFF, FAIL, None, "auth", False),
    # hash mismatch: once more at once rewriting the files, then fail
    (K.HASH_MISMATCH, 1, 1, BACKOFF, RETRY, NOW, "hash_mismatch", True),
    (K.HASH_MISMATCH, 1, 1, (), RETRY, NOW, "hash_mismatch", True),
    (K.HASH_MISMATCH, 1, 2, BACKOFF, FAIL, None, "hash_mismatch", False),
    (K.HASH_MISMATCH, 4, 3, BACKOFF, FAIL, None, "hash_mismatch", False),
    # the rest: fail at once
    (K.LOCAL_FILE_VANISHED, 1, 0, BACKOFF, FAIL, None, "local_file_vanished", False),
    (K.REMOTE_WRITE_REFUSED, 1, 0, BACKOFF, FAIL, None, "remote_write_refused", False),
    (K.REMOTE_CONFLICT, 1, 0, BACKOFF, FAIL, None, "remote_conflict", False),
    (K.LOCAL_DAMAGE, 1, 0, BACKOFF, FAIL, None, "local_damage", False),
]


@pytest.mark.parametrize(
    ("kind", "attempts", "mismatches", "backoff", "action", "when", "error_kind", "rewrite"),
    CASES,
    ids=[f"{c[0]}-a{c[1]}-m{c[2]}-b{len(c[3])}" for c in CASES],
)
def test_decide_table(kind, attempts, mismatches, backoff, action, when, error_kind, rewrite):
    d = decide(kind, attempts=attempts, mismatch_count=mismatches, backoff_s=backoff, now=NOW, message="boom")
    assert isinstance(d, RetryDecision)
    assert (d.action, d.next_attempt_at, d.error_kind, d.rewrite) == (action, when, error_kind, rewrite)
    assert d.retry is (action == RETRY)
    assert "boom" in d.reason
    assert d.reason.startswith(error_kind)


def test_every_kind_is_covered():
    """A kind added to the enum must get a decision, not a crash."""
    for kind in K:
        d = decide(kind, attempts=1, mismatch_count=1, backoff_s=BACKOFF, now=NOW)
        assert d.error_kind == kind.value
        assert d.reason


def test_network_boundary_is_len_backoff_plus_one_attempts():
    for n in range(0, 7):
        backoff = [10.0] * n
        actions = [
            decide("network", attempts=a, mismatch_count=0, backoff_s=backoff, now=NOW).action for a in range(1, n + 3)
        ]
        assert actions == [RETRY] * n + [FAIL, FAIL]


def test_reason_text_is_human_readable():
    d = decide(K.NETWORK, attempts=2, mismatch_count=0, backoff_s=BACKOFF, now=NOW, message="connection refused")
    assert d.reason == "network: connection refused; attempt 2 of 6, next try in 120 s"
    d = decide(K.NETWORK, attempts=6, mismatch_count=0, backoff_s=BACKOFF, now=NOW, message="connection refused")
    assert d.reason == "network: connection refused; attempt 6 of 6, no retries left"
    d = decide("weird", attempts=1, mismatch_count=0, backoff_s=BACKOFF, now=NOW)
    assert d.reason.startswith("unknown (weird); attempt 1 of 6")
    d = decide(K.AUTH, attempts=1, mismatch_count=0, backoff_s=BACKOFF, now=NOW, message="host key mismatch")
    assert d.reason.startswith("auth: host key mismatch; ")


def test_counters_must_include_this_failure():
    with pytest.raises(ValueError):
        decide(K.NETWORK, attempts=0, mismatch_count=0, backoff_s=BACKOFF, now=NOW)
    with pytest.raises(ValueError):
        decide(K.HASH_MISMATCH, attempts=1, mismatch_count=0, backoff_s=BACKOFF, now=NOW)
