"""Fixtures for the service tests: a watcher lab with the real client, and the real app under uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from exlab_wizard.config import Config, parse_config
from exlab_wizard.service import CompletionWatcher
from exlab_wizard.service.server import ServiceInfo, run_service
from exlab_wizard.sync.nas_client import NASSyncClient, client_from_config
from tests.helpers import client_tls, ensure_user
from tests.lab import Lab, client_lab

EQ = "CONFOCAL_01"


@dataclass
class WatchLab:
    root: Path
    local_root: Path
    nas: Path
    state: Path
    signal: str = "sentinel_file"
    sync: dict[str, Any] = field(default_factory=dict)

    def config(self) -> Config:
        return parse_config(
            {
                "equipment": [
                    {
                        "id": EQ,
                        "local_root": str(self.local_root),
                        "completeness_signal": self.signal,
                        "transport": {
                            "type": "mount",
                            "mount_path": str(self.nas / EQ),
                        },
                    }
                ],
                "sync": {
                    "enabled": False,
                    "backoff_s": [0.01],
                    "scan_interval_s": 0.05,
                    **self.sync,
                },
                "state_dir": str(self.state),
            }
        )

    @property
    def equipment_root(self) -> Path:
        return self.local_root / EQ

    def run_dir(
        self,
        name: str = "Run_2026-01-01",
        project: str = "PROJ-1",
        *,
        creation: bool = True,
    ) -> Path:
        """An empty run folder (with its creation.json), as an instrument starts one."""
        parent = "TestRuns" if name.startswith("TestRun_") else "Runs"
        run = self.equipment_root / project / parent / name
        run.mkdir(parents=True)
        if creation:
            (run / ".exlab-wizard").mkdir()
            (run / ".exlab-wizard" / "creation.json").write_text(
                json.dumps(
                    {
                        "schema_version": "1.0",
                        "level": "run",
                        "run_kind": "test" if parent == "TestRuns" else "experimental",
                        "paths": {"local": str(run), "nas": None},
                        "sync_status": "pending",
                        "validation_overrides": [],
                    }
                )
            )
        return run

    def finished_run(
        self,
        name: str = "Run_2026-01-01",
        project: str = "PROJ-1",
        files: dict[str, bytes] | None = None,
    ) -> Path:
        run = self.run_dir(name, project)
        for rel, data in (files if files is not None else {"data.bin": b"x" * 100}).items():
            (run / rel).parent.mkdir(parents=True, exist_ok=True)
            (run / rel).write_bytes(data)
        (run / "acquisition_complete.flag").write_text("")
        return run


@pytest.fixture
def wlab(tmp_path: Path) -> WatchLab:
    (tmp_path / "nas" / EQ).mkdir(parents=True)
    (tmp_path / "nas" / EQ / ".exlab-nas").write_text("mounted\n")
    (tmp_path / "lab").mkdir()
    return WatchLab(tmp_path, tmp_path / "lab", tmp_path / "nas", tmp_path / "state")


class EnqueueSpy:
    """Counts the watcher's calls of the real ``client.enqueue`` (and passes them on)."""

    def __init__(self, client: NASSyncClient):
        self.calls: list[Path] = []
        real = client.enqueue

        async def enqueue(run_path: Path) -> Any:
            self.calls.append(Path(run_path))
            return await real(run_path)

        client.enqueue = enqueue  # type: ignore[method-assign]


@dataclass
class Running:
    client: NASSyncClient
    watcher: CompletionWatcher
    spy: EnqueueSpy
    events: list[dict[str, Any]]


async def start(config: Config) -> Running:
    client = client_from_config(config)
    await client.init()
    spy = EnqueueSpy(client)
    watcher = CompletionWatcher(config, client)
    events: list[dict[str, Any]] = []
    watcher.add_listener(events.append)
    return Running(client, watcher, spy, events)


async def stop(running: Running) -> None:
    running.watcher.close()
    await running.client.close()


@pytest.fixture
async def watching(wlab: WatchLab) -> AsyncIterator[Running]:
    running = await start(wlab.config())
    try:
        yield running
    finally:
        await stop(running)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return client_lab(tmp_path)


@dataclass
class Service:
    info: ServiceInfo
    config: Config
    lab: Lab
    http: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.info.base_url

    @property
    def token(self) -> str:
        return (self.config.state_dir / "api-token").read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return await self.http.post(path, json=body, headers=headers, **kwargs)

    async def wait_state(self, job_id: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
        async def poll() -> dict[str, Any]:
            while True:
                row = (await self.http.get(f"/api/jobs/{job_id}")).json()
                if row.get("state") == state:
                    return row
                await asyncio.sleep(0.05)

        return await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def serving(config: Config, lab: Lab) -> AsyncIterator[Service]:
    stop = asyncio.Event()
    ready: asyncio.Future[ServiceInfo] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_service(
            config,
            host="127.0.0.1",
            port=0,
            stop=stop,
            install_signals=False,
            on_ready=ready.set_result,
            facts_interval_s=0.1,
        )
    )
    done, _ = await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the start-up failure
    info = ready.result()
    async with httpx.AsyncClient(base_url=info.base_url, timeout=20, verify=client_tls()) as http:
        try:
            yield Service(info, config, lab, http)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)


@pytest.fixture
async def service(lab: Lab) -> AsyncIterator[Service]:
    async with serving(lab.config(), lab) as svc:
        yield svc


# --------------------------------------------------------------------------- another local user

OTHER_USER = "attacker"


@pytest.fixture(scope="session")
def other_user() -> Iterator[pwd.struct_passwd]:
    """A second local login (``attacker``): made with ``useradd`` when missing, left in place afterwards
    (the suite's workers start at once; one removing it would pull it from under another's test)."""
    assert os.geteuid() == 0, "running a process as another local user needs root"  # fails, never skips
    yield ensure_user(OTHER_USER, "-M", "-s", "/bin/sh")


@pytest.fixture
def shared_lab() -> Iterator[tuple[Lab, list[subprocess.Popen]]]:
    """A one-equipment lab in a folder other users may search (as a home folder is, 0755), under umask 022.

    Also a list for the processes a test starts: killed at the end.
    """
    root = Path(tempfile.mkdtemp(prefix="exlab-shared-", dir="/tmp"))
    root.chmod(0o755)
    old = os.umask(0o022)
    procs: list[subprocess.Popen] = []
    try:
        yield Lab.build(root, equipment=(EQ,)), procs
    finally:
        os.umask(old)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def as_user(user: pwd.struct_passwd, argv: list[str], **kw: Any) -> subprocess.Popen:
    """Start ``argv`` as ``user`` (no supplementary groups)."""
    return subprocess.Popen(argv, user=user.pw_uid, group=user.pw_gid, extra_groups=[], **kw)
