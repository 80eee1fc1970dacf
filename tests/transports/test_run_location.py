"""Where a run's NAS copy is (``run_location``): every setting that picks the place changes it, nothing else does.

The reaper deletes nothing on passes read at another place than the
configuration names now (``location_change``); these are the settings of
each transport that name the place.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync.transports import rclone_conf
from exlab_wizard.sync.transports.base import location_change, remote_run_path, run_location

BASE = {
    "mount": {"type": "mount", "mount_path": "/mnt/nas"},
    "rsync_ssh": {
        "type": "rsync_ssh",
        "ssh_target": "lab@nas1",
        "ssh_key_path": "/keys/id",
        "ssh_port": 22,
        "remote_path": "/srv/lab",
    },
    "rclone": {
        "type": "rclone",
        "rclone_remote": "labnas",
        "rclone_remote_path": "lab",
        "rclone_config": "/etc/rclone-a.conf",
    },
}
#: per transport: settings that move the copy elsewhere, and one that does not
MOVES = {
    "mount": [{"mount_path": "/mnt/nas2"}],
    "rsync_ssh": [{"ssh_target": "lab@nas2"}, {"ssh_port": 2222}, {"remote_path": "/srv/lab2"}],
    "rclone": [{"rclone_remote": "othernas"}, {"rclone_remote_path": "lab2"}, {"rclone_config": "/etc/rclone-b.conf"}],
}
STAYS = {
    "mount": {"bandwidth": {"upload_mbps": 100}},
    "rsync_ssh": {"ssh_key_path": "/keys/other"},
    "rclone": {"bandwidth": {"upload_mbps": 100}},
}


def _equipment(tmp_path: Path, transport: dict) -> EquipmentConfig:
    return EquipmentConfig.model_validate({"id": "EQ_01", "local_root": str(tmp_path), "transport": transport})


@pytest.mark.parametrize(
    ("kind", "change"), [(kind, change) for kind, changes in MOVES.items() for change in changes], ids=str
)
def test_a_setting_that_names_another_place_changes_the_location(tmp_path: Path, kind: str, change: dict) -> None:
    run = tmp_path / "EQ_01" / "PROJ" / "Run_1"
    before = _equipment(tmp_path, BASE[kind])
    after = _equipment(tmp_path, {**BASE[kind], **change})
    verified = run_location(before, run)
    assert run_location(after, run) != verified
    moved = location_change(after, run, verified_location=verified, remote_path=remote_run_path(before, run))
    assert moved == (verified, run_location(after, run))
    assert location_change(before, run, verified_location=verified, remote_path="ignored") is None


@pytest.mark.parametrize("kind", list(STAYS))
def test_other_settings_leave_the_location(tmp_path: Path, kind: str) -> None:
    run = tmp_path / "EQ_01" / "PROJ" / "Run_1"
    before, after = _equipment(tmp_path, BASE[kind]), _equipment(tmp_path, {**BASE[kind], **STAYS[kind]})
    assert run_location(after, run) == run_location(before, run)


def test_a_job_verified_before_locations_were_kept_is_judged_by_its_remote_path(tmp_path: Path) -> None:
    run = tmp_path / "EQ_01" / "PROJ" / "Run_1"
    eq = _equipment(tmp_path, BASE["rsync_ssh"])
    here = remote_run_path(eq, run)
    assert location_change(eq, run, verified_location=None, remote_path=here) is None
    assert location_change(eq, run, verified_location=None, remote_path="/srv/old/PROJ/Run_1") == (
        "/srv/old/PROJ/Run_1",
        here,
    )


def _conf(tmp_path: Path, text: str) -> None:
    """Write the rclone config in place (two writes may share a clock tick and a size: read as they are)."""
    (tmp_path / "rclone.conf").write_text(text)


def _rclone(tmp_path: Path, conf: str, **extra: str) -> EquipmentConfig:
    path = tmp_path / "rclone.conf"
    _conf(tmp_path, conf)
    return _equipment(tmp_path, {**BASE["rclone"], "rclone_config": str(path), **extra})


def test_an_rclone_remote_edited_in_its_config_file_is_another_place(tmp_path: Path) -> None:
    """A lab moves to a new NAS the rclone way: the remote's definition changes, its name and file do not."""
    run = tmp_path / "EQ_01" / "PROJ" / "Run_1"
    before = _rclone(tmp_path, "[labnas]\ntype = sftp\nhost = nas1\n\n[other]\ntype = local\n")
    verified = run_location(before, run)
    _conf(tmp_path, "[labnas]\ntype = sftp\nhost = nas2\n\n[other]\ntype = local\n")
    assert location_change(before, run, verified_location=verified, remote_path="ignored") is not None
    # another remote of the file edited, or the file rewritten alike: the same place
    _conf(tmp_path, "[other]\ntype = s3\n\n[labnas]\nhost = nas2\ntype = sftp\n")
    again = run_location(before, run)
    _conf(tmp_path, "[labnas]\ntype = sftp\nhost = nas2\n\n[other]\ntype = local\n")
    assert run_location(before, run) == again


def test_an_rclone_remote_follows_the_remotes_it_names(tmp_path: Path) -> None:
    """``alias``, ``crypt``, ``union``: the remote named in a value is part of the place."""
    run = tmp_path / "EQ_01" / "PROJ" / "Run_1"
    eq = _rclone(tmp_path, "[labnas]\ntype = alias\nremote = disk:/srv/a\n\n[disk]\ntype = sftp\nhost = nas1\n")
    verified = run_location(eq, run)
    _conf(tmp_path, "[labnas]\ntype = alias\nremote = disk:/srv/a\n\n[disk]\ntype = sftp\nhost = nas2\n")
    assert location_change(eq, run, verified_location=verified, remote_path="ignored") is not None


def test_an_rclone_location_recorded_before_definitions_counts_as_before(tmp_path: Path) -> None:
    """Recorded by an older version (config file and path only): judged as then, not taken for a move."""
    run = tmp_path / "EQ_01" / "PROJ" / "Run_1"
    eq = _rclone(tmp_path, "[labnas]\ntype = sftp\nhost = nas1\n")
    old = f"rclone|{eq.transport.rclone_config}|{remote_run_path(eq, run)}"
    assert location_change(eq, run, verified_location=old, remote_path="ignored") is None


def test_an_oauth_token_refreshed_by_rclone_is_the_same_place(tmp_path: Path) -> None:
    """rclone writes a refreshed OAuth token back into the file (about hourly): not a move."""
    run = tmp_path / "EQ_01" / "PROJ" / "Run_1"
    eq = _rclone(tmp_path, '[labnas]\ntype = onedrive\ndrive_id = b!x\ntoken = {"access_token":"a1","expiry":"t1"}\n')
    verified = run_location(eq, run)
    _conf(tmp_path, '[labnas]\ntype = onedrive\ndrive_id = b!x\ntoken = {"access_token":"a2","expiry":"t2"}\n')
    assert location_change(eq, run, verified_location=verified, remote_path="ignored") is None
    _conf(tmp_path, '[labnas]\ntype = onedrive\ndrive_id = b!y\ntoken = {"access_token":"a2"}\n')
    assert location_change(eq, run, verified_location=verified, remote_path="ignored") is not None


def test_an_rclone_remote_edited_within_one_clock_tick_at_the_same_size_is_another_place(tmp_path: Path) -> None:
    """A share with a 2 s clock (FAT, SMB): the edit keeps the inode, the size and the mtime; the place still moves."""
    run = tmp_path / "EQ_01" / "PROJ" / "Run_1"
    eq = _rclone(tmp_path, "[labnas]\ntype = sftp\nhost = nas1\n")
    path = tmp_path / "rclone.conf"
    before = path.stat()
    verified = run_location(eq, run)
    with path.open("r+b") as handle:  # same inode, same size
        handle.write(b"[labnas]\ntype = sftp\nhost = nas2\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert location_change(eq, run, verified_location=verified, remote_path="ignored") is not None
    assert rclone_conf._CACHE  # parsed once per content, not once per call


def test_a_mount_location_names_what_is_mounted_there(tmp_path: Path) -> None:
    """fstab pointed at a new server, the config unchanged: the mount table tells the two apart."""
    share = tmp_path / "nas"
    other = tmp_path / "nas02"
    share.mkdir()
    other.mkdir()
    eq = _equipment(tmp_path, {"type": "mount", "mount_path": str(share)})
    run = tmp_path / "EQ_01" / "PROJ" / "Run_1"
    verified = run_location(eq, run)
    subprocess.run(["mount", "--bind", str(other), str(share)], check=True)
    try:
        moved = location_change(eq, run, verified_location=verified, remote_path="ignored")
        here = run_location(eq, run)
    finally:
        subprocess.run(["umount", str(share)], check=True)
    assert moved == (verified, here) and here.endswith(f" {other}|{share}/PROJ/Run_1"), moved
    assert location_change(eq, run, verified_location=verified, remote_path="ignored") is None


def test_a_mount_location_recorded_before_mounts_were_named_counts_as_this_place(tmp_path: Path) -> None:
    """``mount||<path>`` (an older version's): this place while the path is; another path is another place."""
    run = tmp_path / "EQ_01" / "PROJ" / "Run_1"
    eq = _equipment(tmp_path, BASE["mount"])
    assert location_change(eq, run, verified_location="mount||/mnt/nas/PROJ/Run_1", remote_path="x") is None
    assert location_change(eq, run, verified_location="mount||/mnt/old/PROJ/Run_1", remote_path="x") is not None
