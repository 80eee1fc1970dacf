"""``Validator().audit_run`` on a run already on the NAS: the judgement the gate uses, made once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from exlab_wizard.cache import CreationWriter
from exlab_wizard.sync.gate import evaluate_run
from exlab_wizard.sync.manifest_format import format_manifest, manifest_path
from exlab_wizard.validator import Validator


def _run(root: Path, files: dict[str, str], status: str) -> Path:
    run = root / "CONFOCAL_01" / "PROJ-0042" / "Runs" / "Run_1"
    run.mkdir(parents=True)
    for rel, text in files.items():
        (run / rel).write_text(text)
    (run / ".exlab-wizard").mkdir()
    (run / ".exlab-wizard" / "creation.json").write_text(
        json.dumps(
            {
                "schema_version": "1.0",
                "level": "run",
                "run_kind": "experimental",
                "paths": {"local": str(run), "nas": "//nas/x"},
                "sync_status": status,
            }
        )
    )
    return run


def _manifest(run: Path, rels: list[str]) -> None:
    manifest_path(run).write_bytes(
        format_manifest({rel: hashlib.sha256((run / rel).read_bytes()).hexdigest() for rel in rels})
    )


def _flags(findings: list) -> list[tuple[str, str, bool]]:
    return [(f.rule, Path(f.offending_path).name, f.synced_under_prior_policy) for f in findings if f.tier == "hard"]


def test_audit_run_flags_hard_findings_on_a_synced_run(tmp_path: Path) -> None:
    run = _run(tmp_path, {"con.txt": "", "notes.txt": "<name>"}, "synced")
    _manifest(run, ["con.txt", "notes.txt"])
    (run / "aux.csv").write_text("added after the sync")
    assert sorted(_flags(Validator().audit_run(run))) == [
        ("reserved_filesystem_name", "aux.csv", False),
        ("reserved_filesystem_name", "con.txt", True),
        ("unresolved_placeholder_token", "notes.txt", True),
    ]


def test_audit_run_on_a_run_never_synced_flags_nothing(tmp_path: Path) -> None:
    run = _run(tmp_path, {"con.txt": ""}, "pending")
    assert _flags(Validator().audit_run(run)) == [("reserved_filesystem_name", "con.txt", False)]


def test_gate_and_validator_give_the_same_judgement(tmp_path: Path) -> None:
    run = _run(tmp_path, {"con.txt": "", "notes.txt": "<name>", "nul.txt": ""}, "synced")
    _manifest(run, ["con.txt", "notes.txt"])
    (run / "notes.txt").write_text("<edited> since")  # content changed: judged anew
    audit = Validator().audit_run(run)
    gate = evaluate_run(run, validator=Validator(), writer=CreationWriter()).findings
    assert _flags(audit) == _flags(gate)
    assert sorted(_flags(audit)) == [
        ("reserved_filesystem_name", "con.txt", True),
        ("reserved_filesystem_name", "nul.txt", False),
        ("unresolved_placeholder_token", "notes.txt", False),
    ]
