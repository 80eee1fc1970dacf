"""On rclone, a NAS file of a run verified before is sent again when the audit finds it damaged.

The push of a run verified before keeps what it replaces (``--backup-dir``);
rclone's ``copyto`` of each file sent again refused the filter that came with
it ("can't limit to single files when using filters"), so every such push
failed and the job ended FAILED with the NAS copy still bad.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from exlab_wizard.config import parse_config
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, rclone_s3_equipment, running, synced

S = SyncJobState


async def test_rclone_resend_of_a_damaged_nas_file(tmp_path: Path, s3_server, s3_rclone_config) -> None:
    lab = Lab.build(tmp_path)
    prefix = f"revthree-{os.getpid()}-{time.monotonic_ns()}"
    data = lab.config_data(sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 0.05, "audit_interval_s": 6 * 3600})
    data["equipment"] = rclone_s3_equipment(lab, s3_server, s3_rclone_config, prefix)
    cfg = parse_config(data)
    clock = Clock()
    run = lab.make_run("Run_2026-01-01", files=FILES)
    async with running(cfg, clock) as client:
        job = await synced(client, run)
        on_disk = [p for p in (s3_server.data_dir / s3_server.bucket / prefix).rglob("image_001.tif")]
        assert len(on_disk) == 1, on_disk
        nas_file = on_disk[0]
        good = nas_file.read_bytes()
        nas_file.write_bytes(bytes(255 - b for b in good))  # the NAS copy rots, same size
        s3_server.settle()
        clock.advance(7)
        await client.audit_once()  # mismatch: the run goes back to be sent again
        for _ in range(3):
            await client.wait_idle(timeout=60)
            time.sleep(0.1)
        job = await client.job(run)
        print(job.state, job.error_kind, job.last_error)
        assert job.state == S.VERIFIED, (job.state, job.last_error)
        assert nas_file.read_bytes() == good
