"""``exlab-sync override add|revoke|list``: operator overrides of hard gate rules, from the command line.

One implementation with the HTTP API (:mod:`exlab_wizard.validator.override_ops`):
creation.json is changed under its sidecar lock, atomically, every other key
kept; a revocation appends a tombstone, nothing is ever removed.

- ``override add RUN --rule RULE --reason TEXT [--path SUBPATH] [--expires WHEN] [--operator NAME]``
  prints the new override's id. ``WHEN`` is an ISO date (``2027-01-31``: the
  override holds through that day, local time), a length (``30d``, ``12h``,
  ``2w``) or an ISO time with a time zone.
- ``override revoke ID --reason TEXT [--run RUN]``: ``ID`` is the override's id
  or a unique prefix of it (at least 8 characters). Without ``--run`` the run is
  found by reading the creation.json of every run under each equipment's
  ``<local_root>/<id>`` (the same run listing ``problems`` uses; it never
  descends into a run, so it reads one file per run).
- ``override list [RUN] [--json]``: the run's overrides and tombstones with their
  status; with no RUN every run that has any.

A blocked run with a new active override syncs on the next pass: a job held by
the gate is gated again every ``scan_interval_s``, and ``serve``'s watcher
gates a blocked run again when its creation.json changes.

Exit codes: 0 done, 2 refused (unknown or soft rule, expiry not in the future,
path outside the run, no such run or id), always one line on stderr.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import re
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from exlab_wizard.cache import CacheError, CreationWriter
from exlab_wizard.cli import main
from exlab_wizard.cli.common import EXIT_OK, EXIT_USAGE, config_option, console, fail, one_line_errors, printable
from exlab_wizard.cli.output import emit_json, run_label, show_table
from exlab_wizard.config import Config
from exlab_wizard.service import shapes
from exlab_wizard.validator import Validator
from exlab_wizard.validator.override_ops import (
    OverrideError,
    OverrideView,
    add_override,
    list_overrides,
    revoke_override,
)

__all__ = ["expiry_from_text", "find_override", "override_group", "runs_of"]

_LENGTH = re.compile(r"^(\d{1,5})([hdw])$")
_UNIT_HOURS = {"h": 1, "d": 24, "w": 24 * 7}
#: Shortest override id prefix ``revoke`` accepts.
MIN_PREFIX = 8


def expiry_from_text(text: str | None, *, now: dt.datetime) -> dt.datetime | str | None:
    """``--expires`` as given: a date (end of that local day), a length from ``now``, or ISO text passed on."""
    if text is None:
        return None
    value = text.strip()
    length = _LENGTH.match(value)
    if length:
        return now + dt.timedelta(hours=int(length.group(1)) * _UNIT_HOURS[length.group(2)])
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        try:
            day = dt.date.fromisoformat(value)
        except ValueError:
            raise OverrideError("bad_value", f"--expires {text!r} is not a date") from None
        return dt.datetime.combine(day + dt.timedelta(days=1), dt.time()).astimezone()
    return value  # an ISO time: override_ops checks it (time zone, in the future)


def runs_of(config: Config) -> list[str]:
    """Every run under each equipment's ``<local_root>/<id>`` (missing roots skipped)."""
    validator = Validator(config.validator)
    runs: list[str] = []
    for equipment in config.equipment:
        root = os.path.abspath(equipment.equipment_root)
        if os.path.isdir(root):
            runs.extend(validator.find_runs(root))
    return sorted(set(runs))


def _views(writer: CreationWriter, run: str) -> list[OverrideView]:
    try:
        return list_overrides(writer, Path(run))
    except (OverrideError, CacheError):
        return []  # gone meanwhile, or creation.json unusable: `problems` reports that


def find_override(config: Config, writer: CreationWriter, override_id: str) -> tuple[str, str]:
    """``(run, full id)`` of the one override whose id starts with ``override_id``."""
    if len(override_id) < MIN_PREFIX:
        raise OverrideError("bad_value", f"give at least {MIN_PREFIX} characters of the override id")
    found: list[tuple[str, str]] = []
    for run in runs_of(config):
        for view in _views(writer, run):
            ident = view.entry.get("id")
            if view.status != "tombstone" and isinstance(ident, str) and ident.startswith(override_id):
                found.append((run, ident))
    if not found:
        raise OverrideError("not_found", f"no run under the configured equipment has an override {override_id!r}")
    if len(found) > 1:
        raise OverrideError("ambiguous", f"{override_id!r} matches {len(found)} overrides; give more of the id")
    return found[0]


def _run_arg(run: Path) -> Path:
    path = Path(os.path.abspath(run))
    if not path.is_dir():
        fail(f"{run}: no such run folder")
    return path


@main.group("override")
def override_group() -> None:
    """Let a hard gate finding through for one run (add), take that back (revoke), or list them."""


@override_group.command("add")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--rule", required=True, help="The hard rule to let through (see `exlab-sync problems RUN`).")
@click.option("--reason", required=True, help="Why: kept in creation.json for the audit trail.")
@click.option("--path", "subpath", default=None, help="The finding's path inside the run (a note for people).")
@click.option(
    "--expires", default=None, help="2027-01-31 (through that day), 30d, 12h, 2w, or an ISO time with a zone."
)
@click.option("--operator", default=None, help="Who decides (default: the user running the command).")
@config_option
@one_line_errors
def add_cmd(
    run: Path, rule: str, reason: str, subpath: str | None, expires: str | None, operator: str | None, config: Config
) -> None:
    """Record an override of RULE for the run RUN."""
    path = _run_arg(run)
    now = dt.datetime.now(dt.UTC)
    try:
        entry = add_override(
            CreationWriter(),
            path,
            rule=rule,
            reason=reason,
            operator=operator or getpass.getuser(),
            path=subpath,
            expires_at=expiry_from_text(expires, now=now),
            now=now,
        )
    except OverrideError as exc:
        fail(exc.message, EXIT_USAGE)
    except CacheError as exc:
        fail(f"{path}: creation.json cannot be written: {exc}", EXIT_USAGE)
    until = f", until {entry['expires_at']}" if entry.get("expires_at") else ""
    console.print(Text(f"override {entry['id']} added: {rule} for {run_label(config, str(path))}{until}"))
    raise SystemExit(EXIT_OK)


@override_group.command("revoke")
@click.argument("override_id")
@click.option("--reason", required=True, help="Why the override no longer holds.")
@click.option(
    "--run",
    "run",
    type=click.Path(path_type=Path),
    default=None,
    help="The run holding the override (default: search every configured equipment's runs).",
)
@click.option("--operator", default=None, help="Who decides (default: the user running the command).")
@config_option
@one_line_errors
def revoke_cmd(override_id: str, reason: str, run: Path | None, operator: str | None, config: Config) -> None:
    """Revoke the override ID (a tombstone is appended; nothing is removed)."""
    writer = CreationWriter()
    try:
        if run is not None:
            path = _run_arg(run)
            matches = [
                v.entry["id"]
                for v in list_overrides(writer, path)
                if v.status != "tombstone" and str(v.entry.get("id", "")).startswith(override_id)
            ]
            full = matches[0] if len(matches) == 1 else override_id
        else:
            found, full = find_override(config, writer, override_id)
            path = Path(found)
        tombstone = revoke_override(writer, path, full, reason=reason, operator=operator or getpass.getuser())
    except OverrideError as exc:
        fail(exc.message, EXIT_USAGE)
    except CacheError as exc:
        fail(f"creation.json cannot be written: {exc}", EXIT_USAGE)
    console.print(Text(f"override {full} revoked ({tombstone['id']}) for {run_label(config, str(path))}"))
    raise SystemExit(EXIT_OK)


@override_group.command("list")
@click.argument("run", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (keys in docs/cli.md).")
@config_option
@one_line_errors
def list_cmd(run: Path | None, as_json: bool, config: Config) -> None:
    """The overrides of RUN, or of every run that has any, with their status now."""
    writer = CreationWriter()
    if run is not None:
        path = _run_arg(run)
        try:
            listed = [(str(path), list_overrides(writer, path))]
        except OverrideError as exc:
            fail(exc.message, EXIT_USAGE)
        except CacheError as exc:
            fail(f"{path}: creation.json cannot be read: {exc}", EXIT_USAGE)
    else:
        listed = [(r, views) for r in runs_of(config) if (views := _views(writer, r))]
    if as_json:
        emit_json({"runs": [shapes.run_overrides(r, views) for r, views in listed]})
        raise SystemExit(EXIT_OK)
    if not any(views for _r, views in listed):
        console.print("no overrides")
        raise SystemExit(EXIT_OK)
    table = Table(title="Overrides")
    for column in ("run", "id", "rule", "status", "expires", "operator", "reason"):
        table.add_column(column, overflow="fold")
    for r, views in listed:
        for view in views:
            entry = view.entry
            rule = entry.get("problem_class") or (
                f"revokes {entry.get('revokes')}" if view.status == "tombstone" else ""
            )
            table.add_row(
                Text(run_label(config, r)),
                Text(printable(str(entry.get("id", "")))),
                Text(printable(str(rule))),
                view.status,
                Text(printable(str(entry.get("expires_at") or ""))),
                Text(printable(str(entry.get("operator", "")))),
                Text(printable(str(entry.get("reason", "")))),
            )
    show_table(table)
    raise SystemExit(EXIT_OK)
