"""The console script end to end: demo, enqueue --wait, status, jobs, retry, verify, cleanup."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import cli, require_tool


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return cli(*args, cwd=cwd)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("demo") / "lab-demo"
    done = _cli("demo", "--dir", str(base))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return base


def test_demo_syncs_everything_but_the_blocked_run(demo: Path) -> None:
    nas = demo / "nas"
    copies = sorted(p.parent.parent for p in nas.rglob(".exlab-wizard/checksums.sha256"))
    assert len(copies) == 4
    sha256sum = require_tool("sha256sum")
    for copy in copies:
        assert subprocess.run([sha256sum, "-c", "--quiet", ".exlab-wizard/checksums.sha256"], cwd=copy).returncode == 0
    assert not (nas / "CONFOCAL_01" / "PROJ-0042" / "Runs" / "Run_2026-11-03_1410").exists()
    jobs = _cli("jobs", "--config", str(demo / "config.yaml"))
    assert jobs.returncode == 0 and jobs.stdout.count("\tverified\t") == 4  # not a terminal: tab-separated lines


def test_demo_refuses_a_non_empty_folder(demo: Path) -> None:
    again = _cli("demo", "--dir", str(demo))
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr


def test_status_verify_and_cleanup_dry_run(demo: Path) -> None:
    config = str(demo / "config.yaml")
    run = demo / "lab" / "FACS_02" / "PROJ-0107" / "Runs" / "Run_2026-11-01_1100"
    status = _cli("status", str(run), "--config", config)
    assert status.returncode == 0 and "verified" in status.stdout and "awaiting_verify" in status.stdout
    verify = _cli("verify", str(run), "--config", config)
    assert verify.returncode == 0 and "OK" in verify.stdout
    target = run / "plate_layout.csv"
    st = os.stat(target)
    data = bytearray(target.read_bytes())
    data[0] ^= 1
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    bad = _cli("verify", str(run), "--config", config)
    assert bad.returncode == 1 and "plate_layout.csv" in bad.stdout
    dry = _cli("cleanup", "--dry-run", "--config", config)
    assert dry.returncode == 0 and "waiting: 1 of 2 verify passes" in dry.stdout
    assert "nas_cleanup.enabled is false" in dry.stdout


def test_enqueue_wait_blocked_and_retry(demo: Path, tmp_path: Path) -> None:
    config = str(demo / "config.yaml")
    blocked = demo / "lab" / "CONFOCAL_01" / "PROJ-0042" / "Runs" / "Run_2026-11-03_1410"
    out = _cli("enqueue", str(blocked), "--config", config)
    assert out.returncode == 1 and "blocked" in out.stdout and "unresolved_placeholder_token" in out.stdout
    fresh = demo / "lab" / "FACS_02" / "PROJ-0107" / "Runs" / "Run_2026-11-05_0900"
    fresh.mkdir(parents=True)
    (fresh / "x.fcs").write_bytes(b"\x00" * 1000)
    out = _cli("enqueue", "--wait", str(fresh), "--config", config)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verified" in out.stdout
    retry = _cli("retry", "0000", "--config", config)
    assert retry.returncode == 2 and "no job matches" in retry.stderr


def test_usage_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("equipment:\n  - id: lower\n    local_root: /x\n    transport: {type: mount, mount_path: /y}\n")
    for args in (
        ["jobs", "--config", str(bad)],
        ["status", "--config", str(tmp_path / "missing.yaml")],
        ["enqueue", str(tmp_path / "nope"), "--config", str(bad)],
    ):
        out = _cli(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = _cli("jobs", "--config", str(bad))
    assert "equipment[0].id" in out.stderr
