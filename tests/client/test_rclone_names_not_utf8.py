"""On rclone, a run with a file name that is not UTF-8 is refused before any write.

The gate accepts such a name (no rule covers it), and rclone's copy writes it
to the NAS byte for byte, but rclone prints names as JSON: every byte that is
not UTF-8 comes back as U+FFFD. Two such names (``caf\\xe9.raw`` and
``caf\\xff.raw``) listed as one NAS name; the verification found both missing
and a stranger's ``caf\\ufffd.raw``; the retry's conflict check then took the
run's own file for someone else's and the job ended FAILED ``remote_conflict``
("entries that are not in this run"): a lab was told to look for another run
that does not exist, and no retry could ever verify the run. Now the push
refuses the run before it writes anything, naming the file and the cause.
"""

from __future__ import annotations

import os
from pathlib import Path

from exlab_wizard.config import parse_config
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import EQ, Lab, running

S = SyncJobState
FILES = {os.fsdecode(b"caf\xe9.raw"): b"one", os.fsdecode(b"caf\xff.raw"): b"two", "ok.txt": b"ok"}


async def test_a_name_that_is_not_utf8_is_refused_before_any_write(
    tmp_path: Path, sshd, remote_dir, rclone_sftp_config
) -> None:
    lab = Lab.build(tmp_path)
    data = lab.config_data(sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 0.05})
    data["equipment"] = [
        {
            "id": EQ,
            "local_root": str(lab.local_root),
            "transport": {
                "type": "rclone",
                "rclone_remote": "labsftp",
                "rclone_remote_path": str(remote_dir),
                "rclone_config": str(rclone_sftp_config(sshd)),
            },
        }
    ]
    cfg = parse_config(data)
    run = lab.make_run("Run_2026-01-01", files=FILES)
    async with running(cfg, Clock()) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.VERIFIED or job.error_kind != "remote_conflict", (
        f"{job.state.value} {job.error_kind}: {job.last_error}"
    )
    assert (job.state, job.error_kind) == (S.FAILED, "remote_write_refused"), job.last_error
    assert "file name is not UTF-8: rclone cannot list it back: caf\\xe9.raw" in job.last_error
    assert [p for p in remote_dir.rglob("*") if not p.is_dir()] == []  # nothing written, not even a claim
    assert all((run / name).read_bytes() == body for name, body in FILES.items())
