"""rsync_ssh and rclone: a ``remote_path`` that is the NAS data volume's own mount point.

A data manager points ``remote_path`` (``rclone_remote_path``) at the NAS
volume (``/volume1``, ``/srv/nas``): an ordinary setting. When the volume does
not mount (a NAS reboot), the bare mount-point folder on the NAS system disk
is there and empty: "the root is missing" never fires, and a run would be
written there, "verified" there and its local copy deleted; the mounted
volume then hides that folder (rules 3 and 1). ``remote_marker`` is the
network transports' ``mount_marker``: a file touched on the mounted volume,
checked by every look at the NAS; missing, the NAS is unreachable, never empty.
Against the loopback sshd (rclone: its sftp backend to the same folder) and a
real tmpfs as the NAS volume.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from tests.fixtures.sshd import RW_USER
from tests.helpers import Clock
from tests.lab import FILES, Site, acts, running, synced

S = SyncJobState
MARKER = ".exlab-nas"

pytestmark = pytest.mark.network


def _mount_volume(where: Path, *, marker: bool) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(where)], check=True)
    subprocess.run(["chown", f"{RW_USER}:{RW_USER}", str(where)], check=True)
    if marker:  # the data manager's one-time `touch <remote_path>/.exlab-nas` on the mounted volume
        (where / MARKER).write_text("the NAS data volume is mounted\n")


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=False, capture_output=True)


def _site(request: pytest.FixtureRequest, root: Path, kind: str) -> Site:
    site = Site.on(request, root, "rsync_ssh")
    if kind == "rclone":  # rclone sftp to the same loopback sshd and folder
        conf = request.getfixturevalue("rclone_sftp_config")(request.getfixturevalue("sshd"))
        site.transport = {
            "type": "rclone",
            "rclone_remote": "labsftp",
            "rclone_remote_path": str(site.nas_root),
            "rclone_config": str(conf),
        }
    site.transport["remote_marker"] = MARKER
    return site


@pytest.mark.parametrize("kind", ["rsync_ssh", "rclone"])
async def test_a_volume_that_did_not_mount_is_not_taken_for_an_empty_nas(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    site = _site(request, tmp_path, kind)
    volume = site.nas_root  # remote_path: the NAS data volume's mount point
    _mount_volume(volume, marker=True)
    try:
        clock = Clock()
        cfg = site.config(
            sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
            cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24},
        )
        first = site.make_run("Run_1", files=FILES)
        async with running(cfg, clock) as client:
            await synced(client, first)  # the volume is mounted, its marker there: a real copy on it

        _umount(volume)  # the NAS rebooted and its data volume did not mount
        second = site.make_run("Run_2", files=FILES)
        async with running(cfg, clock) as client:
            await client.enqueue(second)
            await client.wait_idle(timeout=60)
            job = await client.job(second)
            outcomes = []
            if job.state == S.VERIFIED:
                for _ in range(4):
                    clock.advance(7)
                    await client.audit_once()
                    outcomes += acts(await client.cleanup_once())
                job = await client.job(second)
            # the reaper's look at the NAS for the first run (verified on the volume) waits too
            for _ in range(2):
                clock.advance(30)
                outcomes += acts(await client.cleanup_once())
            first_job = await client.job(first)

        bare = sorted(str(p.relative_to(volume)) for p in volume.rglob("*"))
        _mount_volume(volume, marker=False)  # the volume is back: it hides what was written into the bare folder
        on_nas = volume / second.relative_to(site.local_root / "CONFOCAL_01")
        local_left = [rel for rel in FILES if (second / rel).is_file()]
        nas_has = [rel for rel in FILES if (on_nas / rel).is_file()]
        assert job.state not in (S.VERIFIED, S.CLEANUP_ELIGIBLE, S.CLEANED), (
            f"the unmounted volume (a bare mount-point folder on the NAS system disk) was taken for the NAS: "
            f"job {job.state.value}, verify_passes={job.verify_passes}; local files left={local_left}, "
            f"on the NAS volume now={nas_has}; {[(o.action, o.reason[:60]) for o in outcomes][-2:]}"
        )
        assert local_left == list(FILES), f"local files deleted: left {local_left}"
        assert [rel for rel in FILES if (first / rel).is_file()] == list(FILES), "run 1's local files deleted"
        assert first_job.state != S.CLEANED
        assert bare == [], f"written into the bare mount point: {bare}"
        assert job.error_kind == "network" and "remote unreachable" in (job.last_error or ""), (
            job.state,
            job.error_kind,
            job.last_error,
        )
        assert "no .exlab-nas" in (job.last_error or ""), job.last_error
    finally:
        _umount(volume)
        _umount(volume)
