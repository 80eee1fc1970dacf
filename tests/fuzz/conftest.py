"""Shared parts of the property-based fuzzing of every input the engine reads.

Every target's property: the call ends in a valid result or in the typed error
its contract names (``ConfigError`` naming a key, ``CacheError`` with a kind, a
``Finding``, ``ManifestFormatError``, a ``Completeness`` reason), never in
another exception, never in a hang (each call runs in a thread with a
deadline), and never with a changed file (the bytes and times of every file
under the case's folder are compared before and after).

``EXLAB_FUZZ_EXAMPLES`` sets the examples per target (default 200, which
keeps the module well under a minute). A long run:

    EXLAB_FUZZ_EXAMPLES=5000 PYTHONPATH=$PWD/src .venv/bin/python -m pytest -q --timeout=0 tests/fuzz

prints the cases tried per target at the end ("fuzz cases tried").
"""

from __future__ import annotations

import collections
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("EXLAB_FUZZ_EXAMPLES", "200"))
#: A single call that takes longer than this counts as a hang.
#: (Generous: a 2 KiB config of nested "{" takes ~2 CPU-seconds to refuse, more on a busy machine.)
CALL_DEADLINE_S = float(os.environ.get("EXLAB_FUZZ_CALL_DEADLINE_S", "60"))

settings.register_profile(
    "exlab-fuzz",
    max_examples=EXAMPLES,
    deadline=None,  # a hang is caught by guarded(); hypothesis' deadline would flag a busy machine
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
FUZZ = settings.get_profile("exlab-fuzz")

#: Cases tried per target in this session (printed in the terminal summary).
CASES: collections.Counter[str] = collections.Counter()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if CASES:
        terminalreporter.write_sep("-", f"fuzz cases tried (EXLAB_FUZZ_EXAMPLES={EXAMPLES})")
        for target, count in sorted(CASES.items()):
            terminalreporter.write_line(f"{target:<40} {count:>7}")
        terminalreporter.write_line(f"{'total':<40} {sum(CASES.values()):>7}")


def guarded(call: Callable[[], Any], timeout: float = CALL_DEADLINE_S) -> tuple[str, Any]:
    """Run ``call`` in a thread with a deadline: ``("ok", value)`` or ``("raised", exception)``.

    Fails the example when the call is still running at the deadline (a hang).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["ok"] = call()
        except BaseException as exc:  # judged by the test thread
            outcome["raised"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the call did not return within {timeout} s"
    return ("ok", outcome["ok"]) if "ok" in outcome else ("raised", outcome["raised"])


def snapshot(root: Path, *, lock_files: bool = True) -> dict[str, tuple[int, bytes | str | None, int, int]]:
    """``{relative path: (mode, bytes or link target, mtime_ns, ctime_ns)}`` of everything under ``root``.

    ``lock_files=False`` leaves out ``*.lock`` files and the times of folders:
    a writer that takes creation.json's lock creates its lock file (which
    stays, by design) even when it then refuses to write.
    """
    out: dict[str, tuple[int, bytes | str | None, int, int]] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if not lock_files and name.endswith(".lock"):
                continue
            info = os.lstat(path)
            times = (info.st_mtime_ns, info.st_ctime_ns)
            if os.path.islink(path):
                body: bytes | str | None = os.readlink(path)
            elif os.path.isfile(path):
                body = Path(path).read_bytes()
            else:
                body = None
                times = times if lock_files else (0, 0)
            out[os.path.relpath(path, root)] = (info.st_mode, body, *times)
    return out


@contextmanager
def case_dir() -> Iterator[Path]:
    """A fresh folder for one example (hypothesis examples cannot share pytest's tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="exlab-fuzz-") as name:
        yield Path(name)
