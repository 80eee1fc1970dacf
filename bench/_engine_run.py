"""Child process of the sync benchmarks: one run through NASSyncClient, enqueue to VERIFIED.

Run in its own process so its peak RSS (``wait4``) is the engine's alone.

    python bench/_engine_run.py --run RUN --local-root ROOT --mount MOUNT --state DIR [--equipment EQ]
    python bench/_engine_run.py --run RUN --config CONFIG.json

The run must lie at ``<ROOT>/<EQ>/...`` and hold ``.exlab-wizard/creation.json``;
``MOUNT`` must hold the mount marker ``.exlab-nas``. ``--config`` takes a whole
config document (JSON) instead, for the network transports. Prints one JSON line:
``{"init_s", "verified_s" (enqueue to VERIFIED), "idle_s" (enqueue to no
work left, i.e. after the refreshed .exlab-wizard/ was pushed), "state"}``.
Exit 1 when the job did not reach VERIFIED.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

from exlab_wizard.cache import CreationWriter
from exlab_wizard.config import parse_config
from exlab_wizard.sync.nas_client import NASSyncClient
from exlab_wizard.validator import Validator


def _config(args: argparse.Namespace):
    if args.config is not None:
        return parse_config(json.loads(args.config.read_text()))
    return parse_config(
        {
            "equipment": [
                {
                    "id": args.equipment,
                    "local_root": str(args.local_root),
                    "transport": {"type": "mount", "mount_path": str(args.mount)},
                }
            ],
            "state_dir": str(args.state),
        }
    )


async def _main(args: argparse.Namespace) -> dict:
    config = _config(args)
    client = NASSyncClient(
        config=config,
        queue_db=config.queue_db,
        validator=Validator(config.validator),
        cache_creation=CreationWriter(),
    )
    done = asyncio.Event()
    seen: list[str] = []

    def on_event(event: dict) -> None:
        if event.get("type") != "state":
            return
        seen.append(event["state"])
        # queued again after running: a failed attempt waiting for its retry
        if event["state"] in ("verified", "failed") or (event["state"] == "queued" and "running" in seen):
            done.set()

    client.add_listener(on_event)
    start = time.perf_counter()
    await client.init()
    init_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        handle = await client.enqueue(args.run)
        if not handle.job_id:
            return {"state": "blocked", "blocking": [str(f) for f in handle.blocking][:5]}
        await asyncio.wait_for(done.wait(), args.timeout)
        verified_s = time.perf_counter() - start
        await client.wait_idle(args.timeout)
        idle_s = time.perf_counter() - start
        job = await client.job(args.run)
        state = job.state.value if job is not None else "none"
        return {
            "peak_rss": _own_peak_rss(),
            "init_s": init_s,
            "verified_s": verified_s,
            "idle_s": idle_s,
            "state": state,
            "last_error": getattr(job, "last_error", None),
        }
    finally:
        await client.close()


def _own_peak_rss() -> int:
    """This process's own peak RSS in bytes (``VmHWM``), 0 where /proc is missing.

    ``wait4``'s ``ru_maxrss`` is no good for this: Linux carries the parent's
    high-water mark into a child across ``exec``, so a child of a 300 MB
    benchmark process reports at least 300 MB.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cap_malloc_arenas(arenas: int = 2) -> None:
    """glibc's malloc arenas capped before any thread starts, as ``exlab-sync serve`` runs the engine.

    Uncapped, each copy thread's arena keeps the dict tables freed in it (7 to 16 MB more at 200,000
    files). Done here with ``mallopt`` rather than by importing the service's
    ``cap_malloc_arenas``: that import alone adds ~12 MB the engine does not need.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).mallopt(ctypes.c_int(-8), ctypes.c_int(arenas))  # M_ARENA_MAX
        except (OSError, AttributeError):
            pass  # another C library: nothing to cap


class _PeakTracer:
    """With ``EXLAB_BENCH_TRACEMALLOC=FILE``: the Python allocation sites alive at the traced peak.

    Polls ``tracemalloc`` twice a second and keeps a snapshot each time the
    traced total has grown by 15 %; at the end writes the largest snapshot's
    top sites, each named by its innermost ``exlab_wizard`` frame, as JSON.
    """

    def __init__(self, out: str):
        self.out = out
        self.best: tracemalloc.Snapshot | None = None
        self.best_size = 0
        self.stop = threading.Event()
        tracemalloc.start(8)
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            current, _peak = tracemalloc.get_traced_memory()
            if current > self.best_size * 1.15:
                self.best, self.best_size = tracemalloc.take_snapshot(), current
        current, _peak = tracemalloc.get_traced_memory()
        if current > self.best_size:
            self.best, self.best_size = tracemalloc.take_snapshot(), current

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()
        _current, peak = tracemalloc.get_traced_memory()
        sites: dict[str, list[int]] = {}
        assert self.best is not None
        for stat in self.best.statistics("traceback"):
            frames = list(stat.traceback)  # oldest call first, the allocation last
            ours = [f for f in frames if "exlab_wizard" in f.filename]
            frame = (ours or frames)[-1]
            inner = frames[-1]
            where = f"{_short(frame.filename)}:{frame.lineno}"
            if inner is not frame:
                where += f" (allocated in {_short(inner.filename)}:{inner.lineno})"
            entry = sites.setdefault(where, [0, 0])
            entry[0] += stat.size
            entry[1] += stat.count
        top = sorted(sites.items(), key=lambda kv: -kv[1][0])[:12]
        with open(self.out, "w") as handle:
            json.dump(
                {
                    "peak": peak,
                    "snapshot_at": self.best_size,
                    "top": [{"where": w, "size": v[0], "count": v[1]} for w, v in top],
                },
                handle,
            )


def _short(filename: str) -> str:
    marker = "exlab_wizard" + os.sep
    return filename[filename.rindex(marker) :] if marker in filename else os.path.basename(filename)


def _absolute(text: str) -> Path:
    """A folder named on the command line, absolute: the config refuses relative paths."""
    return Path(os.path.abspath(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--local-root", type=_absolute)
    parser.add_argument("--mount", type=_absolute)
    parser.add_argument("--state", type=_absolute)
    parser.add_argument("--config", type=Path, help="a whole config document (JSON) instead of the three above")
    parser.add_argument("--equipment", default="BENCH_01")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    if args.config is None and None in (args.local_root, args.mount, args.state):
        parser.error("give --config, or --local-root, --mount and --state")
    _cap_malloc_arenas()
    tracer = _PeakTracer(os.environ["EXLAB_BENCH_TRACEMALLOC"]) if os.environ.get("EXLAB_BENCH_TRACEMALLOC") else None
    result = asyncio.run(_main(args))
    if tracer is not None:
        tracer.finish()
    print(json.dumps(result))
    return 0 if result.get("state") in ("verified",) else 1


if __name__ == "__main__":
    sys.exit(main())
