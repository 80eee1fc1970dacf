"""CPU time per test file over a whole suite run: where the suite's time goes on a busy machine.

A pytest plugin, off unless asked for. Each test's CPU is the pytest worker's
own (``RUSAGE_SELF``) and that of the child processes reaped while it ran
(``RUSAGE_CHILDREN``: the ``exlab-sync`` calls, ``serve``, rsync, rclone,
ssh, and their own children). A child reaped later (a server a fixture stops
at the end of its module, a process left to a later test) counts for the test
that reaps it, so read the figures by file, not by test::

    ./scripts/test.sh -p tests.cpu_per_test          # writes /tmp/exlab-test-cpu/<pid>.tsv
    .venv/bin/python -m tests.cpu_per_test [DIR]     # CPU by file, most first

``EXLAB_TEST_CPU_DIR`` sets the folder (emptied by hand between runs).
"""

from __future__ import annotations

import collections
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

DIR = Path(os.environ.get("EXLAB_TEST_CPU_DIR", "/tmp/exlab-test-cpu"))
_out: Any = None


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    global _out
    if _out is None:
        DIR.mkdir(parents=True, exist_ok=True)
        _out = (DIR / f"{os.getpid()}.tsv").open("a", buffering=1)
    own, kids, started = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), time.monotonic()
    yield
    own, kids = _cpu(resource.RUSAGE_SELF) - own, _cpu(resource.RUSAGE_CHILDREN) - kids
    _out.write(f"{item.nodeid}\t{own:.3f}\t{kids:.3f}\t{time.monotonic() - started:.3f}\n")


def rows(folder: Path = DIR) -> Iterator[tuple[str, float, float, float]]:
    """``(node id, worker CPU s, children CPU s, wall s)`` of every test recorded in ``folder``."""
    for tsv in sorted(folder.glob("*.tsv")):
        for line in tsv.read_text().splitlines():
            nodeid, own, kids, wall = line.split("\t")
            yield nodeid, float(own), float(kids), float(wall)


def main(folder: Path = DIR, top: int = 40) -> None:
    by_file: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for nodeid, own, kids, wall in rows(folder):
        row = by_file[nodeid.split("::")[0]]
        row[0] += own
        row[1] += kids
        row[2] += wall
        row[3] += 1
    own_s, kids_s = sum(r[0] for r in by_file.values()), sum(r[1] for r in by_file.values())
    print(f"{sum(r[3] for r in by_file.values())} tests: {own_s:.0f} CPU-s in the workers, {kids_s:.0f} in children")
    print(f"{'cpu s':>7} {'worker':>7} {'children':>8} {'test s':>7} {'tests':>5}  file")
    for name, (own, kids, wall, count) in sorted(by_file.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:top]:
        print(f"{own + kids:7.1f} {own:7.1f} {kids:8.1f} {wall:7.1f} {count:5d}  {name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DIR)
