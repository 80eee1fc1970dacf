"""``exlab-sync problems``: table and JSON output, exit codes 0/1/2, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from exlab_wizard.cli import main
from tests.helpers import EXE as EXLAB_SYNC
from tests.lab import EQ, Lab


def make_lab(tmp_path: Path, files: dict[str, str], *, overrides: list | None = None) -> tuple[Path, Path]:
    """A lab with one run; returns (config file, run folder)."""
    lab = Lab.build(tmp_path, equipment=(EQ,), nas_per_equipment=False, project="PROJ-0042", marker=None)
    run = lab.make_run("Run_2026-01-15_1000", files, overrides=overrides, nas="//nas/x")
    return lab.write_config(lab.config_data()), run


def invoke(*args: str):
    return CliRunner().invoke(main, ["problems", *args], env={"COLUMNS": "250"})


def test_clean_lab_exit_0(tmp_path: Path) -> None:
    config, _ = make_lab(tmp_path, {"a.txt": "fine"})
    result = invoke("--config", str(config))
    assert result.exit_code == 0, result.output
    assert "No problems found: 1 run(s) checked" in result.output


def test_hard_finding_exit_1_table(tmp_path: Path) -> None:
    config, run = make_lab(tmp_path, {"con.txt": "", "notes.md": "---\nunclosed\n"})
    result = invoke("--config", str(config))
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    hard = next(i for i, line in enumerate(lines) if "reserved_filesystem_name" in line)
    soft = next(i for i, line in enumerate(lines) if "malformed_yaml_front_matter" in line)
    assert hard < soft  # hard first
    assert "1 blocking" in result.output


def test_json_output(tmp_path: Path) -> None:
    config, run = make_lab(tmp_path, {"con.txt": "", "b.txt": "<name>"})
    result = invoke(str(run), "--json", "--config", str(config))
    assert result.exit_code == 1
    document = json.loads(result.output)
    assert document["runs_checked"] == 1
    [checked] = document["runs"]
    assert checked["run_path"] == str(run) and checked["eligible"] is False
    data = checked["findings"]
    assert checked["blocking"] == data
    assert [(d["tier"], d["rule"], Path(d["offending_path"]).name) for d in data] == [
        ("hard", "unresolved_placeholder_token", "b.txt"),
        ("hard", "reserved_filesystem_name", "con.txt"),
    ]
    assert set(data[0]) == {
        "rule",
        "tier",
        "run_path",
        "offending_path",
        "offending_kind",
        "matched_token",
        "rule_detail",
        "synced_under_prior_policy",
        "override_active",
    }


def test_overridden_hard_finding_is_not_a_problem(tmp_path: Path) -> None:
    override = {
        "id": "b5b0d3c2-6a1e-4f7a-8d3b-2c9e1f0a4b7d",
        "problem_class": "reserved_filesystem_name",
        "operator": "asmith",
        "recorded_at": "2026-01-10T09:00:00Z",
        "expires_at": None,
        "reason": "vendor",
        "revoked": False,
    }
    config, run = make_lab(tmp_path, {"aux.csv": ""}, overrides=[override])
    result = invoke("--config", str(config), "--json")
    assert result.exit_code == 0, result.output
    [checked] = json.loads(result.output)["runs"]
    (finding,) = checked["findings"]
    assert finding["override_active"] is True and finding["tier"] == "hard"
    table = invoke("--config", str(config))
    assert table.exit_code == 0 and "active" in table.output


def test_path_may_be_any_folder(tmp_path: Path) -> None:
    config, run = make_lab(tmp_path, {"con.txt": ""})
    assert invoke(str(run.parent.parent), "--config", str(config)).exit_code == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(str(empty), "--config", str(config))
    assert result.exit_code == 0 and "0 run(s) checked" in result.output


def test_control_characters_escaped_in_table(tmp_path: Path) -> None:
    config, run = make_lab(tmp_path, {"bell\x07.dat": ""})
    result = invoke("--config", str(config))
    assert result.exit_code == 1
    assert "\x07" not in result.output and "bell\\x07.dat" in result.output


@pytest.mark.parametrize("case", ["missing-path", "file-path", "no-equipment"])
def test_usage_errors_exit_2(tmp_path: Path, case: str) -> None:
    config, run = make_lab(tmp_path, {})
    args = ["--config", str(config)]
    if case == "missing-path":
        args.insert(0, str(tmp_path / "nope"))
    elif case == "file-path":
        args.insert(0, str(run / ".exlab-wizard" / "creation.json"))
    else:
        config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"COLUMNS": "200"}
    return subprocess.run([EXLAB_SYNC, "problems", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


def test_console_script_exit_codes(tmp_path: Path) -> None:
    config, run = make_lab(tmp_path, {"a.txt": "ok"})
    clean = _run_cli("--config", str(config), cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    (run / "LPT1.csv").write_text("")
    dirty = _run_cli("--config", str(config), cwd=tmp_path)
    assert dirty.returncode == 1, dirty.stderr
    assert "reserved_filesystem_name" in dirty.stdout
    missing = _run_cli(str(tmp_path / "nope"), "--config", str(config), cwd=tmp_path)
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr


def test_console_script_bad_config_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "equipment:\n"
        "  - id: CONFOCAL_01\n"
        f"    local_root: {tmp_path}\n"
        "    transport: {type: rsync_ssh, ssh_target: not-a-target, ssh_key_path: ~/.ssh/id, remote_path: /srv}\n"
    )
    result = _run_cli("--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "equipment[0].transport.ssh_target" in lines[0]
