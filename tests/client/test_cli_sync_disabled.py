"""With ``sync.enabled: false`` nothing is sent to the NAS: ``jobs``/``status`` say so, ``enqueue --wait`` refuses."""

from __future__ import annotations

import json
import sqlite3

from tests.helpers import cli
from tests.lab import Lab

FILES = {"image_001.tif": b"\x00image" * 500, "sub/stack.raw": b"stack" * 600, "notes.txt": b"ok\n"}


def _cli(*args: str):
    return cli(*args, columns=500)


def _config(lab: Lab, enabled: bool) -> str:
    path = lab.root / f"config-{enabled}.yaml"
    path.write_text(
        json.dumps(
            {
                "equipment": [
                    {
                        "id": "CONFOCAL_01",
                        "local_root": str(lab.local_root),
                        "transport": {"type": "mount", "mount_path": str(lab.nas / "CONFOCAL_01")},
                    }
                ],
                "sync": {
                    "enabled": enabled,
                    "backoff_s": [0.01],
                    "scan_interval_s": 3600,
                    "audit_interval_s": 6 * 3600,
                },
                "state_dir": str(lab.state),
            }
        )
    )
    return str(path)


def test_a_metadata_push_owed_while_sync_is_disabled_is_named(lab: Lab) -> None:
    run = lab.make_run(files=FILES)
    done = _cli("enqueue", "--wait", str(run), "--config", _config(lab, True))
    assert done.returncode == 0, done.stdout + done.stderr
    # The push is owed again (as after a kill before it was sent); then the lab turns sync off.
    [db] = list(lab.state.rglob("*.db")) or list(lab.state.rglob("*.sqlite*"))
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE jobs SET metadata_push_due_at = updated_at")
    disabled = _config(lab, False)

    for shown in (_cli("jobs", "--config", disabled), _cli("status", str(run), "--config", disabled)):
        assert "metadata push pending" in shown.stdout and "sync.enabled is false" in shown.stdout, shown.stdout

    waited = _cli("enqueue", "--wait", str(lab.make_run(name="Run_2", files=FILES)), "--config", disabled)
    assert waited.returncode == 2 and "sync.enabled is false" in waited.stderr, waited.stdout + waited.stderr
