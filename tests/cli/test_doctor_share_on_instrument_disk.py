"""``exlab-sync doctor``: a mount path on the instrument's own file system is named in one line.

The marker touched in the bare mount point while the share was not mounted
(doctor's own hint, read in a hurry: "create the marker: touch ..."): every
check passes, ``free_space`` reports the instrument disk as the share, the
engine syncs onto that disk and cleanup frees the originals.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from exlab_wizard.config import parse_config
from exlab_wizard.sync.doctor import run_checks
from tests.lab import EQ, mark_nas


def _said(checks) -> list[tuple[str, bool, str]]:
    return [(c.name, c.ok, c.detail) for c in checks if c.equipment == EQ]


def _warns(checks) -> bool:
    return any((not c.ok) or "warning" in c.detail for c in checks if c.equipment == EQ)


def _config(tmp_path: Path, mount_path: Path):
    return parse_config(
        {
            "equipment": [
                {
                    "id": EQ,
                    "local_root": str(tmp_path / "lab"),
                    "transport": {"type": "mount", "mount_path": str(mount_path)},
                }
            ],
            "state_dir": str(tmp_path / "state"),
        }
    )


async def test_a_mount_path_on_the_instrument_disk_itself_is_named(tmp_path: Path) -> None:
    (tmp_path / "lab" / EQ).mkdir(parents=True)
    bare = mark_nas(tmp_path / "mnt" / "nas")  # the mount point, share NOT mounted, marker touched by hand
    checks = await run_checks(_config(tmp_path, bare))
    assert _warns(checks), f"doctor passes a 'share' on the instrument's own file system: {_said(checks)}"
    [marker] = [c for c in checks if c.name == "mount_marker"]
    assert "same file system as" in marker.detail and "\n" not in marker.detail, marker


async def test_a_share_mounted_there_is_not_named(tmp_path: Path) -> None:
    (tmp_path / "lab" / EQ).mkdir(parents=True)
    share = tmp_path / "mnt" / "nas"
    share.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(share)], check=True)
    try:
        mark_nas(share)
        checks = await run_checks(_config(tmp_path, share))
    finally:
        subprocess.run(["umount", str(share)], check=False)
    [marker] = [c for c in checks if c.name == "mount_marker"]
    assert marker.ok and "warning" not in marker.detail, _said(checks)
