"""The central log (``<state_dir>/exlab-sync.log``) is rolled over: years of service never fill the state_dir's disk."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from exlab_wizard.cli import sync_cmds


@pytest.fixture
def central(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sync_cmds, "CENTRAL_LOG_MAX_BYTES", 16 << 10)
    root = logging.getLogger()
    before = list(root.handlers)
    path = sync_cmds.configure_logging(SimpleNamespace(state_dir=tmp_path))  # type: ignore[arg-type]
    added = [h for h in root.handlers if h not in before]
    try:
        yield path
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()


def test_the_central_log_is_rolled_over_and_bounded(central: Path) -> None:
    log = logging.getLogger("exlab_wizard.test_rotation")
    for i in range(2000):  # ~250 KB of records: fifteen times the (patched) size
        log.warning("record %05d %s", i, "x" * 100)
    files = sorted(central.parent.glob(central.name + "*"))
    assert [f.name for f in files] == [central.name] + [
        f"{central.name}.{n}" for n in range(1, sync_cmds.CENTRAL_LOG_BACKUPS + 1)
    ]
    assert all(f.stat().st_size <= (16 << 10) + 200 for f in files)
    assert "record 01999" in central.read_text()  # the newest records are in the current file
