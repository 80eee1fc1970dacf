"""Benchmark: ``Validator().audit_tree(root)`` against ``find <root> -type f | wc -l``.

Builds a lab tree of ``--files`` files (default 50,000) in ``--runs`` runs
(default 200): mostly small instrument data files with extensions that are
not content-scanned, plus a share of .txt/.csv/.md/.json files that are, and
each run's ``.exlab-wizard/creation.json``. Then times, interleaved
``--repeat`` times on the same (warm) tree, the audit of the whole tree and
``find``, and prints both medians (wall clock, and CPU time, which a busy
machine disturbs less) and their ratio. Target: the audit within 3x of find.

    .venv/bin/python bench/validator.py [--files 50000] [--runs 200] [--repeat 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exlab_wizard.validator import Validator

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, run as a script or with -m
from common import work_dir

__all__ = ["build_tree", "main"]

# One in 10 files is text the validator scans; the rest are instrument data.
_DATA_EXTS = (".tif", ".czi", ".fcs", ".bin", ".raw", ".nd2", ".lif", ".h5", ".ome.tif")
_TEXT_FILES = (
    ("txt", "operator notes: 2 mM NaCl, <2 mM> MgCl2, temperature 37 C\n" * 4),
    ("csv", "well,od600\n" + "".join(f"A{i},0.{i:03d}\n" for i in range(1, 40))),
    ("md", "---\ntitle: plate read\noperator: asmith\n---\n# Notes\nSee <br> the <plate> layout.\n"),
    ("json", json.dumps({"instrument": "CONFOCAL_01", "settings": {"laser": 488, "gain": 1.5}})),
)


def build_tree(root: Path, files: int, runs: int) -> int:
    """Write the benchmark tree under ``root``; returns the number of files written."""
    per_run = max(1, files // runs)
    written = 0
    for r in range(runs):
        equipment = f"EQUIP_{r % 4:02d}"
        project = f"PROJ-{r % 10:04d}"
        parent, prefix, kind = ("TestRuns", "TestRun_", "test") if r % 5 == 0 else ("Runs", "Run_", "experimental")
        run = root / equipment / project / parent / f"{prefix}2026-01-{r % 28 + 1:02d}_{r:04d}"
        meta = run / ".exlab-wizard"
        meta.mkdir(parents=True)
        (meta / "creation.json").write_text(
            json.dumps(
                {
                    "schema_version": "1.0",
                    "level": "run",
                    "run_kind": kind,
                    "paths": {"local": str(run), "nas": f"//nas/lab/{equipment}"},
                    "sync_status": "pending",
                    "validation_overrides": [],
                }
            )
        )
        written += 1
        folders = [run / f"tile_{t:02d}" for t in range(5)]
        for folder in folders:
            folder.mkdir()
        for i in range(per_run - 1):
            folder = folders[i % len(folders)]
            if i % 10 == 0:
                ext, text = _TEXT_FILES[(i // 10) % len(_TEXT_FILES)]
                (folder / f"notes_{i:05d}.{ext}").write_text(text)
            else:
                (folder / f"img_{i:05d}{_DATA_EXTS[i % len(_DATA_EXTS)]}").write_bytes(b"\x00\x01" * 32)
            written += 1
    return written


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time_find(root: Path) -> tuple[float, float, int]:
    """(wall s, CPU s of find and wc, files counted)."""
    cpu = _children_cpu()
    start = time.perf_counter()
    out = subprocess.run(f"find '{root}' -type f | wc -l", shell=True, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, _children_cpu() - cpu, int(out.stdout.strip())


def _time_audit(root: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, findings)."""
    validator = Validator()
    cpu = time.process_time()
    start = time.perf_counter()
    findings = validator.audit_tree(root)
    return time.perf_counter() - start, time.process_time() - cpu, len(findings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=work_dir, default=None, help="build the tree here (default: a temporary folder)")
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="exlab-bench-validator-", dir=args.dir))
    try:
        root = base / "lab"
        started = time.perf_counter()
        count = build_tree(root, args.files, args.runs)
        print(f"tree: {count} files in {args.runs} runs under {root} (built in {time.perf_counter() - started:.1f} s)")
        _time_find(root)  # warm the page cache and dentry cache for both
        _time_audit(root)
        audits, finds, audit_cpu, find_cpu = [], [], [], []
        for _ in range(args.repeat):
            wall, cpu, findings = _time_audit(root)
            audits.append(wall)
            audit_cpu.append(cpu)
            wall, cpu, found = _time_find(root)
            finds.append(wall)
            find_cpu.append(cpu)
        audit_median, find_median = statistics.median(audits), statistics.median(finds)
        ratio = audit_median / find_median
        cpu_ratio = statistics.median(audit_cpu) / max(statistics.median(find_cpu), 1e-9)
        print(
            f"find -type f | wc -l : median {find_median * 1000:8.1f} ms wall, "
            f"{statistics.median(find_cpu) * 1000:6.1f} ms CPU  ({found} files)"
        )
        print(
            f"Validator.audit_tree : median {audit_median * 1000:8.1f} ms wall, "
            f"{statistics.median(audit_cpu) * 1000:6.1f} ms CPU  ({findings} findings)"
        )
        print(
            f"ratio audit/find     : {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU  (target <= 3x wall) -> "
            f"{'OK' if ratio <= 3 else 'SLOW'}"
        )
        return 0 if ratio <= 3 else 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
