"""``exlab-sync doctor`` on an sshfs ``mount_path``: a reminder to mount it with ``-o cache=no``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.fuse_shares import Sshfs
from tests.helpers import cli
from tests.lab import EQ, mark_nas

pytestmark = pytest.mark.network


def _mount_path_check(tmp_path: Path, nas: Path) -> dict:
    (tmp_path / "lab" / EQ).mkdir(parents=True, exist_ok=True)
    config = tmp_path / "config.yaml"
    transport = {"type": "mount", "mount_path": str(nas)}
    equipment = [{"id": EQ, "local_root": str(tmp_path / "lab"), "transport": transport}]
    config.write_text(json.dumps({"equipment": equipment, "state_dir": str(tmp_path / "state")}))
    done = cli("doctor", "--config", str(config), "--json")
    assert done.returncode == 0, done.stdout
    return {c["name"]: c for c in json.loads(done.stdout)["checks"]}["mount_path"]


def test_an_sshfs_mount_path_passes_with_a_cache_warning(tmp_path: Path, sshd_factory, remote_dir: Path) -> None:
    mark_nas(remote_dir)
    mount = Sshfs(sshd_factory(), remote_dir, tmp_path / "nas").mount()
    try:
        check = _mount_path_check(tmp_path, tmp_path / "nas")
    finally:
        mount.close()
    assert check["ok"] and "warning:" in check["detail"] and "-o cache=no" in check["detail"], check


def test_a_local_folder_has_no_sshfs_warning(tmp_path: Path) -> None:
    check = _mount_path_check(tmp_path, mark_nas(tmp_path / "nas"))
    assert check["ok"] and "warning" not in check["detail"], check
