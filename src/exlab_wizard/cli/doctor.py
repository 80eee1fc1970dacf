"""``exlab-sync doctor [--config FILE] [--json]``: check the config and the way to every NAS.

One line per check (``✓``/``✗`` on a terminal, ``OK``/``FAIL`` and tabs
otherwise) with a fix for each failure; the checks themselves are in
:mod:`exlab_wizard.sync.doctor`. Exit 1 when any check fails (a config that
does not load is a failed check too), 0 when all pass.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from rich.text import Text

from exlab_wizard.cli import main
from exlab_wizard.cli.common import EXIT_OK, EXIT_PROBLEM, console, default_config_path, one_line_errors, printable
from exlab_wizard.cli.output import emit_json, tsv_line
from exlab_wizard.sync.doctor import Check, check_config_file, run_checks

__all__ = ["doctor_cmd", "doctor_report"]


def doctor_report(config_path: Path, checks: list[Check]) -> dict:
    """The ``--json`` document: ``ok``, the config file, and every check."""
    return {"ok": all(c.ok for c in checks), "config_path": str(config_path), "checks": [c.to_dict() for c in checks]}


def _print(check: Check) -> None:
    where = check.equipment or "-"
    if not console.is_terminal:
        cells = ["OK" if check.ok else "FAIL", where, check.name, check.detail]
        if check.hint:
            cells.append(f"fix: {check.hint}")
        click.echo(tsv_line(cells))
        return
    line = Text.assemble(
        ("✓ ", "green") if check.ok else ("✗ ", "bold red"),
        (f"{where} ", "bold"),
        (f"{check.name}: ", ""),
        printable(check.detail),
    )
    if check.hint:
        line.append(f"  → fix: {printable(check.hint)}", style="yellow")
    console.print(line, highlight=False, soft_wrap=True)


@main.command("doctor")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Config file (default: the platform config folder, exlab-wizard/config.yaml).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (keys in docs/cli.md).")
@one_line_errors
def doctor_cmd(config_path: Path | None, as_json: bool) -> None:
    """Check the config and, for every equipment, the way to its NAS; exit 1 when a check fails."""
    path = config_path or default_config_path()
    config, first = check_config_file(path)
    checks = [first]
    if config is not None:
        checks += asyncio.run(run_checks(config))
    if as_json:
        emit_json(doctor_report(path, checks))
    else:
        for check in checks:
            _print(check)
    raise SystemExit(EXIT_OK if all(c.ok for c in checks) else EXIT_PROBLEM)
