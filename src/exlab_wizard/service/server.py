"""One ``serve`` process: the client's workers, audit loop and reaper, the completion watcher,
the NAS facts refresh and the HTTP app under uvicorn, all in one event loop.

A port another process holds (``EADDRINUSE``) need not stop the syncing: with
``on_port_taken`` the service starts without the HTTP side and binds again
every :data:`LISTEN_RETRY_S` until it gets the port, then serves as usual.

Shutdown (SIGTERM, SIGINT, or ``stop`` set): the live streams end, uvicorn
stops taking requests, then ``client.close()`` stops the in-flight transfer
at its next block (the transports remove their temporary files) and leaves
the job in the queue, which the next start resumes. The whole shutdown is
bounded by :data:`SHUTDOWN_BUDGET_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from exlab_wizard.config.models import Config
from exlab_wizard.fileio import atomic_write_bytes
from exlab_wizard.service.app import ServiceContext, Watcher, create_app
from exlab_wizard.service.auth import Auth, load_or_create_token
from exlab_wizard.service.events import EventHub
from exlab_wizard.service.metrics import NasFacts, ServiceMetrics
from exlab_wizard.service.watcher import CompletionWatcher
from exlab_wizard.sync.nas_client import NASSyncClient, client_from_config
from exlab_wizard.sync.queue import RunnerLease, lease_path_for
from exlab_wizard.sync.queue_stats import QueueStats
from exlab_wizard.sync.state_dir import PRIVATE_FILE_MODE, lock_holder, make_state_dir, user_name

__all__ = [
    "LISTEN_RETRY_S",
    "LOOPBACK",
    "SERVE_MALLOC_ARENAS",
    "SERVICE_URL_NAME",
    "SHUTDOWN_BUDGET_S",
    "AlreadyServing",
    "CannotListen",
    "NoService",
    "ServiceAddress",
    "ServiceInfo",
    "cap_malloc_arenas",
    "run_service",
    "running_service_url",
    "service_url_path",
]

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")
#: What a stop may take in all; SIGTERM must end the process well inside 10 s.
SHUTDOWN_BUDGET_S = 7.0
#: How often a service whose port was taken tries to bind it again.
LISTEN_RETRY_S = 30.0


#: ``<state_dir>/service-url``: one line, the running service's address and pid
#: (``http://127.0.0.1:8765 12345``), for the CLI (``exlab-sync login-url``). Written once it
#: listens, removed when it stops and by the next serve that takes the runner lease: one left by a
#: killed service is stale, trusted only while its pid holds the lease (:func:`running_service_url`).
SERVICE_URL_NAME = "service-url"


def service_url_path(state_dir: Path) -> Path:
    return Path(state_dir) / SERVICE_URL_NAME


@dataclass(frozen=True)
class ServiceAddress:
    """What ``service-url`` says: the address, and the pid of the serve that wrote it (None: none named)."""

    url: str
    pid: int | None

    @classmethod
    def read(cls, state_dir: Path) -> ServiceAddress:
        """The file's address and pid. Raises ``OSError`` (``FileNotFoundError``: no serve wrote one)."""
        words = service_url_path(state_dir).read_text().split()
        pid = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
        return cls(words[0] if words else "", pid)

    def line(self) -> str:
        return f"{self.url} {self.pid}\n"


class NoService(LookupError):
    """No ``serve`` is proven to listen at the address ``service-url`` names.

    ``kind``: ``"missing"`` (no file: no serve listens) or ``"stale"`` (left by
    a serve that is gone). The message is one line for the CLI.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def running_service_url(config: Config) -> str:
    """The address of the ``serve`` running for ``config``'s state_dir, proven before a token is sent to it.

    ``service-url`` names a pid, and that process must hold the runner lease
    now (the OS's answer, ``/proc/locks``): a serve writes the file only once
    it has bound its port and keeps the port until it stops, so what listens
    there is that serve. A file left by a killed serve (whose port any local
    user may have bound since) fails the check. Raises :class:`NoService`, or
    ``OSError`` when the file cannot be read.
    """
    path = service_url_path(config.state_dir)
    try:
        address = ServiceAddress.read(config.state_dir)
    except FileNotFoundError:
        raise NoService(
            "missing", f"no exlab-sync serve is running for {config.state_dir} (no {path.name} there): start it first"
        ) from None
    holder = lock_holder(lease_path_for(config.queue_db))
    if address.pid is not None and holder is not None and holder.pid == address.pid and address.url:
        return address.url
    if address.pid is None:
        why = "it names no pid"
    elif holder is None:
        why = f"pid {address.pid}, which wrote it, does not hold the runner lease"
    else:
        why = f"the runner lease is held by pid {holder.pid}, not by pid {address.pid}, which wrote it"
    raise NoService(
        "stale",
        f"no exlab-sync serve is running for {config.state_dir}: {path} is stale ({why}); the token was not sent",
    )


class AlreadyServing(RuntimeError):
    """Another process holds the runner lease of this queue (another ``serve``, or ``enqueue --wait``)."""


class CannotListen(OSError):
    """The address cannot be bound (port taken, not this machine's address, no permission): ``strerror`` says why."""


@dataclass(frozen=True)
class ServiceInfo:
    """What a started service tells its caller: its address and a first one-time login address."""

    base_url: str
    login_url: str
    ctx: ServiceContext


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: ``run_service`` owns SIGTERM/SIGINT and the order of shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _make_watcher(config: Config, client: NASSyncClient) -> Watcher:
    return CompletionWatcher(config, client)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; every failure (``socket()`` out of descriptors too) is CannotListen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and without it
        # a small answer waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as exc:
        raise CannotListen(exc.errno, exc.strerror) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise CannotListen(exc.errno, exc.strerror) from exc
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _origins(host: str, port: int) -> list[str]:
    names = {host} | (set(LOOPBACK) if host in LOOPBACK else set())
    return sorted(_url(name, port) for name in names)


def _allowed_hosts(host: str) -> list[str] | None:
    """Host headers a loopback service answers (refuses DNS-rebound names); None: any (another --host)."""
    if host not in LOOPBACK:
        return None
    return ["127.0.0.1", "localhost", "[::1]", "::1"]


#: glibc's mallopt parameter for the number of malloc arenas.
_M_ARENA_MAX = -8
#: Arenas for a long-running ``serve``: glibc's default (8 per core) lets each new worker
#: thread open an arena that grows to its working size and keeps it; two keep the
#: process's memory steady (serve soak, 90 runs: 69 -> 65 MiB, no late steps).
SERVE_MALLOC_ARENAS = 2


def cap_malloc_arenas(arenas: int = SERVE_MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process; call before threads start. False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # another C library (musl): nothing to cap
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_ARENA_MAX, arenas) == 1


async def run_service(
    config: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    on_ready: Callable[[ServiceInfo], None] | None = None,
    stop: asyncio.Event | None = None,
    client: NASSyncClient | None = None,
    install_signals: bool = True,
    facts_interval_s: float = 30.0,
    on_port_taken: Callable[[CannotListen], None] | None = None,
    listen_retry_s: float = LISTEN_RETRY_S,
    on_running: Callable[[], None] | None = None,
) -> None:
    """Run the service until ``stop`` is set or SIGTERM/SIGINT arrives.

    Raises :class:`AlreadyServing` when another process runs the workers for
    this queue, :class:`CannotListen` when the address cannot be bound and
    :class:`~exlab_wizard.sync.queue.QueueDamaged` when the queue's check
    finds the file damaged (all before anything starts); any other ``OSError``
    is not about the address. With ``on_port_taken``, a port in use (``EADDRINUSE``, only
    that) is no error: it is called once, the workers, watcher, audit and
    reaper start, and the bind is tried again every ``listen_retry_s``;
    ``on_ready`` comes once it listens. ``on_running`` is called once the
    workers run (the lease taken, the queue recovered): from then on a failure
    stops a service that was syncing. ``client`` (tests) must not be
    initialised yet.
    """
    make_state_dir(config.state_dir)
    probe = RunnerLease(lease_path_for(config.queue_db))
    if not probe.acquire():
        raise _lease_taken(probe, config)
    # The lease is ours: a service-url still there was left by a serve that died, and its port may be
    # anyone's now. Removed while the probe holds the lease: once this process holds it again (its pid
    # may be the dead one's, after a reboot), login-url must find no address until this one listens.
    with contextlib.suppress(OSError):
        service_url_path(config.state_dir).unlink()
    probe.release()  # the client takes it for real just below; a race is caught by runs_workers
    sock: socket.socket | None = None
    try:
        sock = _bind(host, port)
    except CannotListen as exc:
        if on_port_taken is None or exc.errno != errno.EADDRINUSE or port == 0:
            raise
        logger.warning(
            "cannot listen on %s:%d: address in use; syncing goes on without the API and dashboard, "
            "trying again every %g s",
            host,
            port,
            listen_retry_s,
        )
        on_port_taken(exc)
    else:
        port = sock.getsockname()[1]
    token = load_or_create_token(config.state_dir)
    client = client or client_from_config(config)
    client.close_push_timeout_s = 3.0  # a metadata push left pending is resent by the next start
    try:
        await client.init()
    except BaseException:  # a damaged queue (QueueDamaged), say: nothing started, nothing left open
        await client.close()
        if sock is not None:
            sock.close()
        raise
    if not client.runs_workers:
        await client.close()
        if sock is not None:
            sock.close()
        raise AlreadyServing(f"another process already runs the workers for {config.queue_db}")
    if on_running is not None:
        on_running()
    stop = stop or asyncio.Event()
    stats = QueueStats(config.queue_db)
    hub = EventHub(stats)
    facts = NasFacts(config, stats, interval_s=facts_interval_s)
    metrics = ServiceMetrics(config, stats, facts)
    hub.stored_listeners.append(metrics.on_stored)
    hub.progress_listeners.append(metrics.on_progress)
    client.add_listener(hub.on_client_event)
    base_url = _url(host, port)
    auth = Auth(token, _origins(host, port))
    watcher = _make_watcher(config, client)
    ctx = ServiceContext(
        config=config,
        client=client,
        stats=stats,
        hub=hub,
        auth=auth,
        metrics=metrics,
        facts=facts,
        base_url=base_url,
        watcher=watcher,
    )
    app = create_app(ctx, allowed_hosts=_allowed_hosts(host))
    # log_config=None: uvicorn's default dictConfig would close the central log's handler (the next
    # record reopens the file, which fails while descriptors run out) and print its own lines to
    # stderr; its warnings go to the root logger, so to the central log, as every other record.
    server = _Server(
        uvicorn.Config(
            app, log_config=None, log_level="warning", lifespan="off", timeout_graceful_shutdown=2, access_log=False
        )
    )

    def listening() -> None:
        _write_url(config, base_url)
        if on_ready is not None:
            on_ready(ServiceInfo(base_url, f"{base_url}/login?code={auth.new_login_code()}", ctx))

    http = _Http(server, host, port, sock, listen_retry_s, listening)
    loop = asyncio.get_running_loop()
    if install_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    background: list[asyncio.Task[Any]] = []
    serving: asyncio.Task[None] | None = None
    try:
        hub.start()
        background.append(asyncio.create_task(facts.run(), name="nas-facts"))
        if watcher is not None:
            background.append(asyncio.create_task(watcher.run(), name="completion-watcher"))
        serving = asyncio.create_task(http.run(), name="http")
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({stopping, serving}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if serving.done() and not http.announced:
            serving.result()  # startup failed: raise it
    finally:
        await _shutdown(server, hub, background, client, stats, serving, http)
        _remove_url(config, base_url)
        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        if http.sock is not None:
            http.sock.close()


def _lease_taken(lease: RunnerLease, config: Config) -> AlreadyServing:
    """The one line for a runner lease held by another process: says when that is not an exlab-sync one."""
    holder = lease.holder()
    if holder is not None and holder.is_exlab is False:
        whose = f", {user_name(holder.uid)}" if holder.uid is not None else ""
        return AlreadyServing(
            f"the runner lease {lease.path} is held by pid {holder.pid}{whose} (not an exlab-sync process: "
            f"another user's lock?): serve cannot run the workers for {config.queue_db} until it lets go"
        )
    return AlreadyServing(
        f"another process{f' (pid {holder.pid})' if holder else ''} already runs the workers for {config.queue_db}: "
        "is exlab-sync serve already running on this state_dir?"
    )


class _Http:
    """The HTTP side of ``serve``: the bound socket, or binds every ``retry_s`` until it gets one; then uvicorn.

    :attr:`announced` turns True once uvicorn has started and ``listening``
    has run (``service-url`` written, the address printed).
    """

    def __init__(
        self,
        server: _Server,
        host: str,
        port: int,
        sock: socket.socket | None,
        retry_s: float,
        listening: Callable[[], None],
    ):
        self.server = server
        self.host, self.port = host, port
        self.sock = sock
        self.retry_s = retry_s
        self.listening = listening
        self.announced = False

    @property
    def bound(self) -> bool:
        return self.sock is not None

    async def run(self) -> None:
        said = None
        while self.sock is None:
            await asyncio.sleep(self.retry_s)
            try:
                self.sock = _bind(self.host, self.port)
            except OSError as exc:  # any of them (out of descriptors for a moment): the workers go on
                reason = exc.strerror or str(exc)
                if exc.errno != errno.EADDRINUSE and reason != said:  # a new reason, said once
                    said = reason
                    logger.warning("cannot listen on %s:%d: %s; trying again", self.host, self.port, reason)
                continue
            logger.warning("listening on %s:%d now: the API and dashboard are back", self.host, self.port)
        announce = asyncio.create_task(self._announce(), name="http-started")
        try:
            await self.server.serve(sockets=[self.sock])
        finally:
            announce.cancel()
        if announce.done() and not announce.cancelled() and announce.exception() is not None:
            raise announce.exception()  # type: ignore[misc]

    async def _announce(self) -> None:
        while not self.server.started:
            await asyncio.sleep(0.01)
        try:
            self.listening()
        except BaseException:
            self.server.should_exit = True  # the caller sees it as a failed start
            raise
        self.announced = True


def _write_url(config: Config, base_url: str) -> None:
    line = ServiceAddress(base_url, os.getpid()).line()
    try:
        atomic_write_bytes(service_url_path(config.state_dir), line.encode(), new_mode=PRIVATE_FILE_MODE)
    except OSError as exc:  # the service works without it; only `exlab-sync login-url` needs it
        logger.warning("cannot write %s: %s", service_url_path(config.state_dir), exc)


def _remove_url(config: Config, base_url: str) -> None:
    path = service_url_path(config.state_dir)
    with contextlib.suppress(OSError):
        if ServiceAddress.read(config.state_dir) == ServiceAddress(base_url, os.getpid()):
            path.unlink()


async def _shutdown(
    server: _Server,
    hub: EventHub,
    background: list[asyncio.Task[Any]],
    client: NASSyncClient,
    stats: QueueStats,
    serving: asyncio.Task[None] | None,
    http: _Http,
) -> None:
    """Stop taking work and requests, stop the transfer at a safe point, leave the queue durable."""
    if serving is not None and not http.bound:
        serving.cancel()  # still waiting for the port: it must not bind now
    await hub.stop()  # ends every event stream, so uvicorn need not wait for them
    server.should_exit = True
    for task in background:
        task.cancel()
    for task in background:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    try:
        await asyncio.wait_for(client.close(), SHUTDOWN_BUDGET_S)
    except TimeoutError:
        logger.error(
            "the client did not close within %g s; the queue recovers the job at the next start", SHUTDOWN_BUDGET_S
        )
    if serving is not None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(serving, 3.0)
    stats.close()
