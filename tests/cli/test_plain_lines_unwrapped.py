"""Plain CLI lines are never broken, piped or in an 80-column terminal.

rich's default console hard-wraps at the terminal width, 80 columns when
stdout is piped: ``enqueue`` put the job id on a line of its own (a script
reading the ``queued`` line found none), and the demo's check command was
split after ``cd '<path>' &&``, so pasting it ran a bare ``cd``. Each command
family that prints a path on a plain line is run here piped, with no
``COLUMNS``, under a long lab folder, and its line must stay whole.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.helpers import EXE, flip_byte_keep_stat
from tests.lab import EQ, Lab

LONG = "a-lab-folder-with-a-typical-long-name" * 2
RUN = "Run_2026-01-01_timelapse-of-the-whole-plate-at-four-wavelengths"
STACK = "sub/stack_of-the-whole-plate-at-four-wavelengths.raw"


def _piped(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The console script with stdout a pipe and no ``COLUMNS``: rich's width is 80."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["NO_COLOR"] = "1"
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _line(out: str, start: str) -> str:
    found = [line for line in out.splitlines() if line.strip().startswith(start)]
    assert found, f"no line starts with {start!r}: {out!r}"
    return found[0]


def _lab(tmp_path: Path, **sections: object) -> tuple[Lab, Path]:
    lab = Lab.build(tmp_path / LONG, equipment=(EQ,), nas_per_equipment=False)
    data = lab.config_data(sync={"backoff_s": [0.01], "scan_interval_s": 3600}, **sections)
    return lab, lab.write_config(data)


def _job_id(config: Path, run: Path) -> str:
    status = _piped("status", str(run), "--config", str(config), "--json")
    return json.loads(status.stdout)["job"]["id"]


def test_enqueue_prints_the_job_id_on_the_queued_line(tmp_path: Path) -> None:
    lab, config = _lab(tmp_path)
    run = lab.make_run(RUN, {"a.bin": b"x"})
    out = _piped("enqueue", "--config", str(config), str(run))
    assert out.returncode == 0, out.stderr
    queued = _line(out.stdout, "queued")
    assert str(run) in queued, f"the run's path is split: {out.stdout!r}"
    assert "job " in queued and len(queued.split("job ")[1].strip()) == 32, (
        f"the job id is not on the 'queued' line: {out.stdout!r}"
    )


def test_demo_check_command_is_one_pastable_line(tmp_path: Path) -> None:
    demo = tmp_path / LONG / "demo"
    out = _piped("demo", "--dir", str(demo), timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    cd = _line(out.stdout, "cd ")
    assert "sha256sum -c .exlab-wizard/checksums.sha256" in cd, f"the demo's check command is split: {lines[-4:]!r}"
    jobs = _line(out.stdout, "exlab-sync jobs")
    assert jobs.strip() == f"exlab-sync jobs --config '{demo / 'config.yaml'}'", lines[-4:]
    assert _line(out.stdout, "config:").strip() == f"config:     {demo / 'config.yaml'}"
    # The result table is still drawn within 80 columns.
    table = [line for line in lines if line.startswith(("┏", "│", "└"))]
    assert table and max(len(line) for line in table) <= 80, table


def test_override_add_and_revoke_lines_stay_whole(tmp_path: Path) -> None:
    lab, config = _lab(tmp_path)
    run = lab.make_run(RUN, {"aux.csv": "a", "data.bin": "x"})  # aux.csv: a reserved name blocks it
    label = f"{EQ}/{lab.project}/Runs/{RUN}"
    added = _piped(
        "override", "add", str(run), "--rule", "reserved_filesystem_name", "--reason", "vendor name",
        "--expires", "30d", "--config", str(config),
    )  # fmt: skip
    assert added.returncode == 0, added.stdout + added.stderr
    line = _line(added.stdout, "override ")
    assert f"added: reserved_filesystem_name for {label}, until " in line, added.stdout
    override_id = line.split()[1]
    revoked = _piped("override", "revoke", override_id, "--reason", "renamed", "--config", str(config))
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    line = _line(revoked.stdout, "override ")
    assert line.startswith(f"override {override_id} revoked (") and line.endswith(f") for {label}"), revoked.stdout


def test_problems_summary_line_stays_whole(tmp_path: Path) -> None:
    lab, config = _lab(tmp_path)
    clean = lab.make_run(RUN, {"data.bin": "x"})
    none = _piped("problems", str(clean), "--config", str(config))
    assert none.returncode == 0, none.stdout + none.stderr
    assert none.stdout.strip() == f"No problems found: 1 run(s) checked under {clean}", none.stdout
    lab.make_run("Run_2026-01-02", {"aux.csv": "a"})
    found = _piped("problems", "--config", str(config))
    assert found.returncode == 1, found.stdout + found.stderr
    line = _line(found.stdout, "2 run(s) checked:")
    assert line == "2 run(s) checked: 1 blocking, 0 hard let through (override or synced earlier), 0 soft", found.stdout


def test_restore_and_retry_lines_stay_whole(tmp_path: Path) -> None:
    cleanup = {"enabled": True, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": True}
    lab, config = _lab(tmp_path, nas_cleanup=cleanup)
    run = lab.make_run(RUN, {STACK: os.urandom(3000), "notes.txt": b"ok\n"})
    done = _piped("enqueue", "--wait", str(run), "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    job = _job_id(config, run)

    flip_byte_keep_stat(run / STACK, 5)
    assert _piped("cleanup", "--config", str(config)).returncode == 1  # FAILED local_damage
    restored = _piped("restore", str(run), "--config", str(config))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    line = _line(restored.stdout, f"restored {STACK}")
    assert line.startswith(f"restored {STACK} (the local bytes kept at .exlab-wizard/replaced/"), restored.stdout
    assert line.endswith(f"/{STACK})"), restored.stdout

    flip_byte_keep_stat(run / STACK, 5)
    assert _piped("cleanup", "--config", str(config)).returncode == 1
    accepted = _piped("retry", "--accept-local", job, "--config", str(config))
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert _line(accepted.stdout, "queued") == f"queued {run} job {job}", accepted.stdout
    kept = _line(accepted.stdout, "the local bytes of 1 file(s)")
    assert kept.endswith("the NAS keeps the verified ones under .exlab-wizard/previous/" + kept.rsplit("/", 2)[1] + "/")
