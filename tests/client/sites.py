"""One lab, two real transports: a mounted "NAS" folder, or rsync_ssh to the loopback sshd.

``site`` (a fixture parametrized over ``mount`` and ``rsync_ssh``) gives a
config (as a :class:`Config` or a file for the console script), runs with
their ``.exlab-wizard/`` and the NAS copy of a run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.config import Config, parse_config
from exlab_wizard.sync.queue import JobQueue, SyncJobRow

__all__ = ["EQ", "EXE", "Site", "cli", "site"]

EQ = "CONFOCAL_01"
EXE = str(Path(sys.executable).parent / "exlab-sync")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The installed console script (the worktree's src wins through PYTHONPATH)."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=timeout)


@dataclass
class Site:
    kind: str
    local_root: Path
    nas_root: Path  # where the transport puts this equipment's runs
    state: Path
    transport: dict[str, Any]

    def config_data(self, *, sync: dict[str, Any] | None = None, cleanup: dict[str, Any] | None = None,
                    bandwidth: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        transport = dict(self.transport)
        if bandwidth is not None:
            transport["bandwidth"] = bandwidth
        data: dict[str, Any] = {
            "equipment": [{"id": EQ, "local_root": str(self.local_root), "transport": transport}],
            "sync": {"backoff_s": [0.01, 0.01], "scan_interval_s": 30, **(sync or {})},
            "state_dir": str(self.state),
        }
        if cleanup is not None:
            data["nas_cleanup"] = cleanup
        return data

    def config(self, **kwargs: Any) -> Config:
        return parse_config(self.config_data(**kwargs))

    def write_config(self, **kwargs: Any) -> Path:
        path = self.state.parent / f"config-{len(list(self.state.parent.glob('config-*.yaml')))}.yaml"
        path.write_text(json.dumps(self.config_data(**kwargs)))  # JSON is YAML
        return path

    def make_run(self, name: str = "Run_2026-01-01", files: dict[str, bytes] | None = None,
                 meta: dict[str, bytes] | None = None) -> Path:  # fmt: skip
        """A run with its creation.json; ``meta``: more files in its ``.exlab-wizard/``."""
        run = self.local_root / EQ / "PROJ-1" / "Runs" / name
        (run / ".exlab-wizard").mkdir(parents=True)
        (run / ".exlab-wizard" / "creation.json").write_text(json.dumps({
            "schema_version": "1.0", "level": "run", "run_kind": "experimental",
            "paths": {"local": str(run), "nas": None}, "sync_status": "pending", "validation_overrides": [],
        }))  # fmt: skip
        contents = {**(files or {"data.bin": b"x" * 1000}), **{f".exlab-wizard/{k}": v for k, v in (meta or {}).items()}}
        for rel, data in contents.items():
            target = run / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return run

    def nas_copy(self, run: Path) -> Path:
        return self.nas_root / run.relative_to(self.local_root / EQ)

    def equipment_log(self) -> Path:
        return self.local_root / EQ / ".exlab-wizard" / f"wizard.{socket.gethostname()}.log"

    def log_lines(self, event: str) -> list[str]:
        path = self.equipment_log()
        if not path.exists():
            return []
        return [line for line in path.read_text().splitlines() if f" {event} " in line or line.endswith(f" {event}")]

    def job(self, run: Path) -> SyncJobRow:
        with JobQueue(self.state / "queue.db") as queue:
            row = queue.job_with_events(str(run), limit=500)
        assert row is not None
        return row


@pytest.fixture(params=["mount", "rsync_ssh"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    local = tmp_path / "lab"
    local.mkdir()
    if request.param == "mount":
        nas = tmp_path / "nas" / EQ
        nas.mkdir(parents=True)
        (nas / ".exlab-nas").write_text("mounted\n")
        transport: dict[str, Any] = {"type": "mount", "mount_path": str(nas)}
    else:
        server = request.getfixturevalue("sshd")
        nas = request.getfixturevalue("remote_dir") / EQ
        transport = {
            "type": "rsync_ssh", "ssh_target": "exlabt_rw@127.0.0.1", "ssh_key_path": str(server.env.client_key),
            "ssh_port": server.port, "remote_path": str(nas), "ssh_known_hosts": str(server.known_hosts),
        }
    return Site(request.param, local, nas, tmp_path / "state", transport)
