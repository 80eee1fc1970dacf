"""The validator and the gate on a run whose creation.json (or manifest) is hostile.

Each unusable creation.json is one blocking finding ``unreadable_creation_json``
with the reason, never an exception, a hang or an unbounded read; the file is
left exactly as it was. The same files never hang the search for runs, and a
checksums.sha256 that is a FIFO never hangs the gate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from exlab_wizard.cache import CreationWriter
from exlab_wizard.sync.gate import check_run
from exlab_wizard.sync.manifest_format import manifest_path
from exlab_wizard.validator import Validator
from tests.helpers import BOMB, finishes

GOOD = {"schema_version": "1.0", "level": "run", "run_kind": "experimental", "sync_status": "pending"}


def make_run(tmp_path: Path, name: str = "Run_1") -> Path:
    run = tmp_path / "lab" / "CONFOCAL_01" / "P" / "Runs" / name
    (run / ".exlab-wizard").mkdir(parents=True)
    (run / "data.txt").write_text("fine\n")
    return run


def spoil(run: Path, how: str, tmp_path: Path) -> str:
    """Make the run's creation.json unusable; return a word the reason must hold."""
    target = run / ".exlab-wizard" / "creation.json"
    if how == "nested":
        target.write_bytes(BOMB)
        return "nested too deeply"
    if how == "fifo":
        os.mkfifo(target)
        return "FIFO"
    if how == "symlink":
        good = tmp_path / "elsewhere.json"
        good.write_text(json.dumps(GOOD))
        target.symlink_to(good)
        return "symbolic link"
    if how == "too_large":
        with target.open("wb") as handle:
            handle.write(json.dumps(GOOD).encode())
            handle.truncate(64 * 1024 * 1024)  # sparse: no disk used
        return "larger than"
    raise AssertionError(how)


HOW = ["nested", "fifo", "symlink", "too_large"]


def _state(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_size, st.st_mtime_ns


@pytest.mark.parametrize("how", HOW)
def test_validator_reports_one_blocking_finding_with_the_reason(tmp_path: Path, how: str) -> None:
    run = make_run(tmp_path)
    word = spoil(run, how, tmp_path)
    findings = finishes(lambda: Validator().audit_run(run))
    hard = [f for f in findings if f.tier == "hard"]
    assert [f.rule for f in hard] == ["unreadable_creation_json"]
    assert word in hard[0].rule_detail
    assert hard[0].offending_path == str(run / ".exlab-wizard" / "creation.json")


@pytest.mark.parametrize("how", HOW)
def test_gate_blocks_and_never_rewrites_the_file(tmp_path: Path, how: str) -> None:
    run = make_run(tmp_path)
    spoil(run, how, tmp_path)
    before = _state(run / ".exlab-wizard" / "creation.json")
    result = finishes(lambda: check_run(run, validator=Validator(), writer=CreationWriter()))
    assert not result.eligible
    assert [f.rule for f in result.blocking] == ["unreadable_creation_json"]
    assert _state(run / ".exlab-wizard" / "creation.json") == before


@pytest.mark.parametrize("how", ["nested", "fifo", "symlink"])
def test_the_search_for_runs_passes_over_them(tmp_path: Path, how: str) -> None:
    # Outside Runs/TestRuns a folder is a run only when its creation.json says
    # so: that file is read too, and must not hang or crash the search.
    odd = tmp_path / "lab" / "CONFOCAL_01" / "P" / "Imports" / "batch"
    (odd / ".exlab-wizard").mkdir(parents=True)
    spoil(odd, how, tmp_path)
    run = make_run(tmp_path)
    (run / ".exlab-wizard" / "creation.json").write_text(json.dumps(GOOD))
    assert finishes(lambda: Validator().find_runs(tmp_path / "lab")) == [str(run)]


def test_a_manifest_that_is_a_fifo_does_not_hang_the_gate(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / ".exlab-wizard" / "creation.json").write_text(json.dumps({**GOOD, "sync_status": "synced"}))
    (run / "con.txt").write_text("")  # a hard finding: the gate asks what is already on the NAS
    os.mkfifo(manifest_path(run))
    result = finishes(lambda: check_run(run, validator=Validator(), writer=CreationWriter()))
    assert not result.eligible and [f.rule for f in result.blocking] == ["reserved_filesystem_name"]
