"""``python -m bench.run_all --quick`` writes a results file with every section and figure.

The smoke run of the one benchmark command (tiny data, one round): what is
checked is that every benchmark still runs end to end and that the file says
what it must (command, date, commit, machine, the method of the copies, each
section and the targets), not the figures themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(240)


def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    sections = _run_all().SECTIONS
    out = tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--quick", "--no-lock", "--out", str(out), "--dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    for title in sections:
        assert f"## {title}\n" in text, title
    assert "(not measured)" not in text
    for must in ("git commit:", "date:", "kernel", "CPUs", "copies:", "total time of this run"):
        assert must in text, must
    # every dataset has its floor and the mount figures against their anchor
    for name in ("big", "small", "mixed"):
        assert f"**{name}**" in text
        assert f"| M/MA | {name} |" in text
    for ratio in ("R/RR | small", "C/CB | small", "audit_tree / find", "hash_tree / sha256sum", "status() at"):
        assert ratio in text, ratio
    assert "peak RSS at 4,000 files" in text
    assert " targets met." in text
    # nothing left behind: no loop mount, no work folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("exlab-bench-all-")]
    # a missed transport ratio is followed by what would meet it, from the run's own medians
    transports = text.split("\n## 2.")[1].split("\n## 3.")[0]
    if "| **missed** |" in transports:
        assert "\n### What limits each missed ratio" in transports


def _run_all():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run_all
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return run_all


def test_what_limits_a_missed_mount_ratio_is_figured_against_a_plain_copy() -> None:
    med = {"floor": 10.0, "cp": 8.0, "M": 9.0, "MA": 12.0}
    line = _run_all().what_limits("M", "MA", "big", 0.6, med, None)
    # 0.6 x 12 s = 7.2 s: 0.90x cp + sync, 0.72x the direct floor; ours 1.12x cp + sync, the anchor 1.50x
    assert "at most 7.20 s: 0.90x `cp -a` + `sync` in this run (8.00 s," in line
    assert "0.72x the direct floor" in line and "1.12x `cp -a` + `sync`; the anchor 1.50x" in line
    assert "Reading" not in line  # no read back measured: nothing said of it
    med["readback"] = 3.0
    line = _run_all().what_limits("M", "MA", "big", 0.6, med, None)
    # cp 8 s + read back 3 s = 11 s, 1.53x the 7.2 s allowed; ours 9 s is 0.82x the two one after the other
    assert "Reading `cp`'s copy back from storage alone took 3.00 s" in line
    assert "one after the other, 11.00 s, 1.53x what the target allows" in line
    assert "ours took 9.00 s, 0.82x the two one after the other." in line


def test_what_limits_a_missed_ratio_against_the_unsynced_rsync_names_the_sync() -> None:
    med = {"floor": 1.0, "cp": 1.0, "R": 4.4, "RR": 4.5, "RN": 3.0}
    line = _run_all().what_limits("R", "RN", "small", 1.0, med, 1.2)
    assert "at most 3.00 s" in line and "took 1.20 s more" in line and "ours is 0.98" in line
    assert _run_all().what_limits("R", "RN", "small", 1.0, med, None).endswith("; ours took 4.40 s.")


def test_a_ratio_just_over_its_target_is_not_printed_as_the_target() -> None:
    shown = _run_all().shown
    assert shown(6.80 / 6.77, 1.0) == "1.004"  # missed: "1.00" would read as met
    assert shown(1.0, 1.0) == "1.00" and shown(0.998, 1.0) == "1.00" and shown(1.47, 1.0) == "1.47"
    assert shown(0.603, 0.6) == "0.603" and shown(0.61, 0.6) == "0.61"
