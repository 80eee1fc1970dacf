"""``exlab-sync cleanup [--dry-run]`` prints hostile file names escaped, as plain text.

A name from a run's manifest (here: with a terminal escape sequence, a BEL,
rich markup and a byte that is not UTF-8) reaches the cleanup table through
the reaper's reason. It must never emit control sequences to the terminal,
never be read as rich markup, and never crash the output nor the recording
of the reason (queue and equipment log).
"""

from __future__ import annotations

import json
import os
import subprocess

from exlab_wizard.config import load_config
from tests.helpers import EXE, Clock
from tests.lab import Lab, running, synced

HOSTILE = os.fsdecode(b"\x1b]0;pwned\x07\x1b[31mred[bold]markup[/bold]\xff.bin")
ESCAPED = "\\x1b]0;pwned\\x07\\x1b[31mred[bold]markup[/bold]\\xff.bin"
OVERRIDE = {
    "id": "0b6f9c1e-2c7a-4a64-9a57-6d0f2e6f1a01",
    "problem_class": "illegal_filesystem_character",
    "operator": "asmith",
    "recorded_at": "2026-01-01T00:00:00Z",
    "expires_at": None,
    "reason": "the instrument writes these names",
    "revoked": False,
}


async def test_cleanup_table_escapes_names_from_the_manifest(lab: Lab) -> None:
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
                "sync": {"backoff_s": [0.01], "scan_interval_s": 3600},
                "nas_cleanup": {"enabled": True, "min_verify_passes": 1, "min_age_hours": 0},
                "state_dir": str(lab.state),
            }
        )
    )
    run = lab.make_run("Run_x", files={HOSTILE: b"a" * 100, "ok.bin": b"b" * 100}, overrides=[OVERRIDE])
    async with running(load_config(config_file), Clock()) as client:
        await synced(client, run)
    os.unlink(os.path.join(os.fsencode(run), os.fsencode(HOSTILE)))  # the reason will name it

    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}
    for args in (("--dry-run",), ()):
        result = subprocess.run(
            [EXE, "cleanup", *args, "--config", str(config_file)], capture_output=True, env=env, timeout=120
        )
        out = result.stdout + result.stderr
        assert b"Traceback" not in out
        assert not any(byte in out for byte in (b"\x1b", b"\x07", b"\xff")), out
        text = out.decode("utf-8")
        assert ESCAPED in text  # escaped, and the markup shown literally
        assert "cleanup error" not in text  # the reason was recorded, not lost in a crash
        assert result.returncode == 1, text  # a missing local file is a problem found
    # The job's recorded reason and events show the name the same way.
    for args in (("jobs",), ("status", str(run))):
        result = subprocess.run([EXE, *args, "--config", str(config_file)], capture_output=True, env=env, timeout=120)
        out = result.stdout + result.stderr
        assert b"Traceback" not in out and not any(byte in out for byte in (b"\x1b", b"\x07", b"\xff")), out
        assert b"[31mred[bold]markup[/bold]" in out
