"""``exlab-sync problems [PATH] [--json] --config FILE``: what would the Pre-Sync Gate say?

Checks the run folder PATH, every run under the folder PATH, or -- with no
PATH -- every run under each configured equipment's ``<local_root>/<id>``.
Read-only: it never writes creation.json (the gate run by ``enqueue`` and the
workers records blocks). Findings carry the gate's flags: ``override_active``
(an active operator override lets a hard finding through) and
``synced_under_prior_policy`` (already verified on the NAS).

Output: a table, hard findings first (columns tier, rule, path, token,
detail, override), or with ``--json`` one JSON document: ``runs_checked`` and
``runs``, each run as ``GET /api/problems`` gives it (keys in docs/cli.md).

Exit codes: 1 when some hard finding would block a sync (no active override,
not synced earlier), 0 otherwise (soft findings and hard findings that are
overridden or already on the NAS are reported but are not problems that stop
a sync), 2 for a usage or config error (PATH missing, no equipment
configured, bad config), always one line on stderr.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from exlab_wizard.cache import CreationWriter
from exlab_wizard.cli import main
from exlab_wizard.cli.common import (
    EXIT_OK,
    EXIT_PROBLEM,
    config_option,
    console,
    err_console,
    fail,
    one_line_errors,
    printable,
)
from exlab_wizard.cli.output import emit_json, show_table
from exlab_wizard.config import Config
from exlab_wizard.service import shapes
from exlab_wizard.sync.gate import GateResult, evaluate_run
from exlab_wizard.validator import Finding, Validator, sort_findings

__all__ = ["collect_findings", "gate_runs", "problems"]


def gate_runs(roots: list[Path], config: Config, *, now: dt.datetime | None = None) -> dict[str, GateResult]:
    """The gate's answer (read-only) for every run under ``roots``, by run path, sorted."""
    validator = Validator(config.validator)
    writer = CreationWriter()
    runs: list[str] = []
    for root in roots:
        runs.extend(validator.find_runs(root))
    results: dict[str, GateResult] = {}
    for run in sorted(set(runs)):
        try:
            results[run] = evaluate_run(run, validator=validator, writer=writer, now=now)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed while we looked: nothing left to sync
    return results


def collect_findings(roots: list[Path], config: Config, *, now: dt.datetime | None = None) -> tuple[list[Finding], int]:
    """The gate's findings (flags set, read-only) for every run under ``roots``, and the run count."""
    results = gate_runs(roots, config, now=now)
    return sort_findings([f for result in results.values() for f in result.findings]), len(results)


def _display_path(path: str, base: str) -> str:
    rel = os.path.relpath(path, base)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return path
    return rel


def _flag(finding: Finding) -> str:
    if finding.synced_under_prior_policy:
        return "synced earlier"
    if finding.override_active:
        return "active"
    return ""


def _render_table(findings: list[Finding], base: str, runs: int) -> None:
    # The same offending path is reported once per run it belongs to (a bad
    # project folder name, say); show it once with the number of runs.
    rows: dict[tuple[str, ...], list[Finding]] = {}
    for finding in findings:
        key = (
            finding.tier,
            finding.rule,
            finding.offending_path,
            finding.matched_token,
            finding.rule_detail,
            _flag(finding),
        )
        rows.setdefault(key, []).append(finding)
    table = Table(title=Text(f"Problems under {printable(base)}"), title_justify="left")
    table.add_column("tier", no_wrap=True)
    table.add_column("rule", no_wrap=True)
    for column in ("path", "token", "detail"):
        table.add_column(column, overflow="fold")
    table.add_column("override", no_wrap=True)
    for (tier, rule, path, token, detail, flag), group in rows.items():
        if len(group) > 1:
            detail += f" ({len(group)} runs)"
        style = "bold red" if tier == "hard" and not flag else ("yellow" if tier == "soft" else "")
        table.add_row(
            Text(tier, style=style),
            Text(rule),
            Text(printable(_display_path(path, base))),
            Text(printable(token)),
            Text(printable(detail)),
            Text(flag),
        )
    show_table(table)
    blocking = sum(1 for f in findings if f.blocks)
    passing = sum(1 for f in findings if f.tier == "hard" and not f.blocks)
    soft = sum(1 for f in findings if f.tier == "soft")
    console.print(
        f"{runs} run(s) checked: {blocking} blocking, {passing} hard let through "
        f"(override or synced earlier), {soft} soft",
        highlight=False,
    )


@main.command("problems")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document (keys in docs/cli.md) instead of a table."
)
@config_option
@one_line_errors
def problems(path: Path | None, as_json: bool, config: Config) -> None:
    """Show what the Pre-Sync Gate finds in PATH (a run or any folder), or in every equipment's runs."""
    if path is not None:
        if not path.exists():
            fail(f"{path}: no such file or folder")
        if not path.is_dir():
            fail(f"{path}: not a folder (give a run folder or a folder holding runs)")
        roots = [Path(os.path.abspath(path))]
        base = str(roots[0])
    else:
        if not config.equipment:
            fail("no equipment in the config: add equipment or give a PATH to check")
        roots = []
        for equipment in config.equipment:
            root = Path(os.path.abspath(equipment.equipment_root))
            if root.is_dir():
                roots.append(root)
            else:
                err_console.print(f"note: {equipment.id}: {root} does not exist yet; skipped", highlight=False)
        local_roots = {os.path.abspath(e.local_root) for e in config.equipment}
        base = local_roots.pop() if len(local_roots) == 1 else os.sep

    results = gate_runs(roots, config)
    findings, runs = sort_findings([f for r in results.values() for f in r.findings]), len(results)
    if as_json:
        emit_json({"runs_checked": runs, "runs": [shapes.problems(run, result) for run, result in results.items()]})
    elif not findings:
        console.print(
            f"No problems found: {runs} run(s) checked under {printable(base)}", highlight=False, markup=False
        )
    else:
        _render_table(findings, base, runs)
    sys.exit(EXIT_PROBLEM if any(f.blocks for f in findings) else EXIT_OK)
