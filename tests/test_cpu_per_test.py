"""The opt-in plugin that counts CPU per test file (``-p tests.cpu_per_test``) writes and sums its figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import cpu_per_test

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_per_test_counts_the_worker_and_its_children(tmp_path: Path, capsys) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import subprocess, sys\n"
        "def test_spins_in_a_child():\n"
        "    subprocess.run([sys.executable, '-c', 'import time\\nt=time.process_time()\\n"
        "while time.process_time() - t < 0.3: pass'], check=True)\n"
        "def test_spins_here():\n"
        "    import time\n"
        "    t = time.process_time()\n"
        "    while time.process_time() - t < 0.3: pass\n"
    )
    out = tmp_path / "cpu"
    env = {**os.environ, "EXLAB_TEST_CPU_DIR": str(out), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.cpu_per_test", "-p", "no:cacheprovider", str(probe)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {nodeid.split("::")[1]: (own, kids) for nodeid, own, kids, _wall in cpu_per_test.rows(out)}
    assert set(rows) == {"test_spins_in_a_child", "test_spins_here"}
    assert rows["test_spins_in_a_child"][1] >= 0.3  # the child's CPU
    assert rows["test_spins_here"][0] >= 0.3 and rows["test_spins_here"][1] < 0.1  # the worker's own
    cpu_per_test.main(out)
    shown = capsys.readouterr().out
    assert shown.startswith("2 tests: ") and "test_probe.py" in shown
