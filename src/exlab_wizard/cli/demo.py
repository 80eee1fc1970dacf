"""``exlab-sync demo``: a sample lab synced end to end on the mount transport."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import click
from rich.table import Table

from exlab_wizard.cli import main
from exlab_wizard.cli.common import EXIT_OK, EXIT_PROBLEM, console, fail, one_line_errors
from exlab_wizard.cli.progress import JobProgress, byte_progress
from exlab_wizard.config import load_config
from exlab_wizard.demo import build_demo_lab
from exlab_wizard.sync.nas_client import SyncHandleState, client_from_config
from exlab_wizard.sync.states import SyncJobState

__all__ = ["demo_cmd"]


@main.command("demo")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Build the sample lab here (an empty or new folder). Default: a new temporary folder.")
@one_line_errors
def demo_cmd(directory: Path | None) -> None:
    """Build a sample lab and a local "NAS" folder, and sync it end to end."""
    base = directory or Path(tempfile.mkdtemp(prefix="exlab-demo-"))
    try:
        lab = build_demo_lab(base)
    except FileExistsError as exc:
        fail(str(exc))
    console.print(f"[bold]Sample lab[/] in {lab.base}")
    console.print(f"  local runs: {lab.local_root}\n  NAS share:  {lab.nas_root}\n  config:     {lab.config_path}")
    config = load_config(lab.config_path)
    started = time.monotonic()
    code = asyncio.run(_sync_all(config, lab))
    console.print(f"done in {time.monotonic() - started:.1f} s. Check a NAS copy yourself:")
    sample = lab.runs[0]
    rel = sample.relative_to(lab.local_root / "CONFOCAL_01")
    console.print(f"  cd '{lab.nas_root / 'CONFOCAL_01' / rel}' && sha256sum -c .exlab-wizard/checksums.sha256", highlight=False)
    console.print(f"  exlab-sync jobs --config '{lab.config_path}'", highlight=False)
    raise SystemExit(code)


async def _sync_all(config, lab) -> int:
    client = client_from_config(config)
    await client.init()
    try:
        handles = []
        for run in (*lab.runs, lab.blocked_run):
            handles.append(await client.enqueue(run))
        with byte_progress(console) as progress:
            client.add_listener(JobProgress(progress))
            await client.wait_idle(timeout=600)
        rows = {r.run_path: r for r in await client.jobs()}
        table = Table(title="Demo result")
        for column in ("run", "state", "where it landed / why"):
            table.add_column(column, overflow="fold")
        ok = True
        for handle in handles:
            rel = str(handle.run_path.relative_to(lab.local_root))
            if handle.state == SyncHandleState.BLOCKED:
                why = "; ".join(sorted({f"{f.rule} {f.matched_token!r}" for f in handle.blocking_findings}))
                table.add_row(rel, "[yellow]blocked by the gate[/]", why)
                continue
            row = rows[str(handle.run_path)]
            if row.state == SyncJobState.VERIFIED:
                landed = Path(row.remote_path)
                shown = landed.relative_to(lab.base) if landed.is_relative_to(lab.base) else landed
                table.add_row(rel, "[green]verified[/]", str(shown))
            else:
                ok = False
                table.add_row(rel, f"[red]{row.state.value}[/]", row.last_error or "")
        console.print(table)
        return EXIT_OK if ok else EXIT_PROBLEM
    finally:
        await client.close()
