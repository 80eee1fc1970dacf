"""The cleanup interlocks as pure functions: one table row per condition and outcome."""

from __future__ import annotations

import dataclasses
import datetime as dt
from types import SimpleNamespace

import pytest

from exlab_wizard.config.models import CleanupConfig, Config
from exlab_wizard.sync.policy.cleanup import (
    CleanupCode,
    CleanupFacts,
    LocalCheck,
    RemoteCheck,
    check_remote,
    decide,
    eligible_to_promote,
    format_hours,
    name_paths,
    promotion_refusal,
)

NOW = dt.datetime(2024, 5, 6, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def facts(**changes) -> CleanupFacts:
    """All six interlocks hold; ``changes`` breaks the ones a row is about."""
    base = CleanupFacts(
        enabled=True,
        verify_passes=2,
        min_verify_passes=2,
        verified_at=NOW - 25 * HOUR,
        min_age_hours=24,
        now=NOW,
        remote_reachable=True,
        overrides_no_longer_active=(),
        local=LocalCheck(),
        remote=RemoteCheck(),
    )
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("changes", "action", "reason", "error_kind", "interlock"),
    [
        ({}, "delete", "all six interlocks hold", None, 0),
        ({"enabled": False}, "wait", "cleanup disabled", None, 1),
        ({"verify_passes": 1}, "wait", "waiting: 1 of 2 verify passes", None, 2),
        ({"verify_passes": 0}, "wait", "waiting: 0 of 2 verify passes", None, 2),
        ({"verified_at": None, "verify_passes": 0}, "wait", "waiting: not verified", None, 2),
        ({"verified_at": NOW - 20 * HOUR}, "wait", "waiting: 20 h of 24 h", None, 3),
        ({"verified_at": NOW - 23.99 * HOUR}, "wait", "waiting: 23.9 h of 24 h", None, 3),
        (  # clock moved back: the age counts from the next pass
            {"verified_at": NOW + HOUR},
            "wait",
            "waiting: 0 h of 24 h; verified at 2024-05-06T13:00:00+00:00, after the clock's now (set back since):"
            " the age counts from the next verify pass",
            None,
            3,
        ),
        ({"verified_at": NOW - 24 * HOUR}, "delete", "all six interlocks hold", None, 0),
        ({"min_age_hours": 0.5, "verified_at": NOW - 0.25 * HOUR}, "wait", "waiting: 0.2 h of 0.5 h", None, 3),
        ({"remote_reachable": False}, "wait", "remote unreachable", None, 4),
        (
            {"metadata_push_pending": True},
            "wait",
            "waiting: metadata push to the NAS pending (checksums.sha256 not there yet)",
            None,
            4,
        ),
        (
            {"metadata_push_pending": True, "remote_reachable": None, "local": None},
            "wait",
            "waiting: metadata push to the NAS pending (checksums.sha256 not there yet)",
            None,
            4,
        ),
        ({"overrides_no_longer_active": ("ov-1",)}, "wait", "override revoked since verification: ov-1", None, 5),
        (
            {"override_check_error": "creation.json unreadable: bad JSON"},
            "wait",
            "override status unknown: creation.json unreadable: bad JSON",
            None,
            5,
        ),
        ({"local": LocalCheck(changed=("a.tif",))}, "requeue", "local file changed: a.tif", "local_changed", 6),
        ({"local": LocalCheck(added=("new.csv",))}, "requeue", "local file added: new.csv", "local_changed", 6),
        ({"local": LocalCheck(damaged=("a.tif",))}, "fail", "local damage: a.tif", "local_damage", 6),
        ({"local": LocalCheck(missing=("a.tif",))}, "fail", "local file missing: a.tif", "local_file_vanished", 6),
        ({"local": LocalCheck(refusal="run folder is a symlink")}, "wait", "run folder is a symlink", None, 6),
        # Worst first: damage beats a change; a change beats an addition.
        (
            {"local": LocalCheck(damaged=("d",), changed=("c",), added=("a",))},
            "fail",
            "local damage: d",
            "local_damage",
            6,
        ),
        ({"local": LocalCheck(changed=("c",), added=("a",))}, "requeue", "local file changed: c", "local_changed", 6),
        # The first failing interlock decides, whatever fails after it.
        (
            {"enabled": False, "remote_reachable": False, "local": LocalCheck(damaged=("d",))},
            "wait",
            "cleanup disabled",
            None,
            1,
        ),
        ({"remote_reachable": False, "local": LocalCheck(damaged=("d",))}, "wait", "remote unreachable", None, 4),
        # Interlock 4's listing: the NAS copy must hold every file with its size.
        (
            {"remote": RemoteCheck(missing=("a.tif",))},
            "requeue",
            "NAS copy incomplete: missing on the NAS: a.tif",
            "hash_mismatch",
            4,
        ),
        (
            {"remote": RemoteCheck(wrong_size=("b.raw",))},
            "requeue",
            "NAS copy incomplete: other size on the NAS: b.raw",
            "hash_mismatch",
            4,
        ),
        (
            {"remote": RemoteCheck(missing=("a",), wrong_size=("b",))},
            "requeue",
            "NAS copy incomplete: missing on the NAS: a; other size on the NAS: b",
            "hash_mismatch",
            4,
        ),
        (
            {"remote": RemoteCheck(refusal="remote unreachable: not mounted")},
            "wait",
            "remote unreachable: not mounted",
            None,
            4,
        ),
        # A local copy that cannot be sent again decides before an incomplete NAS copy.
        (
            {"remote": RemoteCheck(missing=("a",)), "local": LocalCheck(damaged=("a",))},
            "fail",
            "local damage: a",
            "local_damage",
            6,
        ),
        (
            {"remote": RemoteCheck(missing=("a",)), "local": LocalCheck(missing=("a",))},
            "fail",
            "local file missing: a",
            "local_file_vanished",
            6,
        ),
        (
            {"remote": RemoteCheck(missing=("a",)), "local": LocalCheck(refusal="run folder missing")},
            "wait",
            "run folder missing",
            None,
            6,
        ),
        ({"remote": RemoteCheck(missing=("a",)), "enabled": False}, "wait", "cleanup disabled", None, 1),
    ],
)
def test_decide_table(changes, action, reason, error_kind, interlock):
    decision = decide(facts(**changes))
    assert (decision.action, decision.reason, decision.error_kind, decision.interlock) == (
        action,
        reason,
        error_kind,
        interlock,
    )


@pytest.mark.parametrize(
    ("changes", "needs"),
    [
        ({"remote_reachable": None, "overrides_no_longer_active": None, "local": None}, "remote_reachable"),
        ({"overrides_no_longer_active": None, "local": None}, "overrides"),
        ({"local": None}, "local"),
        ({"local": None, "remote": None}, "local"),
        ({"remote": None}, "remote_listing"),
    ],
)
def test_unknown_facts_are_asked_for_in_order(changes, needs):
    decision = decide(facts(**changes))
    assert decision.action == "check" and decision.needs == needs


def test_costly_facts_are_not_asked_for_while_a_cheap_interlock_refuses():
    decision = decide(facts(enabled=False, remote_reachable=None, overrides_no_longer_active=None, local=None))
    assert decision.action == "wait" and decision.reason == "cleanup disabled"
    decision = decide(facts(verify_passes=1, remote_reachable=None, local=None))
    assert decision.reason == "waiting: 1 of 2 verify passes"


def test_decision_paths_list_every_path_while_the_reason_names_ten():
    paths = tuple(f"f{i:02d}.tif" for i in range(13))
    decision = decide(facts(local=LocalCheck(damaged=paths)))
    assert decision.paths == paths
    assert decision.reason == "local damage: " + ", ".join(paths[:10]) + " (+3 more)"


def test_check_remote_compares_sizes_of_the_expected_files_only():
    expected = {"a.tif": 10, "sub/b.raw": 0, "new\nline": 3, "gone.txt": 5}
    listing = {"a.tif": 10, "sub/b.raw": 1, "new\nline": 3, ".exlab-wizard/creation.json": 9, "theirs.txt": 1}
    check = check_remote(expected, listing)
    assert (check.missing, check.wrong_size) == (("gone.txt",), ("sub/b.raw",))
    assert check.refusal is None and not check.complete
    assert check_remote(expected, {**listing, "sub/b.raw": 0, "gone.txt": 5}).complete
    assert check_remote(expected, {}).missing == ("a.tif", "gone.txt", "new\nline", "sub/b.raw")  # by bytes
    assert not RemoteCheck(refusal="remote unreachable").complete


def test_check_remote_compares_mtimes_within_the_slack_when_given():
    expected = {"a.tif": 10, "b.raw": 5, "c.txt": 3, "d.bin": 1}
    listing = {"a.tif": 10, "b.raw": 5, "c.txt": 4, "d.bin": 1}
    sent = {"a.tif": {100}, "b.raw": {100, 200}, "c.txt": {100}}  # d.bin: no time to compare
    listed = {"a.tif": 103, "b.raw": 199, "c.txt": 500, "d.bin": 9}
    check = check_remote(expected, listing, sent_times=sent, listed_times=listed, slack_ns=2)
    assert (check.other_mtime, check.wrong_size) == (("a.tif",), ("c.txt",))  # a size mismatch is named once
    assert check_remote(expected, listing).other_mtime == ()  # sizes alone without times
    decision = decide(facts(remote=RemoteCheck(other_mtime=("a.tif",))))
    assert (decision.action, decision.paths, decision.interlock) == ("requeue", ("a.tif",), 4)
    assert decision.reason == "NAS copy changed since it was sent: other mtime on the NAS than the push gave: a.tif"


def test_naive_times_are_refused():
    with pytest.raises(ValueError):
        decide(facts(now=NOW.replace(tzinfo=None)))


def test_local_check_clean():
    assert LocalCheck().clean
    assert not LocalCheck(added=("x",)).clean
    assert not LocalCheck(refusal="run folder missing").clean


@pytest.mark.parametrize(
    ("passes", "hours_ago", "ok", "reason"),
    [
        (2, 25, True, "verified 2 times, first 25 h ago"),
        (5, 25, True, "verified 5 times, first 25 h ago"),
        (1, 25, False, "waiting: 1 of 2 verify passes"),
        (2, 20, False, "waiting: 20 h of 24 h"),
    ],
)
def test_eligible_to_promote(passes, hours_ago, ok, reason):
    job = SimpleNamespace(verify_passes=passes, verified_at=NOW - hours_ago * HOUR)
    config = Config(nas_cleanup=CleanupConfig(enabled=True, min_verify_passes=2, min_age_hours=24))
    assert eligible_to_promote(job, config, NOW) == (ok, reason)
    assert eligible_to_promote(job, config.nas_cleanup, NOW) == (ok, reason)
    # With cleanup off a job stays VERIFIED, whatever its passes and age.
    off = config.nas_cleanup.model_copy(update={"enabled": False})
    assert eligible_to_promote(job, off, NOW) == (False, "cleanup disabled")


def test_clock_counts_from_first_verification():
    """Audit passes every 6 h do not restart the clock: only ``verified_at`` counts."""
    job = SimpleNamespace(
        verify_passes=5, verified_at=NOW - 25 * HOUR, pass_times=tuple(NOW - h * HOUR for h in (25, 19, 13, 7, 1))
    )
    assert eligible_to_promote(job, CleanupConfig(enabled=True, min_age_hours=24), NOW)[0]


C = CleanupCode


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({}, C.DELETE),
        ({"enabled": False}, C.DISABLED),
        ({"verify_passes": 1}, C.WAITING_PASSES),
        ({"verified_at": None, "verify_passes": 0}, C.NOT_VERIFIED),
        ({"verified_at": NOW - 20 * HOUR}, C.WAITING_AGE),
        ({"verified_at": NOW - 21.5 * HOUR}, C.WAITING_AGE),  # the hours move, the code does not
        ({"metadata_push_pending": True}, C.METADATA_PUSH_PENDING),
        ({"remote_reachable": False}, C.REMOTE_UNREACHABLE),
        ({"override_check_error": "bad JSON"}, C.OVERRIDE_UNKNOWN),
        ({"overrides_no_longer_active": ("ov-1",)}, C.OVERRIDE_REVOKED),
        ({"local": LocalCheck(refusal="run folder missing", refusal_code=C.RUN_MISSING)}, C.RUN_MISSING),
        ({"local": LocalCheck(refusal="something else")}, C.LOCAL_UNCHECKED),
        ({"local": LocalCheck(damaged=("a",), changed=("b",))}, C.LOCAL_DAMAGE),
        ({"local": LocalCheck(missing=("a",))}, C.LOCAL_MISSING),
        ({"local": LocalCheck(changed=("a",), added=("b",))}, C.LOCAL_CHANGED),
        ({"local": LocalCheck(added=("b",))}, C.LOCAL_ADDED),
        (
            {"remote": RemoteCheck(refusal="remote unreachable: x", refusal_code=C.REMOTE_UNREACHABLE)},
            C.REMOTE_UNREACHABLE,
        ),
        ({"remote": RemoteCheck(refusal="remote listing failed: auth: x")}, C.REMOTE_LISTING_FAILED),
        ({"remote": RemoteCheck(missing=("a",))}, C.NAS_COPY_INCOMPLETE),
        ({"remote": RemoteCheck(other_mtime=("a",))}, C.NAS_COPY_CHANGED),
        ({"remote": RemoteCheck(wrong_size=("b",), other_mtime=("a",))}, C.NAS_COPY_INCOMPLETE),
        ({"remote_reachable": None}, C.CHECK_PENDING),
    ],
)
def test_every_decision_carries_a_stable_code(changes, code):
    """The reaper recognises a repeated refusal by this code, never by the reason's text."""
    assert decide(facts(**changes)).code is code


def test_promotion_refusal_is_the_wait_with_its_code():
    job = SimpleNamespace(verify_passes=1, verified_at=NOW - 25 * HOUR)
    refusal = promotion_refusal(job, CleanupConfig(enabled=True, min_verify_passes=2), NOW)
    assert refusal is not None and refusal.code is C.WAITING_PASSES
    assert refusal.reason == "waiting: 1 of 2 verify passes"
    assert promotion_refusal(job, CleanupConfig(enabled=False), NOW).code is C.DISABLED
    assert (
        promotion_refusal(
            SimpleNamespace(verify_passes=2, verified_at=NOW - 25 * HOUR),
            CleanupConfig(enabled=True, min_verify_passes=2, min_age_hours=24),
            NOW,
        )
        is None
    )


def test_format_helpers():
    assert [format_hours(h) for h in (0, 19.99, 20, 20.56, -3)] == ["0", "19.9", "20", "20.5", "0"]
    assert name_paths(["a", "b"]) == "a, b"
    assert name_paths(["a", "b", "c"], limit=2) == "a, b (+1 more)"
