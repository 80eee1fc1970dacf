"""On rclone, a file the instrument adds while the push runs is left for later, not a "vanished" file.

The client hashed the local run beside the push (one listing, at the start)
and ``rclone copy`` listed the run again by itself, later (after the conflict
listing and the claim). A file written in between (a thumbnail landing just
after the run's sentinel) was sent but not hashed: the verify pass saw it
"extra" on the NAS and failed the job at once, FAILED ``local_file_vanished``,
though the file was right there, and the watcher never re-arms a FAILED job.
Now the push hashes and copies exactly the files it listed (as mount and
rsync_ssh do): the job is verified without the late file, which the audit
then finds added.
"""

from __future__ import annotations

from pathlib import Path

from exlab_wizard.config import parse_config
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import rclone as rclone_mod
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, act_once_in, running

S = SyncJobState


async def test_a_file_added_while_rclone_pushes_is_not_a_vanished_file(tmp_path: Path, monkeypatch) -> None:
    lab = Lab.build(tmp_path, equipment=(EQ,))
    nas = tmp_path / "rclone-nas"
    nas.mkdir()
    conf = tmp_path / "rclone.conf"
    conf.write_text("[labfs]\ntype = local\n")
    data = lab.config_data(sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 0.05, "audit_interval_s": 6 * 3600})
    data["equipment"] = [
        {
            "id": EQ,
            "local_root": str(lab.local_root),
            "completeness_signal": "sentinel_file",
            "transport": {
                "type": "rclone",
                "rclone_remote": "labfs",
                "rclone_remote_path": str(nas),
                "rclone_config": str(conf),
            },
        }
    ]
    cfg = parse_config(data)
    run = lab.make_run("Run_2026-01-01", files={**FILES, "acquisition_complete.flag": b""})

    # The instrument writes one more file while the push is under way, right before rclone copy lists the run.
    fired = act_once_in(
        monkeypatch,
        rclone_mod,
        "run_tool",
        lambda *a, **kw: kw.get("step") == "push",
        lambda: (run / "thumbnail.png").write_bytes(b"T" * 777),
    )
    clock = Clock()
    async with running(cfg, clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert fired
        assert (run / "thumbnail.png").is_file()
        assert not (job.state == S.FAILED and job.error_kind == "local_file_vanished"), (
            f"a file added during the push failed the job as vanished: "
            f"{job.state.value} {job.error_kind}: {job.last_error}"
        )
        assert job.state == S.VERIFIED, (job.state, job.last_error)
        # Neither sent nor in the manifest ...
        assert not list(nas.rglob("thumbnail.png"))
        manifest = (run / ".exlab-wizard" / "checksums.sha256").read_text()
        assert "thumbnail.png" not in manifest and "acquisition_complete.flag" in manifest

        # ... until the audit finds it added and the run is sent again.
        clock.advance(7)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, (job.state, job.last_error)
        assert [p.read_bytes() for p in nas.rglob("thumbnail.png")] == [b"T" * 777]
        assert "thumbnail.png" in (run / ".exlab-wizard" / "checksums.sha256").read_text()
