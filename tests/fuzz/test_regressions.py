"""Shrunk examples the fuzzers found, kept as plain tests (each failed before its fix)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from exlab_wizard.cache import CreationWriter
from exlab_wizard.config import ConfigError, load_config
from exlab_wizard.sync.manifest_format import format_manifest, parse_manifest
from exlab_wizard.validator.override_ops import OverrideError, revoke_override


def _run_with_creation(tmp_path: Path, raw: dict) -> Path:
    run = tmp_path / "lab" / "CONFOCAL_01" / "PROJ-1" / "Runs" / "Run_2026-01-01"
    (run / ".exlab-wizard").mkdir(parents=True)
    (run / ".exlab-wizard" / "creation.json").write_text(json.dumps(raw))
    return run


@pytest.mark.parametrize("odd_id", [[], {}, ["a"], {"a": 1}])
def test_revoking_beside_an_override_whose_id_is_not_text_is_not_found(tmp_path: Path, odd_id: object) -> None:
    # Found by test_override_operations_on_generated_files_end_in_an_entry_or_a_typed_refusal:
    # an entry with a JSON list or object as its id made revoke_override raise TypeError
    # (unhashable type), a 500 from POST /api/overrides/{id}/revoke.
    run = _run_with_creation(tmp_path, {"schema_version": "1.0", "validation_overrides": [{"id": odd_id}]})
    before = (run / ".exlab-wizard" / "creation.json").read_bytes()
    with pytest.raises(OverrideError) as caught:
        revoke_override(CreationWriter(), run, "a", reason="wrong run", operator="jane")
    assert caught.value.kind == "not_found"
    assert (run / ".exlab-wizard" / "creation.json").read_bytes() == before


def test_a_file_named_dash_at_the_run_root_passes_sha256sum_check(tmp_path: Path) -> None:
    # Found by test_our_rendering_is_what_gnu_sha256sum_prints_and_checks (files={b"-": b"\x00"}):
    # the line "<hex>  -" makes `sha256sum -c` hash its standard input instead of the file.
    (tmp_path / "-").write_bytes(b"\x00")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "-").write_bytes(b"\x01")
    hashes = {"-": hashlib.sha256(b"\x00").hexdigest(), "sub/-": hashlib.sha256(b"\x01").hexdigest()}
    manifest = format_manifest(hashes)
    assert parse_manifest(manifest) == hashes
    (tmp_path / "checksums.sha256").write_bytes(manifest)
    check = subprocess.run(
        ["sha256sum", "--strict", "-c", "checksums.sha256"],
        cwd=tmp_path,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_state_dir_name_too_long_for_the_file_system_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    # Found by test_generated_structures_load_or_name_a_key (EXLAB_FUZZ_EXAMPLES=2000): state_dir of
    # 5000 characters made load_config raise OSError ENAMETOOLONG instead of a ConfigError.
    config = tmp_path / "config.yaml"
    config.write_text(
        "equipment:\n  - id: CONFOCAL_01\n    local_root: /tmp/lab\n"
        "    transport: {type: mount, mount_path: /tmp/nas}\n" + f"state_dir: {tmp_path / ('a' * 5000)}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.problems[0].startswith("state_dir: "), caught.value.problems
    assert "File name too long" in caught.value.problems[0]
