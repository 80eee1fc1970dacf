"""``exlab-sync retry`` / ``enqueue`` refuse local damage; ``restore`` and ``retry --accept-local``,
as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.helpers import EXE, flip_byte_keep_stat
from tests.lab import Lab

FILES = {"image_001.tif": os.urandom(4000), "sub/stack.raw": os.urandom(3000), "notes.txt": b"ok\n"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "500", "NO_COLOR": "1"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=120)


def _data(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".exlab-wizard" not in p.relative_to(root).parts
    }


def _job_id(config: str, run: Path) -> str:
    status = _cli("status", str(run), "--config", config, "--json")
    return json.loads(status.stdout)["job"]["id"]


def test_retry_refused_then_restore_then_accept_local(lab: Lab) -> None:
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
                "nas_cleanup": {"enabled": True, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": True},
                "state_dir": str(lab.state),
            }
        )
    )
    config = str(config_file)
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    done = _cli("enqueue", "--wait", str(run), "--config", config)
    assert done.returncode == 0, done.stdout + done.stderr
    job = _job_id(config, run)

    flip_byte_keep_stat(run / "sub" / "stack.raw", 5)
    damaged = (run / "sub" / "stack.raw").read_bytes()
    cleanup = _cli("cleanup", "--config", config)
    assert cleanup.returncode == 1 and "local damage: sub/stack.raw" in cleanup.stdout, cleanup.stdout

    for refused in (_cli("retry", job[:8], "--config", config), _cli("enqueue", str(run), "--config", config)):
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "Traceback" not in refused.stderr and "sub/stack.raw" in refused.stderr
        assert "exlab-sync restore" in refused.stderr and "--accept-local" in refused.stderr
    assert _data(nas) == FILES

    restored = _cli("restore", str(run), "--config", config)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "restored sub/stack.raw" in restored.stdout and "is verified" in restored.stdout
    assert _data(run) == FILES
    again = _cli("restore", str(run), "--config", config)
    assert again.returncode == 0 and "nothing to restore" in again.stdout

    flip_byte_keep_stat(run / "sub" / "stack.raw", 5)
    assert _cli("cleanup", "--config", config).returncode == 1
    accepted = _cli("retry", "--accept-local", job, "--config", config)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert ".exlab-wizard/previous/" in accepted.stdout
    settle = _cli("enqueue", "--wait", str(run), "--config", config)  # runs the workers: the job is queued
    assert settle.returncode == 0, settle.stdout + settle.stderr
    assert _data(nas) == {**FILES, "sub/stack.raw": damaged}
    [kept] = list((nas / ".exlab-wizard" / "previous").glob("*/sub/stack.raw"))
    assert kept.read_bytes() == FILES["sub/stack.raw"]

    unsynced = lab.make_run("Run_2026-01-02", files={"a.bin": b"a"})
    missing = _cli("restore", str(unsynced), "--config", config)
    assert missing.returncode == 2 and "has no sync job" in missing.stderr and "Traceback" not in missing.stderr
