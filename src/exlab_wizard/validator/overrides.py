"""Which operator overrides in a creation.json are active. Pure functions, no I/O.

``validation_overrides`` is an append-only list of two kinds of entry:
an override ``{"id", "problem_class", "operator", "recorded_at",
"expires_at", "reason", "revoked": false}`` and a tombstone
``{"id", "revokes", "operator", "recorded_at", "reason", "revoked": true}``.

An override is active at ``now`` when it is not a tombstone, no tombstone
revokes its id, and its ``expires_at`` is absent, null or later than ``now``.
Where the file is ambiguous the answer is "not active" (fail safe): an entry
that is not an object, lacks a string ``id`` or ``problem_class``, or whose
``expires_at`` cannot be read as a time. An ``expires_at`` without a UTC
offset is read as UTC (the file stores UTC times). A tombstone naming an id
that is not in the list changes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "active_override_for",
    "active_overrides",
    "is_tombstone",
    "parse_utc_timestamp",
    "revoked_or_expired",
]


def is_tombstone(entry: Mapping[str, Any]) -> bool:
    """True for an entry that revokes (has ``revokes``) or declares itself ``revoked: true``."""
    return isinstance(entry, Mapping) and ("revokes" in entry or entry.get("revoked") is True)


def parse_utc_timestamp(value: object) -> dt.datetime | None:
    """An ISO 8601 time (``Z`` or an offset; none means UTC) as an aware UTC datetime.

    ``None`` when ``value`` is not a string or not a readable time.
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith(("z", "Z")):
        text = text[:-1] + "+00:00"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def _check_now(now: dt.datetime) -> dt.datetime:
    if not isinstance(now, dt.datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be a time-zone aware datetime, not {now!r}")
    return now


def _revoked_ids(entries: Iterable[Any]) -> set[str]:
    return {
        entry["revokes"]
        for entry in entries
        if isinstance(entry, Mapping) and is_tombstone(entry) and isinstance(entry.get("revokes"), str)
    }


def _is_active(entry: Any, revoked: set[str], now: dt.datetime) -> bool:
    if not isinstance(entry, Mapping) or is_tombstone(entry):
        return False
    entry_id = entry.get("id")
    if not isinstance(entry_id, str) or not isinstance(entry.get("problem_class"), str):
        return False
    if entry_id in revoked:
        return False
    expires = entry.get("expires_at")
    if expires is None:
        return True
    moment = parse_utc_timestamp(expires)
    return moment is not None and moment > now


def active_overrides(entries: list[dict[str, Any]], now: dt.datetime) -> list[dict[str, Any]]:
    """The overrides active at ``now`` (aware datetime, else ``ValueError``), in input order."""
    now = _check_now(now)
    entries = list(entries or [])
    revoked = _revoked_ids(entries)
    return [entry for entry in entries if _is_active(entry, revoked, now)]


def active_override_for(rule: str, entries: list[dict[str, Any]], now: dt.datetime) -> dict[str, Any] | None:
    """The first override active at ``now`` whose ``problem_class`` is ``rule``, or ``None``."""
    for entry in active_overrides(entries, now):
        if entry["problem_class"] == rule:
            return entry
    return None


def revoked_or_expired(ids: Iterable[str], entries: list[dict[str, Any]], now: dt.datetime) -> list[str]:
    """Of ``ids``, those not active at ``now``: revoked, expired, or missing from ``entries``.

    Order of ``ids`` kept, duplicates reported once.
    """
    active = {entry["id"] for entry in active_overrides(entries, now)}
    out: list[str] = []
    for override_id in ids:
        if override_id not in active and override_id not in out:
            out.append(override_id)
    return out
