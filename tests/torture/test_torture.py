"""The short torture round of the suite, and the harness's findings reproduced small.

The short round: mount and rsync_ssh, ten SIGKILLs, every other fault once;
the two rounds are played at the same time (about 35 s on two cores, 70 s one
after the other). The short rclone round (rclone sftp to the loopback sshd): two
SIGKILLs, the sshd restart and the damage faults, about 30 s (a round with every
fault takes 60-100 s: each rclone call opens its own sftp session). The long run is
``python -m tests.torture --rounds 20 --kills 100 --report docs/reliability.md``;
``--transports mount,rsync_ssh,rclone`` adds rclone rounds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require_tool
from tests.lab import Lab
from tests.torture.harness import OTHER_FAULTS, plan_rounds, report, torture


def test_short_round_keeps_every_file_and_ends_every_job() -> None:
    for tool in ("mkfs.ext4", "mount", "chattr", "sshd", "rsync"):
        require_tool(tool)
    lines: list[str] = []
    tally = torture(rounds=2, kills=10, seed=7, runs=3, recovery_s=60, parallel=2, log=lines.append)
    print(report(tally, command="pytest tests/torture", seed=7))
    log = "\n".join(lines)
    kinds = {f.kind for f in tally.faults}
    assert sum(f.kind == "sigkill" for f in tally.faults) == 10
    assert tally.restarts == 10
    assert {
        "sshd_restart",
        "share_unmounted",
        "nas_full",
        "nas_read_only",
        "creation_lock_held",
        "local_flip_after_verify",
        "local_edit_after_verify",
        "nas_flip_before_verify",
    } <= kinds
    assert kinds & {"nas_file_deleted", "nas_run_folder_deleted"}
    assert len(OTHER_FAULTS) == 9
    assert tally.files_checked > 0
    assert tally.losses == [], log
    assert tally.nas_damage == [], log
    assert tally.foreign_overwritten == [], log
    assert tally.leftovers == [], log
    assert tally.stuck == [], log
    assert tally.outlived == [], log
    assert tally.metadata_temps == [], log  # fixed: the test below
    # Not asserted, reported: tally.late_flip (a NAS flip after verification, see docs/reliability.md).


def test_a_short_rclone_round_keeps_every_file_and_ends_every_job() -> None:
    for tool in ("mkfs.ext4", "mount", "chattr", "sshd"):
        require_tool(tool)
    lines: list[str] = []
    faults = ["sshd_restart", "nas_flip", "local_flip"]
    tally = torture(
        rounds=1, kills=2, seed=7, runs=2, transports=("rclone",), faults=faults, recovery_s=60, log=lines.append
    )
    print(report(tally, command="pytest tests/torture", seed=7))
    log = "\n".join(lines)
    assert tally.rounds_by_transport == {"rclone": 1}
    assert sum(f.kind == "sigkill" for f in tally.faults) == 2
    assert tally.restarts == 2
    assert "sshd_restart" in {f.kind for f in tally.faults}
    assert tally.files_checked > 0
    assert tally.recovered_rounds == 1, log
    assert tally.losses == [], log
    assert tally.nas_damage == [], log
    assert tally.foreign_overwritten == [], log
    assert tally.leftovers == [], log
    assert tally.stuck == [], log
    assert tally.outlived == [], log
    assert tally.metadata_temps == [], log


def test_rclone_rounds_get_the_sshd_restart_and_every_nas_fault_but_the_marker() -> None:
    plans = plan_rounds(3, 7, ("mount", "rsync_ssh", "rclone"))
    assert [t for t, _k, _f in plans] == ["mount", "rsync_ssh", "rclone"]
    assert [k for _t, k, _f in plans] == [3, 2, 2]
    by_transport = {t: f for t, _k, f in plans}
    assert by_transport["rclone"] == by_transport["rsync_ssh"]
    assert "sshd_restart" in by_transport["rclone"]
    assert "share_unmounted" not in by_transport["rclone"]
    assert set(OTHER_FAULTS) - set(by_transport["rclone"]) == {"share_unmounted"}
    with pytest.raises(ValueError, match="rclone_s3"):
        plan_rounds(1, 1, ("rclone_s3",))


def test_a_temp_file_left_by_a_killed_metadata_write_is_not_kept_nor_pushed(tmp_path: Path) -> None:
    """Found by the torture harness: a SIGKILL inside atomic_write_bytes left its temp for good, and pushed it."""
    lab = Lab.build(tmp_path, equipment=("CONFOCAL_01",))
    run = lab.make_run()
    stale = run / ".exlab-wizard" / ".creation.json.0123456789ab.tmp"
    stale.write_text('{"half written": ')  # what a SIGKILL between the create and the rename leaves
    config = lab.write_config(lab.config_data(sync={"backoff_s": [0.1], "scan_interval_s": 0.2}))
    exe = str(Path(sys.executable).with_name("exlab-sync"))
    done = subprocess.run(
        [exe, "enqueue", str(run), "--wait", "--timeout", "60", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (lab.nas_copy(run) / ".exlab-wizard" / "checksums.sha256").exists()  # synced and pushed
    assert not (lab.nas_copy(run) / ".exlab-wizard" / stale.name).exists()
    assert not stale.exists()
