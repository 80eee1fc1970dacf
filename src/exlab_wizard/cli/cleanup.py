"""``exlab-sync cleanup [--dry-run]``: free the local disk of verified runs, or show what would be freed."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from exlab_wizard.cli import main
from exlab_wizard.cli.common import EXIT_OK, EXIT_PROBLEM, config_option, console, one_line_errors, printable
from exlab_wizard.cli.output import emit_json, run_label, show_table
from exlab_wizard.cli.sync_cmds import run_client
from exlab_wizard.config import Config
from exlab_wizard.service import shapes

__all__ = ["cleanup_cmd"]

_STYLE = {
    "deleted": "green",
    "would_delete": "green",
    "promoted": "cyan",
    "waiting": "yellow",
    "requeued": "magenta",
    "would_requeue": "magenta",
    "failed": "bold red",
    "would_fail": "bold red",
    "aborted": "red",
    "error": "red",
    "busy": "dim",
    "in_progress": "cyan",
}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@main.command("cleanup")
@click.option("--dry-run", is_flag=True, help="List what would be freed and why each other job waits; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (keys in docs/cli.md).")
@config_option
@one_line_errors
def cleanup_cmd(dry_run: bool, as_json: bool, config: Config) -> None:
    """One cleanup pass: delete local data whose NAS copy is verified and every interlock holds."""

    async def body(client) -> int:
        outcomes = await client.cleanup_once(dry_run=dry_run)
        # A pass may promote a job and then act on it: show each job once, with what happened last.
        last: dict[str, object] = {}
        for o in outcomes:
            last[o.job_id or f"#{len(last)}"] = o
        outcomes = list(last.values())
        # A wait is not a problem; a job sent back for a new transfer or failed is one found.
        problems = ("failed", "would_fail", "requeued", "would_requeue", "aborted", "error")
        code = EXIT_PROBLEM if any(o.action in problems for o in outcomes) else EXIT_OK
        if as_json:
            emit_json(shapes.cleanup_report(outcomes, dry_run=dry_run, enabled=config.nas_cleanup.enabled))
            return code
        if not outcomes:
            console.print("nothing to clean: no verified jobs")
            return EXIT_OK
        if not config.nas_cleanup.enabled:
            console.print("[yellow]nas_cleanup.enabled is false[/]: nothing will be deleted until the lab opts in")
        table = Table(title="Cleanup (dry run)" if dry_run else "Cleanup")
        for column in ("run", "action", "files", "size", "reason"):
            table.add_column(column, overflow="fold")
        freed = 0
        for o in outcomes:
            if o.action in ("deleted", "would_delete"):
                freed += o.bytes
            # Run paths and reasons carry file names from the run and its manifest:
            # plain text, escaped, never terminal control sequences or rich markup.
            table.add_row(
                Text(run_label(config, o.run_path) if o.run_path else "-"),
                Text(o.action, style=_STYLE.get(o.action, "white")),
                str(o.files) if o.files else "",
                _size(o.bytes) if o.bytes else "",
                Text(printable(o.reason)),
            )
        show_table(table)
        console.print(f"{'would free' if dry_run else 'freed'} {_size(freed)}")
        return code

    raise SystemExit(run_client(config, body, run_workers=False))
