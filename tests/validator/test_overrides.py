"""Which overrides are active: tables for the rules, a property test against a reference model."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exlab_wizard.validator.overrides import (
    active_override_for,
    active_overrides,
    is_tombstone,
    parse_utc_timestamp,
    revoked_or_expired,
)

NOW = dt.datetime(2024, 6, 1, 12, 0, 0, tzinfo=dt.UTC)


def override(oid: str, rule: str = "reserved_filesystem_name", **extra: Any) -> dict[str, Any]:
    entry = {
        "id": oid,
        "problem_class": rule,
        "operator": "asmith",
        "recorded_at": "2024-05-01T00:00:00Z",
        "expires_at": None,
        "reason": "r",
        "revoked": False,
    }
    entry.update(extra)
    return entry


def tombstone(tid: str, revokes: str) -> dict[str, Any]:
    return {
        "id": tid,
        "revokes": revokes,
        "operator": "b",
        "recorded_at": "2024-05-02T00:00:00Z",
        "reason": "r",
        "revoked": True,
    }


def test_is_tombstone() -> None:
    assert is_tombstone(tombstone("t", "a"))
    assert not is_tombstone(override("a"))
    assert is_tombstone({"id": "x", "revoked": True})  # says it is revoked: never active
    assert is_tombstone({"id": "x", "revokes": "y"})


@pytest.mark.parametrize(
    ("entry", "active"),
    [
        (override("a"), True),
        ({k: v for k, v in override("a").items() if k != "expires_at"}, True),  # absent
        (override("a", expires_at="2024-06-01T12:00:01Z"), True),
        (override("a", expires_at="2024-06-01T12:00:00Z"), False),  # expiry at now: expired
        (override("a", expires_at="2024-06-01T11:59:59Z"), False),
        (override("a", expires_at="2024-06-01T14:30:00+02:00"), True),  # 12:30 UTC
        (override("a", expires_at="2024-06-01T13:30:00+02:00"), False),  # 11:30 UTC
        (override("a", expires_at="2024-06-01T12:00:00.000001+00:00"), True),
        (override("a", expires_at="2024-06-01T12:30:00"), True),  # no offset: read as UTC
        (override("a", expires_at="2024-06-02"), True),
        (override("a", expires_at="next tuesday"), False),  # unreadable: fail safe
        (override("a", expires_at=""), False),
        (override("a", expires_at=1717243200), False),
        (override("a", expires_at="2024-13-01T00:00:00Z"), False),
        (override("a", revoked=True), False),
        ({**override("a"), "id": None}, False),  # cannot be revoked: never active
        ({k: v for k, v in override("a").items() if k != "id"}, False),
        ({**override("a"), "problem_class": None}, False),
        ("not an object", False),
        (None, False),
    ],
)
def test_single_entry(entry: Any, active: bool) -> None:
    assert (active_overrides([entry], NOW) == [entry]) is active


def test_tombstones_revoke_by_id_wherever_they_stand() -> None:
    a, b, c = override("a", "r1"), override("b", "r2"), override("c", "r1")
    entries = [tombstone("t0", "c"), a, b, c, tombstone("t1", "a"), tombstone("t2", "unknown-id")]
    assert active_overrides(entries, NOW) == [b]
    assert active_override_for("r1", entries, NOW) is None
    assert active_override_for("r2", entries, NOW) == b


def test_tombstone_of_an_unknown_id_is_harmless() -> None:
    entries = [override("a"), tombstone("t", "zzz"), tombstone("t2", None), {"revokes": 5, "revoked": True}]
    assert active_overrides(entries, NOW) == [entries[0]]


def test_tombstone_does_not_revoke_itself_or_other_tombstones() -> None:
    entries = [override("a"), tombstone("t1", "a"), tombstone("t2", "t1")]
    # revoking a tombstone does not bring the override back: the list is append-only history
    assert active_overrides(entries, NOW) == []


def test_active_override_for_returns_the_first_match_in_order() -> None:
    first = override("a", "r", expires_at="2020-01-01T00:00:00Z")  # expired
    second = override("b", "r")
    third = override("c", "r")
    assert active_override_for("r", [first, second, third], NOW) is second
    assert active_override_for("other", [first, second, third], NOW) is None
    assert active_override_for("r", [], NOW) is None


def test_revoked_or_expired() -> None:
    entries = [
        override("live"),
        override("gone", expires_at="2024-01-01T00:00:00Z"),
        override("revoked"),
        tombstone("t", "revoked"),
    ]
    ids = ["live", "gone", "revoked", "missing", "gone", "t"]
    assert revoked_or_expired(ids, entries, NOW) == ["gone", "revoked", "missing", "t"]
    assert revoked_or_expired(["live"], entries, NOW) == []
    assert revoked_or_expired([], entries, NOW) == []
    later = dt.datetime(2099, 1, 1, tzinfo=dt.UTC)
    assert revoked_or_expired(["x"], [override("x", expires_at="2030-01-01T00:00:00Z")], later) == ["x"]


def test_now_must_be_aware() -> None:
    with pytest.raises(ValueError, match="aware"):
        active_overrides([override("a")], dt.datetime(2024, 6, 1))


def test_other_time_zones_for_now() -> None:
    tokyo = dt.timezone(dt.timedelta(hours=9))
    entry = override("a", expires_at="2024-06-01T12:00:01Z")
    assert active_overrides([entry], NOW.astimezone(tokyo)) == [entry]


def test_parse_utc_timestamp() -> None:
    assert parse_utc_timestamp("2024-06-01T12:00:00Z") == NOW
    assert parse_utc_timestamp("2024-06-01T12:00:00z") == NOW
    assert parse_utc_timestamp("2024-06-01T14:00:00+02:00") == NOW
    assert parse_utc_timestamp("2024-06-01T12:00:00") == NOW
    assert parse_utc_timestamp("junk") is None
    assert parse_utc_timestamp(None) is None


# -- property: compare with an independent reference model -----------------------

IDS = [f"id-{n}" for n in range(6)]
RULES = ["r1", "r2", "r3"]
OFFSETS = [dt.UTC, dt.timezone(dt.timedelta(hours=2)), dt.timezone(dt.timedelta(hours=-5, minutes=-30))]

# expiry as (kind, seconds from NOW); rendered to text separately so the model never parses
EXPIRY = st.one_of(
    st.just(("absent", 0)),
    st.just(("null", 0)),
    st.tuples(st.just("at"), st.integers(min_value=-10 * 86400, max_value=10 * 86400)),
    st.tuples(st.just("at"), st.sampled_from([-1, 0, 1])),  # edges around now
    st.just(("garbage", 0)),
)


def _render(kind: str, seconds: int, tz: dt.timezone, zulu: bool) -> Any:
    moment = (NOW + dt.timedelta(seconds=seconds)).astimezone(tz)
    text = moment.isoformat()
    return text.replace("+00:00", "Z") if zulu else text


@st.composite
def override_lists(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[tuple[str, Any]]]:
    """Entries for the function, plus the facts the reference model reads."""
    entries: list[dict[str, Any]] = []
    facts: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(min_value=0, max_value=10))):
        if draw(st.integers(min_value=0, max_value=3)) == 0:
            target = draw(st.sampled_from(IDS + ["unknown-1", "unknown-2"]))
            entries.append(tombstone(f"t-{len(entries)}", target))
            facts.append(("tombstone", target))
            continue
        oid = draw(st.sampled_from(IDS))
        rule = draw(st.sampled_from(RULES))
        kind, seconds = draw(EXPIRY)
        entry = override(oid, rule)
        if kind == "absent":
            del entry["expires_at"]
        elif kind == "garbage":
            entry["expires_at"] = draw(st.sampled_from(["soon", "2024-02-30T00:00:00Z", "", "12:00"]))
        elif kind == "at":
            tz = draw(st.sampled_from(OFFSETS))
            entry["expires_at"] = _render(kind, seconds, tz, draw(st.booleans()))
        entries.append(entry)
        facts.append(("override", (oid, rule, kind, seconds)))
    return entries, facts


def reference_active(facts: list[tuple[str, Any]]) -> list[int]:
    """Indexes of the active overrides, from the facts alone (no parsing, no helpers)."""
    revoked = {target for kind, target in facts if kind == "tombstone"}
    out = []
    for index, (kind, fact) in enumerate(facts):
        if kind != "override":
            continue
        oid, _rule, expiry, seconds = fact
        if oid in revoked:
            continue
        if expiry in ("absent", "null") or (expiry == "at" and seconds > 0):
            out.append(index)
    return out


@settings(max_examples=400, deadline=None)
@given(override_lists(), st.sampled_from(RULES), st.lists(st.sampled_from(IDS + ["unknown-1"]), max_size=5))
def test_property_matches_the_reference_model(
    generated: tuple[list[dict[str, Any]], list[tuple[str, Any]]], rule: str, asked: list[str]
) -> None:
    entries, facts = generated
    expected_indexes = reference_active(facts)
    active = active_overrides(entries, NOW)
    assert [id(e) for e in active] == [id(entries[i]) for i in expected_indexes]

    matching = [i for i in expected_indexes if facts[i][1][1] == rule]
    found = active_override_for(rule, entries, NOW)
    assert found is (entries[matching[0]] if matching else None)

    active_ids = {facts[i][1][0] for i in expected_indexes}
    expected_stale = list(dict.fromkeys(x for x in asked if x not in active_ids))
    assert revoked_or_expired(asked, entries, NOW) == expected_stale
