"""One equipment's ``<local_root>/<id>`` inside another's.

A lab copies CONFOCAL_01's entry for a new instrument FACS_02 and sets its
``local_root`` to CONFOCAL_01's folder (``/data/lab/CONFOCAL_01``): FACS_02's
runs then live under ``/data/lab/CONFOCAL_01/FACS_02/...``, inside
CONFOCAL_01's tree. The loader accepted it. FACS_02's watcher finds its runs
and enqueues them, but the client picks the equipment of a run by the first
entry whose root holds it (``Config.equipment_for_run``): the run becomes a
CONFOCAL_01 job, is sent with CONFOCAL_01's transport to CONFOCAL_01's share
(under a "project" FACS_02), verified and cleaned there. The NAS place the
configuration names for FACS_02 never got it; which place a run went to
depended on the order of the entries. The loader now refuses nested (or
equal) equipment roots with one line naming both entries.
"""

from __future__ import annotations

from pathlib import Path

from exlab_wizard.config import ConfigError, parse_config
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, running, synced

OTHER = "FACS_02"


async def test_a_run_under_a_nested_equipment_root_goes_to_its_own_equipments_nas(tmp_path: Path) -> None:
    lab = Lab.build(tmp_path)  # nas/CONFOCAL_01 and nas/FACS_02: one share each
    data = lab.config_data(sync={"backoff_s": [0.01], "scan_interval_s": 3600})
    data["equipment"][1]["local_root"] = str(lab.local_root / EQ)  # FACS_02 inside CONFOCAL_01's tree
    try:
        cfg = parse_config(data)
    except ConfigError as exc:  # refused at load, naming both entries
        assert "equipment[1]" in str(exc) and "equipment[0]" in str(exc), exc
        return
    run = lab.local_root / EQ / OTHER / "PROJ-1" / "Runs" / "Run_2026-01-01"
    run.mkdir(parents=True)
    (run / ".exlab-wizard").mkdir()
    for rel, body in FILES.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(body)
    async with running(cfg, Clock()) as client:
        job = await synced(client, run)
    facs_share = lab.mount_path(OTHER) / "PROJ-1" / "Runs" / "Run_2026-01-01"
    assert job.equipment_id == OTHER and facs_share.is_dir(), (
        f"FACS_02's run became a {job.equipment_id} job, sent to {job.remote_path}; "
        f"FACS_02's NAS place {facs_share} never got it"
    )
