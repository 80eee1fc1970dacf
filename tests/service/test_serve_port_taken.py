"""A taken HTTP port no longer stops the syncing: ``serve`` runs the workers and binds again later.

``serve`` bound its port before starting the workers and exited 2 when it was
taken; any local user could bind 127.0.0.1:8765 first (systemd's 10 s
``RestartSec`` gap, a reboot) and the unit never restarted it, so no run was
synced or cleaned again. Now a port in use (``EADDRINUSE`` only) is one
warning line: the workers, watcher, audit and reaper start, the bind is tried
again every 30 s, and once it binds the usual lines are printed and
``service-url`` written. SIGTERM stops it in either phase.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import subprocess
import time
from pathlib import Path

import httpx

from exlab_wizard.config import load_config
from exlab_wizard.service.server import CannotListen, ServiceInfo, run_service, service_url_path
from exlab_wizard.sync.queue import JobQueue
from tests.fixtures.sshd import free_port
from tests.helpers import cli
from tests.lab import Lab
from tests.service.conftest import as_user
from tests.service.test_serve_process import EXE, write_config


def _state(lab: Lab, run: Path) -> str | None:
    with JobQueue(lab.state / "queue.db") as queue:
        row = queue.job_with_events(str(run), limit=5)
    return row.state.value if row else None


def test_another_local_user_taking_the_port_does_not_stop_syncing(other_user: pwd.struct_passwd, shared_lab) -> None:
    lab, procs = shared_lab
    config = write_config(lab)
    run = lab.make_run()
    queued = cli("enqueue", "--config", str(config), str(run))
    assert queued.returncode == 0, queued.stderr

    port = free_port()
    squat = f"import socket,time;s=socket.socket();s.bind(('127.0.0.1',{port}));s.listen();print('ok',flush=True);time.sleep(120)"
    squatter = as_user(other_user, ["/usr/bin/python3", "-c", squat], stdout=subprocess.PIPE)
    procs.append(squatter)
    assert squatter.stdout is not None and squatter.stdout.readline().strip() == b"ok"

    proc = subprocess.Popen(
        [EXE, "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    deadline = time.monotonic() + 20
    state = None
    while time.monotonic() < deadline:
        state = _state(lab, run)
        if state == "verified" or proc.poll() is not None:
            break
        time.sleep(0.2)
    code = proc.poll()
    stderr = proc.stderr.read() if code is not None and proc.stderr else ""
    assert state == "verified", (
        f"{other_user.pw_name} listens on 127.0.0.1:{port} first; serve exits {code} ({stderr.strip()}) "
        f"and the queued run stays {state}: no worker runs (exit 2 is never restarted by the unit)"
    )
    assert not service_url_path(lab.state).exists()  # nothing listens for login-url to find

    started = time.monotonic()
    proc.terminate()  # still waiting for the port: SIGTERM stops it as ever
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read() == ""
    assert proc.stderr.read().strip() == (
        f"warning: cannot listen on 127.0.0.1:{port}: address in use; syncing goes on without the API and "
        "dashboard, trying again every 30 s"
    )
    log = (lab.state / "exlab-sync.log").read_text()
    assert f"cannot listen on 127.0.0.1:{port}: address in use; syncing goes on" in log


def test_serve_listens_once_the_port_is_free_and_synced_meanwhile(tmp_path: Path) -> None:
    lab = Lab.build(tmp_path, equipment=("CONFOCAL_01",))
    config = load_config(write_config(lab))
    run = lab.make_run()
    assert cli("enqueue", "--config", str(lab.root / "config.yaml"), str(run)).returncode == 0
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    told: list[CannotListen] = []
    ready: list[ServiceInfo] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        service = asyncio.create_task(
            run_service(
                config,
                port=port,
                stop=stop,
                install_signals=False,
                on_ready=ready.append,
                on_port_taken=told.append,
                listen_retry_s=0.2,
            )
        )
        try:
            for _ in range(200):
                if _state(lab, run) == "verified":
                    break
                assert not service.done(), service.exception()
                await asyncio.sleep(0.1)
            assert _state(lab, run) == "verified"  # synced without the HTTP side
            assert [exc.strerror for exc in told] == ["Address already in use"] and not ready
            assert not service_url_path(lab.state).exists()

            taken.close()  # the port is free: the next try binds it
            for _ in range(100):
                if ready:
                    break
                await asyncio.sleep(0.05)
            assert [info.base_url for info in ready] == [f"http://127.0.0.1:{port}"]
            assert service_url_path(lab.state).read_text() == f"{ready[0].base_url} {os.getpid()}\n"
            assert oct(service_url_path(lab.state).stat().st_mode & 0o777) == "0o600"
            async with httpx.AsyncClient(base_url=ready[0].base_url, timeout=10) as http:
                jobs = (await http.get("/api/jobs")).json()["jobs"]
            assert [job["state"] for job in jobs] == ["verified"]
        finally:
            stop.set()
            await asyncio.wait_for(service, 10)
        assert not service_url_path(lab.state).exists()

    try:
        asyncio.run(scenario())
    finally:
        taken.close()


def test_a_stop_while_waiting_for_the_port_ends_the_service(tmp_path: Path) -> None:
    lab = Lab.build(tmp_path, equipment=("CONFOCAL_01",))
    config = load_config(write_config(lab))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()

        async def scenario() -> float:
            stop = asyncio.Event()
            told: list[CannotListen] = []
            service = asyncio.create_task(
                run_service(
                    config,
                    port=taken.getsockname()[1],
                    stop=stop,
                    install_signals=False,
                    on_port_taken=told.append,
                )
            )
            while not told:
                assert not service.done(), service.exception()
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            started = time.monotonic()
            stop.set()  # in the 30 s between two tries
            await asyncio.wait_for(service, 10)
            return time.monotonic() - started

        assert asyncio.run(scenario()) < 2.0
