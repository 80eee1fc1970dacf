"""``restore`` of a CLEANED job names where the verified copy is.

It said "job ... is cleaned: nothing can be restored now" with no next step:
the local files are gone (deleted once verified), and the user was not told
that the NAS run folder holds them, nor where it is.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.sync.recovery import nas_copy_place
from tests.helpers import EXE
from tests.lab import EQ, Lab


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run([EXE, *args], capture_output=True, text=True, env={**env, "NO_COLOR": "1"}, timeout=120)


def test_restore_of_a_cleaned_job_names_the_nas_copy(tmp_path: Path) -> None:
    lab = Lab.build(tmp_path, equipment=(EQ,), nas_per_equipment=False)
    cleanup = {"enabled": True, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": True}
    config = str(lab.write_config(lab.config_data(sync={"backoff_s": [0.01]}, nas_cleanup=cleanup)))
    run = lab.make_run("Run_2026-01-01", {"image_001.tif": b"x" * 4000})
    assert _cli("enqueue", "--wait", str(run), "--config", config).returncode == 0
    cleaned = _cli("cleanup", "--config", config)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    job = json.loads(_cli("status", str(run), "--config", config, "--json").stdout)["job"]
    assert job["state"] == "cleaned", job

    out = _cli("restore", str(run), "--config", config)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"job {job['id']} is cleaned" in out.stderr
    assert f"the verified copy is on the NAS at {lab.nas_copy(run)}: copy the files back from there" in out.stderr


@pytest.mark.parametrize(
    ("transport", "remote_path", "place"),
    [
        ({"type": "mount", "mount_path": "/mnt/nas/C"}, "/mnt/nas/C/P/Runs/R", "/mnt/nas/C/P/Runs/R"),
        (
            {"type": "rsync_ssh", "ssh_target": "lab@nas01", "remote_path": "/srv/C", "ssh_key_path": "/k"},
            "/srv/C/P/Runs/R",
            "lab@nas01:/srv/C/P/Runs/R",
        ),
        (
            {"type": "rsync_ssh", "ssh_target": "lab@nas01", "remote_path": "/srv/C", "ssh_key_path": "/k",
             "ssh_port": 2222},
            "/srv/C/P/Runs/R",
            "lab@nas01:/srv/C/P/Runs/R (ssh port 2222)",
        ),
        ({"type": "rclone", "rclone_remote": "lab-nas", "rclone_remote_path": "C"}, "lab-nas:C/P/Runs/R",
         "lab-nas:C/P/Runs/R"),
    ],
    ids=["mount", "rsync_ssh", "rsync_ssh_port", "rclone"],
)  # fmt: skip
def test_nas_copy_place_by_transport(transport: dict, remote_path: str, place: str) -> None:
    config = parse_config({"equipment": [{"id": EQ, "local_root": "/data/lab", "transport": transport}]})
    assert nas_copy_place(config.equipment[0], remote_path) == place
    assert nas_copy_place(None, remote_path) == remote_path  # equipment no longer configured: the path as recorded
