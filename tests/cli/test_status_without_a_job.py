"""``exlab-sync status PATH`` for a path with no job: no run at all, or a run with no job yet.

A typo, a missing folder or a folder outside every equipment's
``<local_root>/<id>`` used to print ``none``, exit 0, as a run with no job yet
does; ``enqueue`` refuses the same path with exit 2 and says why. Now
``status`` refuses it the same way. A real run with no job still prints
``none``.
"""

from __future__ import annotations

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


def test_a_run_folder_with_no_job_is_still_none(tmp_path: Path) -> None:
    lab, config = _lab(tmp_path)
    run = lab.make_run("Run_2026-01-01", {"a.bin": b"x", SENTINEL: b""})
    shown = cli("status", "--config", str(config), str(run))
    assert (shown.returncode, shown.stdout) == (0, "none\n"), shown.stderr
