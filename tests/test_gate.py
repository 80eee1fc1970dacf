"""The Pre-Sync Gate: blocks, overrides, runs already synced, and what it writes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest

from exlab_wizard.cache import CacheError, CreationWriter
from exlab_wizard.sync.gate import check_run, evaluate_run
from exlab_wizard.sync.manifest_format import format_manifest, manifest_path
from exlab_wizard.validator import Validator

NOW = dt.datetime(2026, 1, 15, 12, 0, tzinfo=dt.UTC)
OVERRIDE_ID = "0f0c7a5e-2b4f-4d8e-9a51-7f3e2c1d0b9a"


def make_run(root: Path, files: dict[str, str], *, status: str | None = "pending", **extra: object) -> Path:
    run = root / "CONFOCAL_01" / "PROJ-0042" / "Runs" / "Run_2026-01-15_1000"
    run.mkdir(parents=True)
    for rel, text in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    if status is not None:
        (run / ".exlab-wizard").mkdir()
        meta = {
            "schema_version": "1.0",
            "level": "run",
            "run_kind": "experimental",
            "paths": {"local": str(run), "nas": "//nas/x"},
            "sync_status": status,
            "lab_note": "kept",
            **extra,
        }
        (run / ".exlab-wizard" / "creation.json").write_text(json.dumps(meta))
    return run


def write_manifest(run: Path, rels: list[str]) -> None:
    hashes = {rel: hashlib.sha256((run / rel).read_bytes()).hexdigest() for rel in rels}
    manifest_path(run).parent.mkdir(exist_ok=True)
    manifest_path(run).write_bytes(format_manifest(hashes))


def meta(run: Path) -> dict:
    return json.loads((run / ".exlab-wizard" / "creation.json").read_text())


def gate(run: Path, **kwargs: object):
    return check_run(run, validator=Validator(), writer=CreationWriter(), now=NOW, **kwargs)


def test_clean_run_eligible_and_untouched(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"a.txt": "fine"})
    before = (run / ".exlab-wizard" / "creation.json").read_bytes()
    result = gate(run)
    assert (result.eligible, result.blocking, result.overrides_relied_on) == (True, [], [])
    assert (run / ".exlab-wizard" / "creation.json").read_bytes() == before


def test_blocked_run_recorded(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"con.txt": "", "ok.txt": "<name>"})
    result = gate(run)
    assert not result.eligible
    assert {f.rule for f in result.blocking} == {"reserved_filesystem_name", "unresolved_placeholder_token"}
    assert all(f.tier == "hard" and not f.override_active for f in result.blocking)
    assert meta(run)["sync_status"] == "blocked_by_validation"
    assert meta(run)["lab_note"] == "kept"


def test_soft_findings_never_block(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"a.md": "---\nunclosed: yes\n"}, status=None)
    result = gate(run)
    assert result.eligible
    assert {f.rule for f in result.findings} == {"orphan", "malformed_yaml_front_matter"}
    assert not (run / ".exlab-wizard").exists()  # the gate does not create creation.json


def test_orphan_with_hard_finding_blocked_but_not_written(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"aux.csv": ""}, status=None)
    result = gate(run)
    assert not result.eligible
    assert not (run / ".exlab-wizard" / "creation.json").exists()


def test_override_lets_run_through(tmp_path: Path) -> None:
    override = {
        "id": OVERRIDE_ID,
        "problem_class": "reserved_filesystem_name",
        "operator": "asmith",
        "recorded_at": "2026-01-10T09:00:00Z",
        "expires_at": None,
        "reason": "vendor file",
        "revoked": False,
    }
    run = make_run(tmp_path, {"aux.csv": ""}, validation_overrides=[override])
    result = gate(run)
    assert result.eligible
    assert result.overrides_relied_on == [OVERRIDE_ID]
    (finding,) = result.findings
    assert (finding.rule, finding.tier, finding.override_active) == ("reserved_filesystem_name", "hard", True)
    assert meta(run)["sync_status"] == "pending"


def test_expired_override_blocks(tmp_path: Path) -> None:
    override = {
        "id": OVERRIDE_ID,
        "problem_class": "reserved_filesystem_name",
        "operator": "asmith",
        "recorded_at": "2026-01-01T09:00:00Z",
        "expires_at": "2026-01-14T00:00:00Z",
        "reason": "r",
        "revoked": False,
    }
    run = make_run(tmp_path, {"aux.csv": ""}, validation_overrides=[override])
    result = gate(run)
    assert not result.eligible and result.overrides_relied_on == []


def test_synced_run_finding_on_manifest_file_does_not_block(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"con.txt": "", "notes.txt": "<name>", "sub<x>/data.bin": "x"}, status="synced")
    write_manifest(run, ["con.txt", "notes.txt", "sub<x>/data.bin"])
    result = gate(run)
    assert result.eligible
    assert result.blocking == []
    assert {f.rule for f in result.findings} >= {"reserved_filesystem_name", "unresolved_placeholder_token"}
    assert all(f.synced_under_prior_policy for f in result.findings if f.tier == "hard")
    assert meta(run)["sync_status"] == "synced"


def test_synced_run_own_segment_finding_does_not_block(tmp_path: Path) -> None:
    run = tmp_path / "CONFOCAL_01" / "PROJ <x>" / "Runs" / "Run_1"
    run.mkdir(parents=True)
    (run / ".exlab-wizard").mkdir()
    (run / ".exlab-wizard" / "creation.json").write_text(
        json.dumps(
            {
                "schema_version": "1.0",
                "level": "run",
                "run_kind": "experimental",
                "paths": {"local": str(run)},
                "sync_status": "synced",
            }
        )
    )
    result = gate(run)
    assert result.eligible
    assert result.findings and all(f.synced_under_prior_policy for f in result.findings)


def test_new_bad_file_in_synced_run_blocks(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"con.txt": "", "good.dat": "x"}, status="synced")
    write_manifest(run, ["con.txt", "good.dat"])
    (run / "aux.csv").write_text("added after the sync")
    result = gate(run)
    assert not result.eligible
    assert [(f.rule, Path(f.offending_path).name) for f in result.blocking] == [("reserved_filesystem_name", "aux.csv")]
    prior = [f for f in result.findings if f.synced_under_prior_policy]
    assert [Path(f.offending_path).name for f in prior] == ["con.txt"]
    assert meta(run)["sync_status"] == "blocked_by_validation"
    # once the new file is gone the old finding is again "synced earlier": the manifest, not the status, says so
    (run / "aux.csv").unlink()
    again = gate(run)
    assert again.eligible and meta(run)["sync_status"] == "blocked_by_validation"  # the client moves it on


def test_edited_content_in_synced_run_blocks(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"notes.txt": "<name>"}, status="synced")
    write_manifest(run, ["notes.txt"])
    assert gate(run).eligible
    (run / "notes.txt").write_text("<other>")
    result = gate(run)
    assert not result.eligible and [f.matched_token for f in result.blocking] == ["<other>"]


def test_override_not_relied_on_when_prior_sync_covers(tmp_path: Path) -> None:
    override = {
        "id": OVERRIDE_ID,
        "problem_class": "reserved_filesystem_name",
        "operator": "asmith",
        "recorded_at": "2026-01-10T09:00:00Z",
        "expires_at": None,
        "reason": "r",
        "revoked": False,
    }
    run = make_run(tmp_path, {"con.txt": ""}, status="synced", validation_overrides=[override])
    write_manifest(run, ["con.txt"])
    result = gate(run)
    assert result.eligible and result.overrides_relied_on == []


def test_fixed_run_eligible_status_left_to_client(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"con.txt": ""})
    assert not gate(run).eligible
    (run / "con.txt").rename(run / "console.txt")
    assert gate(run).eligible
    assert meta(run)["sync_status"] == "blocked_by_validation"


def test_unreadable_creation_json_blocks_and_is_left_alone(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"a.txt": "ok"})
    (run / ".exlab-wizard" / "creation.json").write_text("{broken")
    result = gate(run)
    assert not result.eligible
    assert [f.rule for f in result.blocking] == ["unreadable_creation_json"]
    assert (run / ".exlab-wizard" / "creation.json").read_text() == "{broken"
    assert result.status_error is None


def test_evaluate_run_writes_nothing(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"con.txt": ""})
    result = evaluate_run(run, validator=Validator(), writer=CreationWriter(), now=NOW)
    assert not result.eligible
    assert meta(run)["sync_status"] == "pending"


def test_write_failure_reported_not_raised(tmp_path: Path) -> None:
    class StuckWriter(CreationWriter):
        def set_sync_status(self, run_path: Path, status: str):  # type: ignore[override]
            raise CacheError("lock_timeout", "creation.json.lock held too long")

    run = make_run(tmp_path, {"con.txt": ""})
    result = check_run(run, validator=Validator(), writer=StuckWriter(), now=NOW)
    assert not result.eligible
    assert "lock" in (result.status_error or "")


def test_missing_run_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        gate(tmp_path / "nope")
