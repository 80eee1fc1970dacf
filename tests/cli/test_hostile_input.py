"""The console script on hostile input: a finding or one line, never a traceback, a hang or a crash.

Exit codes: 1 when the command found a problem (an unusable creation.json, an
unparsable manifest), 2 for a config error (one line naming the key).
"""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest

from tests.helpers import BOMB
from tests.helpers import cli as run_cli
from tests.lab import EQ, Lab, write_creation, write_files

MEMORY_CAP = 2 << 30  # a read of /dev/zero must not be able to take the machine down with it


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, columns=400, timeout=60, preexec_fn=_cap_memory, errors="backslashreplace")


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ")
    return line


def lab(tmp_path: Path, **extra: object) -> tuple[Path, Path]:
    """A lab with one clean run; returns (config file, run folder)."""
    folders = Lab.build(tmp_path, equipment=(EQ,), nas_per_equipment=False)
    run = folders.run_path("Run_2026-01-15_1000")
    write_creation(run, paths=False)
    write_files(run, {"data.txt": "fine\n"})
    return folders.write_config(folders.config_data(**extra)), run


def spoil(run: Path, how: str) -> str:
    target = run / ".exlab-wizard" / "creation.json"
    target.unlink()
    if how == "nested":
        target.write_bytes(BOMB)
        return "nested too deeply"
    if how == "fifo":
        os.mkfifo(target)
        return "FIFO"
    target.symlink_to("/dev/zero")
    return "symbolic link"


# -- an unusable creation.json ------------------------------------------------------------


@pytest.mark.parametrize("how", ["nested", "fifo", "dev_zero"])
def test_problems_prints_the_finding(tmp_path: Path, how: str) -> None:
    config, run = lab(tmp_path)
    reason = spoil(run, how)
    for args in ((str(run),), ()):  # one run, and the search of every equipment's runs
        result = cli("problems", *args, "--config", str(config))
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and "RecursionError" not in result.stdout + result.stderr
        assert "unreadable_creation_json" in result.stdout
        assert reason in " ".join(result.stdout.replace("│", " ").split())


@pytest.mark.parametrize("how", ["nested", "fifo", "dev_zero"])
def test_enqueue_reports_the_run_blocked_with_the_reason(tmp_path: Path, how: str) -> None:
    config, run = lab(tmp_path)
    reason = spoil(run, how)
    result = cli("enqueue", str(run), "--config", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "RecursionError" not in result.stdout + result.stderr
    assert "blocked" in result.stdout and "unreadable_creation_json" in result.stdout
    assert reason in " ".join(result.stdout.split())
    assert (run / ".exlab-wizard" / "creation.json").is_symlink() == (how == "dev_zero")


# -- verify on a manifest it cannot use -------------------------------------------------------


@pytest.mark.parametrize("how", ["garbage", "fifo"])
def test_verify_on_an_unusable_manifest_is_a_problem_found(tmp_path: Path, how: str) -> None:
    config, run = lab(tmp_path)
    manifest = run / ".exlab-wizard" / "checksums.sha256"
    if how == "garbage":
        manifest.write_bytes(b"\x00\x01not a sha256sum line\n\xff\xfe\n")
    else:
        os.mkfifo(manifest)
    line = one_line_error(cli("verify", str(run), "--config", str(config)), 1)
    assert "checksums.sha256" in line and "ManifestFormatError" not in line


# -- config errors: one line naming the key, exit 2 ---------------------------------------------


def test_a_state_dir_that_is_a_file_is_named(tmp_path: Path) -> None:
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0::/root:/bin/sh\n")
    config, _ = lab(tmp_path, state_dir=str(a_file))
    for command in ("jobs", "cleanup", "status"):
        line = one_line_error(cli(command, "--config", str(config)), 2)
        assert "state_dir: " in line and "FileExistsError" not in line


@pytest.mark.parametrize("text", ["", "null\n"])
def test_an_empty_config_says_there_is_no_equipment(tmp_path: Path, text: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    line = one_line_error(cli("jobs", "--config", str(config)), 2)
    assert "equipment: " in line and "defines no equipment" in line


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"sync": {"scan_interval_s": 1e300}}, "sync.scan_interval_s: "),
        ({"sync": {"backoff_s": [1e300]}}, "sync.backoff_s: "),
    ],
)
def test_a_number_that_would_overflow_is_refused_naming_the_key(tmp_path: Path, extra: dict, key: str) -> None:
    config, _ = lab(tmp_path, **extra)
    line = one_line_error(cli("jobs", "--config", str(config)), 2)
    assert key in line
