"""``enqueue``, ``status``, ``jobs``, ``retry``, ``restore``, ``verify``: the queue from the command line.

They work on the queue database directly, with or without a running ``serve``;
``enqueue --wait`` runs the workers itself until the runs settle when no other
process holds the runner lease. Every command that opens the queue sends the
engine's own log records (tracebacks included) to ``<state_dir>/exlab-sync.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from exlab_wizard.cli import main
from exlab_wizard.cli.common import (
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_USAGE,
    config_option,
    console,
    ensure_state_dir,
    err_console,
    fail,
    one_line_errors,
    printable,
)
from exlab_wizard.cli.output import emit_json, run_label, show_table
from exlab_wizard.cli.progress import JobProgress, byte_progress
from exlab_wizard.config import Config, EquipmentConfig
from exlab_wizard.service import shapes
from exlab_wizard.service.run_signals import waiting_reason
from exlab_wizard.sync.nas_client import (
    EnqueueError,
    LocalDamageError,
    NASSyncClient,
    RestoreError,
    RunFolderMissingError,
    RunIncompleteError,
    SyncHandleState,
    client_from_config,
)
from exlab_wizard.sync.state_dir import check_writer, make_state_dir, private_opener
from exlab_wizard.sync.states import IllegalTransition, SyncJobState
from exlab_wizard.sync.transports import TransportError

__all__ = [
    "CENTRAL_LOG_BACKUPS",
    "CENTRAL_LOG_MAX_BYTES",
    "CENTRAL_LOG_NAME",
    "DEFAULT_WAIT_TIMEOUT_S",
    "configure_logging",
    "jobs_table",
    "run_client",
]

#: The central log in ``state_dir``: what the engine logs through ``logging`` (tracebacks included).
CENTRAL_LOG_NAME = "exlab-sync.log"
#: The central log is rolled over at this size, keeping CENTRAL_LOG_BACKUPS older files
#: (``exlab-sync.log.1`` ...): a service that runs for years never fills its state_dir's disk.
CENTRAL_LOG_MAX_BYTES = 10 << 20
CENTRAL_LOG_BACKUPS = 4
#: How long ``enqueue --wait`` waits by default before it gives up (a day).
DEFAULT_WAIT_TIMEOUT_S = 86400.0

_STATE_STYLE = {
    "queued": "cyan",
    "running": "bold blue",
    "awaiting_verify": "blue",
    "verified": "green",
    "cleanup_eligible": "green",
    "cleaned": "dim green",
    "failed": "bold red",
    "blocked": "yellow",
}


_SYNC_OFF = "sync.enabled is false, nothing is sent to the NAS until it is true"


def _ago(when: dt.datetime | None) -> str:
    if when is None:
        return ""
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def jobs_table(
    rows: list[Any], title: str = "Jobs", *, sync_enabled: bool = True, config: Config | None = None
) -> Table:
    """The jobs as a table; with ``config`` runs are shown relative to their equipment's local root."""
    table = Table(title=title, show_lines=False)
    for column in ("job", "equipment", "run", "state", "attempts", "passes", "verified at", "reason / remote"):
        table.add_column(column, overflow="fold")
    for row in rows:
        state = row.state.value
        reason = row.last_error if state in ("failed", "queued") and row.last_error else row.remote_path
        if state in ("verified", "cleanup_eligible") and row.metadata_push_pending and not sync_enabled:
            reason = f"metadata push pending: {_SYNC_OFF}"
        elif state in ("verified", "cleanup_eligible") and row.metadata_push_pending and row.metadata_push_error:
            reason = f"metadata push pending: {row.metadata_push_error}"
        table.add_row(
            row.id[:8],
            row.equipment_id,
            Text(run_label(config, row.run_path) if config else printable(row.run_path)),
            f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]",
            str(row.attempts),
            str(row.verify_passes),
            _ago(row.verified_at),
            Text(printable(reason or "")),
        )
    return table


class _CentralLogHandler(logging.handlers.RotatingFileHandler):
    """The central log's handler: a failure to write the file costs that record, never the caller.

    ``FileHandler`` reopens a closed stream outside its own error guard, so
    that ``open`` failing (a logging reconfiguration closed it, and the
    process is out of descriptors) raised into whatever was logging: asyncio's
    exception handler, which ended ``serve``, or a worker's
    ``logger.exception``. A failure is one line on stderr (again after a
    record got through); the next record tries the file again.
    """

    _failures = 0
    _said: str | None = None

    def _open(self) -> Any:
        # 0600 whatever the umask: the state folder's files are the service user's (sync.state_dir).
        return self._builtin_open(
            self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors, opener=private_opener
        )

    def emit(self, record: logging.LogRecord) -> None:
        failures = self._failures
        try:
            super().emit(record)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
        if self._failures == failures:
            self._said = None

    def handleError(self, record: logging.LogRecord) -> None:
        self._failures += 1
        error = sys.exc_info()[1]
        line = (
            f"exlab-sync: cannot write the central log {self.baseFilename}: {getattr(error, 'strerror', None) or error}"
        )
        if logging.raiseExceptions and line != self._said:
            self._said = line
            with contextlib.suppress(Exception):
                sys.stderr.write(line + "\n")
                sys.stderr.flush()


def configure_logging(config: Config, *, on_error: Callable[[Path, OSError], None] | None = None) -> Path | None:
    """Send the engine's log records (INFO and up, tracebacks included) to ``<state_dir>/exlab-sync.log``.

    Rolled over at :data:`CENTRAL_LOG_MAX_BYTES`, :data:`CENTRAL_LOG_BACKUPS` older files kept.

    The terminal gets one-line errors only, never a traceback. Idempotent;
    returns the log's path, or None when it cannot be opened (the command
    still runs: the equipment logs and the queue keep their records), after
    calling ``on_error(path, error)`` when given. Root gets None for a
    ``state_dir`` another user owns (:func:`check_writer`): a log root rolled
    over there would be root's, and the service could not open it again.
    """
    path = Path(config.state_dir) / CENTRAL_LOG_NAME
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path.absolute():
            return path
    try:
        check_writer(path.parent)  # root on the service user's state_dir: never a log of root's there
        make_state_dir(path.parent)
        handler = _CentralLogHandler(
            path, encoding="utf-8", maxBytes=CENTRAL_LOG_MAX_BYTES, backupCount=CENTRAL_LOG_BACKUPS
        )
    except OSError as exc:
        if on_error is not None:
            on_error(path, exc)
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    package = logging.getLogger("exlab_wizard")
    if package.level == logging.NOTSET or package.level > logging.INFO:
        package.setLevel(logging.INFO)
    return path


def run_client(config: Config, body: Any, *, run_workers: bool = False) -> Any:
    """Run ``await body(client)`` with an initialised client, closing it afterwards."""
    ensure_state_dir(config)
    configure_logging(config)

    async def _main() -> Any:
        client = client_from_config(config)
        await client.init(run_workers=run_workers)
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(_main())


@main.command("enqueue")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--wait", is_flag=True, help="Sync now and wait until the runs are verified (metadata pushed) or failed.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0),
    default=DEFAULT_WAIT_TIMEOUT_S,
    show_default=True,
    help="With --wait: give up after this many seconds (0: no limit), say what is still awaited, exit 1.",
)
@config_option
@one_line_errors
def enqueue_cmd(paths: tuple[Path, ...], wait: bool, timeout_s: float, config: Config) -> None:
    """Queue runs for sync (the Pre-Sync Gate runs first)."""
    for path in paths:
        _require_folder(path)
    if wait and not config.sync.enabled:
        fail(f"--wait: {_SYNC_OFF}; nothing would end the wait", EXIT_USAGE)

    async def body(client: NASSyncClient) -> int:
        blocked = False
        ids = []
        for path in paths:
            try:
                handle = await client.enqueue(path)
            except EnqueueError as exc:
                fail(str(exc))
            except LocalDamageError as exc:  # not re-armed: the good NAS copy must not be overwritten
                blocked = True
                err_console.print(f"[bold red]error:[/] {path}: {exc}", highlight=False, soft_wrap=True)
                continue
            if handle.state == SyncHandleState.BLOCKED:
                blocked = True
                console.print(f"[yellow]blocked[/] {handle.run_path}")
                for finding in handle.blocking_findings:
                    console.print(
                        Text(
                            printable(
                                f"    {finding.rule}: {finding.offending_path} ({finding.matched_token!r}): {finding.rule_detail}"
                            )
                        ),
                        highlight=False,
                    )
            elif handle.note:  # the job exists but was not sent again: say so, not "queued"
                ids.append(handle.job_id)
                console.print(
                    f"[yellow]left as it is[/]  {handle.run_path}  job {handle.job_id}: {handle.note}",
                    highlight=False,
                    soft_wrap=True,
                )
            else:
                ids.append(handle.job_id)
                console.print(f"[cyan]queued[/]  {handle.run_path}  job {handle.job_id}", highlight=False)
        if wait and ids:
            if not client.runs_workers:
                fail("another exlab-sync process runs the workers; it will sync these runs (drop --wait)", EXIT_USAGE)
            with byte_progress(console) as progress:
                client.add_listener(JobProgress(progress))
                waiting = await _settle(client, ids, timeout_s or None)
            rows = [r for r in await client.jobs() if r.id in ids]
            show_table(jobs_table(rows, "Result", config=config))
            if waiting:
                client.close_push_timeout_s = 0.0  # the deadline is the user's: a push in flight stays pending
                for job_id, what in waiting.items():
                    console.print(
                        f"[yellow]gave up waiting after {timeout_s:g} s[/] for job {job_id}: {what}", highlight=False
                    )
                console.print(
                    "the queue keeps these jobs: serve, or the next enqueue --wait, carries them on", highlight=False
                )
                return EXIT_PROBLEM
            unpushed = [r for r in rows if r.state != SyncJobState.FAILED and r.metadata_push_pending]
            for row in unpushed:
                console.print(
                    f"[yellow]metadata push pending[/] job {row.id}: {row.metadata_push_error}; "
                    "the NAS copy lacks its checksums.sha256 until serve or the next enqueue --wait sends it",
                    highlight=False,
                )
            if unpushed or any(r.state == SyncJobState.FAILED for r in rows):
                return EXIT_PROBLEM
        elif ids and not client.runs_workers and not wait:
            pass
        return EXIT_PROBLEM if blocked else EXIT_OK

    raise SystemExit(run_client(config, body, run_workers=wait))


def _require_folder(path: Path) -> None:
    """Exit 2 with one line when ``path`` is not a folder (``enqueue``'s first check, before the queue opens)."""
    if not path.is_dir():
        fail(f"{path}: not a folder")


def _require_run_folder(client: NASSyncClient, path: Path) -> tuple[Path, EquipmentConfig]:
    """The run folder (absolute) and its equipment; exit 2 with one line, as ``enqueue`` would, otherwise."""
    _require_folder(path)
    try:
        return client.run_folder(path)
    except EnqueueError as exc:
        fail(str(exc))


async def _settle(client: NASSyncClient, ids: list[str], timeout: float | None) -> dict[str, str]:
    """Wait until every job settled (its metadata push included), or ``timeout`` seconds.

    Returns what each unsettled job still waits for (empty when all settled).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        waiting = await client.waiting_for(ids)
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            return waiting
        await asyncio.sleep(0.05)


@main.command("status")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (keys in docs/cli.md).")
@config_option
@one_line_errors
def status_cmd(path: Path | None, as_json: bool, config: Config) -> None:
    """The state of one run (with its recent events; with no job, why the watcher waits), or a count per state."""

    async def body(client: NASSyncClient) -> int:
        if path is None:
            rows = await client.jobs()
            if as_json:
                emit_json(shapes.queue_counts(rows))
                return EXIT_OK
            table = Table(title="Queue")
            table.add_column("state")
            table.add_column("jobs", justify="right")
            for state in SyncJobState:
                n = sum(1 for r in rows if r.state == state)
                if n:
                    table.add_row(f"[{_STATE_STYLE.get(state.value, 'white')}]{state.value}[/]", str(n))
            show_table(table) if rows else console.print("no jobs")
            return EXIT_OK
        run = os.path.abspath(path)
        row = await client.job(Path(run))
        if row is None:  # no job: a run waiting (say why), or no run at all (fail as enqueue would)
            folder, equipment = _require_run_folder(client, path)
            waiting = await asyncio.to_thread(waiting_reason, equipment, folder)
            if as_json:
                emit_json(shapes.run_status(run, None, waiting))
            else:
                shown = f"none ({printable(waiting)})" if waiting else "none"
                console.print(Text(shown), highlight=False, soft_wrap=True)
            return EXIT_OK
        if as_json:
            emit_json(shapes.run_status(run, row))
            return EXIT_PROBLEM if row.state == SyncJobState.FAILED else EXIT_OK
        show_table(jobs_table([row], "Job", sync_enabled=config.sync.enabled, config=config))
        events = Table(title="Events")
        for column in ("time", "kind", "from", "to", "detail"):
            events.add_column(column, overflow="fold")
        for event in row.events:
            events.add_row(
                _ago(event.at), event.kind, event.from_state or "", event.to_state or "", Text(printable(event.detail))
            )
        show_table(events)
        return EXIT_PROBLEM if row.state == SyncJobState.FAILED else EXIT_OK

    raise SystemExit(run_client(config, body))


@main.command("jobs")
@click.option("--state", type=click.Choice([s.value for s in SyncJobState]), default=None)
@click.option("--equipment", "equipment_id", default=None, help="Only this equipment id.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (keys in docs/cli.md).")
@config_option
@one_line_errors
def jobs_cmd(state: str | None, equipment_id: str | None, as_json: bool, config: Config) -> None:
    """List jobs."""

    async def body(client: NASSyncClient) -> int:
        rows = await client.jobs(state=state, equipment_id=equipment_id)
        if as_json:
            emit_json(shapes.jobs_page(rows, None))
        elif rows:
            show_table(jobs_table(rows, sync_enabled=config.sync.enabled, config=config))
        else:
            console.print("no jobs")
        return EXIT_OK

    raise SystemExit(run_client(config, body))


@main.command("retry")
@click.argument("job_id")
@click.option(
    "--accept-local",
    is_flag=True,
    help="Send locally damaged files as the new truth; the NAS keeps the verified ones under "
    ".exlab-wizard/previous/<UTC timestamp>/.",
)
@config_option
@one_line_errors
def retry_cmd(job_id: str, accept_local: bool, config: Config) -> None:
    """Re-arm a FAILED job (a job id or a unique prefix of one)."""

    async def body(client: NASSyncClient) -> int:
        matches = [r for r in await client.jobs() if r.id.startswith(job_id)]
        if len(matches) != 1:
            fail(
                f"no job matches {job_id!r}"
                if not matches
                else f"{job_id!r} matches {len(matches)} jobs; give more of the id"
            )
        try:
            row = await client.retry(matches[0].id, accept_local=accept_local)
        except IllegalTransition:
            fail(
                f"job {matches[0].id} is {matches[0].state.value}, not failed; only failed jobs can be retried",
                EXIT_PROBLEM,
            )
        except (LocalDamageError, RunFolderMissingError, RunIncompleteError) as exc:
            fail(f"not retried: {exc}", EXIT_PROBLEM)
        console.print(f"[cyan]queued[/] {row.run_path} job {row.id}", highlight=False)
        if row.accept_local_paths:
            console.print(
                f"the local bytes of {len(row.accept_local_paths)} file(s) will be sent as the new truth; the NAS keeps "
                f"the verified ones under .exlab-wizard/previous/{row.previous_stamp}/",
                highlight=False,
            )
        return EXIT_OK

    raise SystemExit(run_client(config, body))


@main.command("restore")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@config_option
@one_line_errors
def restore_cmd(run: Path, config: Config) -> None:
    """Copy the verified NAS bytes back over a run's locally damaged files, and back where files were lost."""

    async def body(client: NASSyncClient) -> int:
        try:
            with byte_progress(console) as progress:
                task = progress.add_task(f"restore {run.name}", total=None)
                result = await client.restore(run, progress=lambda n: progress.update(task, advance=n))
        except RestoreError as exc:
            fail(str(exc), EXIT_USAGE if exc.kind == "no_job" else EXIT_PROBLEM)
        except TransportError as exc:
            fail(f"nothing more restored: {exc.message}", EXIT_PROBLEM)
        for rel in result.restored:
            aside = f" (the local bytes kept at {result.kept[rel]})" if rel in result.kept else ""
            console.print(f"[green]restored[/] {rel}{aside}", highlight=False)
        for rel, why in sorted(result.refused.items()):
            console.print(f"[red]not restored[/] {rel}: {why}", highlight=False)
        if not result.restored and not result.refused:
            console.print("nothing to restore: the local files match the verified manifest")
        console.print(f"job {result.job_id} is {result.state.value if result.state else 'unknown'}", highlight=False)
        return EXIT_OK if result.ok else EXIT_PROBLEM

    raise SystemExit(run_client(config, body))


@main.command("verify")
@click.argument("path", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (keys in docs/cli.md); no progress bar.")
@config_option
@one_line_errors
def verify_cmd(path: Path, as_json: bool, config: Config) -> None:
    """Re-hash a run and check it against its recorded checksums.sha256."""
    from exlab_wizard.sync.manifest_format import ManifestFormatError, read_manifest
    from exlab_wizard.sync.verifier import walk_run

    try:
        recorded = read_manifest(path)
    except (ManifestFormatError, OSError) as exc:  # a broken manifest is a problem found, not a usage error
        fail(f"{path}: .exlab-wizard/checksums.sha256 cannot be used: {exc}", EXIT_PROBLEM)
    if recorded is None:
        fail(f"{path} has no .exlab-wizard/checksums.sha256 (not verified yet)", EXIT_PROBLEM)
    total = sum(os.lstat(path / rel).st_size for rel in walk_run(path))

    async def body(client: NASSyncClient) -> int:
        if as_json:
            result = await client.force_verify(path)
            emit_json(shapes.verify_result(os.path.abspath(path), result))
            return EXIT_OK if result.ok else EXIT_PROBLEM
        with byte_progress(console) as progress:
            task = progress.add_task(f"verify {path.name}", total=total or None)
            result = await client.force_verify(path, progress=lambda n: progress.update(task, advance=n))
        if result.ok:
            console.print(f"[green]OK[/] {result.checked} files match checksums.sha256")
            return EXIT_OK
        for label, items in (("different", result.different), ("missing", result.missing), ("extra", result.extra)):
            for item in items:
                console.print(Text.assemble((label, "red"), " ", printable(item)), highlight=False)
        return EXIT_PROBLEM

    raise SystemExit(run_client(config, body))
