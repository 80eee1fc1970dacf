"""The Validator on real folder trees: what it walks, scans, skips and reports."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from exlab_wizard.config import ValidatorConfig
from exlab_wizard.validator import Finding, Validator

NOW = dt.datetime(2026, 1, 15, 12, 0, tzinfo=dt.UTC)


def creation(kind: str = "experimental", **extra: object) -> dict:
    return {
        "schema_version": "1.0",
        "level": "run",
        "run_kind": kind,
        "paths": {"local": "/data/x", "nas": "//nas/x"},
        "sync_status": "pending",
        **extra,
    }


def make_run(
    root: Path,
    files: dict[str, bytes | str] | None = None,
    *,
    meta: dict | None | str = "default",
    equipment: str = "CONFOCAL_01",
    project: str = "PROJ-0042",
    parent: str = "Runs",
    leaf: str = "Run_2026-01-15_1000",
) -> Path:
    run = root / equipment / project / parent / leaf
    run.mkdir(parents=True)
    if meta == "default":
        meta = creation("test" if parent == "TestRuns" else "experimental")
    if meta is not None:
        (run / ".exlab-wizard").mkdir()
        data = meta if isinstance(meta, str) else json.dumps(meta)
        (run / ".exlab-wizard" / "creation.json").write_text(data)
    for rel, content in (files or {}).items():
        path = run / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        path.write_bytes(content)
    return run


def summary(findings: list[Finding], run: Path | None = None) -> list[tuple[str, str, str, str]]:
    """(rule, path relative to run or absolute, kind, token)."""
    out = []
    for f in findings:
        path = os.path.relpath(f.offending_path, run) if run is not None else f.offending_path
        out.append((f.rule, path, f.offending_kind, f.matched_token))
    return out


def rules_of(findings: list[Finding]) -> set[str]:
    return {f.rule for f in findings}


# -- clean run -----------------------------------------------------------------


def test_clean_run_has_no_findings(tmp_path: Path) -> None:
    run = make_run(
        tmp_path,
        {
            "img_0001.tif": b"\x00\x01",
            "notes.txt": "2 mM <2 mM> NaCl\n",
            "data/a.csv": "x,y\n1,2\n",
            "README.md": "# Run\n\nSee <br> and <name> in prose.\n",
        },
    )
    assert Validator().audit_run(run, now=NOW) == []


# -- names -------------------------------------------------------------------------


def test_bad_names_below_the_run(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"con.txt": "", "sub<x>/f.dat": "", "LPT9.csv": "", "trail./a.bin": "", "a\x07b.bin": ""})
    found = summary(Validator().audit_run(run, now=NOW), run)
    assert ("reserved_filesystem_name", "con.txt", "file_name", "con") in found
    assert ("reserved_filesystem_name", "LPT9.csv", "file_name", "LPT9") in found
    assert ("unresolved_placeholder_token", "sub<x>", "directory_segment", "<x>") in found
    assert ("illegal_filesystem_character", "sub<x>", "directory_segment", "<") in found
    assert ("illegal_filesystem_character", "trail.", "directory_segment", ".") in found
    assert ("illegal_filesystem_character", "a\x07b.bin", "file_name", "\x07") in found


def test_run_own_segments_checked(tmp_path: Path) -> None:
    run = make_run(tmp_path, equipment="EQ{{ id }}", project="<project>", leaf="Run_2026 ")
    found = summary(Validator().audit_run(run, now=NOW))
    assert ("leftover_jinja_marker", str(tmp_path / "EQ{{ id }}"), "directory_segment", "{{ id }}") in found
    assert (
        "unresolved_placeholder_token",
        str(tmp_path / "EQ{{ id }}" / "<project>"),
        "directory_segment",
        "<project>",
    ) in found
    assert ("illegal_filesystem_character", str(run), "directory_segment", " ") in found
    # the folder above the equipment is not the run's business
    tmp_findings = [f for f in Validator().audit_run(run, now=NOW) if f.offending_path == str(tmp_path)]
    assert tmp_findings == []


def test_metadata_folder_names_checked_but_content_not(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / ".exlab-wizard" / "notes.txt").write_text("<placeholder> {{ x }}")
    (run / ".exlab-wizard" / "aux.log").write_text("")
    found = summary(Validator().audit_run(run, now=NOW), run)
    assert found == [("reserved_filesystem_name", ".exlab-wizard/aux.log", "file_name", "aux")]


# -- content -----------------------------------------------------------------------


def test_content_scan_reports_line_and_count(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"notes.txt": "ok\nsample <sample_id>\n<sample_id> again\n{% if x %}\n"})
    findings = Validator().audit_run(run, now=NOW)
    by_rule = {f.rule: f for f in findings}
    assert by_rule["unresolved_placeholder_token"].matched_token == "<sample_id>"
    assert "line 2" in by_rule["unresolved_placeholder_token"].rule_detail
    assert "2 occurrences" in by_rule["unresolved_placeholder_token"].rule_detail
    assert by_rule["leftover_jinja_marker"].offending_kind == "file_content"
    assert "line 4" in by_rule["leftover_jinja_marker"].rule_detail


@pytest.mark.parametrize(
    ("name", "scanned"),
    [
        ("a.txt", True),
        ("a.TXT", True),
        ("a.Csv", True),
        ("a.json", True),
        ("a.yaml", True),
        ("a.py", True),
        ("a.xml", False),  # instrument metadata is full of <Tag> names
        ("a.tif", False),
        ("a", False),
        ("a.txt.bak", False),
    ],
)
def test_content_scan_extensions(tmp_path: Path, name: str, scanned: bool) -> None:
    run = make_run(tmp_path, {name: "value: <unfilled>\n"})
    assert ("unresolved_placeholder_token" in rules_of(Validator().audit_run(run, now=NOW))) is scanned


def test_extensions_config_is_case_insensitive(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"a.LOG": "<x>", "b.xml": "<y>"})
    validator = Validator(ValidatorConfig(content_scan_extensions=[".Log"]))
    assert summary(validator.audit_run(run, now=NOW), run) == [
        ("unresolved_placeholder_token", "a.LOG", "file_content", "<x>")
    ]


@pytest.mark.parametrize("folder", ["plain", "Ünïcode"])
def test_content_candidates_in_any_listing(tmp_path: Path, folder: str) -> None:
    files = {
        f"{folder}/a.TXT": "<a>",
        f"{folder}/é.Csv": "<b>",
        f"{folder}/c.txt.tif": "<c>",
        f"{folder}/.txt": "<d>",
        f"{folder}/sub/d.json": "<e>",
        f"{folder}/x.yml": "<f>",
    }
    run = make_run(tmp_path, files)
    found = {os.path.relpath(f.offending_path, run) for f in Validator().audit_run(run, now=NOW)}
    assert found == {f"{folder}/a.TXT", f"{folder}/é.Csv", f"{folder}/.txt", f"{folder}/sub/d.json", f"{folder}/x.yml"}


def test_binary_file_skipped(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"data.csv": b"<name>\x00\x01\x02", "late_nul.csv": b"x" * 9000 + b"\x00<name>"})
    found = summary(Validator().audit_run(run, now=NOW), run)
    assert found == [("unresolved_placeholder_token", "late_nul.csv", "file_content", "<name>")]


def test_large_file_skipped_whole(tmp_path: Path) -> None:
    limit = 1024  # bytes; content_scan_max_mib is in MiB
    validator = Validator(ValidatorConfig(content_scan_max_mib=limit / (1024 * 1024)))
    run = make_run(tmp_path, {"at_limit.txt": "<x>".ljust(limit, "."), "over.txt": "<y>".ljust(limit + 1, ".")})
    found = summary(validator.audit_run(run, now=NOW), run)
    assert found == [("unresolved_placeholder_token", "at_limit.txt", "file_content", "<x>")]


def test_markdown_prose_not_scanned_front_matter_is(tmp_path: Path) -> None:
    run = make_run(
        tmp_path,
        {
            "a.md": "---\ntitle: <title>\nby: {{ author }}\n---\n# Body <prose_token> {{ not_scanned }}\n",
            "b.md": "# no front matter <x>\n",
            "c.MD": "---\nok: 1\n---\n",
        },
    )
    found = summary(Validator().audit_run(run, now=NOW), run)
    assert sorted(found) == sorted(
        [
            ("unresolved_placeholder_token", "a.md", "file_content", "<title>"),
            ("leftover_jinja_marker", "a.md", "file_content", "{{ author }}"),
        ]
    )
    line = next(f for f in Validator().audit_run(run, now=NOW) if f.matched_token == "<title>").rule_detail
    assert "line 2" in line


def test_unterminated_front_matter_is_soft(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"a.md": "---\ntitle: x\n\n# Body with <br> tags\n"})
    findings = Validator().audit_run(run, now=NOW)
    assert [(f.rule, f.tier) for f in findings] == [("malformed_yaml_front_matter", "soft")]


def test_rendered_files_limit_content_scan(tmp_path: Path) -> None:
    meta = creation(rendered_files=["notes/rendered.txt", "missing.txt", "../outside.txt"])
    run = make_run(tmp_path, {"notes/rendered.txt": "<a>", "instrument.txt": "<b>", "con.txt": "<c>"}, meta=meta)
    found = summary(Validator().audit_run(run, now=NOW), run)
    assert ("unresolved_placeholder_token", "notes/rendered.txt", "file_content", "<a>") in found
    assert not any(path == "instrument.txt" for _, path, _, _ in found)
    # names are still checked everywhere; content of con.txt is not (not rendered)
    assert ("reserved_filesystem_name", "con.txt", "file_name", "con") in found
    assert ("unresolved_placeholder_token", "con.txt", "file_content", "<c>") not in found


def test_rendered_files_absolute_paths_accepted(tmp_path: Path) -> None:
    run_dir = tmp_path / "CONFOCAL_01" / "PROJ-0042" / "Runs" / "Run_2026-01-15_1000"
    meta = creation(rendered_files=[str(run_dir / "r.txt")])
    run = make_run(tmp_path, {"r.txt": "<a>", "s.txt": "<b>"}, meta=meta)
    assert summary(Validator().audit_run(run, now=NOW), run) == [
        ("unresolved_placeholder_token", "r.txt", "file_content", "<a>")
    ]


def test_empty_rendered_files_scans_nothing(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"a.txt": "<a>"}, meta=creation(rendered_files=[]))
    assert Validator().audit_run(run, now=NOW) == []


def test_fifo_is_never_opened(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    os.mkfifo(run / "pipe.txt")
    assert Validator().audit_run(run, now=NOW) == []  # would hang if opened


# -- symlinks ----------------------------------------------------------------------


def test_symlinks_reported_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "bad<x>.txt").write_text("<secret>")
    run = make_run(tmp_path, {"real.txt": "fine"})
    os.symlink(outside, run / "linked_dir")
    os.symlink(outside / "bad<x>.txt", run / "linked.txt")
    os.symlink(tmp_path / "nowhere", run / "dangling")
    findings = Validator().audit_run(run, now=NOW)
    assert {(f.rule, f.tier, os.path.relpath(f.offending_path, run)) for f in findings} == {
        ("symlink_skipped", "soft", "linked_dir"),
        ("symlink_skipped", "soft", "linked.txt"),
        ("symlink_skipped", "soft", "dangling"),
    }


# -- creation.json -----------------------------------------------------------------


def test_orphan_is_soft(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"a.dat": ""}, meta=None)
    findings = Validator().audit_run(run, now=NOW)
    assert [(f.rule, f.tier) for f in findings] == [("orphan", "soft")]


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"level": "run"}),
        json.dumps(creation() | {"schema_version": "2.0"}),
        json.dumps(creation() | {"validation_overrides": "yes"}),
    ],
    ids=["not-json", "not-object", "no-schema", "schema-2", "bad-overrides"],
)
def test_unusable_creation_json_is_hard_not_a_crash(tmp_path: Path, content: str) -> None:
    run = make_run(tmp_path, meta=content)
    findings = Validator().audit_run(run, now=NOW)
    assert [(f.rule, f.tier, f.offending_kind) for f in findings] == [
        ("unreadable_creation_json", "hard", "file_content")
    ]
    assert findings[0].offending_path == str(run / ".exlab-wizard" / "creation.json")


def test_missing_required_fields_are_soft(tmp_path: Path) -> None:
    meta = {"schema_version": "1.0", "level": "run", "sync_status": "pending"}
    run = make_run(tmp_path, meta=meta)
    findings = Validator().audit_run(run, now=NOW)
    assert {(f.rule, f.tier, f.matched_token) for f in findings} == {
        ("missing_required_field", "soft", "run_kind"),
        ("missing_required_field", "soft", "paths"),
    }


def test_mode_prefix_mismatch_uses_run_kind(tmp_path: Path) -> None:
    run = make_run(tmp_path, meta=creation("test"))  # under Runs/Run_
    findings = Validator().audit_run(run, now=NOW)
    assert [(f.rule, f.tier, f.offending_path) for f in findings] == [("mode_prefix_mismatch", "hard", str(run))]


def test_mode_prefix_without_run_kind(tmp_path: Path) -> None:
    good = make_run(tmp_path / "a", meta=None, parent="TestRuns", leaf="TestRun_1")
    bad = make_run(tmp_path / "b", meta=None, parent="TestRuns", leaf="Run_1")
    assert "mode_prefix_mismatch" not in rules_of(Validator().audit_run(good, now=NOW))
    assert "mode_prefix_mismatch" in rules_of(Validator().audit_run(bad, now=NOW))


# -- overrides ---------------------------------------------------------------------


def _override(rule: str, oid: str = "11111111-1111-4111-8111-111111111111", **extra: object) -> dict:
    return {
        "id": oid,
        "problem_class": rule,
        "operator": "asmith",
        "recorded_at": "2026-01-01T00:00:00Z",
        "expires_at": None,
        "reason": "instrument names it so",
        "revoked": False,
        **extra,
    }


def test_active_override_marks_hard_findings(tmp_path: Path) -> None:
    meta = creation(validation_overrides=[_override("reserved_filesystem_name")])
    run = make_run(tmp_path, {"aux.csv": "", "b<x>.dat": ""}, meta=meta)
    findings = Validator().audit_run(run, now=NOW)
    flags = {(f.rule, f.override_active, f.tier) for f in findings}
    assert ("reserved_filesystem_name", True, "hard") in flags
    assert ("unresolved_placeholder_token", False, "hard") in flags


@pytest.mark.parametrize(
    ("entries", "active"),
    [
        ([_override("reserved_filesystem_name", expires_at="2026-02-01T00:00:00Z")], True),
        ([_override("reserved_filesystem_name", expires_at="2026-01-01T00:00:00Z")], False),
        (
            [
                _override("reserved_filesystem_name"),
                {
                    "id": "t1",
                    "revokes": "11111111-1111-4111-8111-111111111111",
                    "operator": "b",
                    "recorded_at": "x",
                    "reason": "r",
                    "revoked": True,
                },
            ],
            False,
        ),
        ([_override("illegal_filesystem_character")], False),
    ],
    ids=["not-expired", "expired", "revoked", "other-rule"],
)
def test_override_activity(tmp_path: Path, entries: list, active: bool) -> None:
    run = make_run(tmp_path, {"aux.csv": ""}, meta=creation(validation_overrides=entries))
    (finding,) = Validator().audit_run(run, now=NOW)
    assert finding.override_active is active


def test_override_never_marks_soft_findings(tmp_path: Path) -> None:
    run = make_run(
        tmp_path, meta=creation(validation_overrides=[_override("missing_required_field")]) | {"level": None}
    )
    (finding,) = Validator().audit_run(run, now=NOW)
    assert (finding.rule, finding.override_active) == ("missing_required_field", False)


# -- order, trees ------------------------------------------------------------------


def test_deterministic_order(tmp_path: Path) -> None:
    files = {f"d{i}/f{j}<x>.txt": "<a> {{ b }}" for i in range(5) for j in range(5)}
    files |= {"con.txt": "", "z.md": "---\nunclosed\n"}
    run = make_run(tmp_path, files, meta=None)
    first = Validator().audit_run(run, now=NOW)
    second = Validator().audit_run(run, now=NOW)
    assert first == second
    tiers = [f.tier for f in first]
    assert tiers == sorted(tiers, key=lambda t: t != "hard")
    hard_paths = [f.offending_path for f in first if f.tier == "hard"]
    assert hard_paths == sorted(hard_paths)


def test_audit_tree_discovers_runs(tmp_path: Path) -> None:
    make_run(tmp_path, {"a<x>.dat": ""}, leaf="Run_1")
    make_run(tmp_path, meta=None, parent="TestRuns", leaf="TestRun_1")
    make_run(tmp_path, meta=None, parent="Runs", leaf="2026-01-15")  # misnamed, still a run
    elsewhere = tmp_path / "CONFOCAL_01" / "PROJ-0042" / "analysis" / "my_run"
    (elsewhere / ".exlab-wizard").mkdir(parents=True)
    (elsewhere / ".exlab-wizard" / "creation.json").write_text(json.dumps(creation()))
    project_meta = tmp_path / "CONFOCAL_01" / "PROJ-0042" / ".exlab-wizard"
    project_meta.mkdir()
    (project_meta / "creation.json").write_text(json.dumps({"schema_version": "1.0", "level": "project"}))
    (tmp_path / "CONFOCAL_01" / "PROJ-0042" / "Runs" / ".hidden").mkdir()
    validator = Validator()
    runs = [os.path.relpath(r, tmp_path) for r in validator.find_runs(tmp_path)]
    assert runs == [
        "CONFOCAL_01/PROJ-0042/Runs/2026-01-15",
        "CONFOCAL_01/PROJ-0042/Runs/Run_1",
        "CONFOCAL_01/PROJ-0042/TestRuns/TestRun_1",
        "CONFOCAL_01/PROJ-0042/analysis/my_run",
    ]
    findings = validator.audit_tree(tmp_path, now=NOW)
    assert {os.path.relpath(f.run_path, tmp_path) for f in findings} == set(runs)
    assert findings == validator.audit_tree(tmp_path, now=NOW)
    # a run root is itself a tree of one run
    run_1 = tmp_path / "CONFOCAL_01" / "PROJ-0042" / "Runs" / "Run_1"
    assert validator.find_runs(run_1) == [str(run_1)]
    assert validator.audit_tree(run_1, now=NOW) == validator.audit_run(run_1, now=NOW)


def test_missing_run_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Validator().audit_run(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        Validator().audit_tree(tmp_path / "file")
