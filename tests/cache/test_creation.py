"""creation.json: the typed view, schema checks, and writers that keep every other key."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exlab_wizard.cache import (
    CREATION_NAME,
    CacheError,
    CacheErrorKind,
    CreationJson,
    CreationWriter,
    LockTimeout,
    creation_lock_path,
    creation_path,
)
from exlab_wizard.validator.overrides import active_override_for
from tests.helpers import hold_lock_in_child, release_child

FULL: dict[str, Any] = {
    "schema_version": "1.0",
    "wizard_version": "0.9.3",
    "level": "run",
    "run_kind": "experimental",
    "paths": {"local": "/data/lab/CONFOCAL_01/P/Runs/Run_1", "nas": "//nas01/lab/P/Runs/Run_1", "extra": [1, 2]},
    "operator": {"name": "asmith", "badge": {"id": 7, "tags": ["a", None, 1.5]}},
    "sync_status": "pending",
    "validation_overrides": [],
    "rendered_files": ["notes.md"],
    "zz_last": True,
}


def make_run(tmp_path: Path, content: Any = None, *, raw_bytes: bytes | None = None) -> Path:
    run = tmp_path / "CONFOCAL_01" / "P" / "Runs" / "Run_1"
    (run / ".exlab-wizard").mkdir(parents=True)
    if raw_bytes is not None:
        creation_path(run).write_bytes(raw_bytes)
    elif content is not None:
        creation_path(run).write_text(json.dumps(content, separators=(",", ":")), encoding="utf-8")
    return run


def on_disk(run: Path) -> dict[str, Any]:
    return json.loads(creation_path(run).read_text(encoding="utf-8"))


# -- paths and the typed view -------------------------------------------------


def test_paths() -> None:
    run = Path("/data/lab/X/P/Runs/Run_1")
    assert CREATION_NAME == "creation.json"
    assert creation_path(run) == run / ".exlab-wizard" / "creation.json"
    assert creation_lock_path(run) == run / ".exlab-wizard" / "creation.json.lock"


def test_view_exposes_known_fields_and_keeps_raw() -> None:
    view = CreationJson.from_bytes(json.dumps(FULL).encode())
    assert view.schema_version == "1.0"
    assert view.level == "run"
    assert view.run_kind == "experimental"
    assert view.paths["nas"] == "//nas01/lab/P/Runs/Run_1"
    assert view.sync_status == "pending"
    assert view.validation_overrides == []
    assert view.rendered_files == ["notes.md"]
    assert view.raw == FULL
    assert list(view.raw) == list(FULL)
    assert view.get("wizard_version") == "0.9.3"


def test_view_defaults_for_absent_fields() -> None:
    view = CreationJson.from_bytes(b'{"schema_version": "1.3", "paths": null, "validation_overrides": null}')
    assert view.paths == {}
    assert view.validation_overrides == []
    assert view.rendered_files is None
    assert view.level is view.run_kind is view.sync_status is None


def test_a_utf8_bom_is_tolerated() -> None:
    assert CreationJson.from_bytes(b"\xef\xbb\xbf" + b'{"schema_version": "1.0"}').schema_version == "1.0"


@pytest.mark.parametrize("version", ["1.0", "1.7", "1.12"])
def test_any_minor_of_major_1_is_accepted(version: str) -> None:
    assert CreationJson.from_bytes(json.dumps({"schema_version": version}).encode()).schema_version == version


@pytest.mark.parametrize(
    ("document", "kind", "message"),
    [
        (
            {"schema_version": "2.0"},
            CacheErrorKind.UNSUPPORTED_SCHEMA,
            "schema_version 2.0 is not supported (major must be 1)",
        ),
        ({"schema_version": "0.9"}, CacheErrorKind.UNSUPPORTED_SCHEMA, "major must be 1"),
        ({"schema_version": "x"}, CacheErrorKind.UNSUPPORTED_SCHEMA, 'schema_version "x" is not "MAJOR.MINOR"'),
        ({"schema_version": "1"}, CacheErrorKind.UNSUPPORTED_SCHEMA, 'is not "MAJOR.MINOR"'),
        ({"schema_version": 1.0}, CacheErrorKind.UNSUPPORTED_SCHEMA, 'is not "MAJOR.MINOR"'),
        ({"level": "run"}, CacheErrorKind.UNSUPPORTED_SCHEMA, "has no schema_version"),
        ([1, 2], CacheErrorKind.MALFORMED, "must hold a JSON object"),
        ({"schema_version": "1.0", "sync_status": 3}, CacheErrorKind.MALFORMED, "sync_status"),
        ({"schema_version": "1.0", "validation_overrides": {}}, CacheErrorKind.MALFORMED, "validation_overrides"),
        ({"schema_version": "1.0", "validation_overrides": ["x"]}, CacheErrorKind.MALFORMED, "validation_overrides"),
        ({"schema_version": "1.0", "rendered_files": "a.md"}, CacheErrorKind.MALFORMED, "rendered_files"),
    ],
)
def test_unusable_documents_raise_a_clear_error(document: Any, kind: CacheErrorKind, message: str) -> None:
    with pytest.raises(CacheError) as caught:
        CreationJson.from_bytes(json.dumps(document).encode(), source="/r/.exlab-wizard/creation.json")
    assert caught.value.kind is kind
    assert message in str(caught.value)
    assert "/r/.exlab-wizard/creation.json" in str(caught.value)


@pytest.mark.parametrize("data", [b"", b"{", b"{'a': 1}", b'{"schema_version": "1.0",}', b"\xff\xfe"])
def test_malformed_json(data: bytes) -> None:
    with pytest.raises(CacheError) as caught:
        CreationJson.from_bytes(data, source="creation.json")
    assert caught.value.kind is CacheErrorKind.MALFORMED
    assert "creation.json is not valid JSON" in str(caught.value)


# -- reading -----------------------------------------------------------------


def test_read_absent_is_none(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert CreationWriter().read(run) is None
    assert not (run / ".exlab-wizard").exists()  # reading creates nothing


def test_read_names_the_file_in_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"schema_version": "2.0"})
    with pytest.raises(CacheError) as caught:
        CreationWriter().read(run)
    assert str(creation_path(run)) in str(caught.value)
    assert caught.value.path == creation_path(run)


# -- writers keep every other key ----------------------------------------------


def _writer_calls(writer: CreationWriter, run: Path) -> None:
    writer.set_sync_status(run, "synced")
    override = writer.append_override(
        run, problem_class="reserved_filesystem_name", operator="asmith", reason="AUX.tif"
    )
    writer.append_tombstone(run, revokes=override["id"], operator="bjones", reason="renamed")
    writer.record(run, "local_cleaned", {"at": "2024-01-01T00:00:00Z", "files": 3})
    writer.ensure_minimal(run, local_path=str(run), nas_path=None)
    writer.update(run, lambda raw: raw.setdefault("tool_notes", []).append("x"))


def test_every_writer_keeps_unknown_keys_and_order(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    writer = CreationWriter()
    _writer_calls(writer, run)
    after = on_disk(run)
    for key in ("wizard_version", "operator", "zz_last"):
        assert after[key] == FULL[key]
    assert after["paths"] == FULL["paths"]
    assert list(after)[: len(FULL)] == list(FULL)  # old keys in place, new ones appended
    assert list(after)[len(FULL) :] == ["local_cleaned", "tool_notes"]
    assert after["sync_status"] == "synced"
    assert [e["revoked"] for e in after["validation_overrides"]] == [False, True]


def test_written_file_is_indented_utf8_with_final_newline(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"schema_version": "1.0", "operator": "Zoë"})
    CreationWriter().set_sync_status(run, "failed")
    text = creation_path(run).read_bytes().decode("utf-8")
    assert text == '{\n  "schema_version": "1.0",\n  "operator": "Zoë",\n  "sync_status": "failed"\n}\n'
    assert [p.name for p in (run / ".exlab-wizard").iterdir() if p.name.endswith(".tmp")] == []


def test_update_returns_the_view_of_the_file(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    view = CreationWriter().update(run, lambda raw: raw.__setitem__("level", "session"))
    assert view.level == "session"
    assert view.raw == on_disk(run)


def test_update_that_raises_writes_nothing(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    before = creation_path(run).read_bytes()

    def mutate(raw: dict[str, Any]) -> None:
        raw["sync_status"] = "synced"
        raise KeyError("stop")

    with pytest.raises(KeyError):
        CreationWriter().update(run, mutate)
    assert creation_path(run).read_bytes() == before


def test_update_refuses_a_result_that_is_not_a_creation_json(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    before = creation_path(run).read_bytes()
    writer = CreationWriter()
    with pytest.raises(CacheError) as caught:
        writer.update(run, lambda raw: raw.__setitem__("schema_version", "2.0"))
    assert caught.value.kind is CacheErrorKind.UNSUPPORTED_SCHEMA
    with pytest.raises(CacheError) as caught:
        writer.update(run, lambda raw: raw.__setitem__("when", dt.datetime.now()))
    assert caught.value.kind is CacheErrorKind.MALFORMED
    with pytest.raises(CacheError):
        writer.update(run, lambda raw: raw.__setitem__("x", float("nan")))
    assert creation_path(run).read_bytes() == before


@pytest.mark.parametrize("content", [b"{not json", b'{"schema_version": "2.0", "x": 1}'])
def test_writers_never_overwrite_a_file_they_cannot_read(tmp_path: Path, content: bytes) -> None:
    run = make_run(tmp_path, raw_bytes=content)
    writer = CreationWriter()
    for call in (
        lambda: writer.set_sync_status(run, "synced"),
        lambda: writer.ensure_minimal(run, local_path=str(run), nas_path=None),
        lambda: writer.record(run, "k", 1),
    ):
        with pytest.raises(CacheError):
            call()
    assert creation_path(run).read_bytes() == content


def test_unchanged_update_does_not_rewrite(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    before = creation_path(run).read_bytes()  # compact, as another tool wrote it
    view = CreationWriter().update(run, lambda raw: None)
    assert creation_path(run).read_bytes() == before
    assert view.raw == FULL


def test_update_on_a_run_without_metadata_folder_creates_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    view = CreationWriter().set_sync_status(run, "blocked_by_validation")
    assert on_disk(run) == {"schema_version": "1.0", "sync_status": "blocked_by_validation"}
    assert view.sync_status == "blocked_by_validation"
    assert creation_lock_path(run).exists()


def test_missing_run_folder_is_an_io_error(tmp_path: Path) -> None:
    with pytest.raises(CacheError) as caught:
        CreationWriter().set_sync_status(tmp_path / "nope", "pending")
    assert caught.value.kind is CacheErrorKind.IO
    assert not (tmp_path / "nope").exists()


# -- the individual writer methods ---------------------------------------------


def test_set_sync_status_validates(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    writer = CreationWriter()
    for status in ("pending", "synced", "failed", "blocked_by_validation"):
        assert writer.set_sync_status(run, status).sync_status == status
    with pytest.raises(ValueError, match="sync_status must be one of"):
        writer.set_sync_status(run, "done")
    assert on_disk(run)["sync_status"] == "blocked_by_validation"


def _parse_utc(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert moment.utcoffset() == dt.timedelta(0)
    return moment


def test_append_override_entry_shape(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    writer = CreationWriter()
    before = dt.datetime.now(dt.UTC)
    expires = dt.datetime(2031, 5, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    entry = writer.append_override(
        run, problem_class="leftover_jinja_marker", operator="asmith", reason="vendor syntax", expires_at=expires
    )
    assert list(entry) == ["id", "problem_class", "operator", "recorded_at", "expires_at", "reason", "revoked"]
    assert uuid.UUID(entry["id"]).version == 4
    assert entry["problem_class"] == "leftover_jinja_marker"
    assert entry["operator"] == "asmith" and entry["reason"] == "vendor syntax"
    assert entry["revoked"] is False
    assert before - dt.timedelta(seconds=1) <= _parse_utc(entry["recorded_at"]) <= dt.datetime.now(dt.UTC)
    assert _parse_utc(entry["expires_at"]) == expires
    assert entry["expires_at"] == "2031-05-01T12:00:00Z"
    assert on_disk(run)["validation_overrides"] == [entry]

    second = writer.append_override(run, problem_class="x", operator="asmith", reason="")
    assert second["expires_at"] is None
    assert [e["id"] for e in on_disk(run)["validation_overrides"]] == [entry["id"], second["id"]]
    now = dt.datetime.now(dt.UTC)
    assert active_override_for("leftover_jinja_marker", writer.read(run).validation_overrides, now) == entry


def test_append_override_rejects_bad_arguments(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    writer = CreationWriter()
    with pytest.raises(ValueError, match="time zone"):
        writer.append_override(run, problem_class="x", operator="a", reason="r", expires_at=dt.datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="operator"):
        writer.append_override(run, problem_class="x", operator=" ", reason="r")
    with pytest.raises(ValueError, match="problem_class"):
        writer.append_override(run, problem_class="", operator="a", reason="r")
    assert on_disk(run)["validation_overrides"] == []


def test_append_tombstone(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    writer = CreationWriter()
    override = writer.append_override(run, problem_class="x", operator="asmith", reason="ok")
    tomb = writer.append_tombstone(run, revokes=override["id"], operator="bjones", reason="no longer needed")
    assert list(tomb) == ["id", "revokes", "operator", "recorded_at", "reason", "revoked"]
    assert tomb["revoked"] is True and tomb["revokes"] == override["id"]
    assert uuid.UUID(tomb["id"]).version == 4 and tomb["id"] != override["id"]
    _parse_utc(tomb["recorded_at"])
    assert on_disk(run)["validation_overrides"] == [override, tomb]
    assert active_override_for("x", writer.read(run).validation_overrides, dt.datetime.now(dt.UTC)) is None


def test_append_tombstone_refuses_an_unknown_id(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    writer = CreationWriter()
    tomb_target = writer.append_override(run, problem_class="x", operator="a", reason="r")
    tomb = writer.append_tombstone(run, revokes=tomb_target["id"], operator="a", reason="r")
    before = creation_path(run).read_bytes()
    for bad in (str(uuid.uuid4()), tomb["id"]):  # unknown, or a tombstone's own id
        with pytest.raises(ValueError, match="no override with id"):
            writer.append_tombstone(run, revokes=bad, operator="a", reason="typo")
    assert creation_path(run).read_bytes() == before


def test_ensure_minimal_on_an_orphan_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    view = CreationWriter().ensure_minimal(run, local_path=str(run), nas_path="/mnt/nas/P/Runs/Run_1")
    assert on_disk(run) == {
        "schema_version": "1.0",
        "level": "run",
        "paths": {"local": str(run), "nas": "/mnt/nas/P/Runs/Run_1"},
        "sync_status": "pending",
        "created_by": "exlab-sync",
    }
    assert view.raw == on_disk(run)
    again = CreationWriter().ensure_minimal(tmp_path / "run", local_path="other", nas_path=None)
    assert again.paths["local"] == str(run)


def test_ensure_minimal_leaves_an_existing_file_byte_for_byte(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    before = creation_path(run).read_bytes()
    mtime = creation_path(run).stat().st_mtime_ns
    view = CreationWriter().ensure_minimal(run, local_path="/elsewhere", nas_path=None)
    assert creation_path(run).read_bytes() == before
    assert creation_path(run).stat().st_mtime_ns == mtime
    assert view.raw == FULL


def test_record_sets_one_top_level_key(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    writer = CreationWriter()
    writer.record(run, "local_cleaned", {"files": 12, "bytes": 4096})
    writer.record(run, "sync_status", "synced")
    after = on_disk(run)
    assert after["local_cleaned"] == {"files": 12, "bytes": 4096}
    assert {k: v for k, v in after.items() if k not in ("local_cleaned", "sync_status")} == {
        k: v for k, v in FULL.items() if k != "sync_status"
    }
    with pytest.raises(ValueError):
        writer.record(run, "", 1)


def test_writer_lock_timeout_against_another_process(tmp_path: Path) -> None:
    run = make_run(tmp_path, FULL)
    before = creation_path(run).read_bytes()
    child = hold_lock_in_child(creation_lock_path(run))
    try:
        with pytest.raises(CacheError) as caught:
            CreationWriter(lock_timeout_seconds=0.2).set_sync_status(run, "synced")
        assert isinstance(caught.value, LockTimeout)
        assert caught.value.kind is CacheErrorKind.LOCK_TIMEOUT
        assert "creation.json.lock" in str(caught.value)
        assert CreationWriter().read(run).raw == FULL  # readers are not blocked
    finally:
        release_child(child)
    assert creation_path(run).read_bytes() == before
    assert CreationWriter(lock_timeout_seconds=2).set_sync_status(run, "synced").sync_status == "synced"


# -- property: unknown keys survive a round trip ---------------------------------

KNOWN = {"schema_version", "level", "run_kind", "paths", "sync_status", "validation_overrides", "rendered_files"}
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
EXTRA_KEYS = st.dictionaries(st.text(max_size=10).filter(lambda k: k not in KNOWN), JSON_VALUES, max_size=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    extras_before=EXTRA_KEYS,
    extras_after=EXTRA_KEYS,
    minor=st.integers(min_value=0, max_value=99),
    status=st.sampled_from(["pending", "synced", "failed", "blocked_by_validation"]),
    indent=st.sampled_from([None, 2, 4]),
)
def test_property_round_trip_keeps_unknown_keys(
    tmp_path: Path,
    extras_before: dict[str, Any],
    extras_after: dict[str, Any],
    minor: int,
    status: str,
    indent: int | None,
) -> None:
    run = tmp_path / "run"
    (run / ".exlab-wizard").mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = dict(extras_before)
    document["schema_version"] = f"1.{minor}"
    document["paths"] = {"local": "/l", "nas": None, **{f"x{k}": v for k, v in extras_after.items()}}
    document["sync_status"] = "pending"
    for key, value in extras_after.items():
        document.setdefault(key, value)
    creation_path(run).write_text(json.dumps(document, indent=indent, ensure_ascii=bool(minor % 2)), encoding="utf-8")

    writer = CreationWriter()
    writer.set_sync_status(run, status)
    back = writer.read(run)
    assert back is not None
    assert back.sync_status == status
    expected = dict(document, sync_status=status)
    assert back.raw == expected
    assert list(back.raw) == list(document)
    assert json.loads(creation_path(run).read_text(encoding="utf-8")) == expected
    for key in set(extras_before) | set(extras_after):
        assert back.raw[key] == document[key]
