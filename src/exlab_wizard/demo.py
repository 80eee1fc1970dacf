"""A sample lab for ``exlab-sync demo``: two instruments, several runs, a local "NAS".

``build_demo_lab(base)`` writes, under ``base``:

    lab/                      the acquisition PC's local root
      CONFOCAL_01/PROJ-0042/Runs/Run_2026-11-02_0930/ ...
      FACS_02/PROJ-0107/Runs/Run_.../ ...
      FACS_02/PROJ-0107/TestRuns/TestRun_.../ ...
      CONFOCAL_01/PROJ-0042/Runs/Run_2026-11-03_1410/   <- blocked by the gate
    nas/CONFOCAL_01/.exlab-nas, nas/FACS_02/.exlab-nas   the "mounted" share
    config.yaml               mount transport, no bandwidth limit
    state/                    queue database and API token

Data is generated deterministically (a seeded byte pattern), so two demos
produce the same checksums.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from exlab_wizard.fileio import METADATA_DIR

__all__ = ["DemoLab", "build_demo_lab"]

_MIB = 1 << 20


@dataclass(frozen=True)
class DemoLab:
    base: Path
    local_root: Path
    nas_root: Path
    config_path: Path
    runs: tuple[Path, ...]
    blocked_run: Path


def _creation(run: Path, run_kind: str, operator: str) -> dict:
    return {
        "schema_version": "1.0",
        "level": "run",
        "run_kind": run_kind,
        "paths": {"local": str(run), "nas": None},
        "sync_status": "pending",
        "validation_overrides": [],
        "created_by": "exlab-wizard demo",
        "operator": operator,
    }


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _payload(rng: random.Random, size: int) -> bytes:
    block = rng.randbytes(min(size, _MIB))
    reps, rest = divmod(size, len(block)) if block else (0, 0)
    return block * reps + block[:rest]


def _make_run(run: Path, run_kind: str, files: dict[str, int], rng: random.Random, operator: str) -> Path:
    meta = run / METADATA_DIR
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "creation.json").write_text(json.dumps(_creation(run, run_kind, operator), indent=2) + "\n")
    for rel, size in files.items():
        _write(run / rel, _payload(rng, size))
    return run


def build_demo_lab(base: Path, *, scale: float = 1.0) -> DemoLab:
    """Create the sample lab under ``base`` (which must be empty or absent)."""
    base = Path(base).resolve()
    base.mkdir(parents=True, exist_ok=True)
    if any(p for p in base.iterdir()):
        raise FileExistsError(f"{base} is not empty; give an empty or new folder")
    rng = random.Random(20261128)
    local = base / "lab"
    nas = base / "nas"
    mib = max(1, int(_MIB * scale))

    confocal = local / "CONFOCAL_01" / "PROJ-0042"
    facs = local / "FACS_02" / "PROJ-0107"
    runs = [
        _make_run(
            confocal / "Runs" / "Run_2026-11-02_0930",
            "experimental",
            {
                "stack_z000-z063.tif": 24 * mib,
                "stack_z064-z127.tif": 24 * mib,
                "metadata/acquisition.json": 2048,
                "metadata/notes.md": 512,
                "acquisition_complete.flag": 0,
            },
            rng,
            "asmith",
        ),
        _make_run(
            confocal / "Runs" / "Run_2026-11-02_1512",
            "experimental",
            {
                "tile_scan/tile_0001.tif": 6 * mib,
                "tile_scan/tile_0002.tif": 6 * mib,
                "tile_scan/tile_0003.tif": 6 * mib,
                "acquisition_complete.flag": 0,
            },
            rng,
            "asmith",
        ),
        _make_run(
            facs / "Runs" / "Run_2026-11-01_1100",
            "experimental",
            {
                **{f"fcs/sample_{i:02d}.fcs": 768 * 1024 for i in range(1, 13)},
                "plate_layout.csv": 4096,
                "acquisition_complete.flag": 0,
            },
            rng,
            "jdoe",
        ),
        _make_run(
            facs / "TestRuns" / "TestRun_2026-11-01_0815",
            "test",
            {
                "fcs/beads.fcs": 2 * mib,
                "qc_report.txt": 1024,
            },
            rng,
            "jdoe",
        ),
    ]
    blocked = _make_run(
        confocal / "Runs" / "Run_2026-11-03_1410",
        "experimental",
        {
            "<sample_id>_image.tif": 3 * mib,  # an unresolved template placeholder
            "settings.txt": 256,
            "acquisition_complete.flag": 0,  # finished: `demo --serve` shows it as blocked
        },
        rng,
        "asmith",
    )

    for equipment in ("CONFOCAL_01", "FACS_02"):
        share = nas / equipment
        share.mkdir(parents=True, exist_ok=True)
        (share / ".exlab-nas").write_text("demo share: this marker proves the NAS is mounted\n")

    state = base / "state"
    config = base / "config.yaml"
    config.write_text(
        f"""# exlab-sync demo configuration (mount transport, no servers needed)
equipment:
  - id: CONFOCAL_01
    label: Confocal Microscope 1
    local_root: {local}
    nas_root: {nas / "CONFOCAL_01"}
    completeness_signal: sentinel_file
    transport:
      type: mount
      mount_path: {nas / "CONFOCAL_01"}
  - id: FACS_02
    label: Flow Cytometer 2
    local_root: {local}
    nas_root: {nas / "FACS_02"}
    completeness_signal: none
    transport:
      type: mount
      mount_path: {nas / "FACS_02"}
nas_cleanup:
  enabled: false
sync:
  max_parallel_jobs: 2
  backoff_s: [1, 2, 4]
  scan_interval_s: 2
state_dir: {state}
"""
    )
    return DemoLab(base, local, nas, config, tuple(runs), blocked)
