"""rclone's quiet steps write the same failure once.

rclone starts every stderr line with a wall-clock timestamp, so a failure keyed by its plain
(rc, stderr tail) never repeated and each reaper pass wrote its listing's failure again (the reaper
lists a waiting run's NAS folder on every pass: 2,880 lines a day a run on rclone sftp or S3).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from exlab_wizard.config import parse_config
from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.transports import rclone


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
