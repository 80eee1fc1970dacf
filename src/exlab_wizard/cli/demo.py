"""``exlab-sync demo``: a sample lab synced end to end on the mount transport.

``demo --serve``: the same lab, synced by a running ``serve`` on 127.0.0.1
(port 8765, or a free one when 8765 is taken) so the dashboard shows it move;
it prints the one-time login address and runs until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from exlab_wizard.cli import main
from exlab_wizard.cli.common import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, console, fail, one_line_errors
from exlab_wizard.cli.progress import JobProgress, byte_progress
from exlab_wizard.config import load_config
from exlab_wizard.demo import DemoLab, build_demo_lab
from exlab_wizard.sync.nas_client import SyncHandleState, client_from_config
from exlab_wizard.sync.states import SyncJobState

if TYPE_CHECKING:  # FastAPI and uvicorn load only for ``demo --serve``
    from exlab_wizard.service.server import ServiceInfo

__all__ = ["demo_cmd"]

DEMO_PORT = 8765


@main.command("demo")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Build the sample lab here (an empty or new folder). Default: a new temporary folder.",
)
@click.option(
    "--serve",
    "serve",
    is_flag=True,
    help="Sync it through a running service and open the dashboard on 127.0.0.1 (Ctrl-C stops it).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEMO_PORT,
    show_default=True,
    help="With --serve: the port (taken: a free one; 0: any free one).",
)
@one_line_errors
def demo_cmd(directory: Path | None, serve: bool, port: int) -> None:
    """Build a sample lab and a local "NAS" folder, and sync it end to end."""
    base = directory or Path(tempfile.mkdtemp(prefix="exlab-demo-"))
    try:
        lab = build_demo_lab(base)
    except FileExistsError as exc:
        fail(str(exc))
    console.print(f"[bold]Sample lab[/] in {lab.base}")
    console.print(f"  local runs: {lab.local_root}\n  NAS share:  {lab.nas_root}\n  config:     {lab.config_path}")
    config = load_config(lab.config_path)
    if serve:
        _serve_demo(config, lab, port)
    started = time.monotonic()
    code = asyncio.run(_sync_all(config, lab))
    console.print(f"done in {time.monotonic() - started:.1f} s. Check a NAS copy yourself:")
    sample = lab.runs[0]
    rel = sample.relative_to(lab.local_root / "CONFOCAL_01")
    console.print(
        f"  cd '{lab.nas_root / 'CONFOCAL_01' / rel}' && sha256sum -c .exlab-wizard/checksums.sha256", highlight=False
    )
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
        console.print(table, soft_wrap=False)  # drawn to the terminal's width, piped too
        return EXIT_OK if ok else EXIT_PROBLEM
    finally:
        await client.close()


def _free_or_any(port: int) -> int:
    """``port`` when it can be bound on 127.0.0.1 now, else 0 (any free port)."""
    if port == 0:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            return 0
    return port


def _serve_demo(config, lab: DemoLab, port: int) -> None:
    """Run ``serve`` on the demo lab until SIGTERM/SIGINT; exits the process."""
    from exlab_wizard.service.server import AlreadyServing, CannotListen, cap_malloc_arenas

    cap_malloc_arenas()
    try:
        free = _free_or_any(port)
    except OSError as exc:
        fail(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", EXIT_USAGE)
    try:
        asyncio.run(_run_demo_service(config, lab, free))
    except AlreadyServing as exc:
        fail(str(exc), EXIT_USAGE)
    except CannotListen as exc:
        fail(f"cannot listen on 127.0.0.1:{free}: {exc.strerror or exc}", EXIT_USAGE)
    except OSError as exc:  # not the address: the machine's (out of descriptors, a disk error)
        where = f" ({exc.filename})" if exc.filename else ""
        fail(f"the demo service stopped: {exc.strerror or exc}{where}", EXIT_PROBLEM)
    print("exlab-sync demo: stopped; the queue is kept in", config.state_dir, flush=True)
    raise SystemExit(EXIT_OK)


async def _run_demo_service(config, lab: DemoLab, port: int) -> None:
    ready: asyncio.Future[ServiceInfo] = asyncio.get_running_loop().create_future()

    def on_ready(info: ServiceInfo) -> None:
        # Plain print and flush, as ``serve`` does: a reader of the pipe sees the lines as they come.
        print(f"exlab-sync demo: dashboard on {info.base_url}/ (API: {info.base_url}/docs)")
        print(f"log in from a browser on this machine (works once, within 10 minutes): {info.login_url}")
        print("Ctrl-C stops it.")
        sys.stdout.flush()
        ready.set_result(info)

    from exlab_wizard.service.server import run_service

    service = asyncio.create_task(run_service(config, host="127.0.0.1", port=port, on_ready=on_ready))
    await asyncio.wait({service, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        queueing = asyncio.create_task(_enqueue_demo_runs(ready.result(), lab))
        await asyncio.wait({service, queueing}, return_when=asyncio.FIRST_COMPLETED)
        if not queueing.done():  # stopped while queueing: what is queued stays queued
            queueing.cancel()
    await service


async def _enqueue_demo_runs(info: ServiceInfo, lab: DemoLab) -> None:
    """Queue the demo's runs now (FACS_02 has no completeness signal, so the watcher would never)."""
    for run in (*lab.runs, lab.blocked_run):
        try:
            await info.ctx.client.enqueue(run)
        except Exception as exc:  # the service keeps running; say what did not queue
            print(f"exlab-sync demo: could not queue {run}: {exc}", file=sys.stderr, flush=True)
    print(
        f"exlab-sync demo: {len(lab.runs)} runs queued, 1 blocked by the gate; watch them on the dashboard", flush=True
    )
