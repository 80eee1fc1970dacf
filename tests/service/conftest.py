"""Fixtures for the completion watcher: a lab on tmp folders, the real client, the mount transport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.config import Config, parse_config
from exlab_wizard.service import CompletionWatcher
from exlab_wizard.sync.nas_client import NASSyncClient, client_from_config

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
        for rel, data in (
            files if files is not None else {"data.bin": b"x" * 100}
        ).items():
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
