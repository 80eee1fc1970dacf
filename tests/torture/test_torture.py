"""The short torture round of the suite: mount and rsync_ssh, ten SIGKILLs, every other fault once.

The long run is ``python -m tests.torture --rounds 20 --kills 100 --report docs/reliability.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import require_tool
from tests.torture.harness import OTHER_FAULTS, report, torture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts, chattr and the sshd users need root")


def test_short_round_keeps_every_file_and_ends_every_job(tmp_path: Path) -> None:
    for tool in ("mkfs.ext4", "mount", "chattr", "sshd", "rsync"):
        require_tool(tool)
    lines: list[str] = []
    tally = torture(rounds=2, kills=10, seed=7, runs=3, workdir=tmp_path / "torture", recovery_s=60, log=lines.append)
    text = report(tally, command="pytest tests/torture", seed=7)
    print(text)
    kinds = {f.kind for f in tally.faults}
    assert sum(f.kind == "sigkill" for f in tally.faults) == 10
    assert tally.restarts == 10
    assert {"sshd_restart", "share_unmounted", "nas_full", "nas_read_only", "creation_lock_held",
            "local_flip_after_verify", "local_edit_after_verify", "nas_flip_before_verify"} <= kinds  # fmt: skip
    assert kinds & {"nas_file_deleted", "nas_run_folder_deleted"}
    assert len(OTHER_FAULTS) == 9
    assert tally.files_checked > 0
    assert tally.losses == [], "\n".join(lines)
    assert tally.nas_damage == [], "\n".join(lines)
    assert tally.foreign_overwritten == []
    assert tally.leftovers == []
    assert tally.stuck == [], "\n".join(lines)
