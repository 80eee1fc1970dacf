"""``exlab-sync cleanup [--dry-run]`` through the console script, on runs synced by the real client.

The runs are synced and audited by a client whose clock is set back (30 h, 3 h
and 1 h ago), so the CLI, running on the real clock, finds one run old enough
to clean and two that wait for different reasons.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from exlab_wizard.config import load_config
from tests.helpers import Clock, cli
from tests.helpers import table_row as _row
from tests.lab import FILES, Lab, running, synced


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, columns=500)


async def test_cleanup_dry_run_lists_what_would_be_freed_and_why_others_wait_then_cleans(lab: Lab) -> None:
    config_file = lab.root / "config.yaml"
    config_file.write_text(
        json.dumps(
            {
                "equipment": [
                    {
                        "id": "CONFOCAL_01",
                        "local_root": str(lab.local_root),
                        "transport": {"type": "mount", "mount_path": str(lab.nas / "CONFOCAL_01")},
                    }
                ],
                "sync": {"backoff_s": [0.01], "scan_interval_s": 3600, "audit_interval_s": 6 * 3600},
                "nas_cleanup": {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
                "state_dir": str(lab.state),
            }
        )
    )
    cfg = load_config(config_file)
    old = lab.make_run("Run_old", files=FILES)
    young = lab.make_run("Run_young", files=FILES)
    once = lab.make_run("Run_once", files=FILES)
    clock = Clock()
    clock.advance(-30)
    async with running(cfg, clock) as client:
        await synced(client, old)
        clock.advance(6)
        await client.audit_once()  # old: 2 passes
        clock.advance(21)
        await synced(client, young)
        clock.advance(1)
        await client.audit_once()  # old: 3 passes, young: 2 passes, verified 3 h ago
        clock.advance(1)
        await synced(client, once)  # 1 pass

    dry = _cli("cleanup", "--dry-run", "--config", str(config_file))
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "would_delete 3 7.8 KiB would free 3 files, 8012 bytes" in _row(dry.stdout, old.relative_to(lab.local_root))
    assert "waiting waiting: 3 h of 24 h" in _row(dry.stdout, young.relative_to(lab.local_root))
    assert "waiting waiting: 1 of 2 verify passes" in _row(dry.stdout, once.relative_to(lab.local_root))
    assert "would free 7.8 KiB" in dry.stdout
    for run in (old, young, once):
        assert all((run / rel).read_bytes() == data for rel, data in FILES.items())

    done = _cli("cleanup", "--config", str(config_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deleted 3 7.8 KiB cleaned: 3 files, 8012 bytes freed" in _row(done.stdout, old.relative_to(lab.local_root))
    assert "waiting waiting: 3 h of 24 h" in _row(done.stdout, young.relative_to(lab.local_root))
    assert "freed 7.8 KiB" in done.stdout
    assert not any((old / rel).exists() for rel in FILES)
    for run in (young, once):
        assert all((run / rel).read_bytes() == data for rel, data in FILES.items())
    status = _cli("status", str(old), "--config", str(config_file))
    assert status.returncode == 0 and "cleaned" in status.stdout, status.stdout

    again = _cli("cleanup", "--dry-run", "--config", str(config_file))
    assert again.returncode == 0 and str(old) not in again.stdout
    assert "would free 0 B" in again.stdout


def test_cleanup_without_verified_jobs_is_a_quiet_no_op(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        json.dumps(
            {
                "equipment": [
                    {
                        "id": "CONFOCAL_01",
                        "local_root": str(tmp_path / "lab"),
                        "transport": {"type": "mount", "mount_path": str(tmp_path / "nas")},
                    }
                ],
                "state_dir": str(tmp_path / "state"),
            }
        )
    )
    done = _cli("cleanup", "--config", str(config_file))
    assert done.returncode == 0 and "nothing to clean: no verified jobs" in done.stdout, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
