"""Shared helpers for the sync benchmarks: datasets, timing, ratios, peak memory.

Kept small and stable; ``bench/sync_mount.py`` and ``bench/sync_network.py``
both use it.

Datasets (issue 3), each scaled by ``scale`` (1.0 = full size):

* ``big``: 1 GiB as 16 files of 64 MiB (file size scaled);
* ``small``: 20,000 files of 4 KiB in 100 folders (file count scaled);
* ``mixed``: 200 x 2 MiB, 2,000 x 16 KiB (counts scaled) and 3 x 128 MiB
  (size scaled).

File contents are incompressible pseudo-random bytes, different in every
file, generated quickly from one random pool.

Example::

    spec = dataset("small", scale=0.05)
    write_dataset(run_folder, spec)
    times = {"cp": [], ...}; times["cp"].append(timed(lambda: sh(["cp", "-a", a, b]))[0])
    print(summary_line("cp -a + sync", times["cp"]))
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "new_run",
    "interleave",
    "DATASETS",
    "Dataset",
    "dataset",
    "fmt_bytes",
    "fmt_s",
    "median",
    "ratio",
    "run_measured",
    "sh",
    "timed",
    "write_dataset",
]

KIB = 1 << 10
MIB = 1 << 20
DATASETS = ("big", "small", "mixed")


@dataclass(frozen=True)
class Dataset:
    """A named list of ``(relative path, size in bytes)``."""

    name: str
    files: tuple[tuple[str, int], ...]

    @property
    def total_bytes(self) -> int:
        return sum(size for _rel, size in self.files)

    def __str__(self) -> str:
        return f"{self.name}: {len(self.files)} files, {fmt_bytes(self.total_bytes)}"


def _count(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _size(n: int, scale: float) -> int:
    return max(KIB, int(n * scale) // KIB * KIB)


def dataset(name: str, scale: float = 1.0) -> Dataset:
    """The file list of dataset ``name`` (one of :data:`DATASETS`) at ``scale``."""
    files: list[tuple[str, int]] = []
    if name == "big":
        files = [(f"stack_{i:02d}.bin", _size(64 * MIB, scale)) for i in range(16)]
    elif name == "small":
        count = _count(20_000, scale)
        folders = min(100, count)
        files = [(f"well_{i % folders:03d}/frame_{i:05d}.bin", 4 * KIB) for i in range(count)]
    elif name == "mixed":
        files += [(f"images/img_{i:04d}.bin", 2 * MIB) for i in range(_count(200, scale))]
        files += [(f"events/part_{i // 100:02d}/ev_{i:05d}.bin", 16 * KIB) for i in range(_count(2_000, scale))]
        files += [(f"volume_{i}.bin", _size(128 * MIB, scale)) for i in range(3)]
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return Dataset(name, tuple(files))


def new_run(root: Path, equipment: str, name: str, created_by: str) -> Path:
    """A run folder ``<root>/<equipment>/PROJ-0001/Runs/Run_2026-12-01_<name>`` with its creation.json, no data yet."""
    run = root / equipment / "PROJ-0001" / "Runs" / f"Run_2026-12-01_{name}"
    meta = run / ".exlab-wizard"
    meta.mkdir(parents=True)
    creation = {
        "schema_version": "1.0",
        "level": "run",
        "run_kind": "experimental",
        "paths": {"local": str(run), "nas": None},
        "sync_status": "pending",
        "validation_overrides": [],
        "created_by": created_by,
    }
    (meta / "creation.json").write_text(json.dumps(creation, indent=2) + "\n")
    return run


def write_dataset(root: Path, spec: Dataset, *, seed: int = 3) -> None:
    """Write the files of ``spec`` under ``root`` (created if needed)."""
    rng = random.Random(seed)
    pool = rng.randbytes(8 * MIB)
    made: set[Path] = set()
    for index, (rel, size) in enumerate(spec.files):
        path = root / rel
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        offset = rng.randrange(len(pool) - MIB)
        with open(path, "wb") as handle:
            written = 0
            header = index.to_bytes(8, "little")  # every file differs, even if the pool slice repeats
            handle.write(header[: min(8, size)])
            written = min(8, size)
            while written < size:
                chunk = min(size - written, len(pool) - offset)
                handle.write(pool[offset : offset + chunk])
                written += chunk
                offset = 0 if offset + chunk >= len(pool) else offset + chunk


def work_dir(value: str) -> str:
    """``--dir``'s argparse type: an existing folder, as an absolute path; else a one-line usage error."""
    path = os.path.abspath(value)
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{value}: no such folder (create it first)")
    return path


# --------------------------------------------------------------------------- timing


def timed(func: Callable[[], object]) -> tuple[float, object]:
    """``(wall seconds, result)`` of ``func()``."""
    start = time.perf_counter()
    result = func()
    return time.perf_counter() - start, result


def sh(argv: Sequence[str | os.PathLike[str]], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run a command, raise with its stderr when it fails; return stdout."""
    done = subprocess.run(
        [os.fspath(a) for a in argv],
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({done.returncode}): {done.stderr.strip()[:2000]}")
    return done.stdout


def run_measured(
    argv: Sequence[str | os.PathLike[str]], *, env: dict[str, str] | None = None
) -> tuple[float, int, str]:
    """Run a child to completion: ``(wall s, its own peak RSS in bytes, stdout)``.

    The peak RSS comes from ``wait4`` of that one child (not the benchmark's).
    Raises ``RuntimeError`` when it exits non-zero.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        [os.fspath(a) for a in argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=None if env is None else {**os.environ, **env},
    )
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        said = (err.decode(errors="replace")[-3000:] + " " + out.decode(errors="replace")[-1000:]).strip()
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {said}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return wall, usage.ru_maxrss * scale, out.decode()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs > 0 else float("inf")


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def fmt_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def interleave(
    names: Sequence[str],
    methods: Sequence[str],
    repeat: int,
    actions: dict[str, Callable[[Path], object]],
    runs: dict[str, Path],
    labels: dict[str, str],
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[dict]]]]:
    """Time every method on every dataset ``repeat`` times, rotating the order each round.

    An action returns seconds, or ``(seconds, info)`` for our engine; returns
    the times and the infos per dataset and method.
    """
    times: dict[str, dict[str, list[float]]] = {n: {m: [] for m in methods} for n in names}
    extra: dict[str, dict[str, list[dict]]] = {n: {m: [] for m in methods} for n in names}
    width = max(len(labels[m]) for m in methods)
    for rep in range(repeat):
        for name in names:
            order = [*methods[rep % len(methods) :], *methods[: rep % len(methods)]]
            for method in order:
                result = actions[method](runs[name])
                if isinstance(result, tuple):
                    seconds, info = result
                    extra[name][method].append(info)
                else:
                    seconds = result
                times[name][method].append(seconds)
                print(f"  [{rep + 1}/{repeat}] {name:5s} {labels[method]:{width}s} {seconds:7.2f} s", flush=True)
    return times, extra
