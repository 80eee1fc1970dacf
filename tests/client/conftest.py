"""Fixtures for client tests: a lab with a mounted "NAS" folder and a config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.cache import CreationWriter
from exlab_wizard.config import Config, parse_config
from exlab_wizard.sync.nas_client import NASSyncClient
from exlab_wizard.validator import Validator


@dataclass
class Lab:
    root: Path
    local_root: Path
    nas: Path
    state: Path

    def config(self, **sync: Any) -> Config:
        data = {
            "equipment": [
                {
                    "id": "CONFOCAL_01",
                    "local_root": str(self.local_root),
                    "transport": {"type": "mount", "mount_path": str(self.nas / "CONFOCAL_01")},
                },
                {
                    "id": "FACS_02",
                    "local_root": str(self.local_root),
                    "transport": {"type": "mount", "mount_path": str(self.nas / "FACS_02")},
                },
            ],
            "sync": {"backoff_s": [0.01, 0.01], "scan_interval_s": 0.05, **sync},
            "state_dir": str(self.state),
        }
        return parse_config(data)

    def make_run(
        self, name: str = "Run_2026-01-01", files: dict[str, bytes] | None = None, *,
        equipment: str = "CONFOCAL_01", project: str = "PROJ-1", overrides: list[dict] | None = None,
        creation: bool = True,
    ) -> Path:
        kind = "test" if name.startswith("TestRun_") else "experimental"
        parent = "TestRuns" if kind == "test" else "Runs"
        run = self.local_root / equipment / project / parent / name
        run.mkdir(parents=True)
        if creation:
            meta = run / ".exlab-wizard"
            meta.mkdir()
            (meta / "creation.json").write_text(json.dumps({
                "schema_version": "1.0", "level": "run", "run_kind": kind,
                "paths": {"local": str(run), "nas": None}, "sync_status": "pending",
                "validation_overrides": overrides or [], "lab_note": {"keep": ["me"]},
            }))
        for rel, data in (files or {"data.bin": b"x" * 1000}).items():
            target = run / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return run

    def nas_copy(self, run: Path, equipment: str = "CONFOCAL_01") -> Path:
        return self.nas / equipment / run.relative_to(self.local_root / equipment)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    local = tmp_path / "lab"
    nas = tmp_path / "nas"
    for eq in ("CONFOCAL_01", "FACS_02"):
        (nas / eq).mkdir(parents=True)
        (nas / eq / ".exlab-nas").write_text("mounted\n")
    local.mkdir()
    return Lab(tmp_path, local, nas, tmp_path / "state")


def make_client(config: Config, **kwargs: Any) -> NASSyncClient:
    return NASSyncClient(
        config=config, queue_db=config.queue_db, validator=Validator(config.validator),
        cache_creation=CreationWriter(), **kwargs,
    )
