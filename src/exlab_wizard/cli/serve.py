"""``exlab-sync serve``: the long-running service (workers, completion watcher, HTTP API, metrics).

Loopback only by default; any other ``--host`` prints a warning (the API then
answers the network: mutations still need the token). One ``serve`` per
``state_dir``: a second one exits 2 with one line, as does a damaged queue
database (its check at start; nothing runs). A port in use is one
warning line, not an exit: the workers run and the port is tried again every
30 s. A ``state_dir`` or runner lease another local user could use is a
warning line at start, as is a central log it cannot open. Prints the
address and a one-time browser login address once it listens; SIGTERM/SIGINT
stop it within seconds, the queue intact, and the next start resumes.

``login-url`` sends the API token only to the serve that holds the runner
lease now, at the address it wrote in ``service-url`` with its pid.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.text import Text

from exlab_wizard.cli import main
from exlab_wizard.cli.common import (
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_USAGE,
    config_option,
    ensure_state_dir,
    err_console,
    fail,
    one_line_errors,
    printable,
)
from exlab_wizard.cli.sync_cmds import configure_logging
from exlab_wizard.config import Config
from exlab_wizard.sync import queue_damage
from exlab_wizard.sync.queue import QueueDamaged, lease_path_for
from exlab_wizard.sync.state_dir import state_dir_warnings
from exlab_wizard.sync.transports import share_lanes

if TYPE_CHECKING:  # FastAPI and uvicorn load only when ``serve`` runs: every other command starts faster
    from exlab_wizard.service.server import ServiceInfo

__all__ = ["login_url_cmd", "serve_cmd"]

logger = logging.getLogger(__name__)


def _announce(info: ServiceInfo) -> None:
    # Plain print and flush: supervisors and tests read these lines as they come.
    print(
        f"exlab-sync serve: listening on {info.base_url} (API: {info.base_url}/docs, metrics: {info.base_url}/metrics)"
    )
    print(f"log in from a browser on this machine (works once, within 10 minutes): {info.login_url}")
    sys.stdout.flush()


class _ErrorLine(logging.Handler):
    """Each record as one ``error:`` line on stderr (the journal), besides the central log."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(
            Text.assemble(("error:", "bold red"), " ", printable(record.getMessage())), highlight=False, soft_wrap=True
        )


def _no_central_log(path: Path, error: OSError) -> None:
    # Else every warning and traceback of the engine would be lost without a word (a log left
    # owned by root, say): the service runs on, this line reaches the journal.
    err_console.print(
        Text.assemble(
            ("warning:", "yellow"),
            " ",
            printable(
                f"cannot open the central log {path}: {error.strerror or error}; serve runs on, but its warnings "
                "and tracebacks are not kept (check the file's owner and mode)"
            ),
        ),
        highlight=False,
    )


#: How long a stopped service waits for its threads to end before it exits without them.
THREADS_GRACE_S = 1.0


async def _then_leave(service: Coroutine[Any, Any, None]) -> None:
    """Run ``service``; then, when a thread is still blocked (in a NAS share gone silent), exit without it.

    ``asyncio.run`` would wait for the default pool without a bound, and the
    interpreter for every pool's threads at exit: a share that does not answer
    would hold the stop past systemd's ``TimeoutStopSec`` (SIGKILL). The queue
    is durable: the job left RUNNING goes back to QUEUED at the next start, and
    the next push removes the temporary files of this one.
    """
    pool = ThreadPoolExecutor(thread_name_prefix="exlab-serve")  # ours, so its end can be bounded
    asyncio.get_running_loop().set_default_executor(pool)
    await service
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + THREADS_GRACE_S
    while True:
        calls = share_lanes.stuck()
        others = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
        if not calls and not others:
            return
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    now = time.time()
    lines = [
        f"serve stopped with a thread blocked for {now - call.since:.0f} s in the share {call.path} ({call.what}): "
        "the NAS does not answer; exiting without it (the job is sent again at the next start)"
        for call in calls
    ]
    if others:
        lines.append(
            f"serve stopped with {len(others)} thread(s) still busy ({', '.join(others)}): exiting without them"
        )
    for line in lines:
        logger.error("%s", line)
        err_console.print(Text.assemble(("error:", "bold red"), " ", printable(line)), highlight=False, soft_wrap=True)
    logging.shutdown()  # flushes the central log
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_OK)


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free one).")
@config_option
@one_line_errors
def serve_cmd(host: str, port: int, config: Config) -> None:
    """Run the sync service: workers, completion watcher, HTTP API and /metrics."""
    ensure_state_dir(config)
    configure_logging(config, on_error=_no_central_log)
    from exlab_wizard.service.server import (
        LISTEN_RETRY_S,
        LOOPBACK,
        AlreadyServing,
        CannotListen,
        cap_malloc_arenas,
        run_service,
    )

    cap_malloc_arenas()  # before any thread: memory stays steady over weeks of runs

    for line in state_dir_warnings(config.state_dir, lease_path_for(config.queue_db)):
        logger.warning("%s", line)
        err_console.print(Text.assemble(("warning:", "yellow"), " ", printable(line)), highlight=False)

    if host not in LOOPBACK:
        err_console.print(
            f"[yellow]warning:[/] listening on {host}: the API is reachable from the network "
            "(reads are open; changes need the token)",
            highlight=False,
        )
    started = False  # the workers run: a failure from then on stops a service that was syncing

    def on_running() -> None:  # called again once it listens
        nonlocal started
        if started:
            return
        started = True
        # Damage to the queue found from now on is one line in the journal too (`systemctl status`
        # shows it): the service stays up to say so on /healthz, but syncs and deletes nothing.
        logging.getLogger(queue_damage.__name__).addHandler(_ErrorLine(logging.ERROR))

    def on_ready(info: ServiceInfo) -> None:
        on_running()
        _announce(info)

    def on_port_taken(exc: CannotListen) -> None:
        # Syncing does not wait for the dashboard: a port another user took (exit 2 is never
        # restarted) would otherwise stop the lab's data for good.
        err_console.print(
            Text.assemble(
                ("warning:", "yellow"),
                f" cannot listen on {host}:{port}: address in use; syncing goes on without the API and "
                f"dashboard, trying again every {LISTEN_RETRY_S:g} s",
            ),
            highlight=False,
        )

    try:
        asyncio.run(
            _then_leave(
                run_service(
                    config, host=host, port=port, on_ready=on_ready, on_port_taken=on_port_taken, on_running=on_running
                )
            )
        )
    except AlreadyServing as exc:
        fail(str(exc), EXIT_USAGE)
    except QueueDamaged as exc:
        # Found by the start's check (the central log has the line): exit 2, which the unit's
        # RestartPreventExitStatus=2 does not restart; a restart reads the same damaged pages.
        fail(str(exc), EXIT_USAGE)
    except CannotListen as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_USAGE)
    except OSError as exc:
        # Once the workers run, a failure is the machine's (out of descriptors, a disk error): exit 1,
        # which a supervisor restarts; before, it is the state_dir's (exit 2, as an unusable state_dir is).
        where = f" ({exc.filename})" if exc.filename else ""
        if started:
            fail(f"serve stopped: {exc.strerror or exc}{where}", EXIT_PROBLEM)
        fail(f"serve cannot start: {exc.strerror or exc}{where}", EXIT_USAGE)
    raise SystemExit(EXIT_OK)


@main.command("login-url")
@config_option
@one_line_errors
def login_url_cmd(config: Config) -> None:
    """A new one-time browser login address from the running service (the one `serve` printed expires)."""
    from exlab_wizard.service.auth import TOKEN_NAME
    from exlab_wizard.service.server import NoService, running_service_url, service_url_path

    # The token goes only to a listener proven to be this state_dir's serve: a service-url left by a
    # killed serve names a port any local user may hold now.
    try:
        base_url = running_service_url(config)
    except NoService as exc:
        fail(str(exc), EXIT_PROBLEM)
    except OSError as exc:
        fail(f"cannot read {service_url_path(config.state_dir)}: {exc.strerror or exc}", EXIT_PROBLEM)
    token_path = config.state_dir / TOKEN_NAME
    try:
        token = token_path.read_text().strip()
    except OSError as exc:
        fail(
            f"cannot read {token_path}: {exc.strerror or exc} (run this as the user the service runs as)",
            EXIT_PROBLEM,
        )
    request = urllib.request.Request(
        f"{base_url}/api/login-codes", method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy
        with direct.open(request, timeout=10) as answer:
            login_url = json.loads(answer.read())["login_url"]
    except urllib.error.HTTPError as exc:
        fail(f"the service at {base_url} refused: HTTP {exc.code} (is {token_path} its token?)", EXIT_PROBLEM)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        fail(f"the service at {base_url} does not answer ({reason}): is exlab-sync serve running?", EXIT_PROBLEM)
    except (ValueError, KeyError):
        fail(f"the service at {base_url} gave no login address", EXIT_PROBLEM)
    print(f"log in from a browser on this machine (works once, within 10 minutes): {login_url}")
