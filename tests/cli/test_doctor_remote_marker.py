"""``exlab-sync doctor`` on a ``remote_path`` that is the NAS data volume's own mount point.

Without ``remote_marker`` such a root is guarded only by "the root is
missing", which a bare mount point never is (an unmounted volume would read
as an empty NAS: tests/client/test_remote_marker_volume.py). Doctor warns in
one line and says how to set a marker; with one set, it checks that it is
there. Against the loopback sshd, a real tmpfs as the NAS volume.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.sync.doctor import run_checks
from tests.fixtures.sshd import RW_USER, SshServer
from tests.lab import EQ, MARKER

pytestmark = pytest.mark.network


def _said(checks) -> list[tuple[str, bool, str]]:
    return [(c.name, c.ok, c.detail) for c in checks if c.equipment == EQ]


def _warns(checks) -> bool:
    return any((not c.ok) or "warning" in c.detail for c in checks if c.equipment == EQ)


def _config(tmp_path: Path, transport: dict):
    (tmp_path / "lab" / EQ).mkdir(parents=True, exist_ok=True)
    return parse_config(
        {
            "equipment": [{"id": EQ, "local_root": str(tmp_path / "lab"), "transport": transport}],
            "state_dir": str(tmp_path / "state"),
        }
    )


def _rsync(sshd: SshServer, remote_dir: Path, **more: str) -> dict:
    return {
        "type": "rsync_ssh",
        "ssh_target": f"{RW_USER}@127.0.0.1",
        "ssh_key_path": str(sshd.env.client_key),
        "ssh_port": sshd.port,
        "remote_path": str(remote_dir),
        "ssh_known_hosts": str(sshd.known_hosts),
        **more,
    }


@pytest.fixture
def volume(remote_dir: Path):
    """``remote_dir`` as the mount point of a NAS data volume (a tmpfs), mounted."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(remote_dir)], check=True)
    try:
        subprocess.run(["chown", f"{RW_USER}:{RW_USER}", str(remote_dir)], check=True)
        yield remote_dir
    finally:
        subprocess.run(["umount", str(remote_dir)], check=False)


async def test_a_remote_path_that_is_the_volume_mount_point_is_named(
    tmp_path: Path, sshd: SshServer, volume: Path
) -> None:
    checks = await run_checks(_config(tmp_path, _rsync(sshd, volume)))
    assert _warns(checks), (
        f"doctor passes a remote_path that is a mount point (an unmounted volume would read as an empty NAS): "
        f"{_said(checks)}"
    )
    found = {c.name: c for c in checks if c.equipment == EQ}
    marker = found["remote_marker"]
    assert marker.ok and marker.detail.startswith("warning:") and "\n" not in marker.detail
    assert f"touch {volume}/.exlab-nas" in marker.detail and "remote_marker: .exlab-nas" in marker.detail
    assert found["remote_writable"].ok and found["remote_hash_tool"].ok  # a warning, the rest checked


async def test_a_plain_folder_and_a_set_marker_say_nothing_more(tmp_path: Path, sshd: SshServer, volume: Path) -> None:
    (volume / "plain").mkdir()
    subprocess.run(["chown", f"{RW_USER}:{RW_USER}", str(volume / "plain")], check=True)
    checks = await run_checks(_config(tmp_path, _rsync(sshd, volume / "plain")))
    assert "remote_marker" not in [c.name for c in checks] and not _warns(checks), _said(checks)

    (volume / MARKER).write_text("mounted\n")
    checks = await run_checks(_config(tmp_path, _rsync(sshd, volume, remote_marker=MARKER)))
    found = {c.name: c for c in checks if c.equipment == EQ}
    assert found["remote_marker"].ok and "warning" not in found["remote_marker"].detail, _said(checks)
    assert not _warns(checks), _said(checks)


async def test_a_missing_marker_fails_and_writes_nothing(
    tmp_path: Path, sshd: SshServer, volume: Path, rclone_sftp_config
) -> None:
    checks = await run_checks(_config(tmp_path, _rsync(sshd, volume, remote_marker=MARKER)))
    found = {c.name: c for c in checks if c.equipment == EQ}
    assert not found["remote_marker"].ok and "remote unreachable" in found["remote_marker"].detail
    assert f"touch {volume}/{MARKER}" in (found["remote_marker"].hint or "")
    assert "remote_writable" not in found  # no probe file into a bare mount point
    assert list(volume.iterdir()) == []

    rclone = {
        "type": "rclone",
        "rclone_remote": "labsftp",
        "rclone_remote_path": str(volume),
        "rclone_config": str(rclone_sftp_config(sshd)),
        "remote_marker": MARKER,
    }
    found = {c.name: c for c in await run_checks(_config(tmp_path, rclone)) if c.equipment == EQ}
    assert not found["remote_marker"].ok and "remote unreachable" in found["remote_marker"].detail
    (volume / MARKER).write_text("mounted\n")
    found = {c.name: c for c in await run_checks(_config(tmp_path, rclone)) if c.equipment == EQ}
    assert found["remote_marker"].ok, found["remote_marker"]
