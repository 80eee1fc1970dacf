"""A relative path on this PC in config.yaml is refused at load, naming its key.

``local_root: lab``, ``mount_path: nas/X`` or ``state_dir: state`` would be read
against the current folder of each process: ``serve`` under systemd (cwd
``/``) would watch ``/lab``, and ``exlab-sync jobs`` typed in another folder
would open a second, empty queue. Paths on the NAS side (``remote_path``,
``rclone_remote_path``) are not paths on this PC and are left as they were.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from exlab_wizard.cli import main
from exlab_wizard.config import ConfigError, EquipmentConfig, load_config
from tests.helpers import cli

RELATIVE = "is relative: write an absolute path (or one starting with ~)"


def _site(root: Path) -> Path:
    """A newcomer's site: a run, a mounted NAS folder and a config naming them relative to its folder."""
    site = root / "site"
    run = site / "lab" / "MICRO_01" / "P" / "Runs" / "Run_1"
    run.mkdir(parents=True)
    (run / "a.bin").write_bytes(b"x" * 100)
    (site / "nas" / "MICRO_01").mkdir(parents=True)
    (site / "nas" / "MICRO_01" / ".exlab-nas").write_text("mounted\n")
    config = site / "config.yaml"
    config.write_text(
        "equipment:\n"
        "  - id: MICRO_01\n"
        "    local_root: lab\n"
        "    completeness_signal: none\n"
        "    transport: {type: mount, mount_path: nas/MICRO_01}\n"
        "state_dir: state\n"
    )
    return config


def test_relative_paths_are_refused_in_every_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _site(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (config.parent, elsewhere):
        monkeypatch.chdir(cwd)
        with pytest.raises(ConfigError) as caught:
            load_config(config)
        assert caught.value.problems == [
            f"equipment[0].local_root: 'lab' {RELATIVE}",
            f"equipment[0].transport.mount_path: 'nas/MICRO_01' {RELATIVE}",
            f"state_dir: 'state' {RELATIVE}",
        ]
    assert not (config.parent / "state").exists() and not (elsewhere / "state").exists()


def test_enqueue_and_jobs_refuse_the_config_and_make_no_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _site(tmp_path)
    run = config.parent / "lab" / "MICRO_01" / "P" / "Runs" / "Run_1"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd, args in ((config.parent, ["enqueue", str(run)]), (elsewhere, ["jobs", "--json"])):
        monkeypatch.chdir(cwd)
        done = CliRunner().invoke(main, [*args, "--config", str(config)], env={"COLUMNS": "250"})
        assert done.exit_code == 2, done.output
        assert f"equipment[0].local_root: 'lab' {RELATIVE}" in done.output
    assert list(tmp_path.rglob("queue.db")) == []


def test_doctor_fails_the_config_check_naming_the_key(tmp_path: Path) -> None:
    config = _site(tmp_path)
    done = cli("doctor", "--json", "--config", str(config), cwd=config.parent)
    assert done.returncode == 1, done.stdout + done.stderr
    checks = json.loads(done.stdout)["checks"]
    failed = [c for c in checks if not c["ok"]]
    assert failed and failed[0]["name"] == "config", checks
    assert f"equipment[0].local_root: 'lab' {RELATIVE}" in failed[0]["detail"]


@pytest.mark.parametrize(
    ("transport", "key"),
    [
        ("{type: mount, mount_path: ./nas}", "mount_path"),
        ("{type: rsync_ssh, ssh_target: s@nas, ssh_key_path: id_ed25519, remote_path: /srv}", "ssh_key_path"),
        (
            "{type: rsync_ssh, ssh_target: s@nas, ssh_key_path: /k, ssh_known_hosts: kh, remote_path: /srv}",
            "ssh_known_hosts",
        ),
        ("{type: rclone, rclone_remote: nas, rclone_config: rclone.conf}", "rclone_config"),
    ],
)
def test_every_local_path_of_a_transport_must_be_absolute(tmp_path: Path, transport: str, key: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"equipment:\n  - id: A\n    local_root: /data\n    transport: {transport}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"equipment[0].transport.{key}: "), caught.value.problems
    assert RELATIVE in caught.value.problems[0]


def test_paths_on_the_nas_side_may_still_be_relative_to_the_remote(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "equipment:\n  - id: A\n    local_root: /data\n"
        "    transport: {type: rclone, rclone_remote: nas, rclone_remote_path: lab/A, rclone_config: ~/rclone.conf}\n"
    )
    transport = load_config(path).equipment[0].transport
    assert transport.remote_root == "nas:lab/A"


def test_a_home_folder_of_no_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "equipment:\n  - id: A\n    local_root: ~no-such-user-here/lab\n    transport: {type: mount, mount_path: /m}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        "equipment[0].local_root: '~no-such-user-here/lab': ~no-such-user-here is no user's home folder here;"
        " write an absolute path"
    ]


def test_a_model_built_in_code_refuses_a_relative_path_too() -> None:
    with pytest.raises(ValueError, match=re.escape(RELATIVE)):
        EquipmentConfig(id="A", local_root=Path("lab"), transport={"type": "mount", "mount_path": "/m"})
    built = EquipmentConfig(id="A", local_root=Path("/data/lab"), transport={"type": "mount", "mount_path": "/m"})
    assert built.local_root == Path("/data/lab") and os.path.isabs(built.transport.mount_path)
