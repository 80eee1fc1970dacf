"""Add, revoke and list a run's operator overrides: the one code path for the API and the CLI.

Every change goes through :class:`~exlab_wizard.cache.CreationWriter` (the
sidecar lock, an atomic write, every other key of creation.json kept), and
the override list stays append-only: a revocation is a tombstone entry,
never a deletion. Refusals are :class:`OverrideError` with a ``kind``:

- ``unknown_rule``: not a rule the validator knows;
- ``soft_rule``: a soft rule never gates a sync, so it needs no override;
- ``bad_value``: an empty reason or operator, an expiry without a time zone
  or not in the future;
- ``outside_run``: the ``path`` noted with an override is not inside the run;
- ``not_found``: no override with that id in the run's creation.json;
- ``already_revoked``: the override was revoked before;
- ``no_run``: the run folder does not exist.

Example::

    entry = add_override(writer, run, rule="reserved_filesystem_name",
                         reason="the instrument names its port AUX", operator="asmith")
    revoke_override(writer, run, entry["id"], reason="renamed", operator="asmith")
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exlab_wizard.cache import CreationWriter
from exlab_wizard.validator.overrides import is_tombstone, parse_utc_timestamp
from exlab_wizard.validator.rules import HARD_RULES, SOFT_RULES

__all__ = [
    "OverrideError",
    "OverrideView",
    "add_override",
    "check_path",
    "list_overrides",
    "parse_expiry",
    "revoke_override",
]

#: Longest reason or operator name kept (a paragraph, not a file).
MAX_TEXT = 2000


class OverrideError(ValueError):
    """An override change that was refused; ``kind`` says why (see the module docstring)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class OverrideView:
    """One entry of ``validation_overrides`` with what it means now.

    ``status`` is ``active``, ``expired``, ``revoked`` or ``unreadable`` for an
    override, ``tombstone`` for a revocation entry; ``revoked_by`` is the id of
    the tombstone that revoked an override.
    """

    entry: dict[str, Any]
    status: str
    revoked_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.entry, "status": self.status, "revoked_by": self.revoked_by}


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OverrideError("bad_value", f"{name} is required (a non-empty text)")
    if len(value) > MAX_TEXT:
        raise OverrideError("bad_value", f"{name} is longer than {MAX_TEXT} characters")
    return value.strip()


def check_rule(rule: object) -> str:
    """The rule name when an override of it makes sense, else :class:`OverrideError`."""
    if rule in HARD_RULES:
        return str(rule)
    if rule in SOFT_RULES:
        raise OverrideError("soft_rule", f"{rule} is a soft rule: it never blocks a sync, so it needs no override")
    raise OverrideError("unknown_rule", f"unknown rule {rule!r}; hard rules are: {', '.join(HARD_RULES)}")


def parse_expiry(value: object, *, now: dt.datetime) -> dt.datetime | None:
    """An ISO 8601 expiry with a time zone, later than ``now``; None for no expiry."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise OverrideError("bad_value", "expires_at must be an ISO 8601 time with a time zone, or null")
    text = value.strip()
    try:
        naive = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "zZ" else text).utcoffset() is None
    except ValueError:
        raise OverrideError("bad_value", f"expires_at {value!r} is not an ISO 8601 time") from None
    if naive:
        raise OverrideError("bad_value", f"expires_at {value!r} has no time zone (add Z or an offset such as +01:00)")
    moment = parse_utc_timestamp(text)
    if moment is None or moment <= now:
        raise OverrideError("bad_value", f"expires_at {value!r} is not in the future")
    return moment


def check_path(run: Path, path: object) -> str | None:
    """The finding's path noted with an override, relative to the run with ``/``; None for none.

    An absolute path must lie inside ``run``; a relative one is taken from the
    run root and may not climb out of it (``..``).
    """
    if path is None:
        return None
    text = _text("path", path)
    absolute = os.path.normpath(text if os.path.isabs(text) else os.path.join(run, text))
    root = os.path.normpath(os.path.abspath(run))
    if absolute == root:
        return "."
    if not absolute.startswith(root.rstrip(os.sep) + os.sep):
        raise OverrideError("outside_run", f"path {text!r} is not inside the run {run}")
    return os.path.relpath(absolute, root).replace(os.sep, "/")


def _require_run(run: Path) -> Path:
    if not run.is_dir() or run.is_symlink():
        raise OverrideError("no_run", f"{run} is not a run folder")
    return run


def add_override(
    writer: CreationWriter,
    run: Path,
    *,
    rule: object,
    reason: object,
    operator: object,
    path: object = None,
    expires_at: object = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Append an override of the hard rule ``rule`` to the run's creation.json; return the entry.

    ``expires_at``: None, an aware datetime, or ISO text with a time zone;
    it must be in the future. ``path`` (optional) names the finding's path
    that prompted the override, for people: the override covers the rule for
    the whole run, as the gate reads it; it is stored relative to the run and
    must lie inside it (``outside_run`` otherwise). Raises :class:`OverrideError`, and
    :class:`~exlab_wizard.cache.CacheError` when creation.json cannot be used.
    """
    now = now or dt.datetime.now(dt.UTC)
    checked_rule = check_rule(rule)
    why = _text("reason", reason)
    who = _text("operator", operator)
    note = check_path(run, path)
    if isinstance(expires_at, dt.datetime):
        expires_at = expires_at.isoformat()
    expiry = parse_expiry(expires_at, now=now)
    _require_run(run)
    return writer.append_override(
        run, problem_class=checked_rule, operator=who, reason=why, expires_at=expiry, path=note
    )


def revoke_override(
    writer: CreationWriter,
    run: Path,
    override_id: str,
    *,
    reason: object,
    operator: object,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Append a tombstone revoking ``override_id``; return it. Nothing is ever removed.

    Raises :class:`OverrideError` (``not_found``, ``already_revoked``,
    ``bad_value``, ``no_run``).
    """
    why = _text("reason", reason)
    who = _text("operator", operator)
    _require_run(run)
    # an entry whose id is not text (a list, an object: a hand-edited file) cannot be the one named
    views = {
        view.entry["id"]: view
        for view in list_overrides(writer, run, now=now)
        if view.status != "tombstone" and isinstance(view.entry.get("id"), str)
    }
    view = views.get(override_id)
    if view is None:
        raise OverrideError("not_found", f"{run} has no override with id {override_id!r}")
    if view.status == "revoked":
        raise OverrideError("already_revoked", f"override {override_id} was already revoked by {view.revoked_by}")
    try:
        return writer.append_tombstone(run, revokes=override_id, operator=who, reason=why)
    except ValueError as exc:  # removed meanwhile by another tool: say so, write nothing
        raise OverrideError("not_found", str(exc)) from exc


def list_overrides(writer: CreationWriter, run: Path, *, now: dt.datetime | None = None) -> list[OverrideView]:
    """Every entry of the run's ``validation_overrides`` in file order, with its status at ``now``."""
    now = now or dt.datetime.now(dt.UTC)
    _require_run(run)
    creation = writer.read(run)
    entries = [e for e in (creation.validation_overrides if creation is not None else []) if isinstance(e, dict)]
    revoked_by = {
        e["revokes"]: str(e.get("id")) for e in entries if is_tombstone(e) and isinstance(e.get("revokes"), str)
    }
    views: list[OverrideView] = []
    for entry in entries:
        if is_tombstone(entry):
            views.append(OverrideView(dict(entry), "tombstone"))
        elif not isinstance(entry.get("id"), str) or not isinstance(entry.get("problem_class"), str):
            views.append(OverrideView(dict(entry), "unreadable"))
        elif entry["id"] in revoked_by:
            views.append(OverrideView(dict(entry), "revoked", revoked_by[entry["id"]]))
        else:
            expires = entry.get("expires_at")
            moment = None if expires is None else parse_utc_timestamp(expires)
            alive = expires is None or (moment is not None and moment > now)
            views.append(OverrideView(dict(entry), "active" if alive else "expired"))
    return views
