"""The queue's hot calls with a large queue: ``status()`` latency, enqueue + gate throughput.

    .venv/bin/python bench/queue_bench.py [--rows 100000] [--runs 1000]

Builds a queue of ``--rows`` jobs over 3 equipment (rows written straight into
SQLite, as ``bench/service.py`` does), opens it with ``NASSyncClient`` (sync
disabled, no workers: the rows stay as written) and times:

* ``status(run)`` on random runs of the queue: median and p95 of 2,000 calls;
* ``enqueue(run)`` of ``--runs`` new run folders (``creation.json`` and three
  small files each), one after another: the Pre-Sync Gate (the validator's
  audit of the run, creation.json read and updated) and the queue insert.

Targets: ``status()`` under 1 ms at 100,000 rows; enqueue at most 10 ms a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import service as sbench  # noqa: E402
from common import new_run  # noqa: E402

from exlab_wizard.cache import CreationWriter  # noqa: E402
from exlab_wizard.sync.nas_client import NASSyncClient  # noqa: E402
from exlab_wizard.validator import Validator  # noqa: E402

__all__ = ["measure"]

STATUS_CALLS = 2_000


def _make_runs(local: Path, count: int) -> list[Path]:
    runs = []
    for k in range(count):
        equipment = sbench.EQUIPMENT[k % len(sbench.EQUIPMENT)]
        run = new_run(local, equipment, f"q{k:05d}", "bench/queue_bench.py")
        for name in ("plate.csv", "image_000.tif", "image_001.tif"):
            (run / name).write_bytes(b"0123456789abcdef" * 64)
        runs.append(run)
    return runs


async def measure(base: Path, rows: int, runs: int, use_lock: bool = False) -> dict:
    """Figures in seconds: status median and p95, the whole enqueue of ``runs`` runs."""
    from run_all import bench_lock  # the same lock as every other timed run

    base.mkdir(parents=True, exist_ok=True)
    config, ids = sbench.build(base, rows)
    local = Path(config.equipment[0].local_root)
    new_runs = _make_runs(local, runs)
    client = NASSyncClient(
        config=config, queue_db=config.queue_db, validator=Validator(config.validator), cache_creation=CreationWriter()
    )
    await client.init(run_workers=False)
    try:
        rng = random.Random(5)
        paths = [
            local / sbench.EQUIPMENT[i % 3] / "P" / "Runs" / f"Run_{i}"
            for i in rng.sample(range(rows), min(rows, STATUS_CALLS))
        ]
        for path in paths[:50]:
            await client.status(path)  # warm
        times = []
        with bench_lock(use_lock) if use_lock else contextlib.nullcontext():
            for path in paths:
                start = time.perf_counter()
                state = await client.status(path)
                times.append(time.perf_counter() - start)
                if state == "none":
                    raise RuntimeError(f"status() found no job for {path}")
            times.sort()
            start = time.perf_counter()
            for run in new_runs:
                handle = await client.enqueue(run)
                if not handle.job_id:
                    raise RuntimeError(f"the gate blocked {run}: {handle}")
            enqueue_s = time.perf_counter() - start
    finally:
        await client.close()
    return {
        "status_calls": len(times),
        "status_median_s": statistics.median(times),
        "status_p95_s": times[int(len(times) * 0.95) - 1],
        "enqueue_s": enqueue_s,
        "ids": len(ids),
    }


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=1_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="exlab-bench-queue-") as tmp:
        figures = asyncio.run(measure(Path(tmp), args.rows, args.runs))
    print(
        f"status() at {args.rows:,} rows: median {figures['status_median_s'] * 1e6:.0f} us, "
        f"p95 {figures['status_p95_s'] * 1e6:.0f} us (target < 1 ms)"
    )
    print(
        f"enqueue + gate of {args.runs:,} runs: {figures['enqueue_s']:.2f} s, "
        f"{figures['enqueue_s'] / args.runs * 1000:.1f} ms a run (target <= 10 ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
