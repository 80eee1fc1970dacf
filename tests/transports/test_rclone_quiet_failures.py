"""rclone's quiet steps and its reachability probe write the same failure once, and a new one again.

rclone starts every stderr line with a wall-clock timestamp, so a failure keyed by its plain
(rc, stderr tail) never repeated and each reaper pass wrote its listing's failure again (the reaper
lists a waiting run's NAS folder on every pass: 2,880 lines a day a run on rclone sftp or S3).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.transports import _process, rclone
from exlab_wizard.sync.transports.rclone import RcloneTransport


def _equipment(tmp_path: Path, nas: Path) -> EquipmentConfig:
    conf = tmp_path / "rclone.conf"
    conf.write_text("[labnas]\ntype = local\n")
    (tmp_path / "lab" / "EQ_01").mkdir(parents=True)
    cfg = parse_config(
        {
            "equipment": [
                {
                    "id": "EQ_01",
                    "local_root": str(tmp_path / "lab"),
                    "transport": {
                        "type": "rclone",
                        "rclone_remote": "labnas",
                        "rclone_remote_path": str(nas),
                        "rclone_config": str(conf),
                    },
                }
            ],
            "state_dir": str(tmp_path / "state"),
        }
    )
    return cfg.equipment[0]


def _exits(log: EquipmentLog) -> list[str]:
    return [line for line in log.path.read_text().splitlines() if " tool_exit " in line] if log.path.exists() else []


async def test_the_same_rclone_listing_failure_is_written_once(tmp_path: Path) -> None:
    nas = tmp_path / "nas"
    nas.mkdir()
    eq = _equipment(tmp_path, nas)
    log = EquipmentLog(eq)
    base = [rclone.rclone_binary(), "--config", str(eq.transport.rclone_config)]
    run = str(tmp_path / "lab" / "EQ_01" / "P" / "Runs" / "R1")
    for _ in range(3):  # three reaper passes (30 s apart in a service; > 1 s apart here)
        result = await rclone._lsjson(base, f"labnas:{nas}/P/Runs/R1", log=log, run_path=run, step="remote_listing")
        assert result.returncode == 3  # the same failure each time: the folder is not there
        await asyncio.sleep(1.1)
    exits = _exits(log)
    assert len(exits) == 1, "\n".join(exits)
    # only the comparison drops rclone's clock: the line written keeps rclone's words as they were
    assert re.search(r"stderr=.*\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ERROR : ", exits[0]), exits[0]


async def test_a_failing_rclone_probe_is_written_once_per_cause(tmp_path: Path) -> None:
    nas = tmp_path / "nas"
    eq = _equipment(tmp_path, nas)  # the root is missing: the NAS volume did not mount
    transport = RcloneTransport(eq)
    run = tmp_path / "lab" / "EQ_01" / "P" / "Runs" / "R1"
    for _ in range(3):
        assert not await transport.reachable(run)
        await asyncio.sleep(1.1)  # another second on rclone's clock
    assert len(_exits(transport.log)) == 1
    conf = Path(eq.transport.rclone_config)
    good = conf.read_text()
    conf.write_text("[other]\ntype = local\n")  # another cause: the remote is gone from the config
    for _ in range(3):
        assert not await transport.reachable(run)
    exits = _exits(transport.log)
    assert len(exits) == 2 and "labnas" in exits[1], exits
    conf.write_text(good)
    nas.mkdir()
    assert await transport.reachable(run)  # a success writes nothing and forgets the failure ...
    nas.rmdir()
    assert not await transport.reachable(run)  # ... so the next outage is written
    assert len(_exits(transport.log)) == 3


async def test_a_failing_rclone_probe_is_written_again_after_an_hour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_process, "QUIET_REPEAT_S", 0.0)
    transport = RcloneTransport(_equipment(tmp_path, tmp_path / "nas"))
    for _ in range(2):
        assert not await transport.reachable(tmp_path / "lab" / "EQ_01" / "P" / "Runs" / "R1")
    assert len(_exits(transport.log)) == 2
