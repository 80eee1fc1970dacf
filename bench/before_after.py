"""A transport before and after a change, in one run: this checkout's engine, another checkout's, the anchor.

Uses ``run_all.py``'s methods as they are (the engine in a child process,
enqueue to VERIFIED; every copy to a fresh loop-mounted ext4; each timed
measurement under ``/tmp/exlab-bench.lock``), with one more method: ``Rb``
(rsync_ssh) or ``Mb`` (mount), the same engine run from ``--before-src``
(default ``/work/main/src``). Prints the medians and the ratios to the
anchor: the bare ``rsync -a --checksum`` (RR), or the durable verified
rclone copy (MA) for the mount transport.

    PYTHONPATH=$PWD/src .venv/bin/python bench/before_after.py --datasets small,mixed,big --repeat 3
    PYTHONPATH=$PWD/src .venv/bin/python bench/before_after.py --transport mount --before-src /tmp/old/src
    PYTHONPATH=$PWD/src .venv/bin/python bench/before_after.py --transport mount --datasets files50000

``filesN``: N files of 1 KiB, 500 to a folder (the peak-memory dataset of ``run_all``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(1, str(_HERE.parent))

import run_all  # noqa: E402
from common import dataset, median, run_measured  # noqa: E402

__all__ = ["main"]


class BeforeAfter(run_all.Transports):
    """run_all's transports plus ``Rb``: rsync_ssh by the engine of another source tree."""

    before_src = "/work/main/src"

    def _engine_before(self, argv: list[str], _profile: Path | None) -> tuple[float, dict]:
        _wall, _rss, out = run_measured(
            [sys.executable, str(run_all.ENGINE), *argv], env={"PYTHONPATH": self.before_src}
        )
        info = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        if info.get("state") != "verified":
            raise RuntimeError(f"the engine ({self.before_src}) did not verify: {info}")
        return info["verified_s"], info

    def _m_Rb(self, run: Path, dest: Path, profile: Path | None) -> tuple[float, dict]:
        self._engine = self._engine_before  # type: ignore[method-assign]
        try:
            return self._network("rsync_ssh", run, dest, profile)
        finally:
            del self._engine

    def _m_Mb(self, run: Path, dest: Path, profile: Path | None) -> tuple[float, dict]:
        self._engine = self._engine_before  # type: ignore[method-assign]
        try:
            return self._m_M(run, dest, profile)
        finally:
            del self._engine


def _dataset(name: str):
    """A dataset of ``common`` by name, or ``filesN``: N files of 1 KiB (``run_all.many_files``)."""
    return run_all.many_files(int(name[5:])) if name.startswith("files") else dataset(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="small,mixed,big")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before-src", default=BeforeAfter.before_src)
    parser.add_argument("--transport", choices=("rsync_ssh", "mount"), default="rsync_ssh")
    args = parser.parse_args(argv)
    methods = ["R", "Rb", "RR"] if args.transport == "rsync_ssh" else ["M", "Mb", "MA"]
    now, before, anchor = methods
    run_all.NETWORK = (*run_all.NETWORK, "Rb")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with run_all.transports_bench(BeforeAfter, "exlab-bench-ba", use_lock=True) as bench:
        bench.before_src = args.before_src
        specs = {name: _dataset(name) for name in args.datasets.split(",")}
        runs = {name: bench.add_run(name, spec) for name, spec in specs.items()}
        subprocess.run(["sync"], check=True)
        if args.transport == "rsync_ssh":
            bench.start_sshd()
        times: dict[str, dict[str, list[float]]] = {name: {m: [] for m in methods} for name in runs}
        for rep in range(args.repeat):
            for name, run in runs.items():
                for method in methods[rep % 3 :] + methods[: rep % 3]:
                    seconds, _info = bench.measure(method, run, specs[name])
                    times[name][method].append(seconds)
                    print(f"  [{rep + 1}/{args.repeat}] {name} {method} {seconds:.2f} s", flush=True)
        for name, by_method in times.items():
            med = {m: median(v) for m, v in by_method.items()}
            print(
                f"{name}: {now} {med[now]:.2f} s, {before} {med[before]:.2f} s, {anchor} {med[anchor]:.2f} s;"
                f" {now}/{anchor} {med[now] / med[anchor]:.2f}, {before}/{anchor} {med[before] / med[anchor]:.2f}"
                f" (runs {json.dumps({m: [round(x, 2) for x in v] for m, v in by_method.items()})})"
            )
        return 0


if __name__ == "__main__":
    sys.exit(main())
