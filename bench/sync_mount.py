"""Benchmark: our engine on the mount transport against cp, sha256sum and rclone.

Generates, in one run and in a temporary folder (removed at the end), three
runs (see ``bench/common.py``): ``big`` (1 GiB of 64 MiB files), ``small``
(20,000 x 4 KiB in 100 folders) and ``mixed`` (200 x 2 MiB, 2,000 x 16 KiB,
3 x 128 MiB). For each, interleaved ``--repeat`` times on the same warm
source, it times copying the whole run folder to a "NAS" folder on the same
disk by:

  (a) our engine: ``NASSyncClient`` on the mount transport, enqueue to
      VERIFIED (gate, copy with hashing, durable files, remote manifest read
      past the page cache, compare, checksums.sha256), in a child process
      (``bench/_engine_run.py``) whose peak RSS is reported;
  (b) ``cp -a`` then ``sync``: the unverified copy;
  (c) ``cp -a`` then coreutils ``sha256sum`` of source and destination, and
      a compare of the two lists: the careful user's script;
  (d) ``rclone copy --checksum`` then ``rclone check`` with SHA-256 on both
      sides (``RCLONE_LOCAL_HASHES=sha256``), then ``sync -f``: a durable,
      verified copy, as ours is.

Every measurement writes into a filesystem made for it (``fresh_fs.py``: a
loop-mounted ext4 when root, else a new folder kept until the end), so no
method pays for the inodes another one freed. ``bench/run_all.py`` runs this
comparison with the disk's floor beside it and writes ``bench/RESULTS.md``. It also measures the local hashing rate of
``exlab_wizard.sync.verifier.hash_tree`` on 2 threads over the warm big run.
Prints medians, the ratios ours/(b) and ours/(d), and the targets of issue 3:
big and mixed <= 0.8x (d) and <= 2.2x (b); small <= 0.8x (d); hashing
>= 1.5 GB/s; peak memory < 100 MB for small. Exit 0 when all are met.

    .venv/bin/python bench/sync_mount.py [--scale 1] [--repeat 3] [--datasets big,small,mixed] [--dir DIR]

A smoke run: ``--scale 0.05 --repeat 1`` (well under a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    DATASETS,
    dataset,
    fmt_bytes,
    interleave,
    median,
    new_run,
    ratio,
    run_measured,
    sh,
    timed,
    work_dir,
    write_dataset,
)
from fresh_fs import FreshFs

from exlab_wizard.sync.transports.rclone import rclone_binary
from exlab_wizard.sync.verifier import hash_tree

__all__ = ["main"]

EQUIPMENT = "BENCH_01"
MARKER = ".exlab-nas"
METHODS = ("a", "b", "c", "d")
LABELS = {
    "a": "(a) ours, enqueue->VERIFIED",
    "b": "(b) cp -a + sync",
    "c": "(c) cp -a + sha256sum x2",
    "d": "(d) rclone copy+check sha256+sync",
}
#: (max ours/(d), max ours/(b)) per dataset; None = no target.
TARGETS = {"big": (0.8, 2.2), "small": (0.8, None), "mixed": (0.8, 2.2)}
HASH_TARGET_GBPS = 1.5
RSS_TARGET_MB = 100

_CHECK_SCRIPT = r"""
set -e
cp -a -- "$1" "$2"
(cd -- "$1" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) > "$3.src"
(cd -- "$2" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) > "$3.dst"
cmp -s -- "$3.src" "$3.dst"
"""


class Bench:
    def __init__(self, base: Path, rclone: str):
        self.base = base
        self.local_root = base / "lab"
        self.rclone = rclone
        self.fs = FreshFs(base / "fresh")
        self.counter = 0
        self.sizes: dict[Path, tuple[int, int]] = {}

    def make_run(self, name: str, scale: float) -> Path:
        run = new_run(self.local_root, EQUIPMENT, name, "bench/sync_mount.py")
        write_dataset(run, dataset(name, scale))
        return run

    def fresh(self, run: Path):
        """An empty folder on a filesystem of its own for one measurement (see ``fresh_fs.py``)."""
        if run not in self.sizes:
            files = [os.path.join(d, f) for d, _s, fs in os.walk(run) for f in fs]
            self.sizes[run] = (len(files), sum(os.path.getsize(f) for f in files))
        files, size = self.sizes[run]
        sh(["sync"])  # no write-back of one measurement spills into the next
        return self.fs.make(run.name[-5:], files=files + 100, data_bytes=size)

    def ours(self, run: Path) -> tuple[float, dict]:
        self.counter += 1
        state = self.base / f"state-{self.counter}"
        with self.fresh(run) as mount:
            (mount / MARKER).write_text("benchmark share\n")
            _wall, rss, out = run_measured(
                [
                    sys.executable,
                    Path(__file__).resolve().parent / "_engine_run.py",
                    "--run",
                    run,
                    "--local-root",
                    self.local_root,
                    "--mount",
                    mount,
                    "--state",
                    state,
                    "--equipment",
                    EQUIPMENT,
                ]
            )
        result = json.loads(out.strip().splitlines()[-1])
        result["rss"] = result.get("peak_rss") or rss  # the child's own VmHWM: wait4's includes ours
        return result["verified_s"], result

    def cp_sync(self, run: Path) -> float:
        with self.fresh(run) as dest:
            target = dest / run.name
            return timed(lambda: sh(["sh", "-c", 'cp -a -- "$1" "$2" && sync -f "$2"', "sh", run, target]))[0]

    def cp_sha256sum(self, run: Path) -> float:
        lists = self.base / f"lists-{self.counter}"
        self.counter += 1
        with self.fresh(run) as dest:
            target = dest / run.name
            return timed(lambda: sh(["bash", "-c", _CHECK_SCRIPT, "bash", run, target, lists]))[0]

    def rclone_copy_check(self, run: Path) -> float:
        env = {"RCLONE_LOCAL_HASHES": "sha256", "RCLONE_CONFIG": os.devnull}
        base = [self.rclone, "--config", os.devnull]
        with self.fresh(run) as dest:
            target = dest / run.name

            def all_three() -> None:
                sh([*base, "copy", "--checksum", run, target], env=env)
                sh([*base, "check", run, target], env=env)
                sh(["sync", "-f", target])

            return timed(all_three)[0]


def hashing_rate(run: Path, repeat: int) -> tuple[float, int]:
    """(GB/s, bytes) of hash_tree on 2 threads over a warm run."""
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _s, fs in os.walk(run) for f in fs)
    hash_tree(run, threads=2)  # warm
    times = [timed(lambda: hash_tree(run, threads=2))[0] for _ in range(repeat)]
    return size / median(times) / 1e9, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="dataset size factor (0.05 for a smoke run)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default=",".join(METHODS), help="subset of a,b,c,d")
    parser.add_argument("--dir", type=work_dir, default=None, help="work here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args(argv)
    names = [n for n in args.datasets.split(",") if n]
    methods = [m for m in args.methods.split(",") if m]
    for name in names:
        dataset(name)  # validates the name
    if set(methods) - set(METHODS):
        parser.error(f"--methods: choose from {','.join(METHODS)}")

    base = Path(tempfile.mkdtemp(prefix="exlab-bench-mount-", dir=args.dir))
    try:
        bench = Bench(base, rclone_binary())
        runs: dict[str, Path] = {}
        for name in names:
            took, run = timed(lambda name=name: bench.make_run(name, args.scale))
            runs[name] = run
            print(f"generated {dataset(name, args.scale)} in {took:.1f} s", flush=True)
        sh(["sync"])

        actions = {"a": bench.ours, "b": bench.cp_sync, "c": bench.cp_sha256sum, "d": bench.rclone_copy_check}
        times, infos = interleave(names, methods, args.repeat, actions, runs, LABELS)
        extra = {n: infos[n].get("a", []) for n in names}
        for name in names:
            for info in extra[name]:
                if info.get("state") != "verified":
                    raise RuntimeError(f"engine did not verify {name}: {info}")

        rate = size = None
        if "big" in runs:
            rate, size = hashing_rate(runs["big"], max(3, args.repeat))

        ok = True
        report: dict[str, dict] = {"scale": args.scale, "repeat": args.repeat, "datasets": {}}
        print()
        print(f"medians of {args.repeat} interleaved runs, scale {args.scale}, warm source cache")
        header = f"{'dataset':7s} " + " ".join(f"{'(' + m + ')':>8s}" for m in methods)
        header += f" {'a/b':>6s} {'a/d':>6s} {'a idle':>7s} {'peak RSS':>9s}  targets"
        print(header)
        for name in names:
            med = {m: median(times[name][m]) for m in methods}
            line = f"{name:7s} " + " ".join(f"{med[m]:7.2f}s" for m in methods)
            a_b = ratio(med["a"], med["b"]) if {"a", "b"} <= set(methods) else None
            a_d = ratio(med["a"], med["d"]) if {"a", "d"} <= set(methods) else None
            line += f" {a_b:6.2f}" if a_b is not None else f" {'-':>6s}"
            line += f" {a_d:6.2f}" if a_d is not None else f" {'-':>6s}"
            idle = median([i["idle_s"] for i in extra[name]]) if extra[name] else None
            rss = max((i["rss"] for i in extra[name]), default=None)
            line += f" {idle:6.2f}s" if idle is not None else f" {'-':>7s}"
            line += f" {rss / 1e6:7.1f}MB" if rss is not None else f" {'-':>9s}"
            max_d, max_b = TARGETS[name]
            verdicts = []
            if a_d is not None:
                verdicts.append(f"a/d<={max_d}: {'met' if a_d <= max_d else 'MISSED'}")
                ok &= a_d <= max_d
            if max_b is not None and a_b is not None:
                verdicts.append(f"a/b<={max_b}: {'met' if a_b <= max_b else 'MISSED'}")
                ok &= a_b <= max_b
            if name == "small" and rss is not None:
                verdicts.append(f"RSS<{RSS_TARGET_MB}MB: {'met' if rss < RSS_TARGET_MB * 1e6 else 'MISSED'}")
                ok &= rss < RSS_TARGET_MB * 1e6
            print(line + "  " + ", ".join(verdicts))
            report["datasets"][name] = {
                "files": len(dataset(name, args.scale).files),
                "bytes": dataset(name, args.scale).total_bytes,
                "times": times[name],
                "medians": med,
                "a_over_b": a_b,
                "a_over_d": a_d,
                "a_idle_median": idle,
                "a_peak_rss_bytes": rss,
            }
        if rate is not None:
            verdict = "met" if rate >= HASH_TARGET_GBPS else "MISSED"
            print(
                f"local hashing (verifier.hash_tree, 2 threads, warm, {fmt_bytes(size)}): "
                f"{rate:.2f} GB/s  (target >= {HASH_TARGET_GBPS}: {verdict})"
            )
            ok &= rate >= HASH_TARGET_GBPS
            report["hash_gbps"] = rate
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0 if ok else 1
    finally:
        if "bench" in locals():
            bench.fs.cleanup()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
