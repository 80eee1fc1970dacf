"""``exlab-sync doctor`` while a mount transport's share stops answering.

The share's FUSE daemon (exfat-fuse) is SIGSTOPped: every syscall on it
blocks, as on a hard-mounted share whose server went silent. ``doctor`` is
what a data manager runs to learn why nothing syncs: it says the share does
not answer (a FAIL line) within a bounded time, and goes on to the next
equipment; it does not hang.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from exlab_wizard.sync import doctor
from tests.fixtures.silent_share import silent_share
from tests.lab import client_lab


def test_doctor_on_a_silent_share_answers_in_bounded_time(tmp_path: Path) -> None:
    lab = client_lab(tmp_path)
    with silent_share(tmp_path) as (share, freezer):
        data = lab.config_data()
        data["equipment"][0]["transport"]["mount_path"] = str(share)
        config = lab.write_config(data)
        freezer.freeze()
        # The real CLI in a process of its own (its exit is part of the promise), its 15 s limit made 2 s.
        launch = (
            "import sys; from exlab_wizard.sync import doctor; doctor.MOUNT_CHECK_TIMEOUT_S = 2.0; "
            "from exlab_wizard.cli import main; sys.argv = ['exlab-sync', *sys.argv[1:]]; main()"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", launch, "doctor", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(timeout=60)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
        finally:
            freezer.thaw()
            if code is None:
                out, err = proc.communicate(timeout=30)
        assert code is not None, (
            "doctor gave no answer in 60 s on a silent share (it printed, once the share answered again: "
            f"{out[-400:]!r})"
        )
        assert code == 1 and "CONFOCAL_01" in out, out + err
        assert f"{share} does not answer within 2 s" in out, out


def test_the_next_equipment_is_checked_after_a_silent_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "MOUNT_CHECK_TIMEOUT_S", 1.0, raising=False)
    lab = client_lab(tmp_path)
    found: list[list[doctor.Check]] = []
    with silent_share(tmp_path) as (share, freezer):
        data = lab.config_data()
        data["equipment"][0]["transport"]["mount_path"] = str(share)
        config, _ = doctor.check_config_file(lab.write_config(data))
        assert config is not None and len(config.equipment) >= 2
        freezer.freeze()
        # On a thread of its own: a check blocked in the share must not keep this test from thawing it.
        checking = threading.Thread(target=lambda: found.append(asyncio.run(doctor.run_checks(config))), daemon=True)
        started = time.monotonic()
        try:
            checking.start()
            checking.join(20)
            took = time.monotonic() - started
            ended = bool(found)
        finally:
            freezer.thaw()
        checking.join(30)
    assert ended, "run_checks did not end on a silent share"
    checks = found[0]
    silent = [c for c in checks if c.equipment == "CONFOCAL_01" and c.name == "mount_path"]
    assert silent and not silent[0].ok and "does not answer within 1 s" in silent[0].detail, silent
    others = {c.equipment for c in checks if c.equipment not in (None, "CONFOCAL_01")}
    assert others, checks
    assert took < 10, took
