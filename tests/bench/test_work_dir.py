"""Every benchmark's ``--dir`` refuses a folder that does not exist in one line, before any work."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("script", ["run_all", "small_profile", "sync_mount", "sync_network", "validator"])
def test_a_missing_work_folder_is_a_one_line_usage_error(
    script: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/<script>.py` runs it
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])
    main = importlib.import_module(script).main
    missing = tmp_path / "not-made"
    with pytest.raises(SystemExit) as exited:
        main(["--dir", str(missing)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"{script}.py: error: argument --dir: {missing}: no such folder (create it first)"
    assert not missing.exists()
