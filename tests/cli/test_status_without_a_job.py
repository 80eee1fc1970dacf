"""``exlab-sync status PATH`` for a path with no job: no run at all, or a run and why it waits.

A typo, a missing folder or a folder outside every equipment's
``<local_root>/<id>`` used to print ``none``, exit 0, as a run with no job yet
does; ``enqueue`` refuses the same path with exit 2 and says why. Now
``status`` refuses it the same way. A real run with no job still prints
``none``, followed by the completion watcher's reason when the watcher holds
it back (``GET /api/watcher`` says the same), computed without a service.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import cli
from tests.lab import EQ, Lab

SENTINEL = "acquisition_complete.flag"


def _lab(tmp_path: Path, **equipment: object) -> tuple[Lab, Path]:
    lab = Lab.build(tmp_path / "site", equipment=(EQ,))
    data = lab.config_data()
    data["equipment"][0].update(equipment)
    return lab, lab.write_config(data)


def _no_run(lab: Lab, tmp_path: Path, which: str) -> Path:
    if which == "typo":
        return lab.local_root / EQ / "PROJ-1" / "Runs" / "Run_2026-01-0l"  # never existed
    if which == "elsewhere":
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        return outside
    if which == "a file":
        run = lab.make_run("Run_2026-01-01")
        return run / "data.bin"
    link = lab.run_path("Run_link")  # a symbolic link to a run: enqueue refuses it too
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(lab.make_run("Run_2026-01-02"))
    return link


@pytest.mark.parametrize("which", ["typo", "elsewhere", "a file", "a link"])
def test_status_of_a_path_that_is_no_run_fails_as_enqueue_does(tmp_path: Path, which: str) -> None:
    lab, config = _lab(tmp_path)
    path = _no_run(lab, tmp_path, which)
    refused = cli("enqueue", "--config", str(config), str(path))
    assert refused.returncode == 2 and refused.stderr.startswith("error: "), refused.stdout + refused.stderr
    for json_flag in ((), ("--json",)):
        shown = cli("status", *json_flag, "--config", str(config), str(path))
        assert (shown.returncode, shown.stdout, shown.stderr) == (2, "", refused.stderr), (which, json_flag)
        assert len(shown.stderr.splitlines()) == 1
    if which == "typo":
        assert "not a folder" in refused.stderr
    if which == "elsewhere":
        assert "not under any configured equipment's <local_root>/<id>" in refused.stderr
    assert not (lab.state / "queue.db").exists() or cli("jobs", "--config", str(config)).stdout == "no jobs\n"


def test_status_says_a_run_waits_for_its_sentinel(tmp_path: Path) -> None:
    lab, config = _lab(tmp_path)
    run = lab.make_run("Run_2026-01-01", {"a.bin": b"x"})
    shown = cli("status", "--config", str(config), str(run), columns=40)
    assert (shown.returncode, shown.stdout) == (0, f"none (waiting for the sentinel file {SENTINEL})\n"), shown.stderr
    document = json.loads(cli("status", "--json", "--config", str(config), str(run)).stdout)
    assert document == {
        "run_path": str(run),
        "status": "none",
        "job": None,
        "waiting_reason": f"waiting for the sentinel file {SENTINEL}",
    }


def test_a_finished_run_with_no_job_is_just_none(tmp_path: Path) -> None:
    lab, config = _lab(tmp_path)
    run = lab.make_run("Run_2026-01-01", {"a.bin": b"x", SENTINEL: b""})
    project = run.parent.parent  # a folder enqueue accepts, which the watcher never looks at
    for path in (run, project):
        shown = cli("status", "--config", str(config), str(path))
        assert (shown.returncode, shown.stdout) == (0, "none\n"), shown.stderr
        document = json.loads(cli("status", "--json", "--config", str(config), str(path)).stdout)
        assert document["status"] == "none" and document["waiting_reason"] is None


def test_status_says_what_a_manifest_still_lacks(tmp_path: Path) -> None:
    lab, config = _lab(tmp_path, completeness_signal="manifest")
    run = lab.make_run("Run_2026-01-01", {"a.bin": b"x"})
    assert (
        cli("status", "--config", str(config), str(run)).stdout == "none (waiting for the manifest run_manifest.json)\n"
    )
    (run / "run_manifest.json").write_text(json.dumps({"files": [{"path": "b.bin", "size": 10}]}))
    assert cli("status", "--config", str(config), str(run)).stdout == "none (waiting for b.bin (missing))\n"


def test_status_says_a_run_of_an_equipment_without_a_signal_is_enqueued_by_hand(tmp_path: Path) -> None:
    lab, config = _lab(tmp_path, completeness_signal="none")
    run = lab.make_run("Run_2026-01-01", {"a.bin": b"x"})
    shown = cli("status", "--config", str(config), str(run))
    assert shown.stdout == "none (completeness_signal is none: enqueue by hand)\n"


def test_a_run_with_a_job_shows_its_job_and_no_waiting_reason(tmp_path: Path) -> None:
    lab, config = _lab(tmp_path)
    run = lab.make_run("Run_2026-01-01", {"a.bin": b"x"})  # no sentinel: enqueued by hand all the same
    assert cli("enqueue", "--config", str(config), str(run)).returncode == 0
    document = json.loads(cli("status", "--json", "--config", str(config), str(run)).stdout)
    assert document["status"] == "queued" and document["job"]["run_path"] == str(run)
    assert document["waiting_reason"] is None
    run.rename(run.with_name("Run_moved"))  # a job whose folder is gone is still shown, not refused
    gone = cli("status", "--json", "--config", str(config), str(run))
    assert gone.returncode == 0 and json.loads(gone.stdout)["status"] == "queued"
